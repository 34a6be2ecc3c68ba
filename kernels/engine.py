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

The gradient takes the fused kernels for d up to ``configs.fused_max_d`` and the panel path above
(kernels/panel.py; configs.py says why).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
from fastcontrast.kernels.configs import (
    DISTILL_FUSED_MAX_D,
    TYPICAL_MULTIPROCESSORS,
    KernelConfig,
    Target,
    distill_config,
    forward_config,
    fused_gradient,
    gradient_config,
    has_tf32,
    panel_configs,
    target_for,
)
from fastcontrast.kernels.distill import distill_forward_kernel, distill_gradient_kernel, distill_panel_kernel
from fastcontrast.kernels.gradient import gradient_kernel
from fastcontrast.kernels.lse_forward import lse_forward_kernel
from fastcontrast.kernels.panel import ds_panel_kernel, panel_matmul_kernel
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
def _device_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU: from the device itself, or an assumed target's typical size (the compile
    checks and the work model record what such a GPU would launch)."""
    target = target_for(device)
    if target == "interpreter":
        return INTERPRETER_TARGET_PROGRAMS
    if device.type == "cuda":
        return _device_programs(device)
    return PROGRAMS_PER_SM * TYPICAL_MULTIPROCESSORS.get(target, 132)


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


def dot_settings(dtype: torch.dtype, target: Target) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of ``dtype`` on ``target``.

    The interpreter's bf16 ``tl.dot`` is wrong (DESIGN §6): there bf16 tiles are multiplied in fp32. fp32 runs
    TF32 only where the user enabled it and the target's triton backend has it (gfx90a's HIP backend rejects
    "tf32")."""
    interpreter = triton_interpreter_enabled()
    dot_fp32 = interpreter and dtype == torch.bfloat16
    if dtype == torch.float32 and not interpreter and tf32_matmul_enabled() and has_tf32(target):
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


