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
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
from fastcontrast.kernels.configs import KernelConfig, distill_config, forward_config, gradient_config
from fastcontrast.kernels.distill import distill_forward_kernel, distill_gradient_kernel
from fastcontrast.kernels.gradient import MODE_LSE, MODE_SIGLIP, gradient_kernel
from fastcontrast.kernels.lse_forward import lse_forward_kernel
from fastcontrast.kernels.siglip_forward import siglip_forward_kernel

from fastcontrast._dispatch import triton_interpreter_enabled
from fastcontrast.engine import DistillStats, empty_like_result, tf32_matmul_enabled

# Merge the column LSE in the same pass as the row LSE while its scratch (n / BLOCK_M · m fp32) stays under
# this many bytes, i.e. up to N ≈ 90k at BLOCK_M = 128; past that a second pass over S is cheaper than
# the scratch's memory.
SINGLE_PASS_SCRATCH_BYTES = 256 * 2**20

# Below this many programs per SM a launch leaves the GPU idle: rows are then split across programs by
# column range too (few rows against many columns: a per-rank local loss, a memory bank).
PROGRAMS_PER_SM = 4
# In the interpreter, split whenever fewer than this many row blocks exist, so that the tests' small
# shapes run the split path as well as the plain one.
INTERPRETER_TARGET_PROGRAMS = 4
# triton specialises an int or a pointer as "divisible by 16" only when it is (DESIGN §6).
ALIGNMENT = 16


