"""Row log-sum-exp of S = s·A·Bᵀ with entries left out by a second, "guide" similarity: the torch-engine path.

Some losses leave out candidates by a rule on another similarity than the one they reduce: GISTEmbed drops
column j of row i when the guide model rates it above the positive (Gᵢⱼ > tᵢ, G = A_g·B_gᵀ); false-negative
masking drops it when the model's own detached similarity does. The core's engines know structural masks
only (an excluded diagonal, a positive), so this module computes such a mask in the tile: each chunk of rows
forms the model's tile S and the guide's tile G beside each other, masks, and reduces; the backward recomputes
both. Memory is one chunk of S and G (``chunk_bytes`` of logits, as the blockwise engine), never N×N.

The mask has no gradient (it is a comparison); gradients reach A and B only, the scale being a constant.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastcontrast.blockwise import DEFAULT_CHUNK_BYTES
from fastcontrast.engine import compute_dtype


def _row_chunks(n: int, m: int, chunk_bytes: int, itemsize: int):
    # Two tiles (S and G) live at once, so each gets half the budget.
    rows = max(1, chunk_bytes // max(1, 2 * m * itemsize))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _guide_mask(a_guide, b_guide, threshold, start, stop, budget):
    """[stop − start, m] bool: where the guide's similarity exceeds the row's threshold.

    The tile is a GEMM, which rounds differently from the per-pair sum Σₖ xₖ·yₖ that sentence-transformers
    compares (``nn.CosineSimilarity`` on unit rows). The two differ by at most 2·d·ε·‖x‖·‖y‖, so the entries
    that close to the threshold are recomputed as that per-pair sum in the guide's dtype: the mask is then the
    original's bit for bit, also where similarities crowd around the threshold (an untrained model's do).
    """
    cdt = compute_dtype(a_guide.dtype)
    rows_guide = a_guide[start:stop]
    guide = rows_guide.to(cdt) @ b_guide.to(cdt).T
    limit = threshold[start:stop].to(cdt).unsqueeze(1)
    mask = guide > limit
    eps = torch.finfo(a_guide.dtype).eps
    band = (2 * a_guide.shape[1] * eps) * torch.outer(rows_guide.to(cdt).norm(dim=1), b_guide.to(cdt).norm(dim=1))
    near = ((guide - limit).abs() <= band).nonzero()
    pairs_per_batch = max(1, budget // max(1, a_guide.shape[1] * a_guide.element_size()))
    for first in range(0, near.shape[0], pairs_per_batch):
        i, j = near[first:first + pairs_per_batch].unbind(1)
        exact = (rows_guide[i] * b_guide[j]).sum(-1)
        mask[i, j] = exact.to(cdt) > limit[i, 0]
    return mask


def _masked_tile(a, b, a_guide, b_guide, threshold, scale, start, stop, protect_offset, exclude_offset, budget):
    """S[start:stop] with the entries the guide rates above the row's threshold (and the excluded diagonal) set
    to −inf, the protected diagonal kept (compute dtype)."""
    cdt = compute_dtype(a.dtype)
    logits = (a[start:stop].to(cdt) @ b.to(cdt).T) * scale
    mask = _guide_mask(a_guide, b_guide, threshold, start, stop, budget)
    rows = torch.arange(stop - start, device=a.device)
    # Values as device tensors: a Python bool would be copied from the host on every chunk.
    if protect_offset is not None:
        mask.index_put_((rows, rows + start + protect_offset), torch.zeros_like(rows, dtype=torch.bool))
    if exclude_offset is not None:
        mask.index_put_((rows, rows + start + exclude_offset), torch.ones_like(rows, dtype=torch.bool))
    return logits.masked_fill_(mask, float("-inf"))


class GuideMaskedLogSumExp(torch.autograd.Function):
    """``apply(a, b, a_guide, b_guide, threshold, scale, protect_offset, exclude_offset, chunk_bytes)`` → lse [n].

    a: [n, d], b: [m, d] (the model's rows and columns); a_guide: [n, d_g], b_guide: [m, d_g] (the guide's,
    no gradient); threshold: [n]; scale: Python float; protect_offset: column ``i + protect_offset`` of row i is
    never masked (the positive), or None; ``exclude_offset``: column ``i + exclude_offset`` of row i is always
    masked (self-similarity), or None; chunk_bytes: bytes of one chunk of logits, or None for the
    blockwise engine's default. lseᵢ = log Σⱼ exp(s·aᵢ·bⱼ) over the j with a_guideᵢ·b_guideⱼ ≤ thresholdᵢ (or
    j = i + protect_offset); −inf where every column is masked. fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, a, b, a_guide, b_guide, threshold, scale: float, protect_offset: Optional[int],
                exclude_offset: Optional[int], chunk_bytes: Optional[int]):
        budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        cdt = compute_dtype(a.dtype)
        lse = torch.empty(a.shape[0], dtype=cdt, device=a.device)
        with torch.no_grad():
            for start, stop in _row_chunks(a.shape[0], b.shape[0], budget, torch.finfo(cdt).bits // 8):
                tile = _masked_tile(a, b, a_guide, b_guide, threshold, scale, start, stop, protect_offset,
                                    exclude_offset, budget)
                lse[start:stop] = torch.logsumexp(tile, dim=1)
        ctx.options = (scale, protect_offset, exclude_offset, budget)
        ctx.save_for_backward(a, b, a_guide, b_guide, threshold, lse)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        a, b, a_guide, b_guide, threshold, lse = ctx.saved_tensors
        scale, protect_offset, exclude_offset, budget = ctx.options
        need_a, need_b = ctx.needs_input_grad[:2]
        cdt = lse.dtype
        grad_a = torch.zeros(a.shape, dtype=cdt, device=a.device) if need_a else None
        grad_b = torch.zeros(b.shape, dtype=cdt, device=b.device) if need_b else None
        with torch.no_grad():
            for start, stop in _row_chunks(a.shape[0], b.shape[0], budget, torch.finfo(cdt).bits // 8):
                tile = _masked_tile(a, b, a_guide, b_guide, threshold, scale, start, stop, protect_offset,
                                    exclude_offset, budget)
                # dS = g·softmax; a fully masked row (lse = −inf) has no softmax and passes no gradient.
                row_lse = lse[start:stop].unsqueeze(1)
                probabilities = torch.exp(tile - row_lse).nan_to_num_(0.0)
                grad_tile = probabilities.mul_(grad_lse[start:stop].to(cdt).unsqueeze(1) * scale)
                if need_a:
                    grad_a[start:stop] = grad_tile @ b.to(cdt)
                if need_b:
                    grad_b += grad_tile.T @ a[start:stop].to(cdt)
        return (grad_a.to(a.dtype) if need_a else None, grad_b.to(b.dtype) if need_b else None,
                None, None, None, None, None, None, None)


def guide_masked_lse(a: torch.Tensor, b: torch.Tensor, a_guide: torch.Tensor, b_guide: torch.Tensor,
                     threshold: torch.Tensor, scale: float, *, protect_offset: Optional[int] = None,
                     exclude_offset: Optional[int] = None, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """Row LSE of scale·A·Bᵀ over the columns the guide does not rate above ``threshold`` (see
    :class:`GuideMaskedLogSumExp`); the guide operands and the threshold are detached."""
    return GuideMaskedLogSumExp.apply(a, b, a_guide.detach(), b_guide.detach(), threshold.detach(), float(scale),
                                      protect_offset, exclude_offset, chunk_bytes)
