"""The Triton engine: tensor-in / tensor-out launchers behind the engine contract of DESIGN §3.

Same interface as :class:`fastcontrast.blockwise.TorchEngine`, so the autograd Functions do not know which
engine runs. Inputs may be fp16, bf16 or fp32 (fp32 uses TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is on); LSEs, sums and gradients come back in fp32. The scale and
bias are read from device pointers inside the kernels: no ``.item()``, no host sync, and no recompile when
they change. Lengths and offsets are not specialised on, so a new batch size does not recompile.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
from fastcontrast.kernels.configs import distill_config, forward_config, gradient_config
from fastcontrast.kernels.distill import distill_forward_kernel, distill_gradient_kernel
from fastcontrast.kernels.gradient import MODE_LSE, MODE_SIGLIP, gradient_kernel
from fastcontrast.kernels.lse_forward import lse_forward_kernel
from fastcontrast.kernels.siglip_forward import siglip_forward_kernel

from fastcontrast.blockwise import DistillStats

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Kernels need unit stride along d; any row stride is fine. Copy only when the last stride is not 1.
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for operands of ``dtype``."""
    interpret = interpreter_enabled()
    dot_fp32 = interpret and dtype == torch.bfloat16
    if dtype == torch.float32 and not interpret and torch.backends.cuda.matmul.allow_tf32:
        return dot_fp32, "tf32"
    return dot_fp32, "ieee"


def _check_dtype(a: torch.Tensor) -> None:
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 features, got {a.dtype}; "
            "use backend='torch' for float64."
        )


def _merge_argmax(partial_max: torch.Tensor, partial_argmax: torch.Tensor) -> torch.Tensor:
    """The argmax over partials [k, n] (each with its max): the first partial holding the largest max wins,
    which is the lowest index on ties, since the partials cover increasing index ranges."""
    if partial_max.shape[0] == 1:
        return partial_argmax[0]
    best = partial_max.argmax(dim=0, keepdim=True)
    return partial_argmax.gather(0, best).squeeze(0)


