"""sentence-transformers' in-batch negatives family: ``MultipleNegativesRankingLoss`` (MNRL) and its deprecated
symmetric alias ``MultipleNegativesSymmetricRankingLoss`` (sentence-transformers 6.2.0), blockwise.

A batch is a query column q [n, d], a positive column p [n, d] and k ≥ 0 hard-negative columns neg_j [n, d]
(one row of each per query). With s = ``scale`` and sim = cosine (or dot) similarity, 6.2.0 builds, for each
local query i, the logits of up to four "directions" and reduces them with log-sum-exp:

- ``query_to_doc``: s·sim(qᵢ, ·) over the documents [p; neg_1; …; neg_k] of every rank (candidate order
  column-major across ranks: every rank's p, then every rank's neg_1, …); the positive is column off + i;
- ``query_to_query``: s·sim(qᵢ, ·) over every rank's queries but qᵢ itself;
- ``doc_to_query``: s·sim(pᵢ, ·) over every rank's queries;
- ``doc_to_doc``: s·sim(pᵢ, ·) over every rank's documents but those of query i (column off + i of each
  block);

``joint`` takes one LSE over all of them, ``per_direction`` the mean of the directions' LSEs; the loss is the
mean over local rows of (LSE − s·sim(qᵢ, pᵢ)). A hardness penalty α·stopgrad(sim) is added to selected
``query_to_doc`` negatives (the in-batch ones, the own hard negatives, or both).

Every block is one call of the differentiable core (:class:`~fastcontrast.autograd.BlockwiseLogSumExp`,
either engine), with the self / same-query entries left out through ``exclude_offset``; blocks meet through
``logsumexp`` of their LSEs. A penalised block's logits are (s + α)·sim in value with gradient s·∂sim, so its
LSE is taken at scale s + α and its gradient scaled by s/(s + α) (``lse.detach() + s/(s+α)·(lse −
lse.detach())``): the same value and first derivatives as 6.2.0's ``s·sim + α·sim.detach()``. The own
entries (positive, own hard negatives) are O(n·d) row dot products. Memory is O(n·(1 + k)·d) throughout.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcontrast import distributed, reference
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import (
    cast_like_autocast,
    check_backend,
    check_chunk_bytes,
    check_false_negative_margin,
    check_features,
    check_flags,
    check_pair,
)
from fastcontrast.autograd import BlockwiseLogSumExp
from fastcontrast.distributed import rank_mean
from fastcontrast.engine import compute_dtype
from fastcontrast.losses._masked_lse import guide_masked_lse, pair_sums, rule_similarity

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' ``util.cos_sim`` for dense tensors: the [n, m] cosine-similarity matrix of a [n, d]
    and b [m, d]. As a ``similarity_fct`` it is recognised and never called: the loss runs blockwise."""
    a = a.unsqueeze(0) if a.dim() == 1 else a
    b = b.unsqueeze(0) if b.dim() == 1 else b
    return F.normalize(a, p=2, dim=-1) @ F.normalize(b, p=2, dim=-1).T


def dot_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' ``util.dot_score`` for dense tensors: the [n, m] matrix a·bᵀ. As a
    ``similarity_fct`` it is recognised and never called: the loss runs blockwise."""
    a = a.unsqueeze(0) if a.dim() == 1 else a
    b = b.unsqueeze(0) if b.dim() == 1 else b
    return a @ b.T


def similarity_kind(similarity_fct: object) -> Optional[str]:
    """``"cos_sim"`` / ``"dot_score"`` for fastcontrast's or sentence-transformers' function of that name, else
    None (a custom similarity). sentence-transformers is only looked at when something already imported it."""
    known = {cos_sim: "cos_sim", dot_score: "dot_score"}
    st_util = sys.modules.get("sentence_transformers.util")
    if st_util is not None:
        for name in ("cos_sim", "dot_score"):
            function = getattr(st_util, name, None)
            if function is not None:
                known[function] = name
    try:
        return known.get(similarity_fct)  # type: ignore[call-overload]
    except TypeError:  # an unhashable callable
        return None


def check_mnrl_options(scale: object, directions: object, partition_mode: object, hardness_mode: object,
                       hardness_strength: object) -> tuple[str, ...]:
    """6.2.0's constructor checks, with its exception types (ValueError), and the directions as a tuple."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`scale` must be a float, got {type(scale).__name__}.")
    if not scale > 0:
        raise ValueError(f"Scale must be a positive value: `scale` must be > 0, got {scale}.")
    if isinstance(directions, str):
        raise ValueError(f"`directions` must be a tuple of direction names, got the string {directions!r}; "
                         f"write ({directions!r},).")
    if not directions:
        raise ValueError("At least one direction must be specified (`directions` is empty).")
    directions = tuple(directions)  # type: ignore[arg-type]
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"Invalid directions: {unknown}. Valid: {set(DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError(
            "partition_mode='per_direction' requires every direction's candidate pool to include the positive pair. "
            "'query_to_query' and 'doc_to_doc' only contain same-type similarities and never include the positive, "
            "making the per-direction loss ill-defined. Use partition_mode='joint' instead."
        )
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {set(HARDNESS_MODES)}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, (int, float)):
        raise TypeError(f"`hardness_strength` must be a float, got {type(hardness_strength).__name__}.")
    if hardness_strength < 0.0:
        raise ValueError(f"hardness_strength must be non-negative, got {hardness_strength}.")
    return directions


