"""The differentiable core: autograd Functions over the blockwise reductions of S = s·A·Bᵀ.

They are the same for every engine (blockwise torch, Triton): an engine computes the reductions and the
unscaled products dS·B and dSᵀ·A; these Functions save only A, B, s (and b) plus the LSE vectors, never
S, and turn the engine's products into gradients:

    dA = s·(dS·B),   dB = s·(dSᵀ·A),   ds = Σᵢⱼ dSᵢⱼ·(Aᵢ·Bⱼ) = ⟨A, dS·B⟩,   db = Σᵢⱼ dSᵢⱼ.

The scale gradient therefore costs O(n·d) once dS·B is known: no extra pass over S. Reading it as
⟨A, dS·B⟩ rather than DESIGN's ⟨A, dA⟩/s is the same number without a division by s (NT-Xent's s = 1/τ
may be negative, and a tiny s would amplify rounding).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from fastcontrast.blockwise import DistillStats, compute_dtype


def _autocast_off(device_type: str):
    # The engines compute in fp32 (fp64) on purpose; an ambient torch.autocast would silently turn their GEMMs
    # back into bf16/fp16 ones (and it rejects the out= variants they use).
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _forward_without_autocast(forward):
    """Run an autograd Function's forward with autocast off on its first input's device (noted for backward)."""

    @functools.wraps(forward)
    def wrapper(ctx, first, *args):
        ctx.autocast_device = first.device.type
        with _autocast_off(ctx.autocast_device):
            return forward(ctx, first, *args)

    return wrapper


def _backward_without_autocast(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with _autocast_off(ctx.autocast_device):
            return backward(ctx, *grads)

    return wrapper


def _scaled_grad(product: Optional[torch.Tensor], scale: torch.Tensor, like: torch.Tensor):
    if product is None:
        return None
    return (product * scale.detach().to(product.dtype)).to(like.dtype)


def _scale_grad(a: torch.Tensor, grad_a_unscaled: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # ⟨A, dS·B⟩ in the compute dtype, then back to the scale's own dtype (fp32 under AMP).
    inner = torch.dot(a.to(grad_a_unscaled.dtype).reshape(-1), grad_a_unscaled.reshape(-1))
    return inner.to(scale.dtype).reshape(scale.shape)


def _positive_logits(a, other, scale, positive_index) -> Optional[torch.Tensor]:
    """S[i, positive_index[i]] = s·⟨aᵢ, other[positive_index[i]]⟩ in the compute dtype, or None."""
    if positive_index is None:
        return None
    cdt = compute_dtype(a.dtype)
    partner = other.index_select(0, positive_index).to(cdt)
    return (a.to(cdt) * partner).sum(dim=1) * scale.detach().to(cdt)


def _add_positive_grads(grad_positives, a, other, positive_index, grad_a_unscaled, grad_b_unscaled, need_a, need_b):
    """Add the positives' unscaled gradients to the engine's dS·B and dSᵀ·A (in place where they exist)."""
    if grad_positives is None:
        return grad_a_unscaled, grad_b_unscaled
    cdt = compute_dtype(a.dtype)
    weight = grad_positives.to(cdt).unsqueeze(1)
    if need_a:
        partner_term = weight * other.index_select(0, positive_index).to(cdt)
        grad_a_unscaled = partner_term if grad_a_unscaled is None else grad_a_unscaled.add_(partner_term)
    if need_b:
        if grad_b_unscaled is None:
            grad_b_unscaled = torch.zeros(other.shape, dtype=cdt, device=other.device)
        grad_b_unscaled.index_add_(0, positive_index, weight * a.to(cdt))
    return grad_a_unscaled, grad_b_unscaled


class BlockwiseLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exp of S = s·A·Bᵀ, and optionally the positive logits, without materialising S.

    ``apply(a, b, scale, engine, need_row, need_col, exclude_offset, positive_index)`` with a: [n, d],
    b: [m, d] or None (then b is a: self-similarity, one gradient), scale: 0-dim. Returns
    ``(lse_row [n], lse_col [m], positives [n])`` in fp32 (fp64 for fp64 inputs), positivesᵢ =
    S[i, positive_index[i]]. An output not asked for is an empty tensor. ``exclude_offset`` (int or None)
    drops entry (i, i + offset) from the LSEs.

    Why the positives live here and not in plain autograd: near convergence a row's softmax approaches the
    one-hot of its positive, and dA = s·(Σⱼ Pᵢⱼ·Bⱼ − B_pos) is the difference of two nearly equal terms. Both
    are summed in fp32 here and rounded to the input dtype once; through two autograd paths each would be
    rounded to bf16 first and the small difference lost.
    """

    @staticmethod
    @_forward_without_autocast
    def forward(ctx, a, b, scale, engine, need_row, need_col, exclude_offset, positive_index, need_argmax=False):
        other = a if b is None else b
        lse_row = lse_col = argmax_row = argmax_col = None
        if need_row or need_col:
            lse_row, lse_col, argmax_row, argmax_col = engine.lse_forward(
                a, other, scale, need_row=need_row, need_col=need_col, exclude_offset=exclude_offset,
                need_argmax=need_argmax,
            )
        cdt = compute_dtype(a.dtype)
        positives = _positive_logits(a, other, scale, positive_index)
        ctx.set_materialize_grads(False)
        ctx.engine = engine
        ctx.exclude_offset = exclude_offset
        ctx.self_similarity = b is None
        ctx.save_for_backward(a, b, scale, lse_row, lse_col, positive_index)
        if not need_argmax:
            # A fresh empty tensor per missing output: one object returned twice confuses torch.compile.
            return (
                lse_row if need_row else a.new_empty(0, dtype=cdt),
                lse_col if need_col else a.new_empty(0, dtype=cdt),
                positives if positives is not None else a.new_empty(0, dtype=cdt),
            )
        argmax_row = argmax_row if argmax_row is not None else a.new_empty(0, dtype=torch.long)
        argmax_col = argmax_col if argmax_col is not None else a.new_empty(0, dtype=torch.long)
        ctx.mark_non_differentiable(argmax_row, argmax_col)
        return (
            lse_row if need_row else a.new_empty(0, dtype=cdt),
            lse_col if need_col else a.new_empty(0, dtype=cdt),
            positives if positives is not None else a.new_empty(0, dtype=cdt),
            argmax_row,
            argmax_col,
        )

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad_row, grad_col, grad_positives, *_argmax_grads):
        a, b, scale, lse_row, lse_col, positive_index = ctx.saved_tensors
        other = a if ctx.self_similarity else b
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        if ctx.self_similarity:
            need_b = need_a
        if lse_row is None:
            grad_row = None
        if lse_col is None:
            grad_col = None
        if positive_index is None:
            grad_positives = None
        need_a_product = need_a or need_scale
        grad_a_unscaled = grad_b_unscaled = None
        if grad_row is not None or grad_col is not None:
            grad_a_unscaled, grad_b_unscaled = ctx.engine.lse_backward(
                a, other, scale, lse_row, lse_col, grad_row, grad_col,
                exclude_offset=ctx.exclude_offset, need_a=need_a_product, need_b=need_b,
            )
        grad_a_unscaled, grad_b_unscaled = _add_positive_grads(
            grad_positives, a, other, positive_index, grad_a_unscaled, grad_b_unscaled, need_a_product, need_b
        )
        if grad_a_unscaled is None and grad_b_unscaled is None:
            return (None,) * 9
        grad_scale = _scale_grad(a, grad_a_unscaled, scale) if need_scale else None
        if ctx.self_similarity:
            total = grad_a_unscaled if grad_b_unscaled is None else grad_a_unscaled.add_(grad_b_unscaled)
            return _scaled_grad(total, scale, a), None, grad_scale, None, None, None, None, None, None
        grad_a = _scaled_grad(grad_a_unscaled, scale, a) if need_a else None
        grad_b = _scaled_grad(grad_b_unscaled, scale, b) if need_b else None
        return grad_a, grad_b, grad_scale, None, None, None, None, None, None