class TritonEngine:
    """Fused Triton kernels for the blockwise LSE and SigLIP reductions and their gradients."""

    name = "triton"

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
        """Row LSE [n] and/or column LSE [m] of S = s·A·Bᵀ, fp32, and with ``need_argmax`` the int64 argmax
        of each row / column (see ``TorchEngine.lse_forward``)."""
        _check_dtype(a)
        a, b = _rows_contiguous(a), _rows_contiguous(b)
        n, m = a.shape[0], b.shape[0]
        lse_row = lse_col = argmax_row = argmax_col = None
        config = forward_config(a.shape[1], a.dtype, interpreter_enabled())
        n_row_blocks = triton.cdiv(n, config.block_m)
        scratch = n_row_blocks * m * (4 + (12 if need_argmax else 0))
        single_pass = need_row and need_col and scratch <= SINGLE_PASS_SCRATCH_BYTES
        if need_row:
            lse_row = torch.empty(n, dtype=torch.float32, device=a.device)
            col_partial = col_max = col_argmax = None
            if single_pass:
                col_partial = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                if need_argmax:
                    col_max = torch.empty((n_row_blocks, m), dtype=torch.float32, device=a.device)
                    col_argmax = torch.empty((n_row_blocks, m), dtype=torch.int64, device=a.device)
            argmax_row = self._launch_lse(a, b, scale, lse_row, col_partial, exclude_offset, need_argmax,
                                          col_max, col_argmax)
            if single_pass:
                lse_col = torch.logsumexp(col_partial, dim=0)
                if need_argmax:
                    argmax_col = _merge_argmax(col_max, col_argmax)
        if need_col and lse_col is None:
            lse_col = torch.empty(m, dtype=torch.float32, device=a.device)
            col_offset = None if exclude_offset is None else -exclude_offset
            argmax_col = self._launch_lse(b, a, scale, lse_col, None, col_offset, need_argmax)
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
        """Unscaled dS·B [n, d] and dSᵀ·A [m, d], fp32 (see ``TorchEngine.lse_backward``)."""
        a, b = _rows_contiguous(a), _rows_contiguous(b)
        row_stats = None if grad_row is None else (lse_row, grad_row.float().contiguous())
        col_stats = None if grad_col is None else (lse_col, grad_col.float().contiguous())
        grad_a = grad_b = None
        if need_a:
            grad_a = self._launch_gradient(
                a, b, scale, None, MODE_LSE, row_stats, col_stats, None, exclude_offset, None
            )
        if need_b:
            col_offset = None if exclude_offset is None else -exclude_offset
            grad_b = self._launch_gradient(
                b, a, scale, None, MODE_LSE, col_stats, row_stats, None, col_offset, None
            )
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
        """Σᵢⱼ softplus(−zᵢⱼ·(Sᵢⱼ + bias)), 0-dim fp32 (see ``TorchEngine.siglip_forward``)."""
        _check_dtype(a)
        a, b = _rows_contiguous(a), _rows_contiguous(b)
        n, m, d = a.shape[0], b.shape[0], a.shape[1]
        config = forward_config(d, a.dtype, interpreter_enabled(), kernel="siglip")
        splits, cols_per_split = column_splits(n, m, config.block_m, config.block_n, a.device)
        grid = (triton.cdiv(n, config.block_m), splits)
        partial = torch.empty((splits, grid[0]), dtype=torch.float32, device=a.device)
        dot_fp32, precision = _dot_settings(a.dtype)
        siglip_forward_kernel[grid](
            a, b, scale, scale if bias is None else bias, partial,
            n, m, d, a.stride(0), b.stride(0), positive_offset, cols_per_split,
            HAS_BIAS=bias is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return partial.sum()

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
        """Unscaled dS·B, dSᵀ·A (fp32) and Σ dS (0-dim fp32) (see ``TorchEngine.siglip_backward``)."""
        a, b = _rows_contiguous(a), _rows_contiguous(b)
        grad = grad.float().reshape(())
        # Σ dS (the bias gradient) comes with the dA pass: it sees every (i, j) once. When only dB is
        # needed the dB pass carries it instead; when neither is, the dA pass runs for it alone.
        bias_partial = []
        grad_a = grad_b = None
        if need_a or not need_b:
            grad_a = self._launch_gradient(
                a, b, scale, bias, MODE_SIGLIP, None, None, grad, positive_offset, bias_partial
            )
        if need_b:
            grad_b = self._launch_gradient(
                b, a, scale, bias, MODE_SIGLIP, None, None, grad, -positive_offset,
                None if bias_partial else bias_partial,
            )
        return (grad_a if need_a else None), grad_b, bias_partial[0].sum()

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
        """Student / teacher LSEs and cross terms by row and column, fp32 (see ``TorchEngine.distill_forward``).

        Rows and columns come from one pass when the column partials (3 · n / BLOCK_M · m fp32) are small,
        else the column statistics are a second pass over the transposed problem.
        """
        _check_dtype(a)
        a, b, a_t, b_t = (_rows_contiguous(x) for x in (a, b, a_t, b_t))
        n, m = a.shape[0], b.shape[0]
        config = distill_config("forward", a.dtype, interpreter_enabled())
        n_row_blocks = triton.cdiv(n, config.block_m)
        single_pass = need_col and 3 * n_row_blocks * m * 4 <= SINGLE_PASS_SCRATCH_BYTES
        stats = DistillStats()
        if need_row or single_pass:
            partial = torch.empty((3, n_row_blocks, m), dtype=torch.float32, device=a.device) if single_pass else None
            stats.lse_row, stats.teacher_lse_row, stats.cross_row = self._launch_distill_forward(
                a, b, scale, a_t, b_t, scale_t, partial
            )
            if single_pass:
                # Merge the row blocks' partials in a fixed order: LSEs by logsumexp, the cross term
                # weighted by each block's share of the teacher's column softmax.
                stats.lse_col = torch.logsumexp(partial[0], dim=0)
                stats.teacher_lse_col = torch.logsumexp(partial[1], dim=0)
                stats.cross_col = ((partial[1] - stats.teacher_lse_col).exp_() * partial[2]).sum(dim=0)
        if need_col and not single_pass:
            stats.lse_col, stats.teacher_lse_col, stats.cross_col = self._launch_distill_forward(
                b, a, scale, b_t, a_t, scale_t, None
            )
        if not need_row:
            stats.lse_row = stats.teacher_lse_row = stats.cross_row = None
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
    ):
        """Unscaled dS·B, dSᵀ·A, dT·B_t, dTᵀ·A_t, fp32 (see ``TorchEngine.distill_backward``)."""
        a, b, a_t, b_t = (_rows_contiguous(x) for x in (a, b, a_t, b_t))

        def side(lse, teacher_lse, cross, grad_lse, grad_cross):
            if grad_lse is None and grad_cross is None:
                return None
            # A missing upstream gradient is a zero one: one flag per side keeps the kernel's variants few.
            grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
            grad_cross = torch.zeros_like(cross) if grad_cross is None else grad_cross.float().contiguous()
            return lse, grad_lse, teacher_lse, cross, grad_cross

        rows = side(stats.lse_row, stats.teacher_lse_row, stats.cross_row, grads.lse_row, grads.cross_row)
        cols = side(stats.lse_col, stats.teacher_lse_col, stats.cross_col, grads.lse_col, grads.cross_col)
        launch = self._launch_distill_gradient
        return (
            launch(a, b, a_t, b_t, scale, scale_t, rows, cols, teacher=False) if need_a else None,
            launch(b, a, b_t, a_t, scale, scale_t, cols, rows, teacher=False) if need_b else None,
            launch(a, b, a_t, b_t, scale, scale_t, rows, cols, teacher=True) if need_a_t else None,
            launch(b, a, b_t, a_t, scale, scale_t, cols, rows, teacher=True) if need_b_t else None,
        )

    @staticmethod
    def _launch_distill_forward(x, y, scale, x_t, y_t, scale_t, col_partial):
        n_x, n_y = x.shape[0], y.shape[0]
        config = distill_config("forward", x.dtype, interpreter_enabled())
        dot_fp32, precision = _dot_settings(x.dtype)
        lse, teacher_lse, cross = (torch.empty(n_x, dtype=torch.float32, device=x.device) for _ in range(3))
        distill_forward_kernel[(triton.cdiv(n_x, config.block_m),)](
            x, y, x_t, y_t, scale, scale_t, lse, teacher_lse, cross, lse if col_partial is None else col_partial,
            n_x, n_y, x.shape[1], x_t.shape[1], x.stride(0), y.stride(0), x_t.stride(0), y_t.stride(0),
            WRITE_COL_PARTIAL=col_partial is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return lse, teacher_lse, cross

    @staticmethod
    def _launch_distill_gradient(x, y, x_t, y_t, scale, scale_t, x_stats, y_stats, *, teacher):
        """W·Y_out for the rows of X: fp32 [n_x, d] (student, W = dS) or [n_x, d_t] (teacher, W = dT)."""
        n_x, n_y = x.shape[0], y.shape[0]
        d_out = x_t.shape[1] if teacher else x.shape[1]
        config = distill_config("gradient", x.dtype, interpreter_enabled())
        dot_fp32, precision = _dot_settings(x.dtype)
        register_acc = d_out <= config.block_d
        out = (torch.empty if register_acc else torch.zeros)((n_x, d_out), dtype=torch.float32, device=x.device)
        placeholder = (out,) * 5
        distill_gradient_kernel[(triton.cdiv(n_x, config.block_m),)](
            x, y, x_t, y_t, scale, scale_t,
            *(x_stats or placeholder), *(y_stats or placeholder), out,
            n_x, n_y, x.shape[1], x_t.shape[1], x.stride(0), y.stride(0), x_t.stride(0), y_t.stride(0),
            out.stride(0),
            TEACHER_GRAD=teacher, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
            REGISTER_ACC=register_acc,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return out

    @staticmethod
    def _launch_lse(x, y, scale, lse_out, col_partial, exclude_offset, need_argmax=False, col_max=None,
                    col_argmax=None):
        """Row LSE of X·Yᵀ into ``lse_out`` (and column partials); returns the rows' argmax if asked."""
        n_x, n_y, d = x.shape[0], y.shape[0], x.shape[1]
        config = forward_config(d, x.dtype, interpreter_enabled())
        dot_fp32, precision = _dot_settings(x.dtype)
        splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
        grid = (triton.cdiv(n_x, config.block_m), splits)
        lse_split = lse_out if splits == 1 else torch.empty((splits, n_x), dtype=torch.float32, device=x.device)
        argmax_split = row_max = None
        if need_argmax:
            argmax_split = torch.empty((splits, n_x), dtype=torch.int64, device=x.device)
            row_max = torch.empty((splits, n_x), dtype=torch.float32, device=x.device)
        placeholder = lse_split  # never written: its flag is off
        lse_forward_kernel[grid](
            x, y, scale, lse_split, placeholder if col_partial is None else col_partial,
            placeholder if argmax_split is None else argmax_split, placeholder if row_max is None else row_max,
            placeholder if col_argmax is None else col_argmax, placeholder if col_max is None else col_max,
            n_x, n_y, d, x.stride(0), y.stride(0), 0 if exclude_offset is None else exclude_offset,
            cols_per_split,
            HAS_EXCLUDE=exclude_offset is not None, WRITE_COL_PARTIAL=col_partial is not None,
            WRITE_ARGMAX=need_argmax,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if splits > 1:
            torch.logsumexp(lse_split, dim=0, out=lse_out)
        return _merge_argmax(row_max, argmax_split) if need_argmax else None

    @staticmethod
    def _launch_gradient(x, y, scale, bias, mode, x_stats, y_stats, grad_total, offset, bias_partial_out):
        """dS·Y for the rows of X (fp32 [n_x, d]); appends the per-program Σ dS to ``bias_partial_out``."""
        n_x, n_y, d = x.shape[0], y.shape[0], x.shape[1]
        config = gradient_config(d, x.dtype, interpreter_enabled())
        dot_fp32, precision = _dot_settings(x.dtype)
        register_acc = d <= config.block_d
        splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
        grid = (triton.cdiv(n_x, config.block_m), splits)
        out_shape = (splits, n_x, d)
        out = (torch.empty if register_acc else torch.zeros)(out_shape, dtype=torch.float32, device=x.device)
        write_bias = bias_partial_out is not None
        bias_partial = torch.empty((splits, grid[0]), dtype=torch.float32, device=x.device) if write_bias else out
        lse_x, grad_x = x_stats if x_stats is not None else (out, out)
        lse_y, grad_y = y_stats if y_stats is not None else (out, out)
        gradient_kernel[grid](
            x, y, scale, scale if bias is None else bias,
            lse_x, grad_x, lse_y, grad_y, scale if grad_total is None else grad_total,
            out, bias_partial,
            n_x, n_y, d, x.stride(0), y.stride(0), out.stride(1), 0 if offset is None else offset, cols_per_split,
            MODE=mode, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
            HAS_EXCLUDE=offset is not None and mode == MODE_LSE, HAS_BIAS=bias is not None,
            WRITE_BIAS_PARTIAL=write_bias, REGISTER_ACC=register_acc,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if write_bias:
            bias_partial_out.append(bias_partial)
        # Sum the column splits' slabs in a fixed order: deterministic, no atomics.
        return out[0] if splits == 1 else out.sum(dim=0)
