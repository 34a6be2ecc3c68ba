"""The engine interface, written down once (docs/kernels.md#how-the-kernels-work).

An engine computes the reductions of the similarity matrix S = s·A·Bᵀ (and of the SigLIP terms) and the
products of their gradient dS with A and B, without ever storing S. Two engines implement :class:`Engine`:
the blockwise torch engine (:class:`fastcontrast.blockwise.TorchEngine`, any device) and the Triton engine
(:class:`fastcontrast.kernels.engine.TritonEngine`, CUDA or triton's interpreter). The autograd Functions
of :mod:`fastcontrast.autograd` reach an engine only through the custom ops of :mod:`fastcontrast.ops`,
which name it (``engine.name``, ``engine.chunk_bytes``), so they never know which one runs.

Glossary, one name per thing in every layer (kernels say X / Y for the row and column operands, because
one kernel serves A·Bᵀ and B·Aᵀ):

- ``a`` [n, d], ``b`` [m, d]: the two feature matrices; ``scale`` (s): 0-dim tensor, read on the device;
  ``bias`` (b): SigLIP's 0-dim bias or None.
- ``lse_row`` [n] / ``lse_col`` [m]: row / column log-sum-exp of S, natural log; ``lse_row_low`` /
  ``lse_col_low``: their rounding errors, so that lse + low is max + log-sum before rounding
  (:mod:`fastcontrast.lse_split`: what makes ``lse − positive`` the originals' value to the bit).
- ``exclude_offset``: entry (i, i + offset) is left out of both reductions (self-similarity), or None.
- ``exclude_positive``: each row's positive entry is left out of the LSEs too (decoupled contrastive
  learning), while ``positives`` still reports it.
- ``private_columns`` (p): columns j < p take part only in row j, as its positive (a memory bank laid out as
  [own keys; bank]: every query sees its own key and the shared bank columns j ≥ p).
- ``positive_index`` [n] int64: row i's positive is column ``positive_index[i]``; ``positives`` [n] are
  those entries of S, taken from the very tiles the LSE reduced, so that ``lse − positive`` is exactly 0
  where a row's softmax is exactly one-hot (as in the originals).
- ``positive_offset`` (SigLIP): zᵢⱼ = +1 where j = i + offset, −1 elsewhere.
- "unscaled" gradient products: ``grad_a`` = dS·B [n, d] and ``grad_b`` = dSᵀ·A [m, d], before the factor s;
  the autograd layer multiplies by s, casts to the input dtype and forms ds = ⟨A, dS·B⟩ from them.

Contract: outputs have fixed shapes. A result that was not asked for is an empty tensor (numel 0), never
None; optional *inputs* are None when absent. LSEs, sums and gradient products are in the compute dtype
(:func:`compute_dtype`); argmaxes are int64 (lowest index on ties). No engine changes its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Protocol

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are computed in fp64; fp16, bf16 and fp32 in fp32 (LSE and loss are never half)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tf32_matmul_enabled() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls, read through whichever API they used.

    torch ≥ 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` (and the global
    ``torch.backends.fp32_precision`` it inherits from, and ``torch.set_float32_matmul_precision``, which sets
    it); once any of those is set, reading the legacy ``allow_tf32`` raises. Older torch has only the legacy
    flag. Never raises.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # a mix of the legacy and the new API: the new one (unset here) means IEEE
        return False


def empty_like_result(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The empty tensor that stands for a result not asked for (a fresh one each time: torch.compile
    rejects one object returned twice)."""
    return like.new_empty(0, dtype=dtype or compute_dtype(like.dtype))


def present(x: Optional[torch.Tensor]) -> bool:
    """True for a tensor that holds a result (not None, not empty)."""
    return x is not None and x.numel() > 0


@dataclass
class DistillStats:
    """Per-row and per-column statistics of the distillation loss, or their upstream gradients.

    ``lse_*``: student log-sum-exp; ``teacher_lse_*``: teacher log-sum-exp; ``cross_*``: Σ softmax(T)·S.
    As engine results every field is a tensor (empty where not computed); as upstream gradients a field is
    None where there is no gradient.
    """

    lse_row: Optional[torch.Tensor] = None
    lse_col: Optional[torch.Tensor] = None
    teacher_lse_row: Optional[torch.Tensor] = None
    teacher_lse_col: Optional[torch.Tensor] = None
    cross_row: Optional[torch.Tensor] = None
    cross_col: Optional[torch.Tensor] = None

    def as_list(self) -> list[Optional[torch.Tensor]]:
        """The fields in declaration order (what the custom ops take and return)."""
        return [getattr(self, f.name) for f in fields(self)]