class BlockwiseSigLipSum(torch.autograd.Function):
    """Σᵢⱼ softplus(−zᵢⱼ·(s·Aᵢ·Bⱼ + bias)) without materialising S; zᵢⱼ = +1 iff j = i + positive_offset.

    ``apply(a, b, scale, bias, engine, positive_offset)`` with a: [n, d], b: [m, d], scale: 0-dim,
    bias: 0-dim or None; returns the 0-dim sum in fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    @_forward_without_autocast
    def forward(ctx, a, b, scale, bias, engine, positive_offset):
        total = engine.siglip_forward(a, b, scale, bias, positive_offset=positive_offset)
        ctx.engine = engine
        ctx.positive_offset = positive_offset
        ctx.save_for_backward(a, b, scale, bias)
        return total

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad_total):
        a, b, scale, bias = ctx.saved_tensors
        need_a, need_b, need_scale, need_bias = ctx.needs_input_grad[:4]
        grad_a_unscaled, grad_b_unscaled, grad_bias = ctx.engine.siglip_backward(
            a, b, scale, bias, grad_total,
            positive_offset=ctx.positive_offset, need_a=need_a or need_scale, need_b=need_b,
        )
        grad_scale = _scale_grad(a, grad_a_unscaled, scale) if need_scale else None
        grad_a = _scaled_grad(grad_a_unscaled, scale, a) if need_a else None
        grad_b = _scaled_grad(grad_b_unscaled, scale, b) if need_b else None
        grad_bias = grad_bias.to(bias.dtype).reshape(bias.shape) if need_bias else None
        return grad_a, grad_b, grad_scale, grad_bias, None, None


class BlockwiseDistill(torch.autograd.Function):
    """Student LSEs, distillation cross terms and positive logits of S = s·A·Bᵀ against T = s_t·A_t·B_tᵀ.

    ``apply(a, b, scale, a_t, b_t, scale_t, engine, need_row, need_col, positive_index)`` with a: [n, d],
    b: [m, d], a_t: [n, d_t], b_t: [m, d_t], scales 0-dim. Returns ``(lse_row [n], lse_col [m], cross_row [n],
    cross_col [m], positives [n])`` in fp32 (fp64 for fp64 inputs), where crossᵢ = Σⱼ softmax(T)ᵢⱼ·Sᵢⱼ (by
    row, and by column for cross_col) and positivesᵢ = S[i, positive_index[i]]. An output not asked for is
    an empty tensor. Neither S nor T is materialised; the teacher LSEs are saved for backward.

    open_clip's distillation term per row is rᵢ − crossᵢ (softmax(T) sums to 1). Gradients reach the
    student features and scale, and the teacher's too when they require grad (through softmax(T), as in
    open_clip); all terms meet in fp32 before the single cast per input (see :class:`BlockwiseLogSumExp`).
    """

    @staticmethod
    @_forward_without_autocast
    def forward(ctx, a, b, scale, a_t, b_t, scale_t, engine, need_row, need_col, positive_index):
        stats = engine.distill_forward(a, b, scale, a_t, b_t, scale_t, need_row=need_row, need_col=need_col)
        positives = _positive_logits(a, b, scale, positive_index)
        ctx.set_materialize_grads(False)
        ctx.engine = engine
        ctx.save_for_backward(
            a, b, scale, a_t, b_t, scale_t, positive_index,
            stats.lse_row, stats.lse_col, stats.teacher_lse_row, stats.teacher_lse_col,
            stats.cross_row, stats.cross_col,
        )
        def out(x):
            # A fresh empty tensor per missing output (see BlockwiseLogSumExp.forward).
            return a.new_empty(0, dtype=compute_dtype(a.dtype)) if x is None else x

        return out(stats.lse_row), out(stats.lse_col), out(stats.cross_row), out(stats.cross_col), out(positives)

    @staticmethod
    @_backward_without_autocast
    def backward(ctx, grad_lse_row, grad_lse_col, grad_cross_row, grad_cross_col, grad_positives):
        a, b, scale, a_t, b_t, scale_t, positive_index, *saved = ctx.saved_tensors
        stats = DistillStats(*saved)
        need_a, need_b, need_scale, need_a_t, need_b_t, need_scale_t = ctx.needs_input_grad[:6]
        grads = DistillStats(
            lse_row=grad_lse_row if stats.lse_row is not None else None,
            lse_col=grad_lse_col if stats.lse_col is not None else None,
            cross_row=grad_cross_row if stats.cross_row is not None else None,
            cross_col=grad_cross_col if stats.cross_col is not None else None,
        )
        if positive_index is None:
            grad_positives = None
        need_a_product = need_a or need_scale
        need_a_t_product = need_a_t or need_scale_t
        grad_a_u = grad_b_u = grad_a_t_u = grad_b_t_u = None
        if any(g is not None for g in vars(grads).values()):
            grad_a_u, grad_b_u, grad_a_t_u, grad_b_t_u = ctx.engine.distill_backward(
                a, b, scale, a_t, b_t, scale_t, stats, grads,
                need_a=need_a_product, need_b=need_b, need_a_t=need_a_t_product, need_b_t=need_b_t,
            )
        grad_a_u, grad_b_u = _add_positive_grads(
            grad_positives, a, b, positive_index, grad_a_u, grad_b_u, need_a_product, need_b
        )
        grad_scale = _scale_grad(a, grad_a_u, scale) if need_scale and grad_a_u is not None else None
        grad_scale_t = _scale_grad(a_t, grad_a_t_u, scale_t) if need_scale_t and grad_a_t_u is not None else None
        return (
            _scaled_grad(grad_a_u, scale, a) if need_a else None,
            _scaled_grad(grad_b_u, scale, b) if need_b else None,
            grad_scale,
            _scaled_grad(grad_a_t_u, scale_t, a_t) if need_a_t else None,
            _scaled_grad(grad_b_t_u, scale_t, b_t) if need_b_t else None,
            grad_scale_t,
            None, None, None, None,
        )


class _KeepInGraph(torch.autograd.Function):
    """Return ``value`` unchanged and give ``anchor`` an exact zero gradient.

    open_clip's ClipLoss adds ``logit_bias`` to every logit, which cannot change a softmax; its gradient is
    zero, but the bias must stay in the autograd graph or DDP with ``find_unused_parameters=False`` fails.
    """

    @staticmethod
    def forward(ctx, value, anchor):
        ctx.anchor_meta = (anchor.shape, anchor.dtype, anchor.device)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.anchor_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def blockwise_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    engine,
    *,
    rows: bool = True,
    cols: bool = True,
    exclude_offset: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Differentiable row/column log-sum-exp of S = scale·a·bᵀ (see :class:`BlockwiseLogSumExp`).

    Args:
        a: [n, d]; b: [m, d], same dtype and device; scale: 0-dim tensor (may require grad).
        engine: an engine object (``fastcontrast._dispatch.resolve_engine``).
        rows / cols: which reductions to return.
        exclude_offset: drop entry (i, i + exclude_offset) from both reductions (self-similarity).
    Returns:
        ``(lse_row [n] or None, lse_col [m] or None)``, fp32 (fp64 for fp64 inputs).
    """
    lse_row, lse_col, _ = BlockwiseLogSumExp.apply(a, b, scale, engine, rows, cols, exclude_offset, None)
    return (lse_row if rows else None), (lse_col if cols else None)