def _merge_lse_in_place(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp over dim 0 of per-block partial LSEs [k, m], and Σ exp(partial − max) [m], computed in
    ``partial``'s own storage (it is left holding exp(partial − max)): the merge adds no temporary of the
    scratch's size (torch.logsumexp would make one). Deterministic: a fixed reduction order."""
    top = partial.amax(dim=0)
    # A column that is −inf in every block (nothing left by the masks) stays −inf, without −inf − (−inf).
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = partial.sub_(top).exp_().sum(dim=0)
    return total.log().add_(top), total


def _merge_argmax(partial_max: torch.Tensor, partial_argmax: torch.Tensor) -> torch.Tensor:
    """The argmax over partials [k, n] (each with its max): the first partial holding the largest max wins,
    which is the lowest index on ties, since the partials cover increasing index ranges."""
    if partial_max.shape[0] == 1:
        return partial_argmax[0]
    best = partial_max.argmax(dim=0, keepdim=True)
    return partial_argmax.gather(0, best).squeeze(0)


MODE_LSE, MODE_SIGLIP = 0, 1  # the MODE constexpr of the gradient kernels (tiles.gradient_tile)


def _flags(config: KernelConfig, operand: torch.Tensor) -> dict:
    """Tile sizes, warps and dot settings of one launch with ``operand``'s dtype and device, as kernel keywords."""
    dot_fp32, precision = dot_settings(operand.dtype, target_for(operand.device))
    return dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _bias_or_zero(bias: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """SigLIP's bias, or an fp32 zero on the device when the loss has none: one binary serves both."""
    return aligned_vector(bias) if bias is not None else torch.zeros((), dtype=torch.float32, device=like.device)


def _unpadded(d: int, *outputs: Optional[torch.Tensor]) -> tuple:
    """The outputs (or None) without the zero columns the aligned buffers added past d."""
    return tuple(None if x is None else x[:, :d] for x in outputs)


def _empty_results(like: torch.Tensor, *results: Optional[torch.Tensor]) -> tuple:
    """The engine's fixed outputs: each result, or the empty tensor that stands for one not computed."""
    return tuple(empty_like_result(like) if x is None else x for x in results)


class TritonEngine:
    """Fused Triton kernels for the blockwise LSE, SigLIP and distillation reductions and their gradients
    (implements :class:`fastcontrast.engine.Engine`; see there for every argument and result)."""

    name = "triton"
    chunk_bytes = 0  # no chunks: the kernels tile S themselves

    def lse_forward(self, a, b, scale, positive_index, *, need_row, need_col, exclude_offset, exclude_positive,
                    private_columns, need_argmax):
        with launch_device(a):
            a, b = aligned_features(a), aligned_features(b)
            scale = aligned_vector(scale)
            positive_index = aligned_vector(positive_index, torch.int64)
            n, m = a.shape[0], b.shape[0]
            masks = dict(exclude_offset=exclude_offset, exclude_positive=exclude_positive,
                         private_columns=private_columns)
            lse_row = lse_col = positives = argmax_row = argmax_col = None
            config = forward_config(target_for(a.device), a.dtype, a.shape[1])
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
                    x=a, y=b, scale=scale, x_is_a=True, positive_index=positive_index,
                    need_argmax=need_argmax and need_row, col_partial=col_partial, col_max=col_max,
                    col_argmax=col_argmax, config=config, **masks,
                )
                if single_pass:
                    lse_col, _ = _merge_lse_in_place(col_partial)
                    if need_argmax:
                        argmax_col = _merge_argmax(col_max, col_argmax)
                if not need_row:  # the pass ran for the positives alone
                    lse_row = argmax_row = None
            if need_col and lse_col is None:
                # The column pass needs the positive index only where a mask depends on it.
                masked_by_positive = exclude_positive or private_columns > 0
                lse_col, _, argmax_col = _launch_lse(
                    x=b, y=a, scale=scale, x_is_a=False, positive_index=positive_index if masked_by_positive else None,
                    need_argmax=need_argmax, config=config,
                    **{**masks, "exclude_offset": None if exclude_offset is None else -exclude_offset},
                )
        return _empty_results(a, lse_row, lse_col, positives) + tuple(
            empty_like_result(a, torch.long) if x is None else x for x in (argmax_row, argmax_col)
        )

    def lse_backward(self, a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives, *,
                     exclude_offset, exclude_positive, private_columns, need_a, need_b):
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
            grad_a, grad_b, _ = _gradients(problem, need_a=need_a, need_b=need_b, need_bias=False)
        return _empty_results(a, *_unpadded(d, grad_a, grad_b))

    def siglip_forward(self, a, b, scale, bias, *, positive_offset):
        with launch_device(a):
            a, b = aligned_features(a), aligned_features(b)
            n, m = a.shape[0], b.shape[0]
            config = forward_config(target_for(a.device), a.dtype, a.shape[1], kernel="siglip")
            splits, cols_per_split = column_splits(n, m, config.block_m, config.block_n, a.device)
            grid = (triton.cdiv(n, config.block_m), splits)
            partial = torch.empty((splits, grid[0]), dtype=torch.float32, device=a.device)
            siglip_forward_kernel[grid](
                X=a, Y=b, SCALE=aligned_vector(scale), BIAS=_bias_or_zero(bias, scale), PARTIAL=partial,
                n_x=n, n_y=m, d=a.shape[1], stride_x=a.stride(0), stride_y=b.stride(0),
                positive_offset=positive_offset, cols_per_split=cols_per_split,
                X_RESIDENT=a.shape[1] <= config.block_d, **_flags(config, a),
            )
            return partial.sum()

    def siglip_backward(self, a, b, scale, bias, grad, *, positive_offset, need_a, need_b):
        with launch_device(a):
            d = a.shape[1]
            a, b = aligned_features(a), aligned_features(b)
            grad = aligned_vector(grad.reshape(()), torch.float32)
            problem = dict(
                a=a, b=b, d=d, scale=aligned_vector(scale), bias=_bias_or_zero(bias, scale), mode=MODE_SIGLIP,
                row_stats=None, col_stats=None, grad_total=grad, ds_scale=gradient_scale(a.dtype, grad),
                positive_index=None, grad_positives=None, offset=positive_offset, exclude_positive=False,
                private_columns=0,
            )
            grad_a, grad_b, grad_bias = _gradients(problem, need_a=need_a, need_b=need_b, need_bias=True)
        return _empty_results(a, *_unpadded(d, grad_a, grad_b)) + (grad_bias,)

    def distill_forward(self, a, b, scale, a_t, b_t, scale_t, *, need_row, need_col):
        """Rows and columns come from one pass when the column partials (3 · n / BLOCK_M · m fp32) are small,
        else the column statistics are a second pass over the transposed problem."""
        with launch_device(a):
            a, b, a_t, b_t = (aligned_features(x) for x in (a, b, a_t, b_t))
            scale, scale_t = aligned_vector(scale), aligned_vector(scale_t)
            n, m = a.shape[0], b.shape[0]
            config = distill_config(target_for(a.device), "forward", a.dtype)
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
                    stats.lse_col, _ = _merge_lse_in_place(partial[0])
                    stats.teacher_lse_col, teacher_sum = _merge_lse_in_place(partial[1])
                    # partial[1] now holds exp(lse_t,b − max): the blocks' shares, up to the common 1/sum.
                    stats.cross_col = partial[1].mul_(partial[2]).sum(dim=0).div_(teacher_sum)
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
                outs = _fused_distill_gradients(problem, needs=(need_a, need_b, need_a_t, need_b_t))
            else:
                outs = _panel_distill_gradients(problem, needs=(need_a, need_b, need_a_t, need_b_t))
        return _empty_results(a, *_unpadded(d, *outs[:2]), *_unpadded(d_t, *outs[2:]))


def _launch_lse(*, x, y, scale, x_is_a, positive_index, need_argmax, exclude_offset, exclude_positive,
                private_columns, config, col_partial=None, col_max=None, col_argmax=None):
    """Row LSE of S = s·X·Yᵀ (and the positives, column partials, argmax when asked): returns
    ``(lse [n_x], positives [n_x] or None, argmax [n_x] or None)``."""
    n_x, n_y = x.shape[0], y.shape[0]
    splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
    grid = (triton.cdiv(n_x, config.block_m), splits)
    partial = functools.partial(torch.empty, (splits, n_x), device=x.device)
    write_positives = x_is_a and positive_index is not None
    x_is_a = x_is_a or positive_index is None  # the orientation matters only with positives (tiles.py)
    lse = partial(dtype=torch.float32)
    positives = partial(dtype=torch.float32) if write_positives else None
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
        WRITE_COL_PARTIAL=col_partial is not None, WRITE_ARGMAX=need_argmax,
        X_RESIDENT=x.shape[1] <= config.block_d, **_flags(config, x),
    )
    # Merge the column splits in a fixed order; a positive lies in exactly one split (0 in the others).
    return (
        lse[0] if splits == 1 else torch.logsumexp(lse, dim=0),
        None if positives is None else positives.sum(dim=0),
        _merge_argmax(row_max, argmax) if need_argmax else None,
    )


