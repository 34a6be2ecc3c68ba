"""The differentiable core: autograd Functions over the blockwise reductions of S = s·A·Bᵀ.

They are the same for every engine (see :mod:`fastcontrast.engine`): they call the engine through the custom
ops of :mod:`fastcontrast.ops`, save only A, B, s (and b) plus the LSE vectors, never S, and turn the
engine's unscaled products into gradients:

    dA = s·(dS·B),   dB = s·(dSᵀ·A),   ds = Σᵢⱼ dSᵢⱼ·(Aᵢ·Bⱼ) = ⟨A, dS·B⟩,   db = Σᵢⱼ dSᵢⱼ.

The scale gradient therefore costs O(n·d) once dS·B is known: no extra pass over S. Reading it as
⟨A, dS·B⟩ rather than as ⟨A, dA⟩/s is the same number without a division by s (NT-Xent's s = 1/τ
may be negative, and a tiny s would amplify rounding).

Every Function runs its engine with autocast off: the engines compute in fp32 (fp64) on purpose, and an
ambient ``torch.autocast`` would turn their GEMMs back into bf16 / fp16 ones.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from fastcontrast import ops
from fastcontrast.engine import DistillStats, Engine, compute_dtype, present


def _autocast_off(device_type: str):
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _scaled_grad(product: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
    """s·product in the input's dtype, or None for an empty (not computed) product."""
    if not present(product):
        return None
    return (product * scale.detach().to(product.dtype)).to(like.dtype)