def blockwise_lse_and_positives(
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    scale: torch.Tensor,
    engine,
    positive_index: torch.Tensor,
    *,
    rows: bool = True,
    cols: bool = False,
    exclude_offset: Optional[int] = None,
    return_argmax: bool = False,
) -> tuple:
    """The LSEs of :func:`blockwise_lse` plus the positive logits S[i, positive_index[i]], in one Function.

    Every softmax loss here is LSE − positive. Computing both in one Function sums their gradients in fp32
    before the single cast to the input dtype (see :class:`BlockwiseLogSumExp`).

    Args:
        a: [n, d]; b: [m, d], or None for S = scale·a·aᵀ (NT-Xent), where ``a`` gets one gradient.
        positive_index: [n] int64 column of each row's positive.
        rows, cols, exclude_offset: see :func:`blockwise_lse`.
        return_argmax: also return the int64 argmax of each row / column of S (lowest index on ties), from
            the same forward pass: retrieval top-1 without materialising the logits.
    Returns:
        ``(lse_row [n] or None, lse_col [m] or None, positives [n])``, fp32 (fp64 for fp64 inputs); with
        ``return_argmax``, followed by ``argmax_row [n] or None, argmax_col [m] or None``.
    """
    if not return_argmax:
        lse_row, lse_col, positives = BlockwiseLogSumExp.apply(
            a, b, scale, engine, rows, cols, exclude_offset, positive_index
        )
        return (lse_row if rows else None), (lse_col if cols else None), positives
    lse_row, lse_col, positives, argmax_row, argmax_col = BlockwiseLogSumExp.apply(
        a, b, scale, engine, rows, cols, exclude_offset, positive_index, True
    )
    if not rows:
        lse_row = argmax_row = None
    if not cols:
        lse_col = argmax_col = None
    return lse_row, lse_col, positives, argmax_row, argmax_col