def _check_columns(embeddings: object) -> list[torch.Tensor]:
    if isinstance(embeddings, torch.Tensor) or not isinstance(embeddings, (list, tuple)):
        raise TypeError(f"`embeddings` must be a list of [batch, dim] tensors (query, positive, negatives...), "
                        f"got {type(embeddings).__name__}.")
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    names = ["embeddings[0] (queries)"] + [f"embeddings[{j}]" for j in range(1, len(embeddings))]
    for name, x in zip(names, embeddings):
        check_features(name, x)
    for name, x in zip(names[1:], embeddings[1:]):
        check_pair(names[0], embeddings[0], name, x, same_batch=True)
    return list(embeddings)


def _softened(lse: torch.Tensor, factor: float) -> torch.Tensor:
    """``lse`` in value, ``factor``·∂lse in gradient: the LSE of a penalised block taken at scale s + α, whose
    gradient 6.2.0 gets at scale s only (its penalty α·sim is detached)."""
    if factor == 1.0:
        return lse
    detached = lse.detach()
    # A block the false-negative mask empties has lse = −inf, and −inf − (−inf) is NaN: keep it −inf.
    return torch.where(torch.isfinite(detached), detached + factor * (lse - detached), lse)


def multiple_negatives_ranking_loss(
    embeddings: Sequence[torch.Tensor],
    scale: float = 20.0,
    similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
    *,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    gather_across_devices: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """sentence-transformers 6.2.0 ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``, blockwise.

    Args:
        embeddings: ``[queries, positives, neg_1, …, neg_k]``, each [n, d] (same n, d, dtype and device), k ≥ 0.
        scale: s > 0, a constant (not learned).
        similarity_fct: :func:`cos_sim` or :func:`dot_score` (fastcontrast's or sentence-transformers') run
            blockwise; any other callable ``(a [n, d], b [m, d]) -> [n, m]`` is called exactly as 6.2.0 does,
            which builds the full matrices (:class:`MultipleNegativesRankingLoss` warns so at construction).
        directions, partition_mode, hardness_mode, hardness_strength: 6.2.0's options (see the module doc).
        gather_across_devices: every rank's rows gathered with gradient; this rank's queries are rows
            rank·n … rank·n + n − 1 of the gathered batch. No process group: a single process, as 6.2.0.
        process_group: the group to gather over (None: the default group); needs ``gather_across_devices``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (6.2.0's full-matrix math).
        chunk_bytes: the torch engine's logits bytes per chunk (None: its default).
        false_negative_margin: fastcontrast's option (6.2.0 has none; off by default): every candidate, in every
            direction, whose similarity to the row exceeds the row's positive similarity sim(qᵢ, pᵢ) by more
            than this margin is left out as a likely false negative (Qwen3-Embedding's rule, ``sim > pos +
            0.1``); the positive pair itself never is. The mask is computed in the tile, on either engine (the Triton
            engine's masked kernels, kernels/masked.py, or the blockwise torch engine).
    Returns:
        0-dim loss, the mean over this rank's queries; fp32 (fp64 for fp64 embeddings).
    """
    directions = check_mnrl_options(scale, directions, partition_mode, hardness_mode, hardness_strength)
    check_false_negative_margin(false_negative_margin)
    check_backend(backend)
    check_flags(gather_across_devices=gather_across_devices)
    columns = _check_columns(embeddings)
    if backend != "reference":
        columns = list(cast_like_autocast(*columns))
    kind = similarity_kind(similarity_fct)
    group = distributed.resolve_gather_group(gather_across_devices, process_group,
                                             what="MultipleNegativesRankingLoss")
    penalty = float(hardness_strength) if hardness_mode is not None else 0.0
    queries = columns[0]

    def check():
        return resolve_engine(backend, queries.device, queries.dtype, chunk_bytes)

    if group is None:
        engine, layout = check(), None
    else:
        engine, layout = distributed.exchange_layout(group, queries, check, what="MultipleNegativesRankingLoss",
                                                     name="embeddings[0]")
    if engine is None or kind is None:
        fct = similarity_fct if kind is None else (cos_sim if kind == "cos_sim" else dot_score)
        gathered = columns if layout is None else [distributed.gather_with_grad(x, group, layout) for x in columns]
        offset = 0 if layout is None else layout.offset
        return reference.mnrl_loss_reference(
            columns[0], gathered[0], gathered[1:], float(scale), fct, directions, partition_mode, hardness_mode,
            penalty, offset=offset, false_negative_margin=false_negative_margin,
        )
    if kind == "cos_sim":
        # Rows normalised once, O(n·d); in fp32 for half inputs (sentence-transformers normalises in the
        # input dtype; for fp32 and fp64 the two are the same numbers).
        columns = [F.normalize(x.to(compute_dtype(x.dtype)), p=2, dim=-1).to(x.dtype) for x in columns]
    gathered = columns if layout is None else [distributed.gather_with_grad(x, group, layout) for x in columns]
    offset = 0 if layout is None else layout.offset
    per_row = _mnrl_rows(columns[0], columns[1], gathered[0], gathered[1:], float(scale), engine, directions,
                         partition_mode, hardness_mode, penalty, offset, false_negative_margin)
    return rank_mean(per_row, layout)


def _mnrl_rows(queries, positives, queries_all, docs_all, scale, engine, directions, partition_mode, hardness_mode,
               penalty, offset, false_negative_margin=None) -> torch.Tensor:
    """Per local row: log Z − positive logit, as 6.2.0 builds them (module doc), from blockwise LSEs.

    queries, positives: this rank's [n, d] (normalised for cos_sim); queries_all: [N, d]; docs_all: every
    rank's [positives, neg_1, …] blocks, each [N, d]; ``offset``: this rank's first row in the gathered batch.
    With ``false_negative_margin``, every block is a guide-masked LSE whose guide is the model's own detached
    similarity, with threshold sim(qᵢ, pᵢ) + margin.
    """
    n = queries.shape[0]
    cdt = compute_dtype(queries.dtype)
    device = queries.device
    # Fills on the device: torch.tensor(number, device=cuda) would block on a host-to-device copy each step.
    s = torch.full((), scale, dtype=cdt, device=device)
    own = torch.arange(offset, offset + n, device=device)

    masked = false_negative_margin is not None
    on_triton = engine.name == "triton"
    if masked:
        # In the arithmetic the rule compares with (masked_lse.rule_similarity): an equal candidate ties.
        threshold = rule_similarity(queries, docs_all[0], offset, backend=engine.name) + false_negative_margin

    def lse(rows, cols, at_scale, exclude_own=False, protect_own=False):
        """Row LSE of at_scale·sim(rows, cols), own column (offset + i) left out (or, under the false-negative
        mask, protected) when asked, or None when nothing is left (a batch of one)."""
        if exclude_own and cols.shape[0] == 1:
            return None
        if masked:
            # The rule compares the model's own similarity: on the torch engine given as the guide (whose entries
            # near the threshold it recomputes as per-pair sums), on Triton the S tile itself.
            guides = (None, None) if on_triton else (rows, cols)
            return guide_masked_lse(rows, cols, *guides, threshold, at_scale,
                                    protect_offset=offset if protect_own else None,
                                    exclude_offset=offset if exclude_own else None, chunk_bytes=engine.chunk_bytes,
                                    backend=engine.name)
        scale_t = s if at_scale == scale else torch.full((), at_scale, dtype=cdt, device=device)
        row, *_ = BlockwiseLogSumExp.apply(rows, cols, scale_t, engine, True, False, None,
                                           offset if exclude_own else None)
        return row

    penalised = penalty > 0.0 and hardness_mode is not None
    in_batch_scale = scale + penalty if penalised and hardness_mode in ("in_batch_negatives", "all_negatives") \
        else scale
    hard_scale = scale + penalty if penalised and hardness_mode in ("hard_negatives", "all_negatives") else scale

    blocks: dict[str, list[torch.Tensor]] = {}
    if in_batch_scale == scale and hard_scale == scale and masked:
        candidates = docs_all[0] if len(docs_all) == 1 else torch.cat(docs_all)
        positive = scale * pair_sums(queries, docs_all[0], offset)
        blocks["query_to_doc"] = [lse(queries, candidates, scale, protect_own=True)]
    elif in_batch_scale == scale and hard_scale == scale:
        # No penalty: one call over all documents, positive taken from the tiles the LSE reduced.
        candidates = docs_all[0] if len(docs_all) == 1 else torch.cat(docs_all)
        # 6.2.0 takes log Z as torch.logsumexp (max + log-sum in one fp32): the plain LSE is its value.
        row, _, positive, *_ = BlockwiseLogSumExp.apply(queries, candidates, s, engine, True, False, own)
        blocks["query_to_doc"] = [row]
    else:
        # Penalised blocks: off-diagonal (in-batch) part per block at its scale, own entries as row dots.
        parts = []
        own_sims = [pair_sums(queries, block, offset) for block in docs_all]
        positive = scale * own_sims[0]
        parts.append(positive)
        for j, block in enumerate(docs_all):
            off_diagonal = lse(queries, block, in_batch_scale, exclude_own=True)
            if off_diagonal is not None:
                parts.append(_softened(off_diagonal, scale / in_batch_scale))
            if j > 0:
                sim = own_sims[j]
                logit = scale * sim + (hard_scale - scale) * sim.detach()
                if masked:
                    rule = sim.detach() if not on_triton else rule_similarity(queries, block, offset,
                                                                              backend=engine.name)
                    logit = logit.masked_fill(rule > threshold, float("-inf"))
                parts.append(logit)
        blocks["query_to_doc"] = parts
    if "query_to_query" in directions:
        blocks["query_to_query"] = [x for x in [lse(queries, queries_all, scale, exclude_own=True)] if x is not None]
    if "doc_to_query" in directions:
        blocks["doc_to_query"] = [lse(positives, queries_all, scale, protect_own=True)]
    if "doc_to_doc" in directions:
        blocks["doc_to_doc"] = [x for x in (lse(positives, block, scale, exclude_own=True) for block in docs_all)
                                if x is not None]

    def combine(parts):
        return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), dim=0)

    if partition_mode == "joint":
        log_z = combine([part for name in DIRECTIONS if name in blocks for part in blocks[name]])
    else:
        log_z = sum(combine(blocks[name]) for name in DIRECTIONS if name in blocks) / len(blocks)
    return log_z - positive