def _gradients(problem: dict, *, need_a: bool, need_b: bool, need_bias: bool):
    """dS·B, dSᵀ·A (fp32, padded width) and Σ dS (or None) of an LSE / SigLIP problem: the fused kernels while
    the accumulator fits on chip, else the panel path."""
    a = problem["a"]
    target = target_for(a.device)
    if fused_gradient(target, a.shape[1], a.dtype):
        return _fused_gradients(problem, target, need_a=need_a, need_b=need_b, need_bias=need_bias)
    return _panel_gradients(problem, target, need_a=need_a, need_b=need_b, need_bias=need_bias)


def _fused_gradients(problem, target, *, need_a, need_b, need_bias):
    # Σ dS (the bias gradient) comes with the SigLIP passes (each sees every (i, j) once): the dA pass's when
    # it runs, else the dB pass's; when neither gradient is needed, the dA pass runs for it alone.
    grad_a = grad_b = bias_partial = None
    if need_a or (need_bias and not need_b):
        grad_a, bias_partial = _launch_gradient(problem, target, transposed=False)
    if need_b:
        grad_b, b_partial = _launch_gradient(problem, target, transposed=True)
        bias_partial = b_partial if bias_partial is None else bias_partial
    grad_bias = bias_partial.sum() if need_bias else None
    return (grad_a if need_a else None), grad_b, grad_bias