def _scale_grad(a: torch.Tensor, grad_a_unscaled: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # ⟨A, dS·B⟩ in the compute dtype, then back to the scale's own dtype (fp32 under AMP).
    inner = torch.dot(a.to(grad_a_unscaled.dtype).reshape(-1), grad_a_unscaled.reshape(-1))
    return inner.to(scale.dtype).reshape(scale.shape)


def _check_symmetric(b, need_col, exclude_offset, private_columns, need_argmax) -> None:
    """What a symmetric call (S = s·A·Aᵀ reduced over its lower block triangle) supports; internal callers only."""
    if b is not None or need_col or exclude_offset not in (None, 0) or private_columns or need_argmax:
        raise ValueError("symmetric=True needs b=None (S = s·A·Aᵀ), rows only, exclude_offset None or 0, no "
                         "private columns and no argmax.")


class BlockwiseLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exp of S = s·A·Bᵀ and the positive logits, without materialising S.

    ``apply(a, b, scale, engine, need_row, need_col, positive_index, exclude_offset, exclude_positive,
    private_columns, need_argmax, symmetric)`` with a: [n, d], b: [m, d] or None (then b is a: self-similarity,
    one gradient), scale: 0-dim, engine: an :class:`~fastcontrast.engine.Engine`, positive_index: [n] int64 or
    None; the masks as in :mod:`fastcontrast.engine`. ``symmetric`` (b None, rows only, the diagonal and an
    involutive positive index the only masks): S = s·A·Aᵀ is symmetric and the engine may reduce one block
    triangle only (both do: :mod:`fastcontrast.blockwise_symmetric`, the Triton kernels' SYMMETRIC). Returns
    ``(lse_row [n], lse_col [m], positives [n], argmax_row [n], argmax_col [m], lse_row_low [n],
    lse_col_low [m])``: fp32 (fp64 for fp64 inputs), argmaxes int64; argmaxes and the LSEs' low parts
    (:mod:`fastcontrast.lse_split`) are not differentiable; a result not asked for is an empty tensor.

    The positives come from the engine, out of the tiles its LSE reduced, and their gradient is folded into
    dS there: near convergence a row's softmax approaches the one-hot of its positive, and dS at the
    positive is p − 1, the difference of two numbers near 1, which keeps its digits only when formed in
    fp32 before any rounding to the input dtype.
    """

    @staticmethod
    def forward(ctx, a, b, scale, engine: Engine, need_row, need_col, positive_index, exclude_offset=None,
                exclude_positive=False, private_columns=0, need_argmax=False, symmetric=False):
        other = a if b is None else b
        if symmetric:
            _check_symmetric(b, need_col, exclude_offset, private_columns, need_argmax)
        with _autocast_off(a.device.type):
            lse_row, lse_col, positives, argmax_row, argmax_col, low_row, low_col = ops.lse_forward(
                a, other, scale, positive_index, need_row, need_col, exclude_offset, exclude_positive,
                private_columns, need_argmax, symmetric, engine.name, engine.chunk_bytes,
            )
        ctx.set_materialize_grads(False)
        ctx.engine = engine
        ctx.symmetric = symmetric
        ctx.mask = (exclude_offset, exclude_positive, private_columns)
        ctx.self_similarity = b is None
        ctx.save_for_backward(a, b, scale, lse_row, lse_col, positive_index)
        ctx.mark_non_differentiable(argmax_row, argmax_col, low_row, low_col)
        return lse_row, lse_col, positives, argmax_row, argmax_col, low_row, low_col

    @staticmethod
    def backward(ctx, grad_row, grad_col, grad_positives, _grad_argmax_row, _grad_argmax_col, _grad_low_row,
                 _grad_low_col):
        a, b, scale, lse_row, lse_col, positive_index = ctx.saved_tensors
        other = a if ctx.self_similarity else b
        need_a, need_b, need_scale = ctx.needs_input_grad[:3]
        if ctx.self_similarity:
            need_b = need_a
        # An output that was not computed (empty) has no gradient to pass on.
        grad_row = grad_row if present(lse_row) else None
        grad_col = grad_col if present(lse_col) else None
        grad_positives = grad_positives if positive_index is not None else None
        none = (None,) * 9  # engine, flags, index and masks take no gradient
        if grad_row is None and grad_col is None and grad_positives is None:
            return (None, None, None) + none
        engine = ctx.engine
        with _autocast_off(a.device.type):
            grad_a_unscaled, grad_b_unscaled = ops.lse_backward(
                a, other, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives,
                *ctx.mask, need_a or need_scale, need_b, ctx.symmetric, engine.name, engine.chunk_bytes,
            )
            if ctx.symmetric:
                # (dS + dSᵀ)·A: ⟨A, dSᵀ·A⟩ = ⟨A, dS·A⟩, so the scale's ⟨A, dS·A⟩ is half of ⟨A, (dS + dSᵀ)·A⟩.
                grad_scale = _scale_grad(a, grad_a_unscaled, scale) / 2 if need_scale else None
                return (_scaled_grad(grad_a_unscaled, scale, a) if need_a else None, None, grad_scale) + none
            grad_scale = _scale_grad(a, grad_a_unscaled, scale) if need_scale else None
            if ctx.self_similarity:
                total = grad_a_unscaled.add_(grad_b_unscaled) if present(grad_b_unscaled) else grad_a_unscaled
                return (_scaled_grad(total, scale, a), None, grad_scale) + none
            grad_a = _scaled_grad(grad_a_unscaled, scale, a) if need_a else None
            grad_b = _scaled_grad(grad_b_unscaled, scale, b) if need_b else None
        return (grad_a, grad_b, grad_scale) + none


class BlockwiseSigLipSum(torch.autograd.Function):
    """Σᵢⱼ softplus(−zᵢⱼ·(s·Aᵢ·Bⱼ + bias)) without materialising S; zᵢⱼ = +1 iff j = i + positive_offset.

    ``apply(a, b, scale, bias, engine, positive_offset, needs)`` with a: [n, d], b: [m, d], scale: 0-dim,
    bias: 0-dim or None, needs: which of (a, b, scale, bias) take a gradient (all False: no gradient);
    returns the 0-dim sum in fp32 (fp64 for fp64 inputs).

    SigLIP's dS is elementwise in S, so with any gradient needed the forward computes it in the same sweep as
    the sum (:meth:`~fastcontrast.engine.Engine.siglip_forward_backward`, at upstream gradient 1) and keeps
    the unscaled products; the backward only multiplies them by its upstream gradient. Forward + backward
    then sweep S once (3 GEMM passes on the panel path) instead of twice. The price: a forward under grad
    whose backward never runs has paid for the gradient.
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, engine: Engine, positive_offset, needs=(False, False, False, False)):
        need_a, need_b, need_scale, need_bias = needs
        ctx.set_materialize_grads(False)
        with _autocast_off(a.device.type):
            if not any(needs):
                return ops.siglip_forward(a, b, scale, bias, positive_offset, engine.name, engine.chunk_bytes)
            total, grad_a, grad_b, grad_bias = ops.siglip_forward_backward(
                a, b, scale, bias, positive_offset, need_a or need_scale, need_b, engine.name, engine.chunk_bytes,
            )
            # ds = ⟨A, dS·B⟩ now, in the compute dtype: dS·B is then kept only if A takes a gradient.
            inner = torch.dot(a.to(grad_a.dtype).reshape(-1), grad_a.reshape(-1)) if need_scale else None
        keep = [grad_a if need_a else None, grad_b if need_b else None, inner, grad_bias if need_bias else None]
        ctx.save_for_backward(scale, bias, *keep)
        ctx.dtypes = (a.dtype, b.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scale, bias, grad_a, grad_b, inner, grad_bias = ctx.saved_tensors
        if grad_total is None:
            return (None,) * 7
        outs = siglip_gradients_at(grad_total, scale, bias, ctx.dtypes, grad_a, grad_b, inner, grad_bias)
        return outs[0], outs[1], outs[2], outs[3], None, None, None


def siglip_gradients_at(grad_total, scale, bias, dtypes, grad_a, grad_b, inner, grad_bias) -> list:
    """``[dA, dB, ds, db]`` (None where not kept) for upstream gradient ``grad_total``, from what a SigLIP
    forward kept at upstream gradient 1: the unscaled products dS·B, dSᵀ·A (compute dtype), ``inner`` =
    ⟨A, dS·B⟩ and Σ dS. Fresh tensors: what was kept stays as it is (a second backward with retain_graph)."""
    with _autocast_off(grad_total.device.type):
        g = grad_total.detach()
        factor = (scale.detach().to(g.dtype) * g).reshape(())  # s·g once, then one multiply per product
        outs = [None if x is None else (x * factor.to(x.dtype)).to(dtype)
                for x, dtype in ((grad_a, dtypes[0]), (grad_b, dtypes[1]))]
        outs.append(None if inner is None else (inner * g.to(inner.dtype)).to(scale.dtype).reshape(scale.shape))
        outs.append(None if grad_bias is None else (grad_bias * g.to(grad_bias.dtype)).to(bias.dtype).reshape(
            bias.shape))
    return outs


def gradients_needed(*tensors: Optional[torch.Tensor]) -> tuple[bool, ...]:
    """Which tensors will take a gradient from an op applied now (grad mode on and ``requires_grad``)."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


def _positive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, positive_index: torch.Tensor):
    """S[i, positive_index[i]] = s·⟨aᵢ, b[positive_index[i]]⟩ in the compute dtype."""
    cdt = compute_dtype(a.dtype)
    partner = b.index_select(0, positive_index).to(cdt)
    return (a.to(cdt) * partner).sum(dim=1) * scale.detach().to(cdt)


def _add_positive_grads(grad_positives, a, b, positive_index, grad_a_unscaled, grad_b_unscaled, need_a, need_b):
    """Add the positives' unscaled gradients to the engine's dS·B and dSᵀ·A, in the compute dtype."""
    cdt = compute_dtype(a.dtype)
    weight = grad_positives.to(cdt).unsqueeze(1)
    if need_a:
        grad_a_unscaled.add_(weight * b.index_select(0, positive_index).to(cdt))
    if need_b:
        grad_b_unscaled.index_add_(0, positive_index, weight * a.to(cdt))


class BlockwiseDistill(torch.autograd.Function):
    """Student LSEs, distillation cross terms and positive logits of S = s·A·Bᵀ against T = s_t·A_t·B_tᵀ.

    ``apply(a, b, scale, a_t, b_t, scale_t, engine, need_row, need_col, positive_index)`` with a: [n, d],
    b: [m, d], a_t: [n, d_t], b_t: [m, d_t], scales 0-dim, positive_index [n] int64. Returns
    ``(lse_row [n], lse_col [m], cross_row [n], cross_col [m], positives [n])`` in fp32 (fp64 for fp64
    inputs), where crossᵢ = Σⱼ softmax(T)ᵢⱼ·Sᵢⱼ (by row, and by column for cross_col) and positivesᵢ =
    S[i, positive_index[i]]; a direction not asked for is empty. Neither S nor T is materialised; the teacher
    LSEs are saved for backward.

    open_clip's distillation term per row is rᵢ − crossᵢ (softmax(T) sums to 1). Gradients reach the
    student features and scale, and the teacher's too when they require grad (through softmax(T), as in
    open_clip); all terms meet in fp32 before the single cast per input. The positives here are a plain
    O(n·d) dot product outside the engine (the distillation engine has no positive output).
    """

    @staticmethod
    def forward(ctx, a, b, scale, a_t, b_t, scale_t, engine: Engine, need_row, need_col, positive_index):
        with _autocast_off(a.device.type):
            stats = DistillStats(*ops.distill_forward(
                a, b, scale, a_t, b_t, scale_t, need_row, need_col, engine.name, engine.chunk_bytes
            ))
            positives = _positive_logits(a, b, scale, positive_index)
        ctx.set_materialize_grads(False)
        ctx.engine = engine
        ctx.save_for_backward(a, b, scale, a_t, b_t, scale_t, positive_index, *stats.as_list())
        return stats.lse_row, stats.lse_col, stats.cross_row, stats.cross_col, positives

    @staticmethod
    def backward(ctx, grad_lse_row, grad_lse_col, grad_cross_row, grad_cross_col, grad_positives):
        a, b, scale, a_t, b_t, scale_t, positive_index, *saved = ctx.saved_tensors
        stats = DistillStats(*saved)
        need_a, need_b, need_scale, need_a_t, need_b_t, need_scale_t = ctx.needs_input_grad[:6]
        rows, cols = present(stats.lse_row), present(stats.lse_col)
        grads = DistillStats(
            lse_row=grad_lse_row if rows else None,
            lse_col=grad_lse_col if cols else None,
            cross_row=grad_cross_row if rows else None,
            cross_col=grad_cross_col if cols else None,
        )
        need_a_product = need_a or need_scale
        need_a_t_product = need_a_t or need_scale_t
        engine = ctx.engine
        with _autocast_off(a.device.type):
            if any(g is not None for g in grads.as_list()):
                grad_a_u, grad_b_u, grad_a_t_u, grad_b_t_u = ops.distill_backward(
                    a, b, scale, a_t, b_t, scale_t, stats.as_list(), grads.as_list(),
                    need_a_product, need_b, need_a_t_product, need_b_t, engine.name, engine.chunk_bytes,
                )
            else:
                cdt = compute_dtype(a.dtype)
                grad_a_u, grad_b_u = (torch.zeros(x.shape, dtype=cdt, device=a.device) for x in (a, b))
                grad_a_t_u = grad_b_t_u = a.new_empty(0, dtype=cdt)
            if grad_positives is not None:
                _add_positive_grads(grad_positives, a, b, positive_index, grad_a_u, grad_b_u, need_a_product,
                                    need_b)
            grad_scale = _scale_grad(a, grad_a_u, scale) if need_scale else None
            grad_scale_t = _scale_grad(a_t, grad_a_t_u, scale_t) if need_scale_t and present(grad_a_t_u) else None
            return (
                _scaled_grad(grad_a_u, scale, a) if need_a else None,
                _scaled_grad(grad_b_u, scale, b) if need_b else None,
                grad_scale,
                _scaled_grad(grad_a_t_u, scale_t, a_t) if need_a_t else None,
                _scaled_grad(grad_b_t_u, scale_t, b_t) if need_b_t else None,
                grad_scale_t,
                None, None, None, None,
            )


class PairDots(torch.autograd.Function):
    """sₖ = ⟨x[rows[k]], y[cols[k]]⟩ for P index pairs, in the compute dtype, saving no [P, d] tensor.

    ``apply(x, y, rows, cols, chunk)`` with x: [n, d], y: [m, d] (or the same tensor), rows, cols: [P] int64;
    returns [P]. The pairs are taken ``chunk`` at a time in both directions (a miner's pairs can number
    n², and their gathered rows would then be an n²×d tensor).
    """

    @staticmethod
    def forward(ctx, x, y, rows, cols, chunk):
        cdt = compute_dtype(x.dtype)
        out = torch.empty(rows.shape[0], dtype=cdt, device=x.device)
        for start in range(0, rows.shape[0], chunk):
            r, c = rows[start : start + chunk], cols[start : start + chunk]
            out[start : start + chunk] = (x.index_select(0, r).to(cdt) * y.index_select(0, c).to(cdt)).sum(dim=1)
        ctx.chunk = chunk
        ctx.save_for_backward(x, y, rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, rows, cols = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[:2]
        cdt = grad.dtype
        grad_x = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_x else None
        grad_y = torch.zeros(y.shape, dtype=cdt, device=y.device) if need_y else None
        for start in range(0, rows.shape[0], ctx.chunk):
            r, c = rows[start : start + ctx.chunk], cols[start : start + ctx.chunk]
            g = grad[start : start + ctx.chunk].unsqueeze(1)
            if need_x:
                grad_x.index_add_(0, r, g * y.index_select(0, c).to(cdt))
            if need_y:
                grad_y.index_add_(0, c, g * x.index_select(0, r).to(cdt))
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_y is None else grad_y.to(y.dtype),
                None, None, None)


def pair_dots(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              chunk_elements: int = 1 << 22) -> torch.Tensor:
    """[P] dot products of the index pairs (see :class:`PairDots`), ``chunk_elements`` gathered values at a time."""
    return PairDots.apply(x, y, rows, cols, max(1, chunk_elements // max(1, x.shape[1])))


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


def keep_in_graph(value: torch.Tensor, anchor: Optional[torch.Tensor]) -> torch.Tensor:
    """``value``, with ``anchor`` (if a tensor that requires grad) attached with an exact zero gradient."""
    if anchor is None or not isinstance(anchor, torch.Tensor) or not anchor.requires_grad:
        return value
    return _KeepInGraph.apply(value, anchor)


def _or_none(x: torch.Tensor, wanted: bool) -> Optional[torch.Tensor]:
    return x if wanted else None


def blockwise_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    engine: Engine,
    *,
    rows: bool = True,
    cols: bool = True,
    exclude_offset: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Differentiable row/column log-sum-exp of S = scale·a·bᵀ (see :class:`BlockwiseLogSumExp`).

    Args:
        a: [n, d]; b: [m, d], same dtype and device; scale: 0-dim tensor (may require grad).
        engine: an engine (``fastcontrast.blockwise.TorchEngine(...)``, ``fastcontrast.kernels.engine.
            TritonEngine()``, or what ``fastcontrast._dispatch.resolve_engine`` returns).
        rows / cols: which reductions to return.
        exclude_offset: drop entry (i, i + exclude_offset) from both reductions (self-similarity).
    Returns:
        ``(lse_row [n] or None, lse_col [m] or None)``, fp32 (fp64 for fp64 inputs).
    """
    lse_row, lse_col, *_ = BlockwiseLogSumExp.apply(a, b, scale, engine, rows, cols, None, exclude_offset)
    return _or_none(lse_row, rows), _or_none(lse_col, cols)


def blockwise_lse_and_positives(
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    scale: torch.Tensor,
    engine: Engine,
    positive_index: torch.Tensor,
    *,
    rows: bool = True,
    cols: bool = False,
    exclude_offset: Optional[int] = None,
    return_argmax: bool = False,
) -> tuple:
    """The LSEs of :func:`blockwise_lse` plus the positive logits S[i, positive_index[i]], in one Function.

    Every softmax loss here is LSE − positive; both come from the same tiles, so the difference is exactly
    0 on a one-hot row, and their gradients meet in fp32 (see :class:`BlockwiseLogSumExp`).

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
    lse_row, lse_col, positives, argmax_row, argmax_col, _, _ = BlockwiseLogSumExp.apply(
        a, b, scale, engine, rows, cols, positive_index, exclude_offset, False, 0, return_argmax
    )
    lse_row, lse_col = _or_none(lse_row, rows), _or_none(lse_col, cols)
    if not return_argmax:
        return lse_row, lse_col, positives
    return lse_row, lse_col, positives, _or_none(argmax_row, rows), _or_none(argmax_col, cols)


def blockwise_siglip_sum(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    engine: Engine,
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
    return BlockwiseSigLipSum.apply(a, b, scale, bias, engine, positive_offset, gradients_needed(a, b, scale, bias))


def blockwise_distill(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    scale_t: torch.Tensor,
    engine: Engine,
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
    return _or_none(lse_row, rows), _or_none(lse_col, cols), _or_none(cross_row, rows), _or_none(cross_col, cols), \
        positives
