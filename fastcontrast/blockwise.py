"""The blockwise PyTorch engine: the engine contract of DESIGN §3 in plain torch ops, on any device.

It walks the similarity matrix S = s·A·Bᵀ in chunks of rows whose logits fit a memory budget, so the
extra memory is O(budget + (n + m)·d) instead of O(n·m). Forward keeps running row / column log-sum-exps
(fp32, or fp64 for fp64 inputs); backward recomputes each chunk of S from A, B and s.

Every engine returns the *unscaled* products ``dS·B`` and ``dSᵀ·A`` in the compute dtype; the autograd
layer multiplies by s, casts to the input dtype, and forms the scale gradient ⟨A, dS·B⟩ from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

# 8 MiB of fp32 logits per chunk. Each step holds about two chunk-sized temporaries (S and exp(S − lse)),
# so the engine's extra memory stays near 16 MiB whatever N is. Measured on a 2-core CPU at N = 8192,
# d = 256: chunks of 4, 8 and 32 MiB run within a few percent of each other (the GEMMs dominate), and the
# small chunk keeps even N = 4096 below a quarter of the N×N matrix per tensor.
DEFAULT_CHUNK_BYTES = 8 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are computed in fp64; fp16, bf16 and fp32 in fp32 (LSE and loss are never half)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(n: int, m: int, chunk_bytes: int, itemsize: int) -> Iterator[tuple[int, int]]:
    rows = max(1, chunk_bytes // max(1, m * itemsize))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _offset_diagonal(start: int, stop: int, m: int, offset: int, device: torch.device):
    """(local row, column) indices of the entries j = i + offset for rows start..stop of the chunk.

    They form one contiguous run, so plain ranges describe them: no boolean mask, whose data-dependent size
    would cost a host sync on CUDA and a graph break under torch.compile.
    """
    first, last = max(start, -offset), min(stop, m - offset)
    rows = torch.arange(first - start, max(first, last) - start, device=device)
    return rows, rows + (start + offset)


@dataclass
class DistillStats:
    """Per-row and per-column statistics of the distillation loss (or their upstream gradients).

    ``lse_*``: student log-sum-exp; ``teacher_lse_*``: teacher log-sum-exp; ``cross_*``: Σ softmax(T)·S.
    Each is a vector (fp32, fp64 for fp64 inputs) or None where not computed.
    """

    lse_row: Optional[torch.Tensor] = None
    lse_col: Optional[torch.Tensor] = None
    teacher_lse_row: Optional[torch.Tensor] = None
    teacher_lse_col: Optional[torch.Tensor] = None
    cross_row: Optional[torch.Tensor] = None
    cross_col: Optional[torch.Tensor] = None


class TorchEngine:
    """Blockwise PyTorch engine.

    Args:
        chunk_bytes: budget for one chunk of logits in bytes (default :data:`DEFAULT_CHUNK_BYTES`).
            A chunk holds ``max(1, chunk_bytes // (m · itemsize))`` rows of S.
    """

    name = "torch"

    def __init__(self, chunk_bytes: Optional[int] = None):
        if chunk_bytes is None:
            chunk_bytes = DEFAULT_CHUNK_BYTES
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"`chunk_bytes` must be a positive int (bytes of logits per chunk), got {chunk_bytes!r}.")
        self.chunk_bytes = chunk_bytes

    def _chunks(self, n: int, m: int, dtype: torch.dtype):
        return _row_chunks(n, m, self.chunk_bytes, torch.finfo(dtype).bits // 8)

    def lse_forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        *,
        need_row: bool,
        need_col: bool,
        exclude_offset: Optional[int],
        need_argmax: bool = False,
    ):
        """Row and/or column log-sum-exp of S = s·A·Bᵀ, and optionally each row's / column's argmax.

        Args:
            a: [n, d]; b: [m, d]; scale: 0-dim.
            exclude_offset: if not None, entry (i, i + exclude_offset) is left out of both reductions.
            need_argmax: also return the index of each row's (column's) largest entry, lowest index on ties.
        Returns:
            ``(lse_row [n], lse_col [m], argmax_row [n], argmax_col [m])``: LSEs in the compute dtype, argmax
            int64; None where not asked for.
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        lse_row = torch.empty(n, dtype=cdt, device=a.device) if need_row else None
        lse_col = torch.full((m,), float("-inf"), dtype=cdt, device=a.device) if need_col else None
        argmax_row = torch.empty(n, dtype=torch.long, device=a.device) if need_row and need_argmax else None
        argmax_col = torch.zeros(m, dtype=torch.long, device=a.device) if need_col and need_argmax else None
        col_max = torch.full((m,), float("-inf"), dtype=cdt, device=a.device) if argmax_col is not None else None
        for start, stop in self._chunks(n, m, cdt):
            logits = self._logits(a, b_c, s, start, stop, exclude_offset)
            if need_row:
                lse_row[start:stop] = torch.logsumexp(logits, dim=1)
                if argmax_row is not None:
                    # torch's max returns the first maximal index: the lowest column on ties.
                    argmax_row[start:stop] = logits.max(dim=1).indices
            if need_col:
                torch.logaddexp(lse_col, torch.logsumexp(logits, dim=0), out=lse_col)
                if argmax_col is not None:
                    chunk_max, chunk_arg = logits.max(dim=0)
                    # Only a strictly larger max moves the argmax: ties keep the earlier (lower) row.
                    better = chunk_max > col_max
                    argmax_col = torch.where(better, chunk_arg + start, argmax_col)
                    col_max = torch.where(better, chunk_max, col_max)
        return lse_row, lse_col, argmax_row, argmax_col

    def lse_backward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        lse_row: Optional[torch.Tensor],
        lse_col: Optional[torch.Tensor],
        grad_row: Optional[torch.Tensor],
        grad_col: Optional[torch.Tensor],
        *,
        exclude_offset: Optional[int],
        need_a: bool,
        need_b: bool,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Backward of :meth:`lse_forward`.

        dSᵢⱼ = grad_rowᵢ·exp(Sᵢⱼ − lse_rowᵢ) + grad_colⱼ·exp(Sᵢⱼ − lse_colⱼ), S recomputed chunk by chunk.

        Returns:
            ``dS·B`` [n, d] and ``dSᵀ·A`` [m, d] in the compute dtype, unscaled (None where not needed).
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        grad_a = torch.empty((n, a.shape[1]), dtype=cdt, device=a.device) if need_a else None
        grad_b = torch.zeros((m, b.shape[1]), dtype=cdt, device=a.device) if need_b else None
        if grad_row is not None:
            grad_row = grad_row.to(cdt)
        if grad_col is not None:
            col_shift = lse_col.unsqueeze(0)
            col_weight = grad_col.to(cdt).unsqueeze(0)
        for start, stop in self._chunks(n, m, cdt):
            logits = self._logits(a, b_c, s, start, stop, exclude_offset)
            if grad_row is not None:
                grad_logits = torch.exp(logits - lse_row[start:stop, None]).mul_(grad_row[start:stop, None])
                if grad_col is not None:
                    grad_logits.add_(logits.sub_(col_shift).exp_().mul_(col_weight))
            else:
                grad_logits = logits.sub_(col_shift).exp_().mul_(col_weight)
            if exclude_offset is not None:
                # Excluded entries get no gradient. Where a whole row or column is excluded its LSE is −inf
                # and exp(−inf − (−inf)) is NaN, which would poison every gradient through dS·B.
                rows, cols = _offset_diagonal(start, stop, m, exclude_offset, a.device)
                grad_logits[rows, cols] = 0
            self._accumulate(grad_logits, a, b_c, start, stop, grad_a, grad_b)
        return grad_a, grad_b

    def siglip_forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        *,
        positive_offset: int,
    ) -> torch.Tensor:
        """Σᵢⱼ softplus(−zᵢⱼ·(Sᵢⱼ + bias)), zᵢⱼ = +1 where j = i + positive_offset, else −1.

        Returns:
            0-dim sum in the compute dtype (the caller divides by n).
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        bias_c = None if bias is None else bias.detach().to(cdt)
        total = torch.zeros((), dtype=cdt, device=a.device)
        for start, stop in self._chunks(n, m, cdt):
            signed = self._siglip_signed_logits(a, b_c, s, bias_c, start, stop, positive_offset)
            # softplus(x) = −log σ(−x), exact for every x (F.softplus switches to x above a threshold).
            total -= F.logsigmoid(signed.neg_()).sum()
        return total

    def siglip_backward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        grad: torch.Tensor,
        *,
        positive_offset: int,
        need_a: bool,
        need_b: bool,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """Backward of :meth:`siglip_forward` for upstream gradient ``grad`` (0-dim).

        dSᵢⱼ = −zᵢⱼ·σ(−zᵢⱼ·(Sᵢⱼ + bias))·grad.

        Returns:
            ``dS·B`` [n, d], ``dSᵀ·A`` [m, d] (unscaled, None where not needed) and ``Σ dS`` (0-dim),
            the bias gradient, all in the compute dtype.
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        bias_c = None if bias is None else bias.detach().to(cdt)
        g = grad.to(cdt)
        grad_a = torch.empty((n, a.shape[1]), dtype=cdt, device=a.device) if need_a else None
        grad_b = torch.zeros((m, b.shape[1]), dtype=cdt, device=a.device) if need_b else None
        grad_bias = torch.zeros((), dtype=cdt, device=a.device)
        for start, stop in self._chunks(n, m, cdt):
            signed = self._siglip_signed_logits(a, b_c, s, bias_c, start, stop, positive_offset)
            # d/dx softplus(−z·x) = −z·σ(−z·x); `signed` is −z·x, so negate σ back at the positives.
            grad_logits = signed.sigmoid_().mul_(g)
            rows, cols = _offset_diagonal(start, stop, m, positive_offset, a.device)
            grad_logits[rows, cols] = -grad_logits[rows, cols]
            grad_bias += grad_logits.sum()
            self._accumulate(grad_logits, a, b_c, start, stop, grad_a, grad_b)
        return grad_a, grad_b, grad_bias

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
        """Statistics of student S = s·A·Bᵀ and teacher T = s_t·A_t·B_tᵀ for the distillation loss.

        Per row: the student LSE rᵢ, the teacher LSE trᵢ and the cross term xrᵢ = Σⱼ softmax(T)ᵢⱼ·Sᵢⱼ; per
        column the same three (c, tc, xc). Then −Σⱼ softmax(T)ᵢⱼ·log_softmax(S)ᵢⱼ = rᵢ − xrᵢ.

        Args:
            a: [n, d]; b: [m, d]; a_t: [n, d_t]; b_t: [m, d_t]; scale, scale_t: 0-dim.
        Returns:
            a :class:`DistillStats` in the compute dtype (row fields None unless ``need_row``, column
            fields None unless ``need_col``).
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c, bt_c = b.to(cdt), b_t.to(cdt)
        s, s_t = scale.detach().to(cdt), scale_t.detach().to(cdt)
        stats = DistillStats()
        if need_row:
            stats.lse_row, stats.teacher_lse_row, stats.cross_row = (
                torch.empty(n, dtype=cdt, device=a.device) for _ in range(3)
            )
        if need_col:
            stats.lse_col = torch.full((m,), float("-inf"), dtype=cdt, device=a.device)
            stats.teacher_lse_col = torch.full((m,), float("-inf"), dtype=cdt, device=a.device)
            stats.cross_col = torch.zeros(m, dtype=cdt, device=a.device)
        # Two chunk-sized matrices (S and T) live at once: halve the rows per chunk to stay in budget.
        for start, stop in _row_chunks(n, m, max(1, self.chunk_bytes // 2), torch.finfo(cdt).bits // 8):
            logits = self._logits(a, b_c, s, start, stop, None)
            teacher = self._logits(a_t, bt_c, s_t, start, stop, None)
            if need_row:
                stats.lse_row[start:stop] = torch.logsumexp(logits, dim=1)
                teacher_lse = torch.logsumexp(teacher, dim=1)
                stats.teacher_lse_row[start:stop] = teacher_lse
                stats.cross_row[start:stop] = (teacher - teacher_lse[:, None]).exp_().mul_(logits).sum(dim=1)
            if need_col:
                torch.logaddexp(stats.lse_col, torch.logsumexp(logits, dim=0), out=stats.lse_col)
                # Online over row chunks, as the kernels do over row blocks: the chunk's softmax-weighted sum
                # is rescaled to the running teacher LSE before it is added.
                chunk_lse = torch.logsumexp(teacher, dim=0)
                merged = torch.logaddexp(stats.teacher_lse_col, chunk_lse)
                chunk_cross = (teacher - chunk_lse[None, :]).exp_().mul_(logits).sum(dim=0)
                stats.cross_col.mul_((stats.teacher_lse_col - merged).exp_())
                stats.cross_col.add_(chunk_cross.mul_((chunk_lse - merged).exp_()))
                stats.teacher_lse_col = merged
        return stats

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
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Backward of :meth:`distill_forward` for upstream gradients ``grads`` (fields lse_row, lse_col,
        cross_row, cross_col; None where there is none). With Pʳ = softmax(T) by row, Pᶜ by column:

            dSᵢⱼ = g_rᵢ·softmax(S)ʳᵢⱼ + g_cⱼ·softmax(S)ᶜᵢⱼ + g_xrᵢ·Pʳᵢⱼ + g_xcⱼ·Pᶜᵢⱼ
            dTᵢⱼ = g_xrᵢ·Pʳᵢⱼ·(Sᵢⱼ − xrᵢ) + g_xcⱼ·Pᶜᵢⱼ·(Sᵢⱼ − xcⱼ)

        Returns:
            unscaled ``dS·B`` [n, d], ``dSᵀ·A`` [m, d], ``dT·B_t`` [n, d_t], ``dTᵀ·A_t`` [m, d_t] in the
            compute dtype (None where not needed).
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c, bt_c = b.to(cdt), b_t.to(cdt)
        s, s_t = scale.detach().to(cdt), scale_t.detach().to(cdt)
        need_teacher = need_a_t or need_b_t
        grad_a = torch.empty((n, a.shape[1]), dtype=cdt, device=a.device) if need_a else None
        grad_b = torch.zeros((m, b.shape[1]), dtype=cdt, device=a.device) if need_b else None
        grad_a_t = torch.empty((n, a_t.shape[1]), dtype=cdt, device=a.device) if need_a_t else None
        grad_b_t = torch.zeros((m, b_t.shape[1]), dtype=cdt, device=a.device) if need_b_t else None
        g = DistillStats(**{k: None if v is None else v.to(cdt) for k, v in vars(grads).items()})
        for start, stop in _row_chunks(n, m, max(1, self.chunk_bytes // 2), torch.finfo(cdt).bits // 8):
            rows = slice(start, stop)
            logits = self._logits(a, b_c, s, start, stop, None)
            teacher = self._logits(a_t, bt_c, s_t, start, stop, None)
            grad_s = torch.zeros_like(logits)
            grad_t = torch.zeros_like(teacher) if need_teacher else None
            if g.lse_row is not None:
                grad_s.add_((logits - stats.lse_row[rows, None]).exp_().mul_(g.lse_row[rows, None]))
            if g.lse_col is not None:
                grad_s.add_((logits - stats.lse_col[None, :]).exp_().mul_(g.lse_col[None, :]))
            if g.cross_row is not None:
                weight = (teacher - stats.teacher_lse_row[rows, None]).exp_()
                grad_s.add_(weight * g.cross_row[rows, None])
                if need_teacher:
                    grad_t.add_(weight.mul_(logits - stats.cross_row[rows, None]).mul_(g.cross_row[rows, None]))
            if g.cross_col is not None:
                weight = (teacher - stats.teacher_lse_col[None, :]).exp_()
                grad_s.add_(weight * g.cross_col[None, :])
                if need_teacher:
                    grad_t.add_(weight.mul_(logits - stats.cross_col[None, :]).mul_(g.cross_col[None, :]))
            self._accumulate(grad_s, a, b_c, start, stop, grad_a, grad_b)
            if need_teacher:
                self._accumulate(grad_t, a_t, bt_c, start, stop, grad_a_t, grad_b_t)
        return grad_a, grad_b, grad_a_t, grad_b_t

    @staticmethod
    def _logits(a, b_c, s, start, stop, exclude_offset):
        # Fold s into the [rows, d] operand: n·d multiplies instead of n·m.
        logits = (a[start:stop].to(b_c.dtype) * s) @ b_c.T
        if exclude_offset is not None:
            rows, cols = _offset_diagonal(start, stop, b_c.shape[0], exclude_offset, a.device)
            logits[rows, cols] = float("-inf")
        return logits

    @staticmethod
    def _siglip_signed_logits(a, b_c, s, bias_c, start, stop, positive_offset):
        """−zᵢⱼ·(Sᵢⱼ + bias) for one chunk of rows: the logits, negated at the positives."""
        logits = (a[start:stop].to(b_c.dtype) * s) @ b_c.T
        if bias_c is not None:
            logits += bias_c
        rows, cols = _offset_diagonal(start, stop, b_c.shape[0], positive_offset, a.device)
        logits[rows, cols] = -logits[rows, cols]
        return logits

    @staticmethod
    def _accumulate(grad_logits, a, b_c, start, stop, grad_a, grad_b):
        if grad_a is not None:
            torch.mm(grad_logits, b_c, out=grad_a[start:stop])
        if grad_b is not None:
            grad_b.addmm_(grad_logits.T, a[start:stop].to(b_c.dtype))