def _launch_gradient(problem, target, *, transposed):
    """dS·Y for the rows of X (X = A, or X = B with ``transposed``): ``(fp32 [n_x, d_pad], Σ dS partials
    [splits, row blocks] for SigLIP, else None)``."""
    x, y = (problem["b"], problem["a"]) if transposed else (problem["a"], problem["b"])
    x_stats, y_stats = (problem["col_stats"], problem["row_stats"]) if transposed else (problem["row_stats"],
                                                                                        problem["col_stats"])
    offset = problem["offset"]
    if offset is not None and transposed:
        offset = -offset
    n_x, n_y, d = x.shape[0], y.shape[0], x.shape[1]
    config = gradient_config(target, d, x.dtype)
    splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
    grid = (triton.cdiv(n_x, config.block_m), splits)
    out = torch.empty((splits, n_x, d), dtype=torch.float32, device=x.device)
    mode = problem["mode"]
    bias_partial = torch.empty(grid[::-1], dtype=torch.float32, device=x.device) if mode == MODE_SIGLIP else None
    lse_x, grad_x = x_stats if x_stats is not None else (None, None)
    lse_y, grad_y = y_stats if y_stats is not None else (None, None)
    has_positives = problem["positive_index"] is not None
    gradient_kernel[grid](
        X=x, Y=y, SCALE=problem["scale"], BIAS=problem["bias"], DS_SCALE=problem["ds_scale"],
        POSITIVE_INDEX=problem["positive_index"], GRAD_POSITIVES=problem["grad_positives"], LSE_X=lse_x,
        GRAD_X=grad_x, LSE_Y=lse_y, GRAD_Y=grad_y, GRAD_TOTAL=problem["grad_total"], OUT=out,
        BIAS_PARTIAL=bias_partial, n_x=n_x, n_y=n_y, d=d, stride_x=x.stride(0), stride_y=y.stride(0),
        stride_out=out.stride(1), offset=0 if offset is None else offset, private_columns=problem["private_columns"],
        cols_per_split=cols_per_split, MODE=mode, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
        HAS_EXCLUDE=offset is not None and mode == MODE_LSE, HAS_POSITIVES=has_positives,
        EXCLUDE_POSITIVE=problem["exclude_positive"], HAS_PRIVATE=problem["private_columns"] > 0,
        X_IS_A=not (transposed and has_positives), SCALE_DS=problem["ds_scale"] is not None, **_flags(config, x),
    )
    # Sum the column splits' slabs in a fixed order: deterministic, no atomics.
    return (out[0] if splits == 1 else out.sum(dim=0)), bias_partial


def _panels(n: int, m: int, rows: int, cols: int):
    """The panels (row range, column range) of an n×m matrix, column panels outermost: a fixed order."""
    for c0 in range(0, m, cols):
        for r0 in range(0, n, rows):
            yield (r0, min(n, r0 + rows)), (c0, min(m, c0 + cols))


