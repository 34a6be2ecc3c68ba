"""Row log-sum-exp of S = s·A·Bᵀ with entries left out by a similarity rule: the torch-engine path.

Some losses leave out candidates by a rule the core's engines do not know (they know structural masks only: an
excluded diagonal, a positive), so this module computes the mask in the tile, beside the logits, and reduces;
the backward recomputes both. Two rules:

- a second, "guide" similarity (:func:`guide_masked_lse`): GISTEmbed drops column j of row i when the guide
  model rates it above the row's threshold (Gᵢⱼ > tᵢ, G = A_g·B_gᵀ); MNRL's ``false_negative_margin`` passes
  the model's own detached features as the guide;
- the model's own similarity against its positive (:func:`false_negative_lse`, ``false_negative_margin`` of
  CLIP and NT-Xent): column j ≠ p(i) is dropped when simᵢⱼ > simᵢ,ₚ₍ᵢ₎ + margin, sim = A·Bᵀ before the scale,
  with simᵢ,ₚ₍ᵢ₎ read from the same tile. One product per tile serves the logits and the mask.

Memory is one chunk of tiles (``chunk_bytes`` of logits, as the blockwise engine), never N×N. The mask has no
gradient (it is a selection); gradients reach A, B and a tensor scale.

``backend="triton"`` runs the same rules in the Triton engine's masked kernels (kernels/masked.py: the rule's
tile beside S in one pass, the backward on the panel path). There every threshold is built from
:func:`rule_similarity`, the kernels' own arithmetic for that pair, so that an equal candidate ties exactly
(the torch engine gets the same from recomputing the entries near the threshold as per-pair sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from fastcontrast.autograd import _autocast_off
from fastcontrast.blockwise import DEFAULT_CHUNK_BYTES
from fastcontrast.engine import compute_dtype


@dataclass(frozen=True)
class _Rule:
    """What one call masks besides the structural diagonals. Given guides: the guide's similarity against the
    threshold; no guides, a threshold: the model's own similarity against it; neither: the model's own
    similarity against its positive's plus ``margin`` (``protect_offset`` then names the positive)."""

    protect_offset: Optional[int]
    exclude_offset: Optional[int]
    margin: Optional[float]
    need_argmax: bool
    budget: int
    backend: str = "torch"


def _row_chunks(n: int, m: int, chunk_bytes: int, itemsize: int):
    # Two tiles (S and G, or S and its mask's comparison) live at once, so each gets half the budget.
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


def _masked_tile(a, b, a_guide, b_guide, threshold, scale, start, stop, rule: _Rule):
    """(logits, argmax): S[start:stop] = scale·A·Bᵀ (compute dtype) with the dropped entries and the excluded
    diagonal set to −inf and the protected diagonal kept; the rows' argmax of the unmasked similarity, or None."""
    cdt = compute_dtype(a.dtype)
    sim = a[start:stop].to(cdt) @ b.to(cdt).T  # [rows, d] @ [d, m] -> [rows, m], before the scale
    rows = torch.arange(stop - start, device=a.device)
    if a_guide is not None:
        dropped = _guide_mask(a_guide, b_guide, threshold, start, stop, rule.budget)
    elif threshold is not None:
        dropped = sim > threshold[start:stop].to(cdt).unsqueeze(1)
    else:
        # The positive's similarity from this very tile: a column equal to the positive ties with it exactly,
        # and no entry needs a second product.
        positive = sim[rows, rows + (start + rule.protect_offset)]
        dropped = sim > (positive + rule.margin).unsqueeze(1)
    argmax = sim.argmax(dim=1) if rule.need_argmax else None
    # Values as device tensors: a Python bool would be copied from the host on every chunk.
    if rule.protect_offset is not None:
        dropped.index_put_((rows, rows + start + rule.protect_offset), torch.zeros_like(rows, dtype=torch.bool))
    if rule.exclude_offset is not None:
        dropped.index_put_((rows, rows + start + rule.exclude_offset), torch.ones_like(rows, dtype=torch.bool))
    return sim.mul_(scale).masked_fill_(dropped, float("-inf")), argmax


def _scale_value(scale: Union[float, torch.Tensor], cdt: torch.dtype):
    return scale.detach().to(cdt) if isinstance(scale, torch.Tensor) else scale


