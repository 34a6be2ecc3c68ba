"""The blockwise PyTorch engine: the engine contract of fastcontrast/engine.py in plain torch ops, on any device.

It walks the similarity matrix S = s·A·Bᵀ in chunks of rows whose logits fit a memory budget, so the
extra memory is O(budget + (n + m)·d) instead of O(n·m). Forward keeps running row / column log-sum-exps
(fp32, or fp64 for fp64 inputs); backward recomputes each chunk of S from A, B and s.

Every engine returns the *unscaled* products ``dS·B`` and ``dSᵀ·A`` in the compute dtype; the autograd
layer multiplies by s, casts to the input dtype, and forms the scale gradient ⟨A, dS·B⟩ from them.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from fastcontrast._validation import check_chunk_bytes
from fastcontrast.blockwise_symmetric import symmetric_lse_backward, symmetric_lse_forward
from fastcontrast.engine import DistillStats, compute_dtype, empty_like_result
from fastcontrast.lse_split import finite_or_zero, lse_from_sums

# 8 MiB of fp32 logits per chunk. Each step holds about two chunk-sized temporaries (S and exp(S − lse)),
# so the engine's extra memory stays near 16 MiB whatever N is. Measured on a 2-core CPU at N = 8192,
# d = 256: chunks of 4, 8 and 32 MiB run within a few percent of each other (the GEMMs dominate), and the
# small chunk keeps even N = 4096 below a quarter of the N×N matrix per tensor.
DEFAULT_CHUNK_BYTES = 8 * 2**20


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


class TorchEngine:
    """Blockwise PyTorch engine (implements :class:`fastcontrast.engine.Engine`).

    Args:
        chunk_bytes: budget for one chunk of logits in bytes (default :data:`DEFAULT_CHUNK_BYTES`).
            A chunk holds ``max(1, chunk_bytes // (m · itemsize))`` rows of S.
    """

    name = "torch"

    def __init__(self, chunk_bytes: Optional[int] = None):
        chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes

    def _chunks(self, n: int, m: int, dtype: torch.dtype):
        return _row_chunks(n, m, self.chunk_bytes, torch.finfo(dtype).bits // 8)

    def lse_forward(self, a, b, scale, positive_index, *, need_row, need_col, exclude_offset, exclude_positive,
                    private_columns, need_argmax, symmetric=False):
        """See :meth:`fastcontrast.engine.Engine.lse_forward`. Chunks of rows: the row LSE chunk by chunk, the
        column sums merged across chunks against a running max, the positives gathered from the same logits.
        Max and log-sum stay apart until :func:`~fastcontrast.lse_split.split_lse` (why: that module). With
        ``symmetric``, the lower block triangle only (:mod:`fastcontrast.blockwise_symmetric`)."""
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        device = a.device
        if symmetric:
            lse, low, positives = symmetric_lse_forward(
                a, scale.detach().to(cdt), positive_index, exclude_self=exclude_offset == 0,
                exclude_positive=exclude_positive, chunks=self._chunks(n, n, cdt), cdt=cdt)
            return (lse, empty_like_result(a), empty_like_result(a) if positives is None else positives,
                    empty_like_result(a, torch.long), empty_like_result(a, torch.long), low, empty_like_result(a))
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        mask = (exclude_offset, exclude_positive, private_columns)
        need_positives = positive_index is not None
        lse_row = torch.empty(n, dtype=cdt, device=device) if need_row else empty_like_result(a)
        low_row = torch.empty(n, dtype=cdt, device=device) if need_row else empty_like_result(a)
        positives = torch.empty(n, dtype=cdt, device=device) if need_positives else empty_like_result(a)
        argmax_row = torch.empty(n if need_row and need_argmax else 0, dtype=torch.long, device=device)
        argmax_col = torch.zeros(m if need_col and need_argmax else 0, dtype=torch.long, device=device)
        col_top = torch.full((m,), float("-inf"), dtype=cdt, device=device) if need_col else None
        col_total = torch.zeros(m, dtype=cdt, device=device) if need_col else None
        for start, stop in self._chunks(n, m, cdt):
            logits, chunk_positives = self._masked_logits(a, b_c, s, start, stop, positive_index, *mask)
            if need_positives:
                # The very entries the LSE reduces: on a one-hot row lse − positive is then exactly 0.
                positives[start:stop] = chunk_positives
            if need_col:
                chunk_top, chunk_arg = logits.max(dim=0)
                if need_argmax:
                    # Only a strictly larger max moves the argmax: ties keep the earlier (lower) row.
                    argmax_col = torch.where(chunk_top > col_top, chunk_arg + start, argmax_col)
                top = torch.maximum(col_top, chunk_top)
                shift = finite_or_zero(top)
                col_total.mul_((col_top - shift).exp_()).add_((logits - shift).exp_().sum(dim=0))
                col_top = top
            if need_row:
                top, arg = logits.max(dim=1)
                if need_argmax:
                    # torch's max returns the first maximal index: the lowest column on ties.
                    argmax_row[start:stop] = arg
                shift = finite_or_zero(top)
                # The chunk's logits are not needed past here: exp in place, no second chunk-sized temporary.
                total = logits.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)
                lse_row[start:stop], low_row[start:stop] = lse_from_sums(top, total)
        if need_col:
            lse_col, low_col = lse_from_sums(col_top, col_total)
        else:
            lse_col, low_col = empty_like_result(a), empty_like_result(a)
        return lse_row, lse_col, positives, argmax_row, argmax_col, low_row, low_col

    def lse_backward(
        self, a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives, *,
        exclude_offset, exclude_positive, private_columns, need_a, need_b, symmetric=False,
    ):
        """See :meth:`fastcontrast.engine.Engine.lse_backward`: S recomputed chunk by chunk, the positives'
        gradient folded into dS in the compute dtype before the products."""
        cdt = compute_dtype(a.dtype)
        if symmetric:
            grad = symmetric_lse_backward(
                a, scale.detach().to(cdt), positive_index, lse_row, grad_row, grad_positives,
                exclude_self=exclude_offset == 0, exclude_positive=exclude_positive,
                chunks=self._chunks(a.shape[0], a.shape[0], cdt), cdt=cdt)
            return grad, empty_like_result(a)
        n, m = a.shape[0], b.shape[0]
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        mask = (exclude_offset, exclude_positive, private_columns)
        masked = exclude_offset is not None or exclude_positive or private_columns > 0
        grad_a = torch.empty((n, a.shape[1]), dtype=cdt, device=a.device) if need_a else empty_like_result(a)
        grad_b = torch.zeros((m, b.shape[1]), dtype=cdt, device=a.device) if need_b else empty_like_result(a)
        if grad_row is not None:
            row_weight = grad_row.to(cdt).unsqueeze(1)
        if grad_col is not None:
            col_shift = lse_col.unsqueeze(0)
            col_weight = grad_col.to(cdt).unsqueeze(0)
        if grad_positives is not None:
            grad_positives = grad_positives.to(cdt)
        for start, stop in self._chunks(n, m, cdt):
            logits, _ = self._masked_logits(a, b_c, s, start, stop, positive_index, *mask)
            # Left-out entries are −inf; where a whole row or column is left out its LSE is −inf too, and
            # exp(−inf − (−inf)) is NaN, which would poison every gradient through dS·B: zero them explicitly.
            left_out = torch.isneginf(logits) if masked else None
            # Two chunk-sized buffers at a time, S and dS: the row term is formed in dS's own buffer and the
            # column term in S's, in place (a zeros buffer, an out-of-place exp(S − lse) and the previous
            # chunk's S and dS held four to five).
            if grad_row is not None:
                grad_logits = torch.sub(logits, lse_row[start:stop, None]).exp_().mul_(row_weight[start:stop])
            else:
                grad_logits = torch.zeros_like(logits)
            if grad_col is not None:
                grad_logits.add_(logits.sub_(col_shift).exp_().mul_(col_weight))
            if left_out is not None:
                grad_logits.masked_fill_(left_out, 0)
            if grad_positives is not None:
                # Near convergence a row's softmax approaches the one-hot of its positive, and dS there is
                # p − 1, a small difference of two numbers near 1: formed here in the compute dtype, it keeps
                # its digits, which a separate product of the positive term would lose in half precision.
                grad_logits.scatter_add_(1, positive_index[start:stop, None], grad_positives[start:stop, None])
            self._accumulate(grad_logits, a, b_c, start, stop, grad_a if need_a else None,
                             grad_b if need_b else None)
            # Freed before the next chunk's S exists, not when the names are rebound after it.
            del logits, grad_logits, left_out
        return grad_a, grad_b

    def siglip_forward(self, a, b, scale, bias, *, positive_offset):
        """See :meth:`fastcontrast.engine.Engine.siglip_forward`."""
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

    def siglip_forward_backward(self, a, b, scale, bias, *, positive_offset, need_a, need_b):
        """See :meth:`fastcontrast.engine.Engine.siglip_forward_backward`: each chunk of S gives its share of
        the sum and of the gradient products before it is let go."""
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c = b.to(cdt)
        s = scale.detach().to(cdt)
        bias_c = None if bias is None else bias.detach().to(cdt)
        grad_a = torch.empty((n, a.shape[1]), dtype=cdt, device=a.device) if need_a else empty_like_result(a)
        grad_b = torch.zeros((m, b.shape[1]), dtype=cdt, device=a.device) if need_b else empty_like_result(a)
        total = torch.zeros((), dtype=cdt, device=a.device)
        grad_bias = torch.zeros((), dtype=cdt, device=a.device)
        for start, stop in self._chunks(n, m, cdt):
            signed = self._siglip_signed_logits(a, b_c, s, bias_c, start, stop, positive_offset)
            # As siglip_forward (the same chunks, the same bits), negating in place and back (exact): one
            # chunk-sized temporary, logsigmoid's output, not two.
            total -= F.logsigmoid(signed.neg_()).sum()
            signed.neg_()
            # d/dx softplus(−z·x) = −z·σ(−z·x); `signed` is −z·x, so negate σ back at the positives.
            grad_logits = signed.sigmoid_()
            rows, cols = _offset_diagonal(start, stop, m, positive_offset, a.device)
            grad_logits[rows, cols] = -grad_logits[rows, cols]
            grad_bias += grad_logits.sum()
            self._accumulate(grad_logits, a, b_c, start, stop, grad_a if need_a else None,
                             grad_b if need_b else None)
            del signed, grad_logits
        return total, grad_a, grad_b, grad_bias

    def distill_forward(self, a, b, scale, a_t, b_t, scale_t, *, need_row, need_col):
        """See :meth:`fastcontrast.engine.Engine.distill_forward`.

        Per row: the student LSE rᵢ, the teacher LSE trᵢ and the cross term xrᵢ = Σⱼ softmax(T)ᵢⱼ·Sᵢⱼ; per
        column the same three (c, tc, xc). Then −Σⱼ softmax(T)ᵢⱼ·log_softmax(S)ᵢⱼ = rᵢ − xrᵢ.
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c, bt_c = b.to(cdt), b_t.to(cdt)
        s, s_t = scale.detach().to(cdt), scale_t.detach().to(cdt)
        stats = DistillStats(*(empty_like_result(a) for _ in range(6)))
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
            logits = self._logits(a, b_c, s, start, stop)
            teacher = self._logits(a_t, bt_c, s_t, start, stop)
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

    def distill_backward(self, a, b, scale, a_t, b_t, scale_t, stats, grads, *, need_a, need_b, need_a_t, need_b_t):
        """See :meth:`fastcontrast.engine.Engine.distill_backward`. With Pʳ = softmax(T) by row, Pᶜ by column:

            dSᵢⱼ = g_rᵢ·softmax(S)ʳᵢⱼ + g_cⱼ·softmax(S)ᶜᵢⱼ + g_xrᵢ·Pʳᵢⱼ + g_xcⱼ·Pᶜᵢⱼ
            dTᵢⱼ = g_xrᵢ·Pʳᵢⱼ·(Sᵢⱼ − xrᵢ) + g_xcⱼ·Pᶜᵢⱼ·(Sᵢⱼ − xcⱼ)
        """
        cdt = compute_dtype(a.dtype)
        n, m = a.shape[0], b.shape[0]
        b_c, bt_c = b.to(cdt), b_t.to(cdt)
        s, s_t = scale.detach().to(cdt), scale_t.detach().to(cdt)
        need_teacher = need_a_t or need_b_t
        def out(rows, x, wanted, alloc):
            return alloc((rows, x.shape[1]), dtype=cdt, device=a.device) if wanted else None

        grad_a, grad_b = out(n, a, need_a, torch.empty), out(m, b, need_b, torch.zeros)
        grad_a_t, grad_b_t = out(n, a_t, need_a_t, torch.empty), out(m, b_t, need_b_t, torch.zeros)
        g = DistillStats(**{k: None if v is None else v.to(cdt) for k, v in vars(grads).items()})
        for start, stop in _row_chunks(n, m, max(1, self.chunk_bytes // 2), torch.finfo(cdt).bits // 8):
            rows = slice(start, stop)
            logits = self._logits(a, b_c, s, start, stop)
            teacher = self._logits(a_t, bt_c, s_t, start, stop)
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
        return tuple(empty_like_result(a) if x is None else x for x in (grad_a, grad_b, grad_a_t, grad_b_t))

    @staticmethod
    def _logits(a, b_c, s, start, stop):
        # Fold s into the [rows, d] operand: n·d multiplies instead of n·m (open_clip's s·I·Tᵀ does the same).
        return (a[start:stop].to(b_c.dtype) * s) @ b_c.T

    @staticmethod
    def _masked_logits(a, b_c, s, start, stop, positive_index, exclude_offset, exclude_positive, private_columns):
        """One chunk of logits with the left-out entries at −inf, and the chunk's positives (or None),
        read before any masking so that a positive left out of the LSE is still reported."""
        logits = TorchEngine._logits(a, b_c, s, start, stop)
        positives = None
        if positive_index is not None:
            positives = logits.gather(1, positive_index[start:stop, None]).squeeze(1)
        if exclude_offset is not None:
            rows, cols = _offset_diagonal(start, stop, b_c.shape[0], exclude_offset, a.device)
            logits[rows, cols] = float("-inf")
        if exclude_positive:
            logits.scatter_(1, positive_index[start:stop, None], float("-inf"))
        if private_columns:
            # Columns j < p belong to row j alone: keep (j, j), drop the rest of that block.
            rows, cols = _offset_diagonal(start, stop, min(private_columns, b_c.shape[0]), 0, a.device)
            own = logits[rows, cols]
            logits[:, :private_columns] = float("-inf")
            logits[rows, cols] = own
        return logits, positives

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
