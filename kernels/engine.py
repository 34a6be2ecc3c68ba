"""The Triton engine: tensor-in / tensor-out launchers behind :class:`fastcontrast.engine.Engine`.

Inputs may be fp16, bf16 or fp32 (fp32 uses TF32 only when the user's torch settings say so); LSEs, sums
and gradients come back in fp32. What every launch here takes care of, because a GPU run would otherwise go
wrong where the interpreter cannot see it:

- the device: triton launches on the *current* CUDA device and its stream, so every launch runs under a
  guard for the inputs' device (:func:`launch_device`);
- the binaries: triton compiles one variant per divisibility of each pointer, d and stride by 16, so
  features whose d, row stride or address is not a multiple of 16 are copied once into an aligned,
  zero-padded buffer (zero columns change no dot product) and every tensor argument is 16-byte aligned:
  only the aligned binaries, the ones the compile checks cover, ever launch;
- no host sync: the scale and bias are read from device pointers, never ``.item()``; lengths and offsets
  are not specialised on (``do_not_specialize``), so a new batch size does not recompile;
- fp16 gradients: dS is scaled by a power of two before its cast to fp16 (tiles.as_dot_operand).

This module holds the engine and the forward LSE launcher; the launch plumbing is in ``launch.py``, the
gradient launchers in ``gradient_launch.py`` (fused kernels up to ``configs.fused_max_d``, the panel path
above; configs.py says why) and the distillation launchers in ``distill_launch.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
from fastcontrast.kernels.configs import (
    DISTILL_FUSED_MAX_D,
    distill_config,
    forward_config,
    target_for,
)
from fastcontrast.kernels.distill_launch import (
    fused_distill_gradients,
    launch_distill_forward,
    panel_distill_gradients,
)
from fastcontrast.kernels.gradient_launch import gradients, symmetric_gradients
from fastcontrast.kernels.launch import (
    MODE_LSE,
    MODE_SIGLIP,
    aligned_features,
    aligned_vector,
    bias_or_zero,
    column_splits,
    empty_results,
    gradient_scale,
    launch_device,
    launch_flags,
    merge_argmax,
    merge_lse_in_place,
    merge_partials,
    unpadded,
)
from fastcontrast.kernels.lse_forward import lse_forward_kernel
from fastcontrast.kernels.masked_launch import guide_features, masked_gradients, masked_lse_forward, pair_similarity
from fastcontrast.kernels.siglip_forward import siglip_forward_kernel

from fastcontrast.engine import DistillStats, empty_like_result

# Merge the column LSE in the same pass as the row LSE while its scratch (each row block's column LSEs as exact
# pairs: 2 · n / BLOCK_M · m fp32) stays under this many bytes, i.e. up to N ≈ 90k at BLOCK_M = 128, under the
# gradient sweep's own peak there; past that a second pass over S is cheaper than the scratch's memory. Also
# what keeps the scratch's offsets (int32 in the kernels) under 2³¹.
SINGLE_PASS_SCRATCH_BYTES = 512 * 2**20


class TritonEngine:
    """Fused Triton kernels for the blockwise LSE, SigLIP and distillation reductions and their gradients
    (implements :class:`fastcontrast.engine.Engine`; see there for every argument and result)."""

    name = "triton"
    chunk_bytes = 0  # no chunks: the kernels tile S themselves

    def lse_forward(self, a, b, scale, positive_index, *, need_row, need_col, exclude_offset, exclude_positive,
                    private_columns, need_argmax, symmetric=False):
        if symmetric:
            return self._symmetric_lse_forward(a, scale, positive_index, exclude_offset=exclude_offset,
                                               exclude_positive=exclude_positive)
        with launch_device(a):
            a, b = aligned_features(a), aligned_features(b)
            scale = aligned_vector(scale)
            positive_index = aligned_vector(positive_index, torch.int64)
            n, m = a.shape[0], b.shape[0]
            masks = dict(exclude_offset=exclude_offset, exclude_positive=exclude_positive,
                         private_columns=private_columns)
            lse_row = lse_col = positives = argmax_row = argmax_col = low_row = low_col = None
            config = forward_config(target_for(a.device), a.dtype, a.shape[1])
            n_row_blocks = triton.cdiv(n, config.block_m)
            scratch = n_row_blocks * m * (8 + (12 if need_argmax else 0))
            single_pass = need_row and need_col and scratch <= SINGLE_PASS_SCRATCH_BYTES
            if need_row or positive_index is not None:
                col_partial = col_low = col_max = col_argmax = None
                if single_pass:
                    # Each row block's column LSEs as exact pairs (fastcontrast/lse_split.py).
                    col_partial = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                    col_low = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                    if need_argmax:
                        col_max = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                        col_argmax = torch.empty((n_row_blocks, m), dtype=torch.int64, device=a.device)
                (lse_row, low_row), positives, argmax_row = _launch_lse(
                    x=a, y=b, scale=scale, x_is_a=True, positive_index=positive_index,
                    need_argmax=need_argmax and need_row, col_partial=col_partial, col_low=col_low, col_max=col_max,
                    col_argmax=col_argmax, config=config, **masks,
                )
                if single_pass:
                    if need_argmax:
                        argmax_col = merge_argmax(col_max, col_argmax)
                    lse_col, low_col = merge_partials(col_partial, col_low)
                if not need_row:  # the pass ran for the positives alone
                    lse_row = argmax_row = low_row = None
            if need_col and lse_col is None:
                # The column pass needs the positive index only where a mask depends on it.
                masked_by_positive = exclude_positive or private_columns > 0
                (lse_col, low_col), _, argmax_col = _launch_lse(
                    x=b, y=a, scale=scale, x_is_a=False, positive_index=positive_index if masked_by_positive else None,
                    need_argmax=need_argmax, config=config,
                    **{**masks, "exclude_offset": None if exclude_offset is None else -exclude_offset},
                )
        return empty_results(a, lse_row, lse_col, positives) + tuple(
            empty_like_result(a, torch.long) if x is None else x for x in (argmax_row, argmax_col)
        ) + empty_results(a, low_row, low_col)

    def _symmetric_lse_forward(self, z, scale, positive_index, *, exclude_offset, exclude_positive):
        """Row LSE (exact pairs) and positives of S = s·Z·Zᵀ over its upper block triangle (lse_forward_kernel's
        SYMMETRIC): about half a pass. The scratch holds one row of pairs per row block; where all of them would
        pass :data:`SINGLE_PASS_SCRATCH_BYTES`, the row blocks run in bands, each band's pairs merged in place
        into the running pair (scratch row 0) before the next band reuses the scratch."""
        with launch_device(z):
            z, scale = aligned_features(z), aligned_vector(scale)
            n = z.shape[0]
            config = forward_config(target_for(z.device), z.dtype, z.shape[1])
            row_blocks = triton.cdiv(n, config.block_m)
            # Rows of n pairs (8 bytes each) per band, one of them the running pair.
            band = max(1, min(row_blocks, SINGLE_PASS_SCRATCH_BYTES // (8 * n) - 1))
            has_running = band < row_blocks
            lse_part, low_part = (torch.empty((band + has_running, n), dtype=torch.float32, device=z.device)
                                  for _ in range(2))
            rows_lse, rows_low = lse_part[has_running:], low_part[has_running:]
            positives = None
            if positive_index is not None:
                positive_index = aligned_vector(positive_index, torch.int64)
                # A row whose positive the index places outside the matrix keeps 0, as the two-tower route.
                positives = torch.zeros(n, dtype=torch.float32, device=z.device)
            if has_running:  # merged into band by band, in place
                out = (lse_part[0], low_part[0])
            else:
                out = tuple(torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(2))
            for first_block in range(0, row_blocks, band):
                blocks = min(band, row_blocks - first_block)
                start = first_block * config.block_m
                lse_forward_kernel[(blocks, 1)](
                    X=z, Y=z, SCALE=scale, POSITIVE_INDEX=positive_index, LSE_X=rows_lse,
                    LOW_X=rows_low, POSITIVES=positives, COL_PARTIAL=rows_lse, COL_LOW=rows_low, ARGMAX_X=None,
                    MAX_X=None, COL_ARGMAX=None, COL_MAX=None, n_x=n, n_y=n, d=z.shape[1], stride_x=z.stride(0),
                    stride_y=z.stride(0), exclude_offset=0, private_columns=0, cols_per_split=n,
                    block_offset=first_block, HAS_EXCLUDE=exclude_offset is not None,
                    HAS_POSITIVES=positive_index is not None, EXCLUDE_POSITIVE=exclude_positive, HAS_PRIVATE=False,
                    X_IS_A=True, WRITE_COL_PARTIAL=True, WRITE_ARGMAX=False, X_RESIDENT=z.shape[1] <= config.block_d,
                    SYMMETRIC=True, **launch_flags(config, z),
                )
                # Entries before the band are final; the band's rows hold pairs from its diagonal on.
                if first_block == 0:
                    parts = (rows_lse[:blocks, start:], rows_low[:blocks, start:])
                    first = 0
                else:  # the running pair first (every entry), then the band's row k from block k on
                    parts = (lse_part[:blocks + 1, start:], low_part[:blocks + 1, start:])
                    first = config.block_m
                merge_partials(*parts, out=(out[0][start:], out[1][start:]), block_rows=config.block_m,
                               first=first)
            if has_running:
                # Apart from the scratch, which the saved LSE would otherwise keep alive into the backward.
                out = tuple(x.clone() for x in out)
        return (out[0], empty_like_result(z), empty_like_result(z) if positives is None else positives,
                empty_like_result(z, torch.long), empty_like_result(z, torch.long), out[1], empty_like_result(z))

    def lse_backward(self, a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives, *,
                     exclude_offset, exclude_positive, private_columns, need_a, need_b, symmetric=False):
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            row_stats = None if grad_row is None else (aligned_vector(lse_row), aligned_vector(grad_row, torch.float32))
            col_stats = None if grad_col is None else (aligned_vector(lse_col), aligned_vector(grad_col, torch.float32))
            if positive_index is not None and grad_positives is None:
                grad_positives = torch.zeros(positive_index.shape, dtype=torch.float32, device=a.device)
            grad_positives = aligned_vector(grad_positives, torch.float32)
            problem = dict(
                a=a, b=b, d=d, scale=aligned_vector(scale), bias=None, mode=MODE_LSE, row_stats=row_stats,
                col_stats=col_stats, grad_total=None, ds_scale=gradient_scale(a.dtype, grad_row, grad_col,
                                                                              grad_positives),
                positive_index=aligned_vector(positive_index, torch.int64), grad_positives=grad_positives,
                offset=exclude_offset, exclude_positive=exclude_positive, private_columns=private_columns,
            )
            if symmetric:  # b is a: (dS + dSᵀ)·A, from one S tile per entry pair on the panel path
                # G = dS + dSᵀ: twice dS's bound for the fp16 scale.
                problem["ds_scale"] = gradient_scale(a.dtype, grad_row, grad_row, grad_positives, grad_positives)
                grad_a, grad_b = symmetric_gradients(problem), None
            else:
                grad_a, grad_b, _, _ = gradients(problem, need_a=need_a, need_b=need_b, need_bias=False)
        return empty_results(a, *unpadded(d, grad_a, grad_b))

    def pair_similarity(self, x, y, offset, *, guide=False, model_dtype=None):
        """xᵢ·y₍ᵢ₊offset₎ [n] fp32 (x [n, d], y [m, d], no gradient), in the arithmetic of the masked kernels'
        model tile (``guide``: of their guide tile) for model features of ``model_dtype`` (default x's): a
        threshold built from it ties exactly with an equal candidate in :meth:`masked_lse_forward` and
        :meth:`masked_lse_backward` (kernels/masked.py)."""
        prepared = guide_features if guide else aligned_features
        with launch_device(x):
            return pair_similarity(prepared(x), prepared(y), offset, guide=guide,
                                   model_dtype=x.dtype if model_dtype is None else model_dtype)

    def masked_lse_forward(self, a, b, scale, a_guide, b_guide, threshold, *, protect_offset, exclude_offset,
                           need_argmax):
        """``(lse [n], positives [n], argmax [n])`` of the row LSE of S = s·A·Bᵀ without the entries a rule
        leaves out: column j of row i goes when Gᵢⱼ > thresholdᵢ, G = a_guide·b_guideᵀ ([n, d_g], [m, d_g]) or,
        both None, A·Bᵀ itself (before the scale); column i + ``protect_offset`` always stays (its logit is
        positivesᵢ), column i + ``exclude_offset`` always goes (each when not None). lse is −inf where nothing
        stays; argmax of the unmasked similarity with ``need_argmax``; empty results where not asked."""
        with launch_device(a):
            a, b = aligned_features(a), aligned_features(b)
            a_guide, b_guide = guide_features(a_guide), guide_features(b_guide)
            lse, positives, argmax = masked_lse_forward(
                a, b, aligned_vector(scale, torch.float32), a_guide, b_guide, aligned_vector(threshold, torch.float32),
                protect_offset=protect_offset, exclude_offset=exclude_offset, need_argmax=need_argmax,
            )
        return (lse, empty_like_result(a) if positives is None else positives,
                empty_like_result(a, torch.long) if argmax is None else argmax)

    def masked_lse_backward(self, a, b, scale, a_guide, b_guide, threshold, lse, grad_lse, grad_positives, *,
                            protect_offset, exclude_offset, need_a, need_b):
        """Unscaled ``(dS·B [n, d], dSᵀ·A [m, d])`` of :meth:`masked_lse_forward`'s lse and positives, with
        dSᵢⱼ = grad_lseᵢ·exp(Sᵢⱼ − lseᵢ) over the entries the forward kept + grad_positivesᵢ at the protected
        column (either gradient None: no such term); empty where not asked."""
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            a_guide, b_guide = guide_features(a_guide), guide_features(b_guide)
            grad_a, grad_b = masked_gradients(
                a, b, aligned_vector(scale, torch.float32), a_guide, b_guide, aligned_vector(threshold, torch.float32),
                aligned_vector(lse, torch.float32), aligned_vector(grad_lse, torch.float32),
                aligned_vector(grad_positives, torch.float32), protect_offset=protect_offset,
                exclude_offset=exclude_offset, need_a=need_a, need_b=need_b,
            )
        return empty_results(a, *unpadded(d, grad_a, grad_b))

    def siglip_forward(self, a, b, scale, bias, *, positive_offset):
        with launch_device(a):
            a, b = aligned_features(a), aligned_features(b)
            n, m = a.shape[0], b.shape[0]
            config = forward_config(target_for(a.device), a.dtype, a.shape[1], kernel="siglip")
            splits, cols_per_split = column_splits(n, m, config.block_m, config.block_n, a.device)
            grid = (triton.cdiv(n, config.block_m), splits)
            partial = torch.empty((splits, grid[0]), dtype=torch.float32, device=a.device)
            siglip_forward_kernel[grid](
                X=a, Y=b, SCALE=aligned_vector(scale), BIAS=bias_or_zero(bias, scale), PARTIAL=partial,
                n_x=n, n_y=m, d=a.shape[1], stride_x=a.stride(0), stride_y=b.stride(0),
                positive_offset=positive_offset, cols_per_split=cols_per_split,
                X_RESIDENT=a.shape[1] <= config.block_d, **launch_flags(config, a),
            )
            return partial.sum()

    def siglip_forward_backward(self, a, b, scale, bias, *, positive_offset, need_a, need_b):
        """The gradient kernels at upstream gradient 1; the panel path (every real CLIP width) sums the loss in
        its dS kernel, beside Σ dS: one sweep. At fused widths the forward kernel adds its pass."""
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            # Upstream gradient 1: a constant on the device (a fill, no host-to-device copy).
            grad = torch.ones((), dtype=torch.float32, device=a.device)
            problem = dict(
                a=a, b=b, d=d, scale=aligned_vector(scale), bias=bias_or_zero(bias, scale), mode=MODE_SIGLIP,
                row_stats=None, col_stats=None, grad_total=grad, ds_scale=gradient_scale(a.dtype, grad),
                positive_index=None, grad_positives=None, offset=positive_offset, exclude_positive=False,
                private_columns=0,
            )
            grad_a, grad_b, grad_bias, total = gradients(problem, need_a=need_a, need_b=need_b, need_bias=True,
                                                         need_loss=True)
            if total is None:
                total = self.siglip_forward(a, b, scale, bias, positive_offset=positive_offset)
        return (total,) + empty_results(a, *unpadded(d, grad_a, grad_b)) + (grad_bias,)

    def distill_forward(self, a, b, scale, a_t, b_t, scale_t, *, need_row, need_col):
        """Rows and columns come from one pass when the column partials (3 · n / BLOCK_M · m fp32) are small,
        else the column statistics are a second pass over the transposed problem."""
        with launch_device(a):
            a, b, a_t, b_t = (aligned_features(x) for x in (a, b, a_t, b_t))
            scale, scale_t = aligned_vector(scale), aligned_vector(scale_t)
            n, m = a.shape[0], b.shape[0]
            config = distill_config(target_for(a.device), "forward", a.dtype)
            n_row_blocks = triton.cdiv(n, config.block_m)
            # Half the LSE's bound (its partials are three plain fp32, not exact pairs): N ≈ 64k at BLOCK_M = 128.
            single_pass = need_col and 3 * n_row_blocks * m * 4 <= SINGLE_PASS_SCRATCH_BYTES // 2
            stats = DistillStats(*(empty_like_result(a) for _ in range(6)))
            if need_row or single_pass:
                partial = torch.empty((3, n_row_blocks, m), dtype=torch.float32, device=a.device) if single_pass \
                    else None
                rows = launch_distill_forward(x=a, y=b, x_t=a_t, y_t=b_t, scale=scale, scale_t=scale_t,
                                               col_partial=partial, config=config)
                if need_row:
                    stats.lse_row, stats.teacher_lse_row, stats.cross_row = rows
                if single_pass:
                    # Merge the row blocks' partials in a fixed order: LSEs by logsumexp, the cross term
                    # weighted by each block's share of the teacher's column softmax.
                    stats.lse_col, _ = merge_lse_in_place(partial[0])
                    stats.teacher_lse_col, teacher_sum = merge_lse_in_place(partial[1])
                    # partial[1] now holds exp(lse_t,b − max): the blocks' shares, up to the common 1/sum.
                    stats.cross_col = partial[1].mul_(partial[2]).sum(dim=0).div_(teacher_sum)
            if need_col and not single_pass:
                stats.lse_col, stats.teacher_lse_col, stats.cross_col = launch_distill_forward(
                    x=b, y=a, x_t=b_t, y_t=a_t, scale=scale, scale_t=scale_t, col_partial=None, config=config
                )
        return stats

    def distill_backward(self, a, b, scale, a_t, b_t, scale_t, stats, grads, *, need_a, need_b, need_a_t, need_b_t):
        with launch_device(a):
            d, d_t = a.shape[1], a_t.shape[1]
            a, b, a_t, b_t = (aligned_features(x) for x in (a, b, a_t, b_t))
            scale, scale_t = aligned_vector(scale), aligned_vector(scale_t)

            def side(lse, teacher_lse, cross, grad_lse, grad_cross):
                if grad_lse is None and grad_cross is None:
                    return None
                # A missing upstream gradient is a zero one: one flag per side keeps the kernel's variants few.
                grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
                grad_cross = torch.zeros_like(cross) if grad_cross is None else grad_cross
                return tuple(aligned_vector(x, torch.float32)
                             for x in (lse, grad_lse, teacher_lse, cross, grad_cross))

            rows = side(stats.lse_row, stats.teacher_lse_row, stats.cross_row, grads.lse_row, grads.cross_row)
            cols = side(stats.lse_col, stats.teacher_lse_col, stats.cross_col, grads.lse_col, grads.cross_col)
            upstream = [x for s in (rows, cols) if s is not None for x in (s[1], s[4])]
            student_scale = teacher_scale = gradient_scale(a.dtype, *upstream)
            need_teacher = need_a_t or need_b_t
            if student_scale is not None and need_teacher:
                # dT = g·P_t·(S − cross): |S − cross| ≤ 2·s·max‖a‖·max‖b‖ enters the teacher's bound.
                logit_bound = 2 * scale.float() * a.float().norm(dim=1).amax() * b.float().norm(dim=1).amax()
                teacher_scale = gradient_scale(a.dtype, *(g * logit_bound for g in upstream))
            problem = dict(a=a, b=b, a_t=a_t, b_t=b_t, scale=scale, scale_t=scale_t, rows=rows, cols=cols,
                           student_scale=student_scale, teacher_scale=teacher_scale)
            widest = max(a.shape[1], a_t.shape[1] if need_teacher else 0)
            if widest <= DISTILL_FUSED_MAX_D:
                outs = fused_distill_gradients(problem, needs=(need_a, need_b, need_a_t, need_b_t))
            else:
                outs = panel_distill_gradients(problem, needs=(need_a, need_b, need_a_t, need_b_t))
        return empty_results(a, *unpadded(d, *outs[:2]), *unpadded(d_t, *outs[2:]))


def _launch_lse(*, x, y, scale, x_is_a, positive_index, need_argmax, exclude_offset, exclude_positive,
                private_columns, config, col_partial=None, col_low=None, col_max=None, col_argmax=None):
    """Row LSE of S = s·X·Yᵀ (and the positives, column partials, argmax when asked): returns
    ``((lse [n_x], lse_low [n_x]), positives [n_x] or None, argmax [n_x] or None)``."""
    n_x, n_y = x.shape[0], y.shape[0]
    splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
    grid = (triton.cdiv(n_x, config.block_m), splits)
    partial = functools.partial(torch.empty, (splits, n_x), device=x.device)
    write_positives = x_is_a and positive_index is not None
    x_is_a = x_is_a or positive_index is None  # the orientation matters only with positives (tiles.py)
    lse, low = partial(dtype=torch.float32), partial(dtype=torch.float32)
    positives = partial(dtype=torch.float32) if write_positives else None
    argmax = partial(dtype=torch.int64) if need_argmax else None
    row_max = partial(dtype=torch.float32) if need_argmax else None
    lse_forward_kernel[grid](
        X=x, Y=y, SCALE=scale, POSITIVE_INDEX=positive_index, LSE_X=lse, LOW_X=low, POSITIVES=positives,
        COL_PARTIAL=col_partial, COL_LOW=col_low, ARGMAX_X=argmax, MAX_X=row_max, COL_ARGMAX=col_argmax,
        COL_MAX=col_max,
        n_x=n_x, n_y=n_y, d=x.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        exclude_offset=0 if exclude_offset is None else exclude_offset, private_columns=private_columns,
        cols_per_split=cols_per_split, block_offset=0,
        HAS_EXCLUDE=exclude_offset is not None, HAS_POSITIVES=positive_index is not None,
        EXCLUDE_POSITIVE=exclude_positive, HAS_PRIVATE=private_columns > 0, X_IS_A=x_is_a,
        WRITE_COL_PARTIAL=col_partial is not None, WRITE_ARGMAX=need_argmax,
        X_RESIDENT=x.shape[1] <= config.block_d, SYMMETRIC=False, **launch_flags(config, x),
    )
    # Merge the column splits in a fixed order; a positive lies in exactly one split (0 in the others).
    return (
        (lse[0], low[0]) if splits == 1 else merge_partials(lse, low),
        None if positives is None else positives.sum(dim=0),
        merge_argmax(row_max, argmax) if need_argmax else None,
    )