def launch_device(x: torch.Tensor):
    """The context every launch runs in: the inputs' CUDA device made current (triton launches on the
    current device and its stream), nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_TARGET_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def column_splits(n_x: int, n_y: int, block_m: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(number of column splits, columns per split) so that row blocks × splits fills the GPU.

    Depends only on the shapes and the device, so a given call always sums its partials in the same order.
    """
    row_blocks = triton.cdiv(n_x, block_m)
    col_blocks = triton.cdiv(n_y, block_n)
    splits = max(1, min(col_blocks, _target_programs(device) // row_blocks))
    blocks_per_split = triton.cdiv(col_blocks, splits)
    return triton.cdiv(col_blocks, blocks_per_split), blocks_per_split * block_n


def _is_aligned(x: torch.Tensor) -> bool:
    return x.data_ptr() % ALIGNMENT == 0


def aligned_features(x: torch.Tensor) -> torch.Tensor:
    """[n, d] features with unit stride along d and d, row stride and address all multiples of 16 elements
    or bytes: ``x`` itself when it already is, else an aligned copy zero-padded to d' = ⌈d/16⌉·16 columns."""
    n, d = x.shape
    if x.stride(1) == 1 and d % ALIGNMENT == 0 and x.stride(0) % ALIGNMENT == 0 and _is_aligned(x):
        return x
    padded = x.new_zeros((n, triton.cdiv(d, ALIGNMENT) * ALIGNMENT))
    padded[:, :d] = x
    return padded


def aligned_vector(x: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """A contiguous, 16-byte aligned vector (or scalar) in ``dtype``: a copy only when it is not one already."""
    if x is None:
        return None
    x = x.to(dtype) if dtype is not None else x
    x = x.contiguous()
    return x if _is_aligned(x) else x.clone()


def dot_settings(dtype: torch.dtype, interpreter: bool) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of ``dtype``: fp32 runs TF32 only where the user enabled it."""
    dot_fp32 = interpreter and dtype == torch.bfloat16
    if dtype == torch.float32 and not interpreter and tf32_matmul_enabled():
        return dot_fp32, "tf32"
    return dot_fp32, "ieee"


def gradient_scale(dtype: torch.dtype, *bounds: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """For fp16 operands: a power of two 2⁻ᵉ (fp32, on the device, no host sync) that brings Σ max|bound|, a
    bound of every |dS|, into [0.5, 1); None for other dtypes (bf16 has fp32's range)."""
    if dtype != torch.float16:
        return None
    total = sum(b.detach().abs().amax().float() for b in bounds if b is not None and b.numel())
    if not isinstance(total, torch.Tensor):
        return None
    _, exponent = torch.frexp(total.reshape(1))
    # A zero bound keeps the factor 1; the clamp keeps the factor a finite fp32 power of two.
    exponent = torch.where(total > 0, exponent, torch.zeros_like(exponent)).clamp(-120, 120)
    return torch.ldexp(torch.ones(1, device=total.device), -exponent)


def _merge_argmax(partial_max: torch.Tensor, partial_argmax: torch.Tensor) -> torch.Tensor:
    """The argmax over partials [k, n] (each with its max): the first partial holding the largest max wins,
    which is the lowest index on ties, since the partials cover increasing index ranges."""
    if partial_max.shape[0] == 1:
        return partial_argmax[0]
    best = partial_max.argmax(dim=0, keepdim=True)
    return partial_argmax.gather(0, best).squeeze(0)


def _flags(config: KernelConfig, dtype: torch.dtype) -> dict:
    """Tile sizes, warps and dot settings of one launch, as kernel keywords."""
    dot_fp32, precision = dot_settings(dtype, triton_interpreter_enabled())
    return dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )


class TritonEngine:
    """Fused Triton kernels for the blockwise LSE, SigLIP and distillation reductions and their gradients
    (implements :class:`fastcontrast.engine.Engine`; see there for every argument and result)."""

    name = "triton"
    chunk_bytes = 0  # no chunks: the kernels tile S themselves

    def lse_forward(self, a, b, scale, positive_index, *, need_row, need_col, exclude_offset, exclude_positive,
                    private_columns, need_argmax):
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            scale = aligned_vector(scale)
            positive_index = aligned_vector(positive_index, torch.int64)
            n, m = a.shape[0], b.shape[0]
            masks = dict(exclude_offset=exclude_offset, exclude_positive=exclude_positive,
                         private_columns=private_columns, positive_index=positive_index)
            lse_row = lse_col = positives = argmax_row = argmax_col = None
            config = forward_config(d, a.dtype, triton_interpreter_enabled())
            n_row_blocks = triton.cdiv(n, config.block_m)
            scratch = n_row_blocks * m * (4 + (12 if need_argmax else 0))
            single_pass = need_row and need_col and scratch <= SINGLE_PASS_SCRATCH_BYTES
            if need_row or positive_index is not None:
                col_partial = col_max = col_argmax = None
                if single_pass:
                    col_partial = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                    if need_argmax:
                        col_max = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                        col_argmax = torch.empty((n_row_blocks, m), dtype=torch.int64, device=a.device)
                lse_row, positives, argmax_row = _launch_lse(
                    x=a, y=b, scale=scale, x_is_a=True, need_positives=positive_index is not None,
                    need_argmax=need_argmax and need_row, col_partial=col_partial, col_max=col_max,
                    col_argmax=col_argmax, config=config, **masks,
                )
                if single_pass:
                    lse_col = torch.logsumexp(col_partial, dim=0)
                    if need_argmax:
                        argmax_col = _merge_argmax(col_max, col_argmax)
                if not need_row:  # the pass ran for the positives alone
                    lse_row = argmax_row = None
            if need_col and lse_col is None:
                col_offset = None if exclude_offset is None else -exclude_offset
                lse_col, _, argmax_col = _launch_lse(
                    x=b, y=a, scale=scale, x_is_a=False, need_positives=False, need_argmax=need_argmax,
                    config=config, **{**masks, "exclude_offset": col_offset},
                )
        return tuple(empty_like_result(a) if x is None else x for x in (lse_row, lse_col, positives)) + tuple(
            torch.empty(0, dtype=torch.long, device=a.device) if x is None else x for x in (argmax_row, argmax_col)
        )

    def lse_backward(self, a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives, *,
                     exclude_offset, exclude_positive, private_columns, need_a, need_b):
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            scale = aligned_vector(scale)
            positive_index = aligned_vector(positive_index, torch.int64)
            row_stats = None if grad_row is None else (aligned_vector(lse_row), aligned_vector(grad_row, torch.float32))
            col_stats = None if grad_col is None else (aligned_vector(lse_col), aligned_vector(grad_col, torch.float32))
            grad_positives = aligned_vector(grad_positives, torch.float32)
            ds_scale = gradient_scale(a.dtype, grad_row, grad_col, grad_positives)
            common = dict(scale=scale, bias=None, mode=MODE_LSE, grad_total=None, ds_scale=ds_scale,
                          positive_index=positive_index, grad_positives=grad_positives,
                          exclude_positive=exclude_positive, private_columns=private_columns, d=d)
            grad_a = grad_b = None
            if need_a:
                grad_a, _ = _launch_gradient(x=a, y=b, x_stats=row_stats, y_stats=col_stats, x_is_a=True,
                                             offset=exclude_offset, **common)
            if need_b:
                col_offset = None if exclude_offset is None else -exclude_offset
                grad_b, _ = _launch_gradient(x=b, y=a, x_stats=col_stats, y_stats=row_stats, x_is_a=False,
                                             offset=col_offset, **common)
        return tuple(empty_like_result(a) if x is None else x for x in (grad_a, grad_b))

    def siglip_forward(self, a, b, scale, bias, *, positive_offset):
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            n, m = a.shape[0], b.shape[0]
            config = forward_config(d, a.dtype, triton_interpreter_enabled(), kernel="siglip")
            splits, cols_per_split = column_splits(n, m, config.block_m, config.block_n, a.device)
            grid = (triton.cdiv(n, config.block_m), splits)
            partial = torch.empty((splits, grid[0]), dtype=torch.float32, device=a.device)
            siglip_forward_kernel[grid](
                X=a, Y=b, SCALE=aligned_vector(scale), BIAS=aligned_vector(bias), PARTIAL=partial,
                n_x=n, n_y=m, d=a.shape[1], stride_x=a.stride(0), stride_y=b.stride(0),
                positive_offset=positive_offset, cols_per_split=cols_per_split, HAS_BIAS=bias is not None,
                **_flags(config, a.dtype),
            )
            return partial.sum()

    def siglip_backward(self, a, b, scale, bias, grad, *, positive_offset, need_a, need_b):
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            grad = aligned_vector(grad.reshape(()), torch.float32)
            common = dict(scale=aligned_vector(scale), bias=aligned_vector(bias), mode=MODE_SIGLIP, x_stats=None,
                          y_stats=None, grad_total=grad, ds_scale=gradient_scale(a.dtype, grad),
                          positive_index=None, grad_positives=None, exclude_positive=False, private_columns=0, d=d)
            # Σ dS (the bias gradient) comes with the dA pass: it sees every (i, j) once. When only dB is
            # needed the dB pass carries it instead; when neither is, the dA pass runs for it alone.
            grad_a = grad_b = bias_partial = None
            if need_a or not need_b:
                grad_a, bias_partial = _launch_gradient(x=a, y=b, x_is_a=True, offset=positive_offset,
                                                        write_bias_partial=True, **common)
            if need_b:
                grad_b, b_partial = _launch_gradient(x=b, y=a, x_is_a=False, offset=-positive_offset,
                                                     write_bias_partial=bias_partial is None, **common)
                bias_partial = b_partial if bias_partial is None else bias_partial
        return (grad_a if need_a else empty_like_result(a)), (
            empty_like_result(a) if grad_b is None else grad_b), bias_partial.sum()

    def distill_forward(self, a, b, scale, a_t, b_t, scale_t, *, need_row, need_col):
        """Rows and columns come from one pass when the column partials (3 · n / BLOCK_M · m fp32) are small,
        else the column statistics are a second pass over the transposed problem."""
        with launch_device(a):
            a, b, a_t, b_t = (aligned_features(x) for x in (a, b, a_t, b_t))
            scale, scale_t = aligned_vector(scale), aligned_vector(scale_t)
            n, m = a.shape[0], b.shape[0]
            config = distill_config("forward", a.dtype, triton_interpreter_enabled())
            n_row_blocks = triton.cdiv(n, config.block_m)
            single_pass = need_col and 3 * n_row_blocks * m * 4 <= SINGLE_PASS_SCRATCH_BYTES
            stats = DistillStats(*(empty_like_result(a) for _ in range(6)))
            if need_row or single_pass:
                partial = torch.empty((3, n_row_blocks, m), dtype=torch.float32, device=a.device) if single_pass \
                    else None
                rows = _launch_distill_forward(x=a, y=b, x_t=a_t, y_t=b_t, scale=scale, scale_t=scale_t,
                                               col_partial=partial, config=config)
                if need_row:
                    stats.lse_row, stats.teacher_lse_row, stats.cross_row = rows
                if single_pass:
                    # Merge the row blocks' partials in a fixed order: LSEs by logsumexp, the cross term
                    # weighted by each block's share of the teacher's column softmax.
                    stats.lse_col = torch.logsumexp(partial[0], dim=0)
                    stats.teacher_lse_col = torch.logsumexp(partial[1], dim=0)
                    stats.cross_col = ((partial[1] - stats.teacher_lse_col).exp_() * partial[2]).sum(dim=0)
            if need_col and not single_pass:
                stats.lse_col, stats.teacher_lse_col, stats.cross_col = _launch_distill_forward(
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
            ds_scale = gradient_scale(a.dtype, *upstream)
            student_scale = ds_scale
            if ds_scale is not None and (need_a_t or need_b_t):
                # dT = g·P_t·(S − cross): |S − cross| ≤ 2·s·max‖a‖·max‖b‖ enters the teacher's bound.
                logit_bound = 2 * scale.float() * a.float().norm(dim=1).amax() * b.float().norm(dim=1).amax()
                ds_scale = gradient_scale(a.dtype, *(g * logit_bound for g in upstream))
            common = dict(scale=scale, scale_t=scale_t)
            outs = []
            for wanted, swap, teacher in ((need_a, False, False), (need_b, True, False),
                                          (need_a_t, False, True), (need_b_t, True, True)):
                if not wanted:
                    outs.append(empty_like_result(a))
                    continue
                x, y, x_t, y_t = (b, a, b_t, a_t) if swap else (a, b, a_t, b_t)
                outs.append(_launch_distill_gradient(
                    x=x, y=y, x_t=x_t, y_t=y_t, x_stats=cols if swap else rows, y_stats=rows if swap else cols,
                    teacher=teacher, ds_scale=ds_scale if teacher else student_scale,
                    d_out=d_t if teacher else d, **common,
                ))
        return tuple(outs)


def _launch_lse(*, x, y, scale, x_is_a, need_positives, need_argmax, exclude_offset, exclude_positive,
                private_columns, positive_index, config, col_partial=None, col_max=None, col_argmax=None):
    """Row LSE of S = s·X·Yᵀ (and the positives, column partials, argmax when asked): returns
    ``(lse [n_x], positives [n_x] or None, argmax [n_x] or None)``."""
    n_x, n_y = x.shape[0], y.shape[0]
    splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
    grid = (triton.cdiv(n_x, config.block_m), splits)
    partial = functools.partial(torch.empty, (splits, n_x), device=x.device)
    lse = partial(dtype=torch.float32)
    positives = partial(dtype=torch.float32) if need_positives else None
    argmax = partial(dtype=torch.int64) if need_argmax else None
    row_max = partial(dtype=torch.float32) if need_argmax else None
    lse_forward_kernel[grid](
        X=x, Y=y, SCALE=scale, POSITIVE_INDEX=positive_index, LSE_X=lse, POSITIVES=positives,
        COL_PARTIAL=col_partial, ARGMAX_X=argmax, MAX_X=row_max, COL_ARGMAX=col_argmax, COL_MAX=col_max,
        n_x=n_x, n_y=n_y, d=x.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        exclude_offset=0 if exclude_offset is None else exclude_offset, private_columns=private_columns,
        cols_per_split=cols_per_split,
        HAS_EXCLUDE=exclude_offset is not None, HAS_POSITIVES=positive_index is not None,
        EXCLUDE_POSITIVE=exclude_positive, HAS_PRIVATE=private_columns > 0, X_IS_A=x_is_a,
        WRITE_POSITIVES=need_positives, WRITE_COL_PARTIAL=col_partial is not None, WRITE_ARGMAX=need_argmax,
        **_flags(config, x.dtype),
    )
    # Merge the column splits in a fixed order; a positive lies in exactly one split (0 in the others).
    return (
        lse[0] if splits == 1 else torch.logsumexp(lse, dim=0),
        None if positives is None else positives.sum(dim=0),
        _merge_argmax(row_max, argmax) if need_argmax else None,
    )


def _launch_gradient(*, x, y, d, scale, bias, mode, x_stats, y_stats, grad_total, ds_scale, positive_index,
                     grad_positives, x_is_a, offset, exclude_positive, private_columns, write_bias_partial=False):
    """dS·Y for the rows of X: ``(fp32 [n_x, d], per-program Σ dS [splits, row blocks] or None)``."""
    n_x, n_y = x.shape[0], y.shape[0]
    config = gradient_config(d, x.dtype, triton_interpreter_enabled())
    d_launch = x.shape[1]
    register_acc = d_launch <= config.block_d
    splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
    grid = (triton.cdiv(n_x, config.block_m), splits)
    out = (torch.empty if register_acc else torch.zeros)((splits, n_x, d_launch), dtype=torch.float32,
                                                         device=x.device)
    bias_partial = torch.empty(grid[::-1], dtype=torch.float32, device=x.device) if write_bias_partial else None
    lse_x, grad_x = x_stats if x_stats is not None else (None, None)
    lse_y, grad_y = y_stats if y_stats is not None else (None, None)
    gradient_kernel[grid](
        X=x, Y=y, SCALE=scale, BIAS=bias, DS_SCALE=ds_scale, POSITIVE_INDEX=positive_index,
        GRAD_POSITIVES=grad_positives, LSE_X=lse_x, GRAD_X=grad_x, LSE_Y=lse_y, GRAD_Y=grad_y,
        GRAD_TOTAL=grad_total, OUT=out, BIAS_PARTIAL=bias_partial,
        n_x=n_x, n_y=n_y, d=d_launch, stride_x=x.stride(0), stride_y=y.stride(0), stride_out=out.stride(1),
        offset=0 if offset is None else offset, private_columns=private_columns, cols_per_split=cols_per_split,
        MODE=mode, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
        HAS_EXCLUDE=offset is not None and mode == MODE_LSE, HAS_POSITIVES=positive_index is not None,
        GRAD_POSITIVE_TERM=grad_positives is not None, EXCLUDE_POSITIVE=exclude_positive,
        HAS_PRIVATE=private_columns > 0, X_IS_A=x_is_a, HAS_BIAS=bias is not None,
        WRITE_BIAS_PARTIAL=write_bias_partial, SCALE_DS=ds_scale is not None, REGISTER_ACC=register_acc,
        **_flags(config, x.dtype),
    )
    # Sum the column splits' slabs in a fixed order: deterministic, no atomics.
    summed = out[0] if splits == 1 else out.sum(dim=0)
    return summed[:, :d], bias_partial


def _launch_distill_forward(*, x, y, x_t, y_t, scale, scale_t, col_partial, config):
    """(student LSE, teacher LSE, cross term), each fp32 [n_x], of the rows of X; column partials if given."""
    n_x, n_y = x.shape[0], y.shape[0]
    lse, teacher_lse, cross = (torch.empty(n_x, dtype=torch.float32, device=x.device) for _ in range(3))
    distill_forward_kernel[(triton.cdiv(n_x, config.block_m),)](
        X=x, Y=y, XT=x_t, YT=y_t, SCALE=scale, SCALE_T=scale_t, LSE_X=lse, TEACHER_LSE_X=teacher_lse,
        CROSS_X=cross, COL_PARTIAL=col_partial,
        n_x=n_x, n_y=n_y, d=x.shape[1], d_t=x_t.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        stride_xt=x_t.stride(0), stride_yt=y_t.stride(0), WRITE_COL_PARTIAL=col_partial is not None,
        **_flags(config, x.dtype),
    )
    return lse, teacher_lse, cross


def _launch_distill_gradient(*, x, y, x_t, y_t, scale, scale_t, x_stats, y_stats, teacher, ds_scale, d_out):
    """W·Y_out for the rows of X: fp32 [n_x, d] (student, W = dS) or [n_x, d_t] (teacher, W = dT)."""
    n_x, n_y = x.shape[0], y.shape[0]
    config = distill_config("gradient", x.dtype, triton_interpreter_enabled())
    d_launch = x_t.shape[1] if teacher else x.shape[1]
    register_acc = d_launch <= config.block_d
    out = (torch.empty if register_acc else torch.zeros)((n_x, d_launch), dtype=torch.float32, device=x.device)
    x_stats = x_stats or (None,) * 5
    y_stats = y_stats or (None,) * 5
    names = ("LSE", "GRAD_LSE", "TEACHER_LSE", "CROSS", "GRAD_CROSS")
    distill_gradient_kernel[(triton.cdiv(n_x, config.block_m),)](
        X=x, Y=y, XT=x_t, YT=y_t, SCALE=scale, SCALE_T=scale_t, DS_SCALE=ds_scale,
        **{f"{name}_X": value for name, value in zip(names, x_stats)},
        **{f"{name}_Y": value for name, value in zip(names, y_stats)},
        OUT=out, n_x=n_x, n_y=n_y, d=x.shape[1], d_t=x_t.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        stride_xt=x_t.stride(0), stride_yt=y_t.stride(0), stride_out=out.stride(0),
        TEACHER_GRAD=teacher, HAS_X_TERM=x_stats[0] is not None, HAS_Y_TERM=y_stats[0] is not None,
        SCALE_DS=ds_scale is not None, REGISTER_ACC=register_acc, **_flags(config, x.dtype),
    )
    return out[:, :d_out]
