"""What every Triton launch shares: the device guard, aligned operands, dot settings, the fp16 gradient scale,
grid sizing and the fixed-order merges of per-program partials.

Why each exists (a GPU run would otherwise go wrong where the interpreter cannot see it):

- the device: triton launches on the *current* CUDA device and its stream, so every launch runs under a
  guard for the inputs' device (:func:`launch_device`);
- the binaries: triton compiles one variant per divisibility of each pointer, d and stride by 16, so
  features whose d, row stride or address is not a multiple of 16 are copied once into an aligned,
  zero-padded buffer (zero columns change no dot product) and every tensor argument is 16-byte aligned:
  only the aligned binaries, the ones the compile checks cover, ever launch;
- fp16 gradients: dS is scaled by a power of two before its cast to fp16 (:func:`gradient_scale`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
from fastcontrast.kernels.configs import (
    TYPICAL_MULTIPROCESSORS,
    KernelConfig,
    Target,
    has_tf32,
    target_for,
)
from fastcontrast.kernels.lse_forward import merge_partials_kernel

from fastcontrast._dispatch import triton_interpreter_enabled
from fastcontrast.engine import empty_like_result, tf32_matmul_enabled
from fastcontrast.lse_split import finite_or_zero

# Below this many programs per SM a launch leaves the GPU idle: rows are then split across programs by
# column range too (few rows against many columns: a per-rank local loss, a memory bank).
PROGRAMS_PER_SM = 4
# In the interpreter, split whenever fewer than this many row blocks exist, so that the tests' small
# shapes run the split path as well as the plain one.
INTERPRETER_TARGET_PROGRAMS = 4
# triton specialises an int or a pointer as "divisible by 16" only when it is
# (docs/kernels.md#compiled-for-every-target-without-spills).
ALIGNMENT = 16


def launch_device(x: torch.Tensor):
    """The context every launch runs in: the inputs' CUDA device made current (triton launches on the
    current device and its stream), nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _device_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def target_programs(device: torch.device) -> int:
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
    splits = max(1, min(col_blocks, target_programs(device) // row_blocks))
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

    The interpreter's bf16 ``tl.dot`` is wrong (docs/numerics.md#testing-gpu-code-on-a-cpu): there bf16 tiles
    are multiplied in fp32. fp32 runs TF32 only where the user enabled it and the target's triton backend has
    it (gfx90a's HIP backend rejects "tf32")."""
    interpreter = triton_interpreter_enabled()
    dot_fp32 = interpreter and dtype == torch.bfloat16
    if dtype == torch.float32 and not interpreter and tf32_matmul_enabled() and has_tf32(target):
        return dot_fp32, "tf32"
    return dot_fp32, "ieee"


def gradient_scale(dtype: torch.dtype, *bounds: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """For fp16 operands: a power of two 2ᵏ (fp32 [1], on the device, no host sync) that brings Σ max|bound|, a
    bound of every |dS|, into [2¹³, 2¹⁴); None for other dtypes (bf16 has fp32's range).

    Why so high: dS ≈ P/(2N) is tiny at real N. Scaled only into [0.5, 1), almost every off-diagonal entry is
    an fp16 subnormal from N ≥ 16k (fp16's normals start at 2⁻¹⁴) and the negatives' share of the gradient
    loses ~6e-4 relative at N = 65k. [2¹³, 2¹⁴) keeps the largest |dS| a factor 4 below fp16's maximum (65504)
    and moves every entry above 2⁻¹⁴·2⁻¹³ out of the subnormals. The kernels undo 2ᵏ in fp32, exactly."""
    if dtype != torch.float16:
        return None
    total = sum(b.detach().abs().amax().float() for b in bounds if b is not None and b.numel())
    if not isinstance(total, torch.Tensor):
        return None
    _, exponent = torch.frexp(total.reshape(1))  # total = mantissa · 2^exponent, mantissa in [0.5, 1)
    # A zero bound keeps the factor 1; the clamp keeps the factor a finite, normal fp32 power of two.
    shift = torch.where(total > 0, 14 - exponent, torch.zeros_like(exponent)).clamp(-126, 126)
    return torch.ldexp(torch.ones(1, device=total.device), shift)


def merge_lse_in_place(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp over dim 0 of per-block partial LSEs [k, m], and Σ exp(partial − max) [m], computed in
    ``partial``'s own storage (it is left holding exp(partial − max)): the merge adds no temporary of the
    scratch's size (torch.logsumexp would make one). Deterministic: a fixed reduction order."""
    top = partial.amax(dim=0)
    # A column that is −inf in every block (nothing left by the masks) stays −inf, without −inf − (−inf).
    top = finite_or_zero(top)
    total = partial.sub_(top).exp_().sum(dim=0)
    return total.log().add_(top), total


MERGE_BLOCK = 512  # entries per program of merge_partials_kernel: 128 programs at N = 65k


def merge_partials(part_lse: torch.Tensor, part_low: torch.Tensor, *, out: Optional[tuple] = None,
                   block_rows: int = 0, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE over dim 0 of partial LSEs given as exact pairs [k, n] (the row splits, the row blocks' column
    partials; rows may be strided views), as the exact pair ``(hi, lo)`` of :mod:`fastcontrast.lse_split`:
    one launch of ``merge_partials_kernel`` ([n] fp32 each, or written into ``out``, which may be rows of the
    partials themselves), no torch op between the kernels; a fixed reduction order. ``block_rows`` / ``first``:
    partial k holds entry o only where k·block_rows ≤ o + first (the symmetric forward's triangle)."""
    n = part_lse.shape[1]
    if out is None:
        out = tuple(torch.empty(n, dtype=torch.float32, device=part_lse.device) for _ in range(2))
    hi, lo = out
    merge_partials_kernel[(triton.cdiv(n, MERGE_BLOCK),)](
        PART_LSE=part_lse, PART_LOW=part_low, LSE=hi, LOW=lo, n_parts=part_lse.shape[0], n=n,
        pitch=part_lse.stride(0), block_rows=block_rows, first=first, BLOCK=MERGE_BLOCK, num_warps=4, num_stages=1,
    )
    return hi, lo


def merge_argmax(partial_max: torch.Tensor, partial_argmax: torch.Tensor) -> torch.Tensor:
    """The argmax over partials [k, n] (each with its max): the first partial holding the largest max wins,
    which is the lowest index on ties, since the partials cover increasing index ranges."""
    if partial_max.shape[0] == 1:
        return partial_argmax[0]
    best = partial_max.argmax(dim=0, keepdim=True)
    return partial_argmax.gather(0, best).squeeze(0)


MODE_LSE, MODE_SIGLIP = 0, 1  # the MODE constexpr of the gradient kernels (tiles.gradient_tile)


def launch_flags(config: KernelConfig, operand: torch.Tensor) -> dict:
    """Tile sizes, warps and dot settings of one launch with ``operand``'s dtype and device, as kernel keywords."""
    dot_fp32, precision = dot_settings(operand.dtype, target_for(operand.device))
    return dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def bias_or_zero(bias: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """SigLIP's bias, or an fp32 zero on the device when the loss has none: one binary serves both."""
    return aligned_vector(bias) if bias is not None else torch.zeros((), dtype=torch.float32, device=like.device)


def unpadded(d: int, *outputs: Optional[torch.Tensor]) -> tuple:
    """The outputs (or None) without the zero columns the aligned buffers added past d."""
    return tuple(None if x is None else x[:, :d] for x in outputs)


def empty_results(like: torch.Tensor, *results: Optional[torch.Tensor]) -> tuple:
    """The engine's fixed outputs: each result, or the empty tensor that stands for one not computed."""
    return tuple(empty_like_result(like) if x is None else x for x in results)
