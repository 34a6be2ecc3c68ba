"""Supervised contrastive: pytorch-metric-learning 2.x ``SupConLoss``, with its miners, distances and reducer.

Positives by class label; Σ over a row's positives is one class sum (``index_add``), O(n·d), beside the
blockwise row LSE (docs/kernels.md#the-math-two-log-sum-exps).
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from fastcontrast import distributed, reference
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import (
    cast_like_autocast,
    check_backend,
    check_chunk_bytes,
    check_features,
    check_flags,
    check_indices_tuple,
    check_labels,
    check_pair,
    check_positive_temperature,
    values_readable,
)
from fastcontrast.autograd import BlockwiseLogSumExp, pair_dots
from fastcontrast.engine import compute_dtype
from fastcontrast.losses._common import normalize_rows


def _supcon_anchor_losses(
    z: torch.Tensor,
    labels: torch.Tensor,
    z_ref: torch.Tensor,
    ref_labels: torch.Tensor,
    inv_temperature: torch.Tensor,
    engine,
    *,
    exclude_offset: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-anchor SupCon losses of unit rows z against unit references z_ref, with no n×m tensor.

    With S = z·z_refᵀ/τ, rᵢ the row LSE (entry (i, i + exclude_offset) left out when given) and P(i) the
    references of label yᵢ (that entry left out too): lossᵢ = −(Σ_{p∈P(i)} Sᵢₚ − |P(i)|·rᵢ) / |P(i)|, or 0 when
    P(i) is empty. Σ_{p∈P(i)} Sᵢₚ = zᵢ·(Σ of the reference rows of label yᵢ)/τ: one class sum (``index_add``)
    per label, O((n + m)·d).

    Returns:
        ``(losses [n], positive pairs per anchor [n], negative pairs per anchor [n])``, the counts as floats.
    """
    cdt = compute_dtype(z.dtype)
    n, m = labels.shape[0], ref_labels.shape[0]
    all_labels = torch.cat([labels, ref_labels])
    # A label's id is the position of its first occurrence among the sorted labels: not compact (at most
    # n + m ids), but found without unique(), so shapes stay static (no host sync, no torch.compile break).
    ids = torch.searchsorted(torch.sort(all_labels).values, all_labels)
    anchor_class, ref_class = ids[:n], ids[n:]
    class_count = torch.zeros(n + m, dtype=cdt, device=z.device).index_add_(
        0, ref_class, torch.ones(m, dtype=cdt, device=z.device)
    )
    class_sum = torch.zeros((n + m, z.shape[1]), dtype=cdt, device=z.device).index_add_(0, ref_class, z_ref.to(cdt))
    if engine is None:
        # backend="reference" across ranks (no original to copy): the same terms from the full logits.
        logits = (z.to(cdt) @ z_ref.to(cdt).T) * inv_temperature
        if exclude_offset is not None:
            logits = logits.diagonal_scatter(torch.full_like(logits.diagonal(exclude_offset), float("-inf")),
                                             exclude_offset)
        lse = torch.logsumexp(logits, dim=1)
    else:
        # Embeddings as their own reference set: S = z·zᵀ/τ and its self-mask are symmetric, so an engine may
        # reduce one block triangle only (fastcontrast.blockwise_symmetric; the Triton kernels' SYMMETRIC).
        symmetric = z_ref is z and exclude_offset in (None, 0)
        lse, *_ = BlockwiseLogSumExp.apply(
            z, None if z_ref is z else z_ref, inv_temperature, engine, True, False, None, exclude_offset, False, 0,
            False, symmetric,
        )
    positive_count = class_count[anchor_class]
    negative_count = m - positive_count
    z_c, z_ref_c = z.to(cdt), z_ref.to(cdt)
    positive_sum = (z_c * class_sum[anchor_class]).sum(dim=1)
    if exclude_offset is not None:
        # The left-out entry (i, i + offset) is a positive only where the labels agree (PML drops it from the
        # matches; it can never be a negative).
        cols = torch.arange(n, device=z.device) + exclude_offset
        partner = cols.clamp(0, m - 1)
        twin = (cols >= 0) & (cols < m) & (ref_labels[partner] == labels)
        self_term = torch.where(twin, (z_c * z_ref_c[partner]).sum(dim=1), torch.zeros_like(positive_sum))
        positive_sum = positive_sum - self_term
        positive_count = positive_count - twin.to(cdt)
    positive_sum = positive_sum * inv_temperature
    has_positive = positive_count > 0
    # A row without positives has loss 0 (PML: 0 / (0 + tiny)); where() keeps a −inf LSE (a row with nothing
    # left) from turning 0·(−inf) into NaN.
    mean_log_prob = torch.where(
        has_positive, (positive_sum - positive_count * lse) / positive_count.clamp(min=1), torch.zeros_like(lse)
    )
    return -mean_log_prob, positive_count, negative_count