def _panel_gradients(problem, target, *, need_a, need_b, need_bias):
    """The panel path (kernels/panel.py): per panel one dS kernel and up to two GEMM kernels."""
    a, b = problem["a"], problem["b"]
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    panel, ds_config, matmul_config = panel_configs(target, a.dtype)
    rows, cols = min(n, panel.rows), min(m, panel.cols)
    ds = _panel_scratch(rows, cols, a)
    grad_a = torch.empty((n, d), dtype=torch.float32, device=a.device) if need_a else None
    grad_b = torch.empty((m, d), dtype=torch.float32, device=a.device) if need_b else None
    row_stats, col_stats = problem["row_stats"], problem["col_stats"]
    offset, mode = problem["offset"], problem["mode"]
    bias_partials = []
    for (r0, r1), (c0, c1) in _panels(n, m, rows, cols):
        grid = (triton.cdiv(r1 - r0, ds_config.block_m), triton.cdiv(c1 - c0, ds_config.block_n))
        bias_partial = torch.empty(grid, dtype=torch.float32, device=a.device) if mode == MODE_SIGLIP else None
        ds_panel_kernel[grid](
            A=a, B=b, SCALE=problem["scale"], BIAS=problem["bias"], DS_SCALE=problem["ds_scale"],
            POSITIVE_INDEX=problem["positive_index"], GRAD_POSITIVES=problem["grad_positives"],
            LSE_ROW=None if row_stats is None else row_stats[0], GRAD_ROW=None if row_stats is None else row_stats[1],
            LSE_COL=None if col_stats is None else col_stats[0], GRAD_COL=None if col_stats is None else col_stats[1],
            GRAD_TOTAL=problem["grad_total"], DS=ds, BIAS_PARTIAL=bias_partial,
            row_start=r0, row_stop=r1, col_start=c0, col_stop=c1, d=d, stride_a=a.stride(0), stride_b=b.stride(0),
            stride_ds=ds.stride(0), offset=0 if offset is None else offset,
            private_columns=problem["private_columns"], MODE=mode, HAS_ROW_TERM=row_stats is not None,
            HAS_COL_TERM=col_stats is not None, HAS_EXCLUDE=offset is not None and mode == MODE_LSE,
            HAS_POSITIVES=problem["positive_index"] is not None, EXCLUDE_POSITIVE=problem["exclude_positive"],
            HAS_PRIVATE=problem["private_columns"] > 0, SCALE_DS=problem["ds_scale"] is not None,
            **_flags(ds_config, a),
        )
        if need_bias:
            bias_partials.append(bias_partial.reshape(-1))
        _multiply_panel(ds, r0, r1, c0, c1, problem["ds_scale"], matmul_config,
                        out_a=grad_a, out_b=grad_b, a=a, b=b)
    grad_bias = torch.cat(bias_partials).sum() if need_bias else None
    return grad_a, grad_b, grad_bias


# Elements after the dS panel's last row: panel_matmul_kernel reads dSᵀ without a row mask, up to one
# row tile past the panel's columns (at most the largest BLOCK_M).
PANEL_SLACK = 256