class MaskedLogSumExp(torch.autograd.Function):
    """``apply(a, b, scale, a_guide, b_guide, threshold, rule)`` → ``(lse [n], positives [n], argmax [n])``.

    a: [n, d], b: [m, d] (the model's rows and columns); scale: Python float or 0-dim tensor (then it gets a
    gradient); a_guide: [n, d_g], b_guide: [m, d_g] or both None (the model's own similarity is the guide);
    threshold: [n] or None (the positive's similarity + ``rule.margin``); none of them gets a gradient;
    ``rule``: a :class:`_Rule`. lseᵢ = log Σⱼ exp(s·aᵢ·bⱼ) over the columns the rule
    keeps (−inf where it keeps none); positivesᵢ = s·aᵢ·b₍ᵢ₊protect_offset₎ out of the same tiles, its gradient
    folded into the tile's dS as in the core (empty without ``protect_offset``); argmax: each row's argmax of
    the unmasked similarity (lowest index on ties; empty unless ``rule.need_argmax``). fp32 (fp64 for fp64).
    """

    @staticmethod
    def forward(ctx, a, b, scale, a_guide, b_guide, threshold, rule: _Rule):
        ctx.set_materialize_grads(False)
        ctx.rule = rule
        ctx.scale = None if isinstance(scale, torch.Tensor) else scale
        if rule.backend == "triton":
            lse, positives, argmax = _triton_engine().masked_lse_forward(
                a.detach(), b.detach(), _scale_tensor(scale, a.device), a_guide, b_guide, threshold,
                protect_offset=rule.protect_offset, exclude_offset=rule.exclude_offset, need_argmax=rule.need_argmax,
            )
            ctx.save_for_backward(a, b, scale if isinstance(scale, torch.Tensor) else None, a_guide, b_guide,
                                  threshold, lse)
            ctx.mark_non_differentiable(argmax)
            return lse, positives, argmax
        n, cdt = a.shape[0], compute_dtype(a.dtype)
        has_positive = rule.protect_offset is not None
        lse = torch.empty(n, dtype=cdt, device=a.device)
        positives = torch.empty(n if has_positive else 0, dtype=cdt, device=a.device)
        argmax = torch.empty(n if rule.need_argmax else 0, dtype=torch.int64, device=a.device)
        s = _scale_value(scale, cdt)
        with torch.no_grad(), _autocast_off(a.device.type):
            for start, stop in _row_chunks(n, b.shape[0], rule.budget, torch.finfo(cdt).bits // 8):
                tile, row_argmax = _masked_tile(a, b, a_guide, b_guide, threshold, s, start, stop, rule)
                lse[start:stop] = torch.logsumexp(tile, dim=1)
                if has_positive:
                    rows = torch.arange(stop - start, device=a.device)
                    positives[start:stop] = tile[rows, rows + start + rule.protect_offset]
                if row_argmax is not None:
                    argmax[start:stop] = row_argmax
        ctx.save_for_backward(a, b, scale if isinstance(scale, torch.Tensor) else None, a_guide, b_guide,
                              threshold, lse)
        ctx.mark_non_differentiable(argmax)
        return lse, positives, argmax

    @staticmethod
    def backward(ctx, grad_lse, grad_positives, _grad_argmax):
        a, b, scale_tensor, a_guide, b_guide, threshold, lse = ctx.saved_tensors
        rule = ctx.rule
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        none = (None,) * 4  # guides, threshold and rule take no gradient
        if grad_lse is None and grad_positives is None:
            return (None, None, None) + none
        cdt = lse.dtype
        scale = ctx.scale if scale_tensor is None else scale_tensor
        s = _scale_value(scale, cdt)
        if rule.backend == "triton":
            grad_a, grad_b = _triton_engine().masked_lse_backward(
                a.detach(), b.detach(), _scale_tensor(scale, a.device), a_guide, b_guide, threshold, lse, grad_lse,
                grad_positives if rule.protect_offset is not None else None, protect_offset=rule.protect_offset,
                exclude_offset=rule.exclude_offset, need_a=need_a or need_scale, need_b=need_b,
            )
            return _scaled_gradients(a, b, scale_tensor, s, grad_a if need_a or need_scale else None,
                                     grad_b if need_b else None, need_a, need_scale) + none
        # dS = s·(g·softmax + g_p·onehot(positive)); unscaled here, the factor s applied once at the end.
        grad_a = torch.zeros(a.shape, dtype=cdt, device=a.device) if need_a or need_scale else None
        grad_b = torch.zeros(b.shape, dtype=cdt, device=b.device) if need_b else None
        with torch.no_grad(), _autocast_off(a.device.type):
            for start, stop in _row_chunks(a.shape[0], b.shape[0], rule.budget, torch.finfo(cdt).bits // 8):
                tile, _ = _masked_tile(a, b, a_guide, b_guide, threshold, s, start, stop, rule)
                if grad_lse is not None:
                    # A fully masked row (lse = −inf) has no softmax and passes no gradient.
                    grad_tile = torch.exp(tile - lse[start:stop].unsqueeze(1)).nan_to_num_(0.0)
                    grad_tile.mul_(grad_lse[start:stop].to(cdt).unsqueeze(1))
                else:
                    grad_tile = torch.zeros_like(tile)
                if grad_positives is not None:
                    # Formed here in fp32, before any rounding: near convergence g·p + g_p (g_p = −g for
                    # lse − positive) is a difference of two numbers near g, which keeps its digits only this
                    # way (as in the core).
                    rows = torch.arange(stop - start, device=a.device)
                    grad_tile.index_put_((rows, rows + start + rule.protect_offset),
                                         grad_positives[start:stop].to(cdt), accumulate=True)
                if grad_a is not None:
                    grad_a[start:stop] = grad_tile @ b.to(cdt)  # [rows, m] @ [m, d] -> [rows, d]
                if grad_b is not None:
                    grad_b += grad_tile.T @ a[start:stop].to(cdt)  # [m, rows] @ [rows, d] -> [m, d]
        return _scaled_gradients(a, b, scale_tensor, s, grad_a, grad_b, need_a, need_scale) + none


def _scaled_gradients(a, b, scale_tensor, s, grad_a, grad_b, need_a, need_scale):
    """(dA, dB, ds) from the unscaled products dS·B, dSᵀ·A (compute dtype; None where not formed)."""
    grad_scale = None
    if need_scale:
        # ds = Σ dS_unscaled ⊙ sim = ⟨A, dS_unscaled·B⟩: no extra pass over the tiles.
        grad_scale = torch.dot(a.to(grad_a.dtype).reshape(-1), grad_a.reshape(-1)).to(scale_tensor.dtype)
        grad_scale = grad_scale.reshape(scale_tensor.shape)
    grad_a = (grad_a * s).to(a.dtype) if need_a else None
    grad_b = (grad_b * s).to(b.dtype) if grad_b is not None else None
    return grad_a, grad_b, grad_scale


def _triton_engine():
    from fastcontrast.kernels.engine import TritonEngine

    return TritonEngine()


def _scale_tensor(scale: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The scale as the kernels read it: an fp32 0-dim tensor on the device (a fill, no host-to-device copy)."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().float()
    return torch.full((), scale, dtype=torch.float32, device=device)


def _budget(chunk_bytes: Optional[int]) -> int:
    return DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes


def rule_similarity(x: torch.Tensor, y: torch.Tensor, offset: int, *, backend: str = "torch", guide: bool = False,
                    dtype: Optional[torch.dtype] = None, model_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """xᵢ·y₍ᵢ₊offset₎ [n], detached: the similarity a masked call's threshold is built from, in the arithmetic
    that call's rule compares with, so that a candidate equal to the reference ties with it exactly.

    x: [n, d], y: [m, d] (m ≥ offset + n). torch: the per-pair sum in ``dtype`` (default: the compute dtype of
    x), which is what sentence-transformers' cosine computes and what the torch engine's guide mask recomputes
    near the threshold; triton: the masked kernels' own tile arithmetic (kernels/masked.py; ``guide``: as their
    guide tile, IEEE fp32, else as their model tile) for model features of ``model_dtype`` (default x's), fp32.
    """
    if backend == "triton":
        return _triton_engine().pair_similarity(x.detach(), y.detach(), offset, guide=guide, model_dtype=model_dtype)
    return pair_sums(x.detach(), y.detach(), offset, dtype)


def pair_sums(x: torch.Tensor, y: torch.Tensor, offset: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """xᵢ·y₍ᵢ₊offset₎ [n] as per-pair sums in ``dtype`` (default: the compute dtype of x), differentiable: the
    diagonal of a block, O(n·d). x: [n, d], y: [m, d] (m ≥ offset + n)."""
    cdt = dtype or compute_dtype(x.dtype)
    return (x.to(cdt) * y.narrow(0, offset, x.shape[0]).to(cdt)).sum(dim=1)


def guide_masked_lse(a: torch.Tensor, b: torch.Tensor, a_guide: Optional[torch.Tensor],
                     b_guide: Optional[torch.Tensor], threshold: torch.Tensor, scale: float, *,
                     protect_offset: Optional[int] = None, exclude_offset: Optional[int] = None,
                     chunk_bytes: Optional[int] = None, backend: str = "torch") -> torch.Tensor:
    """Row LSE [n] of scale·A·Bᵀ over the columns whose guide similarity a_guideᵢ·b_guideⱼ is ≤ thresholdᵢ.

    a: [n, d], b: [m, d]; a_guide: [n, d_g], b_guide: [m, d_g], threshold: [n] (all detached; build the
    threshold from :func:`rule_similarity` with the same ``backend``); scale: a Python float (a constant);
    column ``i + protect_offset`` of row i is never masked (the positive) and column ``i + exclude_offset``
    always is (self-similarity), each when not None; chunk_bytes: bytes of one chunk of logits (None: the
    blockwise engine's default; the torch engine's); backend: ``"torch"`` or ``"triton"``. With ``"triton"``
    the guides may be None: the rule then compares the model's own similarity a·bᵀ (one product per tile).
    −inf where every column is masked; fp32 (fp64 for fp64 inputs).
    """
    rule = _Rule(protect_offset, exclude_offset, None, False, _budget(chunk_bytes), backend)
    guides = (None, None) if a_guide is None else (a_guide.detach(), b_guide.detach())
    lse, _, _ = MaskedLogSumExp.apply(a, b, float(scale), *guides, threshold.detach(), rule)
    return lse


def false_negative_lse(a: torch.Tensor, b: torch.Tensor, scale: Union[float, torch.Tensor], margin: float, *,
                       positive_offset: int, exclude_offset: Optional[int] = None,
                       chunk_bytes: Optional[int] = None, need_argmax: bool = False, backend: str = "torch",
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row LSE of scale·A·Bᵀ without the likely false negatives, and the positive logits.

    Row i's positive is column p(i) = i + ``positive_offset``; column j ≠ p(i) is left out when
    aᵢ·bⱼ > aᵢ·b₍ₚ₍ᵢ₎₎ + ``margin`` (the similarity before the scale, so the rule does not move with it),
    and column ``i + exclude_offset`` always (self-similarity), when not None. The positive is never left out.
    The torch engine reads aᵢ·b₍ₚ₍ᵢ₎₎ from the very tile it compares; the Triton engine from
    :func:`rule_similarity`, the same arithmetic: a column equal to the positive ties with it on both.

    Args:
        a: [n, d] rows, b: [m, d] columns (fp16, bf16, fp32 or fp64; same dtype).
        scale: a Python float, or a 0-dim tensor that then gets a gradient (CLIP's ``logit_scale``).
        margin: a finite float, negative allowed.
        backend: ``"torch"`` (chunks of ``chunk_bytes``) or ``"triton"``.
    Returns:
        ``(lse [n], positives [n], argmax [n])``: fp32 (fp64 for fp64) LSE and positive logits s·aᵢ·b₍ₚ₍ᵢ₎₎,
        both differentiable; argmax of each row's unmasked similarity (int64, empty unless ``need_argmax``).
    """
    rule = _Rule(positive_offset, exclude_offset, float(margin), need_argmax, _budget(chunk_bytes), backend)
    threshold = None
    if backend == "triton":
        threshold = rule_similarity(a, b, positive_offset, backend=backend) + float(margin)
    return MaskedLogSumExp.apply(a, b, scale, None, None, threshold, rule)


def threshold_masked_lse(a: torch.Tensor, b: torch.Tensor, scale: float, threshold: torch.Tensor, *,
                         chunk_bytes: Optional[int] = None, backend: str = "torch") -> torch.Tensor:
    """Row LSE [n] of scale·A·Bᵀ over the columns j with aᵢ·bⱼ ≤ thresholdᵢ (the similarity before the scale;
    −inf where none is left): the false-negative rule when the positive is not among the columns (a memory
    bank). a: [n, d], b: [m, d]; threshold: [n] (detached); scale: a Python float; backend: ``"torch"`` or
    ``"triton"``. fp32 (fp64 for fp64)."""
    rule = _Rule(None, None, None, False, _budget(chunk_bytes), backend)
    lse, _, _ = MaskedLogSumExp.apply(a, b, float(scale), None, None, threshold.detach(), rule)
    return lse