def _supcon_mined_anchor_losses(
    z: torch.Tensor, z_ref: torch.Tensor, pairs: tuple, inv_temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor SupCon losses over a miner's pairs only, O(P·d) for P pairs (no n×m tensor).

    Anchor i's softmax runs over its mined positives and negatives (each pair once, as PML's masks hold it);
    lossᵢ = −mean over its positives of (Sᵢₚ − LSEᵢ), 0 without positives.

    Returns:
        ``(losses [n], valid)``: ``valid`` a 0-dim bool, False where PML returns its zero losses.
    """
    cdt = compute_dtype(z.dtype)
    n, m = z.shape[0], z_ref.shape[0]
    a1, p, a2, neg = pairs
    # PML writes the pairs into masks: duplicates count once, and a pair may not be both. Duplicates are
    # masked rather than removed (torch.unique's data-dependent size would read a count back to the host
    # every step); the kept pairs are unique's, in its sorted order, so the sums below add the same terms
    # in the same order, plus exact zeros.
    pos_keys, pos_first = _sorted_with_first_occurrence(a1 * m + p)
    neg_keys, neg_first = _sorted_with_first_occurrence(a2 * m + neg)
    both = torch.isin(pos_keys, neg_keys).any()
    message = "`indices_tuple`: each pair should be either positive or negative, not both."
    if values_readable(both):
        if bool(both):
            raise ValueError(message)
    else:
        torch._assert_async(~both, message)
    keys = torch.cat([pos_keys, neg_keys])
    first = torch.cat([pos_first, neg_first])
    rows, cols = keys.div(m, rounding_mode="floor"), keys.remainder(m)
    logits = pair_dots(z, z_ref, rows, cols) * inv_temperature
    # Segment log-sum-exp per anchor, max-subtracted (the max is a constant for the gradient; a duplicate
    # cannot change it).
    row_max = torch.full((n,), float("-inf"), dtype=cdt, device=z.device).scatter_reduce(
        0, rows, logits.detach(), reduce="amax"
    )
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    terms = torch.where(first, torch.exp(logits - shift[rows]), torch.zeros_like(logits))
    sums = torch.zeros(n, dtype=cdt, device=z.device).index_add(0, rows, terms)
    lse = torch.log(sums.clamp(min=torch.finfo(cdt).tiny)) + shift
    n_pos = pos_keys.shape[0]
    pos_rows, pos_logits = rows[:n_pos], logits[:n_pos]
    positive_count = torch.zeros(n, dtype=cdt, device=z.device).index_add(0, pos_rows, pos_first.to(cdt))
    positive_sum = torch.zeros(n, dtype=cdt, device=z.device).index_add(
        0, pos_rows, torch.where(pos_first, pos_logits, torch.zeros_like(pos_logits))
    )
    has_positive = positive_count > 0
    losses = torch.where(
        has_positive, -(positive_sum - positive_count * lse) / positive_count.clamp(min=1), torch.zeros_like(lse)
    )
    # At least one positive and one negative pair: known from the sizes alone, which the host has.
    valid = torch.full((), n_pos > 0 and neg_keys.shape[0] > 0, dtype=torch.bool, device=z.device)
    return losses, valid


def _sorted_with_first_occurrence(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys`` [k] sorted, and a bool [k] that is True at the first of each run of equal keys: what
    ``torch.unique`` keeps, at a size known without reading the data."""
    ordered = torch.sort(keys).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return ordered, first


def _supcon_label_validity(positive_pairs, negative_pairs) -> torch.Tensor:
    """PML's early exits over all label pairs: a positive and a negative pair, and more than one of either."""
    return (positive_pairs > 0) & (negative_pairs > 0) & ((positive_pairs > 1) | (negative_pairs > 1))