class Engine(Protocol):
    """What an engine computes. Shapes: a [n, d], b [m, d], a_t [n, d_t], b_t [m, d_t]; scales 0-dim."""

    name: str
    chunk_bytes: int

    def lse_forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        positive_index: Optional[torch.Tensor],
        *,
        need_row: bool,
        need_col: bool,
        exclude_offset: Optional[int],
        exclude_positive: bool,
        private_columns: int,
        need_argmax: bool,
        symmetric: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lse_row [n], lse_col [m], positives [n], argmax_row [n], argmax_col [m], lse_row_low [n],
        lse_col_low [m])``.

        ``positives`` whenever a ``positive_index`` is given; argmaxes only with ``need_argmax``; each low part
        with its LSE. ``symmetric``: b is a, rows only, masks symmetric (the diagonal, an involutive positive
        index): an engine may reduce one block triangle of S only (the torch engine its lower, the Triton
        engine its upper: fastcontrast/blockwise_symmetric.py, kernels/lse_forward.py).
        """
        ...

    def lse_backward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        positive_index: Optional[torch.Tensor],
        lse_row: torch.Tensor,
        lse_col: torch.Tensor,
        grad_row: Optional[torch.Tensor],
        grad_col: Optional[torch.Tensor],
        grad_positives: Optional[torch.Tensor],
        *,
        exclude_offset: Optional[int],
        exclude_positive: bool,
        private_columns: int,
        need_a: bool,
        need_b: bool,
        symmetric: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled ``(dS·B [n, d], dSᵀ·A [m, d])`` (``symmetric``, as in :meth:`lse_forward`: ``((dS + dSᵀ)·A,
        empty)``) with
        dSᵢⱼ = grad_rowᵢ·exp(Sᵢⱼ − lse_rowᵢ) + grad_colⱼ·exp(Sᵢⱼ − lse_colⱼ) (0 where the LSEs leave (i, j)
        out) + grad_positivesᵢ·[j = positive_index[i]]."""
        ...

    def siglip_forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        *,
        positive_offset: int,
    ) -> torch.Tensor:
        """0-dim Σᵢⱼ softplus(−zᵢⱼ·(Sᵢⱼ + b)) (the caller divides by n)."""
        ...

    def siglip_forward_backward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        *,
        positive_offset: int,
        need_a: bool,
        need_b: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sum and its gradient in one sweep over S: ``(0-dim Σ softplus(−zᵢⱼ·(Sᵢⱼ + b)), dS·B, dSᵀ·A,
        Σ dS)``, unscaled, at upstream gradient 1: dSᵢⱼ = −zᵢⱼ·σ(−zᵢⱼ·(Sᵢⱼ + b)). SigLIP's dS is elementwise
        in S (no LSE to wait for), so the forward under grad forms it from the tiles it already has and the
        backward only multiplies by its upstream gradient; Σ dS is the bias gradient."""
        ...

    def distill_forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        a_t: torch.Tensor,
        b_t: torch.Tensor,
        scale_t: torch.Tensor,
        *,
        need_row: bool,
        need_col: bool,
    ) -> DistillStats:
        """Student / teacher LSEs and cross terms of S = s·A·Bᵀ against T = s_t·A_t·B_tᵀ, by row and column."""
        ...

    def distill_backward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        a_t: torch.Tensor,
        b_t: torch.Tensor,
        scale_t: torch.Tensor,
        stats: DistillStats,
        grads: DistillStats,
        *,
        need_a: bool,
        need_b: bool,
        need_a_t: bool,
        need_b_t: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unscaled ``(dS·B, dSᵀ·A, dT·B_t, dTᵀ·A_t)`` for upstream ``grads`` (fields lse_row, lse_col,
        cross_row, cross_col; None where there is none)."""
        ...