def blockwise_siglip_sum(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    engine,
    *,
    positive_offset: int = 0,
) -> torch.Tensor:
    """Differentiable Σᵢⱼ softplus(−zᵢⱼ·(scale·aᵢ·bⱼ + bias)) (see :class:`BlockwiseSigLipSum`).

    Args:
        a: [n, d]; b: [m, d]; scale, bias: 0-dim tensors (bias may be None).
        positive_offset: zᵢⱼ = +1 where j = i + positive_offset, −1 elsewhere.
    Returns:
        0-dim sum, fp32 (fp64 for fp64 inputs).
    """
    return BlockwiseSigLipSum.apply(a, b, scale, bias, engine, positive_offset)


def keep_in_graph(value: torch.Tensor, anchor: Optional[torch.Tensor]) -> torch.Tensor:
    """``value``, with ``anchor`` (if a tensor that requires grad) attached with an exact zero gradient."""
    if anchor is None or not isinstance(anchor, torch.Tensor) or not anchor.requires_grad:
        return value
    return _KeepInGraph.apply(value, anchor)


def blockwise_distill(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    scale_t: torch.Tensor,
    engine,
    positive_index: torch.Tensor,
    *,
    rows: bool = True,
    cols: bool = True,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           torch.Tensor]:
    """Differentiable statistics of open_clip's distillation loss (see :class:`BlockwiseDistill`).

    Args:
        a: [n, d], b: [m, d] student features; scale: student scale, 0-dim.
        a_t: [n, d_t], b_t: [m, d_t] teacher features; scale_t: teacher scale, 0-dim.
        positive_index: [n] int64 column of each row's positive (the contrastive labels).
        rows / cols: which directions to compute.
    Returns:
        ``(lse_row, lse_col, cross_row, cross_col, positives)``: row fields [n] or None, column fields [m] or
        None, positives [n]; fp32 (fp64 for fp64 inputs). The distillation loss of a row is lse − cross.
    """
    lse_row, lse_col, cross_row, cross_col, positives = BlockwiseDistill.apply(
        a, b, scale, a_t, b_t, scale_t, engine, rows, cols, positive_index
    )
    if not rows:
        lse_row = cross_row = None
    if not cols:
        lse_col = cross_col = None
    return lse_row, lse_col, cross_row, cross_col, positives
