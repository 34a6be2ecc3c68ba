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


# d buckets are upper bounds; d above the last bucket uses the last entry (chunked over d).
_FORWARD_TABLE = (
    (64, KernelConfig(block_m=128, block_n=64, block_d=64, num_warps=4, num_stages=2)),
    (128, KernelConfig(block_m=128, block_n=64, block_d=64, num_warps=4, num_stages=2)),
    (4096 * 64, KernelConfig(block_m=128, block_n=64, block_d=64, num_warps=4, num_stages=2)),
)

_GRADIENT_TABLE = (
    (64, KernelConfig(block_m=64, block_n=64, block_d=64, num_warps=4, num_stages=2)),
    (128, KernelConfig(block_m=64, block_n=64, block_d=128, num_warps=4, num_stages=2)),
    (256, KernelConfig(block_m=64, block_n=32, block_d=256, num_warps=8, num_stages=1)),
    (4096 * 64, KernelConfig(block_m=64, block_n=64, block_d=64, num_warps=4, num_stages=2)),
)

# The interpreter runs tiles as numpy arrays on the CPU: small tiles keep tests fast and still exercise
# ragged edges (n, m, d not multiples of the block) and the chunked-d path (d > 64).
INTERPRETER_CONFIG = KernelConfig(block_m=32, block_n=32, block_d=64, num_warps=1, num_stages=1)

# The d buckets the compile test and the README table cover.
COMPILE_DIMS = (64, 128, 256, 512, 768, 1024, 1280)


def _lookup(table, d: int) -> KernelConfig:
    for bound, config in table:
        if d <= bound:
            return config
    return table[-1][1]


def forward_config(d: int, dtype: torch.dtype, interpreter: bool) -> KernelConfig:
    """Config of the forward kernels (LSE and SigLIP sum) for feature dim ``d``."""
    if interpreter:
        return INTERPRETER_CONFIG
    config = _lookup(_FORWARD_TABLE, d)
    if dtype == torch.float32:
        # fp32 tiles take twice the registers and shared memory of half tiles.
        return KernelConfig(64, config.block_n, 32, config.num_warps, config.num_stages)
    return config


def gradient_config(d: int, dtype: torch.dtype, interpreter: bool) -> KernelConfig:
    """Config of the gradient kernel for feature dim ``d``."""
    if interpreter:
        return INTERPRETER_CONFIG
    config = _lookup(_GRADIENT_TABLE, d)
    if dtype == torch.float32:
        if d <= 128:
            return KernelConfig(32, 64, config.block_d, config.num_warps, 1)
        return KernelConfig(32, 32, 64, 4, 1)
    return config