def _supcon_reduce(losses, valid, *, total_nonzero=None, world_scale=1.0):
    """PML's AvgNonZeroReducer: the mean over anchors with a loss > 0, and 0 where PML returns its zero losses
    (``valid`` False) or no anchor has a loss > 0. ``total_nonzero`` (all ranks) and ``world_scale`` (W)
    make the per-rank share exact."""
    nonzero = losses > 0
    count = nonzero.sum() if total_nonzero is None else total_nonzero
    value = torch.where(nonzero, losses, torch.zeros_like(losses)).sum() * world_scale / count.clamp(min=1)
    return torch.where(valid & (count > 0), value, torch.zeros_like(value))


def _check_supcon(embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, backend, chunk_bytes):
    """Single-process SupCon inputs checked: ``(embeddings, ref_emb, temperature, pairs, engine)`` with
    autocast's casts applied and ``pairs`` the miner's (a1, p, a2, n) or None."""
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        embeddings, ref_emb = cast_like_autocast(embeddings, ref_emb)
    temperature = check_positive_temperature(temperature)
    check_features("embeddings", embeddings)
    if indices_tuple is None and labels is None:
        raise ValueError("SupConLoss: `labels` is required without `indices_tuple` (one integer label per row).")
    if labels is not None:
        check_labels("labels", labels, rows=embeddings.shape[0], like=embeddings)
    if ref_emb is not None:
        check_features("ref_emb", ref_emb)
        check_pair("embeddings", embeddings, "ref_emb", ref_emb, same_batch=False)
        if ref_labels is not None:
            check_labels("ref_labels", ref_labels, rows=ref_emb.shape[0], like=embeddings)
        elif indices_tuple is None:
            raise ValueError("`ref_emb` and `ref_labels` must be given together (a reference set), or neither.")
    elif ref_labels is not None:
        raise ValueError("`ref_emb` and `ref_labels` must be given together (a reference set), or neither.")
    pairs = None
    if indices_tuple is not None:
        ref_rows = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
        pairs = check_indices_tuple(indices_tuple, rows=embeddings.shape[0], ref_rows=ref_rows, like=embeddings)
    engine = resolve_engine(backend, embeddings.device, embeddings.dtype, chunk_bytes)
    return embeddings, ref_emb, temperature, pairs, engine


