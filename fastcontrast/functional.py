"""The losses as functions: validation, then the differentiable core plus O(n·d) torch ops (DESIGN §2).

Every function here computes its loss in fp32 (fp64 for fp64 inputs) whatever the feature dtype, and
returns gradients in each input's own dtype. None of them allocates an n×m tensor unless
``backend="reference"`` is asked for.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastcontrast import distributed, reference
from fastcontrast._dispatch import check_backend, resolve_engine
from fastcontrast._validation import as_scalar_tensor, cast_like_autocast, check_features, check_pair
from fastcontrast.autograd import (
    blockwise_distill,
    blockwise_lse,
    blockwise_lse_and_positives,
    blockwise_siglip_sum,
    keep_in_graph,
)
from fastcontrast.blockwise import compute_dtype

Scalar = Union[torch.Tensor, float]

TEMPERATURE_EPS = 1e-8


SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


def positive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s·⟨aᵢ, bᵢ⟩ for each row, in the compute dtype (fp32, or fp64 for fp64): [n]."""
    cdt = compute_dtype(a.dtype)
    return (a.to(cdt) * b.to(cdt)).sum(dim=1) * scale.to(cdt)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    return_accuracy: bool = False,
):
    """open_clip's CLIP loss, blockwise: ½[mean(r − p) + mean(c − p)].

    r and c are the row and column log-sum-exps of S = s·I·Tᵀ, p the positive logits s·Iᵢ·Tᵢ.

    Args:
        image_features: [n, d] (fp16, bf16, fp32 or fp64), used as given (open_clip does not normalise).
        text_features: [n, d], same dtype and device.
        logit_scale: the exponentiated scale: a 0-dim or one-element tensor (any float dtype, may require
            grad) or a Python number. A number or CPU tensor must be finite and positive; a CUDA tensor's
            value is not checked, because reading it would cost a host sync every step.
        logit_bias: optional scalar added to every logit. It changes nothing in a softmax, but like in
            open_clip it stays in the graph and gets an exact zero gradient.
        local_loss, gather_with_grad, rank, world_size: open_clip's distributed options, with open_clip's
            meaning in all four flag combinations (the README's "Distributed training" says which give exact
            gradients).
        process_group: the torch.distributed group to gather over (None: the default group). When given,
            the rank and world size come from it; explicit ``rank``/``world_size`` must then agree with it.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        chunk_bytes: logits budget per chunk for the torch engine (bytes).
        return_accuracy: also return retrieval top-1 accuracy from the same forward pass (the kernels keep
            each row's and column's argmax, lowest index on ties): image→text and text→image.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). Across processes, ranks may hold different batch sizes;
        the local loss is then weighted by W·n_k/N so that the average over ranks is the global-batch loss.
        With ``return_accuracy``: ``(loss, {"i2t_top1": ..., "t2i_top1": ...})``, the accuracies detached
        fp32 scalars over the rows this rank scores (all N for the global loss, its own rows for the local
        loss).
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features = cast_like_autocast(image_features, text_features)
    group = distributed.resolve_group(rank, world_size, process_group, what="ClipLoss")
    if group is not None:
        return _clip_loss_distributed(
            image_features, text_features, logit_scale, logit_bias, group,
            local_loss=local_loss, gather_with_grad=gather_with_grad,
            backend=backend, chunk_bytes=chunk_bytes, return_accuracy=return_accuracy,
        )
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
    bias = as_scalar_tensor("logit_bias", logit_bias, like=image_features, must_be_positive=False)
    engine = resolve_engine(backend, image_features.device, chunk_bytes)
    return _clip_loss_square(image_features, text_features, scale, bias, engine, return_accuracy)


def _clip_loss_square(image, text, scale, bias, engine, return_accuracy):
    """The full n×n CLIP loss (one process, or every rank's gathered global loss), with accuracy if asked."""
    diagonal = torch.arange(image.shape[0], device=image.device)
    if engine is None:
        loss = reference.clip_loss_reference(image, text, scale, bias)
        if not return_accuracy:
            return loss
        logits_per_image, logits_per_text = reference.clip_logits_reference(image, text, scale)
        return loss, _top1(logits_per_image.argmax(dim=1), logits_per_text.argmax(dim=1), diagonal)
    lse_row, lse_col, pos, *argmax = blockwise_lse_and_positives(
        image, text, scale, engine, diagonal, rows=True, cols=True, return_argmax=return_accuracy
    )
    loss = keep_in_graph(((lse_row - pos).mean() + (lse_col - pos).mean()) / 2, bias)
    return (loss, _top1(*argmax, diagonal)) if return_accuracy else loss


def _top1(i2t_argmax: torch.Tensor, t2i_argmax: torch.Tensor, target: torch.Tensor) -> dict:
    """Retrieval top-1: the fraction of images whose best text is their own, and of texts likewise."""
    return {
        "i2t_top1": (i2t_argmax == target).float().mean().detach(),
        "t2i_top1": (t2i_argmax == target).float().mean().detach(),
    }


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dist_impl: Optional[str] = None,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """open_clip's SigLIP loss, blockwise: −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n.

    zᵢⱼ = +1 on the diagonal, −1 elsewhere; the division is by n (open_clip's), not n².

    Args:
        image_features: [n, d]; text_features: [n, d], same dtype and device.
        logit_scale: exponentiated scale (see :func:`clip_loss`); logit_bias: scalar or None.
        rank, world_size, process_group: see :func:`clip_loss`.
        dist_impl: ``None``, ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"``. In open_clip these are
            four communication schedules for the same function (text features travel with their gradient to
            every rank); here all four are that same function, computed by one gather of the text features
            with gradient and one rectangular blockwise call with the positives at this rank's offset.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). With unequal batch sizes across ranks the loss is
        weighted by W·n_k/N, as in :func:`clip_loss`.
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features = cast_like_autocast(image_features, text_features)
    if dist_impl not in SIGLIP_DIST_IMPLS:
        raise ValueError(
            f"`dist_impl` must be one of {', '.join(repr(c) for c in SIGLIP_DIST_IMPLS)}, got {dist_impl!r}."
        )
    group = distributed.resolve_group(rank, world_size, process_group, what="SigLipLoss")
    if group is not None:
        return _siglip_loss_distributed(
            image_features, text_features, logit_scale, logit_bias, group,
            backend=backend, chunk_bytes=chunk_bytes,
        )
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
    bias = as_scalar_tensor("logit_bias", logit_bias, like=image_features, must_be_positive=False)
    engine = resolve_engine(backend, image_features.device, chunk_bytes)
    if engine is None:
        return reference.siglip_loss_reference(image_features, text_features, scale, bias)
    total = blockwise_siglip_sum(image_features, text_features, scale, bias, engine, positive_offset=0)
    return total / image_features.shape[0]


def _check_distill_inputs(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                          dist_logit_scale):
    """Validation shared by the one-process and distributed distillation losses: (scale, teacher scale)."""
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    check_features("dist_image_features", dist_image_features)
    check_features("dist_text_features", dist_text_features)
    check_pair("dist_image_features", dist_image_features, "dist_text_features", dist_text_features,
               same_batch=True)
    if dist_image_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            "`dist_image_features` must have the student's batch size (row i is the teacher's view of "
            f"sample i), got {dist_image_features.shape[0]} and {image_features.shape[0]}."
        )
    if dist_image_features.device != image_features.device:
        raise ValueError(
            f"`dist_image_features` must be on the student's device {image_features.device}, "
            f"got {dist_image_features.device}."
        )
    if dist_image_features.dtype != image_features.dtype:
        raise TypeError(
            f"`dist_image_features` must have the student's dtype {image_features.dtype}, got "
            f"{dist_image_features.dtype} (cast the teacher's features, or run both under torch.autocast)."
        )
    scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
    scale_t = as_scalar_tensor("dist_logit_scale", dist_logit_scale, like=image_features, must_be_positive=True)
    return scale, scale_t


def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: Scalar,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's DistillClipLoss, blockwise: (contrastive loss, distillation loss).

    With S = s·I·Tᵀ (student) and T' = s_t·I_t·T_tᵀ (teacher), r / c the row / column LSEs of S, p the
    positive logits and x_r / x_c the rows' / columns' Σ softmax(T')·S:
    contrastive = ½[mean(r − p) + mean(c − p)], distill = ½[mean(r − x_r) + mean(c − x_c)], which is
    open_clip's ½ Σ over both directions of −(softmax(teacher) · log_softmax(student)).sum(1).mean().

    Args:
        image_features, text_features: [n, d] student features (fp16, bf16, fp32 or fp64).
        logit_scale: the student's exponentiated scale (see :func:`clip_loss`).
        dist_image_features, dist_text_features: [n, d_t] teacher features, same dtype and device as the
            student's; d_t may differ from d. They get gradients only if they require grad (open_clip's
            behaviour: its teacher features normally carry none).
        dist_logit_scale: the teacher's exponentiated scale.
        local_loss, gather_with_grad, rank, world_size, process_group: as :func:`clip_loss`; the teacher's
            features are gathered the same way as the student's (open_clip calls ``get_logits`` on both).
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        ``(contrastive_loss, distill_loss)``, 0-dim fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features, dist_image_features, dist_text_features = cast_like_autocast(
            image_features, text_features, dist_image_features, dist_text_features
        )
    group = distributed.resolve_group(rank, world_size, process_group, what="DistillClipLoss")
    if group is not None:
        return _distill_clip_loss_distributed(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features,
            dist_logit_scale, group, local_loss=local_loss, gather_with_grad=gather_with_grad,
            backend=backend, chunk_bytes=chunk_bytes,
        )
    scale, scale_t = _check_distill_inputs(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale
    )
    engine = resolve_engine(backend, image_features.device, chunk_bytes)
    return _distill_clip_loss_square(
        image_features, text_features, scale, dist_image_features, dist_text_features, scale_t, engine
    )


def _distill_clip_loss_square(image, text, scale, image_t, text_t, scale_t, engine):
    """(contrastive, distill) over the full n×n matrices (one process, or the gathered global loss)."""
    if engine is None:
        return reference.distill_clip_loss_reference(image, text, scale, image_t, text_t, scale_t)
    diagonal = torch.arange(image.shape[0], device=image.device)
    lse_row, lse_col, cross_row, cross_col, pos = blockwise_distill(
        image, text, scale, image_t, text_t, scale_t, engine, diagonal
    )
    contrastive = ((lse_row - pos).mean() + (lse_col - pos).mean()) / 2
    distill = ((lse_row - cross_row).mean() + (lse_col - cross_col).mean()) / 2
    return contrastive, distill


def check_temperature(temperature: object) -> float:
    """lightly's rule: |τ| < 1e-8 is an error; a negative τ is accepted, as lightly accepts it."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a float, got {type(temperature).__name__}.")
    if not abs(temperature) >= TEMPERATURE_EPS:  # also catches NaN
        raise ValueError(f"`temperature` must satisfy abs(temperature) >= 1e-8, got {temperature}.")
    return float(temperature)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows like lightly's ``F.normalize(x, dim=1)`` (eps 1e-12), robust in half precision.

    lightly computes the norm in the input dtype; in fp16 the squares of small entries underflow, the norm
    becomes 0 and the row is divided by eps (lightly issue #1259). Normalising in fp32 (fp64 for fp64) and
    casting back avoids that and leaves fp32 results bit-identical.
    """
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=1, eps=1e-12).to(x.dtype)


def nt_xent_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """lightly's NT-Xent (SimCLR) loss, blockwise, without memory bank.

    With z = [normalize(out0); normalize(out1)] (2n rows) and S = z·zᵀ/τ, each row's candidates are the other
    2n−1 rows: loss = mean over 2n rows of (LSE_{j≠i} Sᵢⱼ − S_{i, i±n}).

    Args:
        out0, out1: [n, d] projections of two views, same dtype and device.
        temperature: τ; |τ| < 1e-8 is an error (lightly's rule).
        gather_distributed: lightly's option: negatives from every rank of the group, gathered with
            gradient, labels offset by the rank. Without an initialised process group it gathers nothing.
        process_group: the group to gather over (None: the default group); needs ``gather_distributed``.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). With unequal batch sizes across ranks the loss is
        weighted by W·n_k/N, as in :func:`clip_loss`.
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        out0, out1 = cast_like_autocast(out0, out1)
    temperature = check_temperature(temperature)
    group = distributed.resolve_gather_group(gather_distributed, process_group, what="NTXentLoss")
    if group is not None:
        return _nt_xent_loss_distributed(
            out0, out1, temperature, group, backend=backend, chunk_bytes=chunk_bytes
        )
    check_features("out0", out0)
    check_features("out1", out1)
    check_pair("out0", out0, "out1", out1, same_batch=True)
    engine = resolve_engine(backend, out0.device, chunk_bytes)
    if engine is None:
        return reference.nt_xent_loss_reference(out0, out1, temperature)
    z0 = normalize_rows(out0)
    z1 = normalize_rows(out1)
    z = torch.cat([z0, z1])
    n = out0.shape[0]
    inv_temperature = torch.tensor(1.0 / temperature, dtype=compute_dtype(z.dtype), device=z.device)
    # Row i's positive is the other view of its sample: i + n for the first view, i − n for the second.
    partner = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
    lse, _, pos = blockwise_lse_and_positives(z, None, inv_temperature, engine, partner, exclude_offset=0)
    return (lse - pos).mean()


def nt_xent_memory_bank_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    bank: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """lightly's NT-Xent with a memory bank (MoCo-style), blockwise.

    One direction only: for q = normalize(out0), k = normalize(out1), pᵢ = qᵢ·kᵢ/τ and rᵢ the row LSE of
    q·bankᵀ/τ, loss = mean(logaddexp(p, r) − p). No in-batch negatives; the bank gets no gradient.

    Args:
        out0: [n, d] queries; out1: [n, d] keys.
        bank: [K, d] negatives as read *before* this batch is enqueued (lightly keeps it in fp32).
        temperature, backend, chunk_bytes: see :func:`nt_xent_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        out0, out1 = cast_like_autocast(out0, out1)
    temperature = check_temperature(temperature)
    check_features("out0", out0)
    check_features("out1", out1)
    check_pair("out0", out0, "out1", out1, same_batch=True)
    check_features("bank", bank)
    if bank.shape[1] != out0.shape[1]:
        raise ValueError(
            f"memory bank feature dim must match `out0`'s: bank has shape {tuple(bank.shape)}, "
            f"out0 has dim {out0.shape[1]}."
        )
    engine = resolve_engine(backend, out0.device, chunk_bytes)
    if engine is None:
        return reference.nt_xent_memory_bank_loss_reference(out0, out1, bank, temperature)
    cdt = compute_dtype(out0.dtype)
    # The bank is fp32 (lightly's): queries and keys are normalised and compared in fp32 rather than
    # rounding the bank to half precision, and every gradient term meets in fp32 before the one cast back.
    # The bank never receives a gradient.
    q = F.normalize(out0.to(cdt), dim=1, eps=1e-12)
    k = F.normalize(out1.to(cdt), dim=1, eps=1e-12)
    negatives = bank.detach().to(device=q.device, dtype=cdt)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=cdt, device=q.device)
    lse_bank, _ = blockwise_lse(q, negatives, inv_temperature, engine, rows=True, cols=False)
    pos = positive_logits(q, k, inv_temperature)
    return (torch.logaddexp(pos, lse_bank) - pos).mean()


def check_labels(name: str, labels: object, *, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Class labels: a 1-D integer tensor with one entry per row of the features, on their device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be a 1-D integer torch.Tensor of class labels, got {type(labels).__name__}.")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"`{name}` must have shape [{rows}] (one label per row), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"`{name}` must hold integer class labels, got {labels.dtype}.")
    if labels.device != like.device:
        raise ValueError(f"`{name}` must be on the embeddings' device {like.device}, got {labels.device}.")
    return labels


def check_supcon_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a float, got {type(temperature).__name__}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a finite positive number, got {temperature}.")
    return float(temperature)


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
    cdt = z.dtype
    n, m = labels.shape[0], ref_labels.shape[0]
    all_labels = torch.cat([labels, ref_labels])
    # A label's id is the position of its first occurrence among the sorted labels: not compact (at most
    # n + m ids), but found without unique(), so shapes stay static (no host sync, no torch.compile break).
    ids = torch.searchsorted(torch.sort(all_labels).values, all_labels)
    anchor_class, ref_class = ids[:n], ids[n:]
    class_count = torch.zeros(n + m, dtype=cdt, device=z.device).index_add_(
        0, ref_class, torch.ones(m, dtype=cdt, device=z.device)
    )
    class_sum = torch.zeros((n + m, z.shape[1]), dtype=cdt, device=z.device).index_add_(0, ref_class, z_ref)
    if engine is None:
        # backend="reference" across ranks (no original to copy): the same terms from the full logits.
        logits = (z @ z_ref.T) * inv_temperature
        if exclude_offset is not None:
            logits = logits.diagonal_scatter(torch.full_like(logits.diagonal(exclude_offset), float("-inf")),
                                             exclude_offset)
        lse = torch.logsumexp(logits, dim=1)
    else:
        lse, _ = blockwise_lse(
            z, None if z_ref is z else z_ref, inv_temperature, engine, rows=True, cols=False,
            exclude_offset=exclude_offset,
        )
    positive_count = class_count[anchor_class]
    negative_count = m - positive_count
    positive_sum = (z * class_sum[anchor_class]).sum(dim=1)
    if exclude_offset is not None:
        # The left-out entry (i, i + offset) is a positive only where the labels agree (PML drops it from the
        # matches; it can never be a negative).
        cols = torch.arange(n, device=z.device) + exclude_offset
        partner = cols.clamp(0, m - 1)
        twin = (cols >= 0) & (cols < m) & (ref_labels[partner] == labels)
        self_term = torch.where(twin, (z * z_ref[partner]).sum(dim=1), torch.zeros_like(positive_sum))
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


def _supcon_reduce(losses, positive_pairs, negative_pairs, *, total_nonzero=None, world_scale=1.0):
    """PML's rules: mean over anchors with a loss > 0; 0 without a positive or a negative pair, or with at
    most one of each. ``total_nonzero`` (all ranks) and ``world_scale`` (W) make the per-rank share exact."""
    nonzero = losses > 0
    count = nonzero.sum() if total_nonzero is None else total_nonzero
    value = torch.where(nonzero, losses, torch.zeros_like(losses)).sum() * world_scale / count.clamp(min=1)
    valid = (positive_pairs > 0) & (negative_pairs > 0) & ((positive_pairs > 1) | (negative_pairs > 1)) & (count > 0)
    return torch.where(valid, value, torch.zeros_like(value))


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
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
        embeddings: [n, d] (fp16, bf16, fp32 or fp64); labels: [n] integer class labels.
        ref_emb, ref_labels: optional [m, d] / [m] reference set (both or neither): anchors are scored against
            it, with no self-exclusion, as in PML.
        temperature: τ > 0 (PML's default 0.1).
        gather_distributed: anchors of this rank against the embeddings of every rank of the group (gathered
            with gradient, labels gathered too), with gradients exact under DDP averaging. Not with a
            reference set. Without an initialised process group it gathers nothing.
        process_group: the group to gather over (None: the default group); needs ``gather_distributed``.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 embeddings).
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        embeddings, ref_emb = cast_like_autocast(embeddings, ref_emb)
    temperature = check_supcon_temperature(temperature)
    group = distributed.resolve_gather_group(gather_distributed, process_group, what="SupConLoss")
    if group is not None:
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("SupConLoss: `gather_distributed=True` does not take a reference set (`ref_emb`).")
        return _supcon_loss_distributed(embeddings, labels, temperature, group, backend=backend,
                                        chunk_bytes=chunk_bytes)
    check_features("embeddings", embeddings)
    check_labels("labels", labels, rows=embeddings.shape[0], like=embeddings)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("`ref_emb` and `ref_labels` must be given together (a reference set), or neither.")
    # PML leaves an anchor's own entry out when its labels are the reference labels (no reference set, or
    # the same labels tensor passed again).
    exclude = ref_emb is None or ref_labels is labels
    if ref_emb is not None:
        check_features("ref_emb", ref_emb)
        check_pair("embeddings", embeddings, "ref_emb", ref_emb, same_batch=False)
        check_labels("ref_labels", ref_labels, rows=ref_emb.shape[0], like=embeddings)
    engine = resolve_engine(backend, embeddings.device, chunk_bytes)
    if engine is None:
        return reference.supcon_loss_reference(embeddings, labels, temperature, ref_emb, ref_labels)
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    cdt = compute_dtype(embeddings.dtype)
    z = F.normalize(embeddings.to(cdt), dim=1)
    z_ref = z if ref_emb is embeddings else F.normalize(ref_emb.to(cdt), dim=1)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=cdt, device=z.device)
    losses, positives, negatives = _supcon_anchor_losses(
        z, labels, z_ref, ref_labels, inv_temperature, engine, exclude_offset=0 if exclude else None
    )
    return _supcon_reduce(losses, positives.sum(), negatives.sum())


def _rank_mean(per_row: torch.Tensor, layout: distributed.BatchLayout) -> torch.Tensor:
    """This rank's share of a global-batch mean: the mean over its rows, times W·n_k/N when sizes differ.

    ``per_row`` holds this rank's ``layout.local_rows`` rows. With equal sizes the factor is 1 and this is the
    plain mean (the originals' value, bit for bit); with unequal sizes the average over ranks of these
    values, and of their gradients under DDP, is the mean over all N rows.
    """
    if layout.equal:
        return per_row.mean()
    return per_row.sum() * (layout.world_size / layout.total)


def _clip_loss_distributed(
    image_features, text_features, logit_scale, logit_bias, group, *, local_loss, gather_with_grad, backend,
    chunk_bytes, return_accuracy=False,
):
    """open_clip's gather_features + get_logits + cross-entropy across ranks, blockwise (DESIGN §5).

    Gathers: with grad (autograd all-gather, gradients summed back to their rank); without grad for the
    local loss (the gathered tensors are constants); without grad for the global loss but with the live
    local tensor in its slot. The global loss is the full N×N loss on every rank; the local loss is two
    rectangular row-direction calls, positives at this rank's offset, read from the gathered tensors so that
    gradients take exactly open_clip's routes.
    """

    def check():
        check_features("image_features", image_features)
        check_features("text_features", text_features)
        check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
        scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
        bias = as_scalar_tensor("logit_bias", logit_bias, like=image_features, must_be_positive=False)
        return scale, bias, resolve_engine(backend, image_features.device, chunk_bytes)

    (scale, bias, engine), layout = distributed.exchange_layout(
        group, image_features, check, what="ClipLoss", name="image_features"
    )
    if gather_with_grad:
        gather = distributed.gather_with_grad
    elif local_loss:
        gather = distributed.gather_without_grad
    else:
        gather = distributed.gather_with_local_slot
    all_image = gather(image_features, group, layout)
    all_text = gather(text_features, group, layout)
    if not local_loss:
        return _clip_loss_square(all_image, all_text, scale, bias, engine, return_accuracy)
    start, stop = layout.offset, layout.offset + layout.local_rows
    positive_index = torch.arange(start, stop, device=image_features.device)
    if engine is None:
        loss = reference.clip_loss_local_reference(
            image_features, text_features, all_image, all_text, scale, bias, offset=start
        )
        loss = loss if layout.equal else loss * layout.loss_weight()
        if not return_accuracy:
            return loss
        i2t = (image_features @ all_text.T).argmax(dim=1)
        t2i = (text_features @ all_image.T).argmax(dim=1)
        return loss, _top1(i2t, t2i, positive_index)
    # The positives are read from the gathered tensors (open_clip's labels i + offset), so their gradients
    # take open_clip's routes: back through the gather with grad, nowhere when the copies are constants.
    lse_image, _, pos_image, *image_argmax = blockwise_lse_and_positives(
        image_features, all_text, scale, engine, positive_index, rows=True, cols=False,
        return_argmax=return_accuracy,
    )
    lse_text, _, pos_text, *text_argmax = blockwise_lse_and_positives(
        text_features, all_image, scale, engine, positive_index, rows=True, cols=False,
        return_argmax=return_accuracy,
    )
    loss = (_rank_mean(lse_image - pos_image, layout) + _rank_mean(lse_text - pos_text, layout)) / 2
    loss = keep_in_graph(loss, bias)
    if not return_accuracy:
        return loss
    return loss, _top1(image_argmax[0], text_argmax[0], positive_index)


def _siglip_loss_distributed(
    image_features, text_features, logit_scale, logit_bias, group, *, backend, chunk_bytes
) -> torch.Tensor:
    """open_clip's SigLipLoss across ranks: local images against the texts of every rank (gathered with
    gradient), +1 only against this rank's own texts, summed and divided by the local batch size."""

    def check():
        check_features("image_features", image_features)
        check_features("text_features", text_features)
        check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
        scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
        bias = as_scalar_tensor("logit_bias", logit_bias, like=image_features, must_be_positive=False)
        return scale, bias, resolve_engine(backend, image_features.device, chunk_bytes)

    (scale, bias, engine), layout = distributed.exchange_layout(
        group, image_features, check, what="SigLipLoss", name="image_features"
    )
    all_text = distributed.gather_with_grad(text_features, group, layout)
    if engine is None:
        loss = reference.siglip_loss_reference(
            image_features, all_text, scale, bias, positive_offset=layout.offset
        )
        return loss if layout.equal else loss * layout.loss_weight()
    total = blockwise_siglip_sum(image_features, all_text, scale, bias, engine, positive_offset=layout.offset)
    if layout.equal:
        return total / layout.local_rows
    return total * (layout.world_size / layout.total)


def _nt_xent_loss_distributed(out0, out1, temperature, group, *, backend, chunk_bytes) -> torch.Tensor:
    """lightly's NTXentLoss(gather_distributed=True): the 2n local rows against the 2N rows of every rank
    (gathered with gradient), each row's own entry excluded, the positive in the other view of its sample."""

    def check():
        check_features("out0", out0)
        check_features("out1", out1)
        check_pair("out0", out0, "out1", out1, same_batch=True)
        return resolve_engine(backend, out0.device, chunk_bytes)

    engine, layout = distributed.exchange_layout(group, out0, check, what="NTXentLoss", name="out0")
    normalize = reference.lightly_normalize if engine is None else normalize_rows
    z0 = normalize(out0)
    z1 = normalize(out1)
    z = torch.cat([z0, z1])
    # Each rank contributes its [z0; z1]: the gathered tensor is rank by rank, so this rank's own rows start
    # at 2·offset, and row i's self-similarity is column 2·offset + i.
    views = layout.scaled(2)
    z_all = distributed.gather_with_grad(z, group, views)
    if engine is None:
        z0_all, z1_all = distributed.split_views(z_all, layout, 2)
        loss = reference.nt_xent_loss_gathered_reference(
            z0, z1, z0_all, z1_all, temperature, offset=layout.offset
        )
        return loss if layout.equal else loss * layout.loss_weight()
    inv_temperature = torch.tensor(1.0 / temperature, dtype=compute_dtype(z.dtype), device=z.device)
    n = layout.local_rows
    # Row i's positive is the other view of its sample, in this rank's own block of the gathered tensor.
    partner = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n).add_(views.offset)
    lse, _, pos = blockwise_lse_and_positives(
        z, z_all, inv_temperature, engine, partner, exclude_offset=views.offset
    )
    return _rank_mean(lse - pos, views)


def _distill_clip_loss_distributed(
    image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    group, *, local_loss, gather_with_grad, backend, chunk_bytes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's DistillClipLoss across ranks: student and teacher gathered alike, as in ``ClipLoss``."""

    def check():
        scales = _check_distill_inputs(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale
        )
        return scales, resolve_engine(backend, image_features.device, chunk_bytes)

    ((scale, scale_t), engine), layout = distributed.exchange_layout(
        group, image_features, check, what="DistillClipLoss", name="image_features"
    )
    # The teacher's dim must agree across ranks too, or its gathers would not match: one more tiny exchange.
    distributed.exchange_layout(
        group, dist_image_features, lambda: None, what="DistillClipLoss", name="dist_image_features"
    )
    if gather_with_grad:
        gather = distributed.gather_with_grad
    elif local_loss:
        gather = distributed.gather_without_grad
    else:
        gather = distributed.gather_with_local_slot
    all_image, all_text = gather(image_features, group, layout), gather(text_features, group, layout)
    all_image_t, all_text_t = gather(dist_image_features, group, layout), gather(dist_text_features, group, layout)
    if not local_loss:
        return _distill_clip_loss_square(all_image, all_text, scale, all_image_t, all_text_t, scale_t, engine)
    start, stop = layout.offset, layout.offset + layout.local_rows
    if engine is None:
        student = reference.distill_logits_reference(
            image_features, text_features, scale, all_image, all_text
        )
        teacher = reference.distill_logits_reference(
            dist_image_features, dist_text_features, scale_t, all_image_t, all_text_t
        )
        losses = reference.distill_clip_loss_from_logits_reference(*student, *teacher, offset=start)
        return losses if layout.equal else tuple(loss * layout.loss_weight() for loss in losses)
    positive_index = torch.arange(start, stop, device=image_features.device)
    lse_image, _, cross_image, _, pos_image = blockwise_distill(
        image_features, all_text, scale, dist_image_features, all_text_t, scale_t, engine, positive_index,
        rows=True, cols=False,
    )
    lse_text, _, cross_text, _, pos_text = blockwise_distill(
        text_features, all_image, scale, dist_text_features, all_image_t, scale_t, engine, positive_index,
        rows=True, cols=False,
    )
    contrastive = (_rank_mean(lse_image - pos_image, layout) + _rank_mean(lse_text - pos_text, layout)) / 2
    distill = (_rank_mean(lse_image - cross_image, layout) + _rank_mean(lse_text - cross_text, layout)) / 2
    return contrastive, distill


def _supcon_loss_distributed(embeddings, labels, temperature, group, *, backend, chunk_bytes) -> torch.Tensor:
    """SupCon with the embeddings of every rank as references (gathered with gradient, labels too).

    Each rank scores its own anchors against all N rows (its own entries left out at its offset); its loss is
    W · (Σ of its nonzero anchor losses) / (number of nonzero anchors on all ranks), so that the average over
    ranks, and its gradient under DDP, is the global-batch loss. The count is one all-reduce, without gradient.
    """

    def check():
        check_features("embeddings", embeddings)
        check_labels("labels", labels, rows=embeddings.shape[0], like=embeddings)
        return resolve_engine(backend, embeddings.device, chunk_bytes)

    engine, layout = distributed.exchange_layout(group, embeddings, check, what="SupConLoss", name="embeddings")
    cdt = compute_dtype(embeddings.dtype)
    z = F.normalize(embeddings.to(cdt), dim=1)
    z_all = distributed.gather_with_grad(z, group, layout)
    labels_all = distributed.gather_without_grad(labels.reshape(-1, 1), group, layout).reshape(-1)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=cdt, device=z.device)
    losses, positives, negatives = _supcon_anchor_losses(
        z, labels, z_all, labels_all, inv_temperature, engine, exclude_offset=layout.offset
    )
    counts = torch.stack([(losses > 0).sum().to(cdt), positives.sum(), negatives.sum()]).detach()
    distributed.all_reduce_sum(counts, group)
    return _supcon_reduce(
        losses, counts[1], counts[2], total_nonzero=counts[0], world_scale=float(layout.world_size)
    )