def _embed_columns(model: nn.Module, sentence_features: Iterable[dict]) -> list[torch.Tensor]:
    """6.2.0's ``embed_columns`` (one forward for the query column, one merged forward for the documents where
    their features allow), so that the embeddings, and hence the loss, are the original's bit for bit."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # no sentence-transformers (or another version): one forward per column
        return [model(features)["sentence_embedding"] for features in sentence_features]
    return embed_columns(model, sentence_features)


class MultipleNegativesRankingLoss(nn.Module):
    """Drop-in for sentence-transformers 6.2.0 ``MultipleNegativesRankingLoss``, O(N·(1 + k)·d) memory.

    Same constructor, ``forward(sentence_features, labels)``, ``compute_loss_from_embeddings(embeddings,
    labels)``, ``get_config_dict()``, ``temperature`` and ``citation``; same values and gradients (see
    :func:`multiple_negatives_ranking_loss` and the module doc for what each option computes).

    Args:
        model: the SentenceTransformer (only ``forward`` uses it).
        scale, similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
            hardness_strength: 6.2.0's, same defaults. ``cos_sim`` / ``dot_score`` (this module's or
            sentence-transformers') run blockwise; another ``similarity_fct`` runs as given, building the full
            matrices (a warning says so).
        backend, chunk_bytes: see :func:`multiple_negatives_ranking_loss`.
        process_group: the group ``gather_across_devices`` gathers over (None: the default group).
        false_negative_margin: an option 6.2.0 lacks, off by default: leave out candidates whose similarity
            exceeds the positive's by more than this margin (see :func:`multiple_negatives_ranking_loss`).
    """

    def __init__(
        self,
        model: Optional[nn.Module],
        scale: float = 20.0,
        similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        process_group=None,
        false_negative_margin: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.model = model
        check_false_negative_margin(false_negative_margin)
        self.false_negative_margin = false_negative_margin
        self.directions = check_mnrl_options(scale, directions, partition_mode, hardness_mode, hardness_strength)
        self.scale = scale
        self.similarity_fct = similarity_fct
        check_flags(gather_across_devices=gather_across_devices)
        self.gather_across_devices = gather_across_devices
        self.partition_mode = partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength
        self.backend = check_backend(backend)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        if process_group is not None:
            distributed.resolve_gather_group(gather_across_devices, process_group,
                                             what=type(self).__name__)
        self.process_group = process_group
        if not callable(similarity_fct):
            raise TypeError(f"`similarity_fct` must be callable (a, b) -> [n, m], got {type(similarity_fct).__name__}.")
        if similarity_kind(similarity_fct) is None and backend != "reference":
            warnings.warn(
                f"{type(self).__name__}: similarity_fct {getattr(similarity_fct, '__name__', similarity_fct)!r} has "
                "no blockwise form; the loss calls it as given, which builds the full similarity matrices "
                "(O(N²) memory). cos_sim and dot_score run blockwise.",
                stacklevel=2,
            )
        if hardness_mode is not None and hardness_strength == 0.0:
            warnings.warn(
                f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness weighting has no "
                "effect. Set hardness_strength to a positive value to enable hardness weighting.",
                stacklevel=2,
            )

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """Embed each column with ``model`` (as 6.2.0 does) and return the loss (labels are unused)."""
        if self.model is None:
            raise ValueError(f"{type(self).__name__}.forward needs the `model` given at construction; without one, "
                             "call compute_loss_from_embeddings(embeddings, labels).")
        return self.compute_loss_from_embeddings(_embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: Optional[torch.Tensor]
                                     ) -> torch.Tensor:
        """The loss of ``[queries, positives, neg_1, …]`` embeddings, each [n, d]; 0-dim, fp32 (fp64)."""
        return multiple_negatives_ranking_loss(
            embeddings, self.scale, self.similarity_fct, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, gather_across_devices=self.gather_across_devices,
            process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
            false_negative_margin=self.false_negative_margin,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        if set(self.directions) == set(DIRECTIONS) and self.partition_mode == "joint":
            return _CITATION_GTE
        if set(self.directions) == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return _CITATION_JINA
        return _CITATION_CPC


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """Drop-in for sentence-transformers 6.2.0 ``MultipleNegativesSymmetricRankingLoss``: deprecated there, and
    exactly :class:`MultipleNegativesRankingLoss` with ``directions=("query_to_doc", "doc_to_query")`` and
    ``partition_mode="per_direction"`` (hard-negative columns, if given, are candidates of the q→d term)."""

    def __init__(
        self,
        model: Optional[nn.Module],
        scale: float = 20.0,
        similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
        gather_across_devices: bool = False,
        *,
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__(
            model=model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", backend=backend,
            chunk_bytes=chunk_bytes, process_group=process_group,
        )


def _similarity_name(similarity_fct: Callable) -> str:
    """6.2.0's ``similarity_fct_name`` when sentence-transformers is importable, else the function's name."""
    try:
        from sentence_transformers.util import similarity_fct_name
    except ImportError:
        return getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    return similarity_fct_name(similarity_fct)


_CITATION_GTE = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""

_CITATION_JINA = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""  # noqa: E501

_CITATION_CPC = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""