def supcon_anchor_losses(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
    indices_tuple: Optional[tuple] = None,
    normalize: bool = True,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-metric-learning's SupCon per-anchor losses (the "element" losses its reducer sees), blockwise.

    Args:
        embeddings, labels, ref_emb, ref_labels, temperature: see :func:`supcon_loss`.
        indices_tuple: a miner's pairs (a1, p, a2, n) or triplets (a, p, n): each anchor's softmax then runs
            over its mined pairs only, O(pairs·d); labels are not needed (may be None).
        normalize: True for PML's ``CosineSimilarity`` (unit rows), False for ``DotProductSimilarity(
            normalize_embeddings=False)`` (raw dot products).
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        ``(losses [n], valid)``: losses fp32 (fp64 for fp64 embeddings; the input dtype for
        ``backend="reference"``); ``valid`` a 0-dim bool tensor, False where PML returns its zero losses
        (its reducers then give 0 whatever the losses).
    """
    embeddings, ref_emb, temperature, pairs, engine = _check_supcon(
        embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, backend, chunk_bytes
    )
    # PML leaves an anchor's own entry out when its labels are the reference labels (no reference set, or
    # the same labels tensor passed again).
    exclude = ref_emb is None or (ref_labels is labels and labels is not None)
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    if engine is None:
        mat = reference.cosine_similarity_reference(embeddings, ref_emb) if normalize else embeddings @ ref_emb.T
        pairs = pairs if pairs is not None else reference.supcon_pairs_reference(labels, ref_labels)
        losses = reference.supcon_anchor_losses_reference(mat, pairs, temperature)
        valid = losses is not None
        losses = losses if valid else torch.zeros(embeddings.shape[0], dtype=mat.dtype, device=mat.device)
        return losses, torch.full((), valid, dtype=torch.bool, device=embeddings.device)
    cdt = compute_dtype(embeddings.dtype)
    # Normalised in fp32, then kept in the input dtype: half embeddings run on the tensor cores.
    z = normalize_rows(embeddings) if normalize else embeddings
    z_ref = z if ref_emb is embeddings else (normalize_rows(ref_emb) if normalize else ref_emb)
    # A fill on the device: torch.tensor(number, device=cuda) would block on a host-to-device copy each step.
    inv_temperature = torch.full((), 1.0 / temperature, dtype=cdt, device=z.device)
    if pairs is not None:
        if all(len(x) <= 1 for x in pairs):  # PML's first early exit counts the pairs as given
            # Zeros that stay in the graph, as PML's sum(embeddings·0) does.
            return (z.to(cdt) * 0).sum(dim=1), torch.zeros((), dtype=torch.bool, device=z.device)
        return _supcon_mined_anchor_losses(z, z_ref, pairs, inv_temperature)
    losses, positives, negatives = _supcon_anchor_losses(
        z, labels, z_ref, ref_labels, inv_temperature, engine, exclude_offset=0 if exclude else None
    )
    return losses, _supcon_label_validity(positives.sum(), negatives.sum())


def supcon_anchor_losses_with_distance(
    distance,
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
    indices_tuple: Optional[tuple] = None,
) -> Optional[torch.Tensor]:
    """PML's per-anchor SupCon losses under any PML ``distance``: the full [n, m] matrix from the distance,
    then PML's masked log-softmax (:func:`fastcontrast.reference.supcon_anchor_losses_reference`).

    The exact path for distances with no blockwise form (``LpDistance``, ``SNRDistance``, custom ones):
    O(n·m) memory, like PML. Returns the losses [n] in the matrix's dtype, or None where PML returns its
    zero losses.
    """
    embeddings, ref_emb, temperature, pairs, _ = _check_supcon(
        embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, "reference", None
    )
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    pairs = pairs if pairs is not None else reference.supcon_pairs_reference(labels, ref_labels)
    if all(len(x) <= 1 for x in pairs):
        return None
    mat = distance(embeddings, ref_emb)
    return reference.supcon_anchor_losses_reference(mat, pairs, temperature, inverted=distance.is_inverted)


def supcon_loss(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
    indices_tuple: Optional[tuple] = None,
    normalize: bool = True,
    gather_distributed: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """pytorch-metric-learning's SupConLoss (multi-positive contrastive loss by label), blockwise.

    Cosine similarity of the normalised embeddings over τ; for each anchor, −mean over its positives (same
    label, itself excluded) of the log-softmax over every other item; averaged over the anchors whose loss is
    > 0; 0 when the batch has no positive pair or no negative pair (PML's rules, see
    :func:`fastcontrast.reference.supcon_loss_reference`). No n×n tensor: the row LSE comes from the core and
    the positive logits from per-class sums of the embeddings.

    Args:
        embeddings: [n, d] (fp16, bf16, fp32 or fp64); labels: [n] integer class labels (None allowed with
            ``indices_tuple``).
        ref_emb, ref_labels: optional [m, d] / [m] reference set: anchors are scored against it, with no
            self-exclusion, as in PML.
        temperature: τ > 0 (PML's default 0.1).
        indices_tuple: a miner's pairs (a1, p, a2, n) or triplets (a, p, n): only those pairs enter each
            anchor's softmax (O(pairs·d)), as in PML's ``indices_tuple``.
        normalize: False for PML's ``DotProductSimilarity(normalize_embeddings=False)``.
        gather_distributed: anchors of this rank against the embeddings of every rank of the group (gathered
            with gradient, labels gathered too), with gradients exact under DDP averaging. Not with a
            reference set or ``indices_tuple``. Without an initialised process group it gathers nothing.
        process_group: the group to gather over (None: the default group); needs ``gather_distributed``.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 embeddings).
    """
    group = distributed.resolve_gather_group(gather_distributed, process_group, what="SupConLoss")
    if group is None:
        if backend == "reference" and normalize:
            _check_supcon(embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, backend, chunk_bytes)
            return reference.supcon_loss_reference(embeddings, labels, temperature, ref_emb, ref_labels,
                                                   indices_tuple=indices_tuple)
        losses, valid = supcon_anchor_losses(
            embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple=indices_tuple,
            normalize=normalize, backend=backend, chunk_bytes=chunk_bytes,
        )
        return _supcon_reduce(losses, valid)
    check_backend(backend)
    if backend != "reference":
        embeddings, ref_emb = cast_like_autocast(embeddings, ref_emb)
    temperature = check_positive_temperature(temperature)
    if ref_emb is not None or ref_labels is not None or indices_tuple is not None:
        raise ValueError(
            "SupConLoss: `gather_distributed=True` takes labels only, not a reference set (`ref_emb`) or a "
            "miner's `indices_tuple` (its indices would refer to this rank's batch alone)."
        )

    def check():
        check_features("embeddings", embeddings)
        if labels is None:
            raise ValueError("SupConLoss: `labels` is required (one integer class label per embedding).")
        check_labels("labels", labels, rows=embeddings.shape[0], like=embeddings)
        return resolve_engine(backend, embeddings.device, embeddings.dtype, chunk_bytes)

    engine, layout = distributed.exchange_layout(group, embeddings, check, what="SupConLoss", name="embeddings")
    cdt = compute_dtype(embeddings.dtype)
    z = normalize_rows(embeddings) if normalize else embeddings
    z_all = distributed.gather_with_grad(z, group, layout)
    labels_all = distributed.gather_without_grad(labels.reshape(-1, 1), group, layout).reshape(-1)
    inv_temperature = torch.full((), 1.0 / temperature, dtype=cdt, device=z.device)
    losses, positives, negatives = _supcon_anchor_losses(
        z, labels, z_all, labels_all, inv_temperature, engine, exclude_offset=layout.offset
    )
    # Each rank's loss is W·(Σ of its nonzero anchor losses)/(nonzero anchors on all ranks), so that the
    # average over ranks, and its gradient under DDP, is the global-batch loss: one all-reduce of counts.
    counts = torch.stack([(losses > 0).sum().to(cdt), positives.sum(), negatives.sum()]).detach()
    distributed.all_reduce_sum(counts, group)
    return _supcon_reduce(losses, _supcon_label_validity(counts[1], counts[2]), total_nonzero=counts[0],
                          world_scale=float(layout.world_size))


def _similarity_of(distance) -> Optional[bool]:
    """For a PML distance the blockwise path computes exactly, its ``normalize`` flag (True: cosine
    similarity, False: raw dot products); None for any other distance. None (PML's default) is cosine."""
    if distance is None:
        return True
    try:
        from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
    except ImportError:  # not a PML distance then, since PML is what defines them
        return None
    # Exact types only: a subclass may override compute_mat.
    if type(distance) not in (CosineSimilarity, DotProductSimilarity) or distance.power != 1:
        return None
    if distance.normalize_embeddings and distance.p != 2:
        return None
    return bool(distance.normalize_embeddings)


class SupConLoss(nn.Module):
    """Drop-in for pytorch-metric-learning 2.x ``SupConLoss(temperature=0.1, **kwargs)``, O(N·d) memory.

    Multi-positive contrastive loss by class label on cosine similarities: for each anchor, −mean over its
    positives (same label, itself excluded) of the log-softmax over every other item, averaged over the
    anchors whose loss is > 0; 0 when the batch has no positive pair or no negative pair (PML's rules).

    Args:
        temperature: τ > 0.
        distance: PML's ``distance=``. ``CosineSimilarity()`` (the default) and ``DotProductSimilarity()``
            run blockwise; any other distance is computed exactly through the distance itself, which builds
            the N×M matrix (a warning says so at construction).
        reducer: PML's ``reducer=``: it receives the per-anchor losses, as in PML. None: PML's default
            ``AvgNonZeroReducer``, computed without host syncs.
        embedding_regularizer, embedding_reg_weight: PML's: the regulariser's loss is added through PML's
            ``MultipleReducers``, as in PML.
        collect_stats: accepted for PML compatibility (fastcontrast keeps no statistics).
        gather_distributed: anchors of this rank against the embeddings of every rank (gathered with gradient),
            exact under DDP averaging; a single process when no group is initialised. Not with a custom
            distance, reducer or regulariser.
        backend, process_group, chunk_bytes: see :class:`ClipLoss` (``process_group`` needs
            ``gather_distributed=True``).

    Any other keyword is a TypeError, as in PML.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        distance=None,
        reducer=None,
        embedding_regularizer=None,
        embedding_reg_weight: float = 1,
        collect_stats: Optional[bool] = None,
        gather_distributed: bool = False,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
    ):
        super().__init__()
        self.temperature = check_positive_temperature(temperature)
        check_flags(gather_distributed=gather_distributed)
        if process_group is not None:
            distributed.resolve_gather_group(gather_distributed, process_group, what="SupConLoss")
        self.gather_distributed = gather_distributed
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.collect_stats = collect_stats
        self.distance = distance
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self._normalize = _similarity_of(distance)
        if distance is not None and not callable(distance):
            raise TypeError(f"SupConLoss: `distance` must be a PML distance, got {type(distance).__name__}.")
        if self._normalize is None and not hasattr(distance, "is_inverted"):
            raise TypeError(
                f"SupConLoss: `distance` must be a PML distance (with `is_inverted`), got {type(distance).__name__}."
            )
        if embedding_regularizer is not None and not callable(embedding_regularizer):
            raise TypeError(
                f"SupConLoss: `embedding_regularizer` must be callable, got {type(embedding_regularizer).__name__}."
            )
        custom = reducer is not None or embedding_regularizer is not None or self._normalize is None
        if custom and gather_distributed:
            raise ValueError(
                "SupConLoss: gather_distributed=True takes the default distance, reducer and no regulariser: "
                "their per-rank shares are only exact for PML's defaults."
            )
        if self._normalize is None:
            warnings.warn(
                f"SupConLoss: distance {type(distance).__name__} has no blockwise form; the loss is computed "
                "exactly through the distance, which builds the full N×M matrix (O(N·M) memory).",
                stacklevel=2,
            )
        self.reducer = self._pml_reducer(reducer) if reducer is not None or embedding_regularizer is not None else None

    def _pml_reducer(self, reducer):
        """PML's ``set_reducer``: the reducer as given (copied), or per sub-loss under ``MultipleReducers``."""
        from pytorch_metric_learning.reducers import AvgNonZeroReducer, DoNothingReducer, MultipleReducers

        if isinstance(reducer, (MultipleReducers, DoNothingReducer)):
            return reducer
        if self.embedding_regularizer is None:
            return copy.deepcopy(reducer)
        names = ("loss", "embedding_reg_loss")
        return MultipleReducers(
            {k: AvgNonZeroReducer() if reducer is None else copy.deepcopy(reducer) for k in names}
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Args: embeddings [n, d]; labels [n] integer (optional with ``indices_tuple``); ``indices_tuple``
        a miner's pairs (a1, p, a2, n) or triplets (a, p, n); optional reference set ref_emb [m, d],
        ref_labels [m] (anchors against it, no self-exclusion). Returns a 0-dim fp32 loss."""
        if self.reducer is None and self._normalize is not None:
            return supcon_loss(
                embeddings, labels, ref_emb, ref_labels, self.temperature, indices_tuple=indices_tuple,
                normalize=self._normalize, gather_distributed=self.gather_distributed,
                process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
            )
        loss_dict = {"loss": self._anchor_losses(embeddings, labels, indices_tuple, ref_emb, ref_labels)}
        if self.embedding_regularizer is not None:
            loss_dict["embedding_reg_loss"] = {
                "losses": self.embedding_regularizer(embeddings) * self.embedding_reg_weight,
                "indices": None, "reduction_type": "already_reduced",
            }
        if self.reducer is None:  # a non-blockwise distance with PML's default reducer
            info = loss_dict["loss"]
            if info["reduction_type"] == "already_reduced":
                return torch.sum(embeddings * 0)
            nonzero = info["losses"] > 0
            return info["losses"][nonzero].mean() if bool(nonzero.any()) else torch.sum(embeddings * 0)
        return self.reducer(loss_dict, embeddings, labels)

    def _anchor_losses(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        """PML's loss dict entry: per-anchor "element" losses, or its zero loss."""
        if self._normalize is not None:
            losses, valid = supcon_anchor_losses(
                embeddings, labels, ref_emb, ref_labels, self.temperature, indices_tuple=indices_tuple,
                normalize=self._normalize, backend=self.backend, chunk_bytes=self.chunk_bytes,
            )
            valid = bool(valid)  # the reducer branches on it, as PML does
        else:
            losses = supcon_anchor_losses_with_distance(
                self.distance, embeddings, labels, ref_emb, ref_labels, self.temperature,
                indices_tuple=indices_tuple,
            )
            valid = losses is not None
        if not valid:
            return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
        return {"losses": losses, "indices": torch.arange(losses.shape[0], device=losses.device),
                "reduction_type": "element"}