def _panel_scratch(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """The [rows, cols] dS panel in the input dtype, its row stride padded to 16 elements (aligned binaries),
    viewed in a buffer with :data:`PANEL_SLACK` elements more (zeroed: what is read there stays finite)."""
    stride = triton.cdiv(cols, ALIGNMENT) * ALIGNMENT
    buffer = torch.empty(rows * stride + PANEL_SLACK, dtype=like.dtype, device=like.device)
    buffer[rows * stride:].zero_()
    return buffer[: rows * stride].view(rows, stride)


def _multiply_panel(panel, r0, r1, c0, c1, ds_scale, config, *, out_a, out_b, a, b):
    """out_a[r0:r1] (+)= P·B[c0:c1] and out_b[c0:c1] (+)= Pᵀ·A[r0:r1] for the panel P of rows r0:r1 and
    columns c0:c1 (the first panel of each output row range writes, the later ones add)."""
    if out_a is not None:
        _launch_panel_matmul(out=out_a[r0:r1], p=panel, p_strides=(panel.stride(0), 1), depth=c1 - c0,
                             y=b[c0:c1], accumulate=c0 > 0, ds_scale=ds_scale, config=config, transposed=False)
    if out_b is not None:
        _launch_panel_matmul(out=out_b[c0:c1], p=panel, p_strides=(1, panel.stride(0)), depth=r1 - r0,
                             y=a[r0:r1], accumulate=r0 > 0, ds_scale=ds_scale, config=config, transposed=True)


def _launch_panel_matmul(*, out, p, p_strides, depth, y, accumulate, ds_scale, config, transposed):
    """out (+)= P[:rows, :depth] @ y (fp32), with the reduction split across programs when the output tiles
    alone would leave the GPU idle (few rows: a local loss); the splits are summed in a fixed order."""
    rows, cols = out.shape
    tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(cols, config.block_n)
    splits = max(1, min(_target_programs(out.device) // tiles, triton.cdiv(depth, 4 * config.block_d)))
    k_per_split = triton.cdiv(triton.cdiv(depth, splits), config.block_d) * config.block_d
    splits = triton.cdiv(depth, k_per_split)
    target = out if splits == 1 else torch.empty((splits, rows, cols), dtype=torch.float32, device=out.device)
    panel_matmul_kernel[(tiles, splits)](
        P=p, Y=y, OUT=target, DS_SCALE=ds_scale, rows=rows, cols=cols, depth=depth, k_per_split=k_per_split,
        stride_p_row=p_strides[0], stride_p_k=p_strides[1], stride_y=y.stride(0), stride_out=out.stride(0),
        ACCUMULATE=accumulate and splits == 1, SCALE_DS=ds_scale is not None, P_TRANSPOSED=transposed,
        **_flags(config, y),
    )
    if splits > 1:
        if accumulate:
            out.add_(target.sum(dim=0))
        else:
            torch.sum(target, dim=0, out=out)


def _launch_distill_forward(*, x, y, x_t, y_t, scale, scale_t, col_partial, config):
    """(student LSE, teacher LSE, cross term), each fp32 [n_x], of the rows of X; column partials if given."""
    n_x, n_y = x.shape[0], y.shape[0]
    lse, teacher_lse, cross = (torch.empty(n_x, dtype=torch.float32, device=x.device) for _ in range(3))
    distill_forward_kernel[(triton.cdiv(n_x, config.block_m),)](
        X=x, Y=y, XT=x_t, YT=y_t, SCALE=scale, SCALE_T=scale_t, LSE_X=lse, TEACHER_LSE_X=teacher_lse,
        CROSS_X=cross, COL_PARTIAL=col_partial,
        n_x=n_x, n_y=n_y, d=x.shape[1], d_t=x_t.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        stride_xt=x_t.stride(0), stride_yt=y_t.stride(0), WRITE_COL_PARTIAL=col_partial is not None,
        **_flags(config, x),
    )
    return lse, teacher_lse, cross


_STAT_NAMES = ("LSE", "GRAD_LSE", "TEACHER_LSE", "CROSS", "GRAD_CROSS")


def _fused_distill_gradients(problem, *, needs):
    """The four distillation gradients (or None) with the fused kernel, accumulator in registers."""
    outs = []
    for wanted, swap, teacher in zip(needs, (False, True, False, True), (False, False, True, True)):
        if not wanted:
            outs.append(None)
            continue
        x, y, x_t, y_t = (problem[k] for k in (("b", "a", "b_t", "a_t") if swap else ("a", "b", "a_t", "b_t")))
        x_stats, y_stats = (problem["cols"], problem["rows"]) if swap else (problem["rows"], problem["cols"])
        config = distill_config(target_for(x.device), "gradient", x.dtype)
        n_x, n_y = x.shape[0], y.shape[0]
        out = torch.empty((n_x, (x_t if teacher else x).shape[1]), dtype=torch.float32, device=x.device)
        ds_scale = problem["teacher_scale" if teacher else "student_scale"]
        distill_gradient_kernel[(triton.cdiv(n_x, config.block_m),)](
            X=x, Y=y, XT=x_t, YT=y_t, SCALE=problem["scale"], SCALE_T=problem["scale_t"], DS_SCALE=ds_scale,
            **{f"{name}_X": value for name, value in zip(_STAT_NAMES, x_stats or (None,) * 5)},
            **{f"{name}_Y": value for name, value in zip(_STAT_NAMES, y_stats or (None,) * 5)},
            OUT=out, n_x=n_x, n_y=n_y, d=x.shape[1], d_t=x_t.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
            stride_xt=x_t.stride(0), stride_yt=y_t.stride(0), stride_out=out.stride(0),
            TEACHER_GRAD=teacher, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
            SCALE_DS=ds_scale is not None, **_flags(config, x),
        )
        outs.append(out)
    return outs


def _panel_distill_gradients(problem, *, needs):
    """The four distillation gradients (or None) by the panel path: W (and dT) per panel, then GEMMs."""
    a, b, a_t, b_t = (problem[k] for k in ("a", "b", "a_t", "b_t"))
    need_a, need_b, need_a_t, need_b_t = needs
    student, teacher = need_a or need_b, need_a_t or need_b_t
    target = target_for(a.device)
    n, m = a.shape[0], b.shape[0]
    panel, _, matmul_config = panel_configs(target, a.dtype)
    config = distill_config(target, "panel", a.dtype)
    rows, cols = min(n, panel.rows), min(m, panel.cols)

    def scratch(wanted):
        return _panel_scratch(rows, cols, a) if wanted else None

    def output(x, wanted):
        return torch.empty((x.shape[0], x.shape[1]), dtype=torch.float32, device=a.device) if wanted else None

    w_panel, t_panel = scratch(student), scratch(teacher)
    outs = [output(a, need_a), output(b, need_b), output(a_t, need_a_t), output(b_t, need_b_t)]
    row_stats, col_stats = problem["rows"], problem["cols"]
    for (r0, r1), (c0, c1) in _panels(n, m, rows, cols):
        grid = (triton.cdiv(r1 - r0, config.block_m), triton.cdiv(c1 - c0, config.block_n))
        distill_panel_kernel[grid](
            A=a, B=b, AT=a_t, BT=b_t, SCALE=problem["scale"], SCALE_T=problem["scale_t"],
            DS_SCALE=problem["teacher_scale"] if teacher else problem["student_scale"],
            **{f"{name}_ROW": value for name, value in zip(_STAT_NAMES, row_stats or (None,) * 5)},
            **{f"{name}_COL": value for name, value in zip(_STAT_NAMES, col_stats or (None,) * 5)},
            W=w_panel, DT=t_panel, row_start=r0, row_stop=r1, col_start=c0, col_stop=c1, d=a.shape[1],
            d_t=a_t.shape[1], stride_a=a.stride(0), stride_b=b.stride(0), stride_at=a_t.stride(0),
            stride_bt=b_t.stride(0), stride_panel=(w_panel if student else t_panel).stride(0),
            HAS_ROW_TERM=row_stats is not None, HAS_COL_TERM=col_stats is not None, STUDENT=student, TEACHER=teacher,
            SCALE_DS=problem["student_scale"] is not None, **_flags(config, a),
        )
        # One fp16 scale for both panels (the teacher's bound is the larger): W and dT share DS_SCALE.
        shared_scale = problem["teacher_scale"] if teacher else problem["student_scale"]
        if student:
            _multiply_panel(w_panel, r0, r1, c0, c1, shared_scale, matmul_config, out_a=outs[0], out_b=outs[1],
                            a=a, b=b)
        if teacher:
            _multiply_panel(t_panel, r0, r1, c0, c1, shared_scale, matmul_config, out_a=outs[2], out_b=outs[3],
                            a=a_t, b=b_t)
    return outs
