"""Block sizes and warps for each kernel, keyed by a feature-dim bucket (DESIGN §4, "Configs").

There is no autotuning: the interpreter cannot autotune, and a fixed table keeps results bit-reproducible
across runs. Every entry of this table is compiled for sm_80 and sm_90 by the compile test
(``tests/test_kernels_compile.py``), which checks for zero register spills and the shared-memory limit,
and ``python -m fastcontrast info --kernels`` prints the result.

``BLOCK_D`` is the chunk of the feature dim loaded per ``tl.dot``. In the gradient kernel, when the whole
feature dim fits one chunk (``d <= BLOCK_D``, "register" path), the [BLOCK_M, d] fp32 accumulator lives in
registers, as in FlashAttention. Above that, the kernel accumulates into its own rows of the fp32 output
(read-modify-write per column block, owned by one program, so still no atomics): the recomputed S tile
stays the same cost, and only the accumulator traffic grows with d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# The forward kernels loop over d in BLOCK_D chunks whatever d is, so one config serves every d. Each
# entry was checked by the compile test: 0 spills on sm_80 and sm_90. The SigLIP softplus keeps more
# values live than the online max/sum: with 4 warps ptxas capped it at 168 registers on sm_80 and spilled
# 8 bytes, so it runs 8 warps (146 registers for a 128×64 tile).
_LSE_FORWARD = {"half": KernelConfig(128, 64, 64, num_warps=4, num_stages=2),
                "fp32": KernelConfig(64, 64, 32, num_warps=4, num_stages=2)}
_SIGLIP_FORWARD = {"half": KernelConfig(128, 64, 64, num_warps=8, num_stages=2),
                   "fp32": KernelConfig(64, 64, 32, num_warps=8, num_stages=2)}

# Gradient kernel, by d bucket (upper bounds; larger d uses the last entry, accumulating in fp32 rows).
# d = 128 with 4 warps spilled on sm_80 (56 bytes): 8 warps halve the accumulator per thread.
_GRADIENT_TABLE = {
    "half": (
        (64, KernelConfig(64, 64, 64, num_warps=4, num_stages=2)),
        (128, KernelConfig(64, 64, 128, num_warps=8, num_stages=2)),
        (256, KernelConfig(64, 32, 256, num_warps=8, num_stages=1)),
        (None, KernelConfig(64, 64, 64, num_warps=4, num_stages=2)),
    ),
    "fp32": (
        (64, KernelConfig(32, 64, 64, num_warps=4, num_stages=1)),
        (128, KernelConfig(32, 64, 128, num_warps=8, num_stages=1)),
        (None, KernelConfig(32, 32, 64, num_warps=4, num_stages=1)),
    ),
}

# Distillation kernels hold two S tiles (student and teacher) plus, in the forward, the column partials of
# both, and in the gradient the output accumulator. With 4 warps ptxas capped the forward at 255 registers
# and spilled 12 bytes on sm_80 and sm_90 (the gradient's register path 8 bytes on sm_80); 8 warps halve
# each tile's share per thread. One config serves every d (the gradient keeps its accumulator in registers
# for d ≤ BLOCK_D and in its own fp32 rows above).
_DISTILL_FORWARD = {"half": KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
                    "fp32": KernelConfig(64, 64, 32, num_warps=8, num_stages=2)}
_DISTILL_GRADIENT = {"half": KernelConfig(64, 64, 64, num_warps=8, num_stages=2),
                     "fp32": KernelConfig(32, 64, 64, num_warps=4, num_stages=1)}

# The interpreter runs tiles as numpy arrays on the CPU: small tiles keep tests fast and still exercise
# ragged edges (n, m, d not multiples of the block) and the chunked-d path (d > 64).
INTERPRETER_CONFIG = KernelConfig(block_m=32, block_n=32, block_d=64, num_warps=1, num_stages=1)

# The d buckets the compile test and the README table cover.
COMPILE_DIMS = (64, 128, 256, 512, 768, 1024, 1280)


# Set by ``work_count.gpu_configs()`` so that the interpreter runs the GPU table's tiles, for counting the
# work of the configs that really ship. Never set while computing results.
_GPU_TABLE_IN_INTERPRETER = False


def _precision(dtype: torch.dtype) -> str:
    # fp32 tiles take twice the registers and shared memory of fp16 / bf16 tiles.
    return "fp32" if dtype == torch.float32 else "half"


def forward_config(d: int, dtype: torch.dtype, interpreter: bool, kernel: str = "lse") -> KernelConfig:
    """Config of a forward kernel (``kernel`` = ``"lse"`` or ``"siglip"``) for feature dim ``d``."""
    if interpreter and not _GPU_TABLE_IN_INTERPRETER:
        return INTERPRETER_CONFIG
    table = _SIGLIP_FORWARD if kernel == "siglip" else _LSE_FORWARD
    return table[_precision(dtype)]


def gradient_config(d: int, dtype: torch.dtype, interpreter: bool) -> KernelConfig:
    """Config of the gradient kernel for feature dim ``d``."""
    if interpreter and not _GPU_TABLE_IN_INTERPRETER:
        return INTERPRETER_CONFIG
    for bound, config in _GRADIENT_TABLE[_precision(dtype)]:
        if bound is None or d <= bound:
            return config
    raise LookupError(f"no gradient config for d={d}")  # unreachable: the last entry has no bound


def distill_config(kernel: str, dtype: torch.dtype, interpreter: bool) -> KernelConfig:
    """Config of a distillation kernel (``kernel`` = ``"forward"`` or ``"gradient"``)."""
    if interpreter and not _GPU_TABLE_IN_INTERPRETER:
        return INTERPRETER_CONFIG
    table = _DISTILL_FORWARD if kernel == "forward" else _DISTILL_GRADIENT
    return table[_precision(dtype)]
