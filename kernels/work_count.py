"""Work counted, not guessed: FLOPs and bytes of the Triton kernels, counted in triton's interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.dot`` goes through ``InterpreterBuilder.create_dot`` with its
operand tiles, and every load / store through ``create_masked_load`` / ``create_masked_store``. Wrapping
them counts exactly what the kernels ask for:

- FLOPs: 2·M·N·K per ``tl.dot``, tile padding included (what the tensor cores really execute);
- transcendentals: elements through exp / exp2 / log / log2 (the SFU work: FlashAttention-3 shows it can
  rival the tensor cores at small d);
- bytes requested: active (unmasked) elements × element size for every load and store (unmasked ones go
  through the masked path too). This is traffic *requested* from the memory system with no cache model, so
  an upper bound on DRAM traffic: a B tile that every row block re-reads is counted every time, though on a
  GPU it mostly hits L2. ``python -m fastcontrast model`` turns the counts into a modelled time.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

# Interpreter ops counted as transcendental (one SFU op per element, padding included).
TRANSCENDENTALS = ("create_exp", "create_exp2", "create_log", "create_log2")


@dataclass
class WorkCount:
    flops: int = 0
    dots: int = 0
    transcendentals: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0

    @property
    def bytes_requested(self) -> int:
        return self.bytes_loaded + self.bytes_stored


@contextlib.contextmanager
def count_work():
    """Count FLOPs and bytes of every Triton kernel launched inside the ``with`` block (interpreter only).

    Yields:
        a :class:`WorkCount` filled in as kernels run.
    Raises:
        RuntimeError: if TRITON_INTERPRET=1 was not set before triton was imported.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("count_work() needs TRITON_INTERPRET=1, set before triton is imported.")
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    count = WorkCount()
    original_dot = InterpreterBuilder.create_dot
    original_load = InterpreterBuilder.create_masked_load
    original_store = InterpreterBuilder.create_masked_store
    original_unary = {name: getattr(InterpreterBuilder, name) for name in TRANSCENDENTALS}

    def counting_dot(self, a, b, d, *args, **kwargs):
        # [M, K] @ [K, N]
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        batch = int(np.prod(a.data.shape[:-2])) if a.data.ndim > 2 else 1
        count.flops += 2 * batch * m * n * k
        count.dots += 1
        return original_dot(self, a, b, d, *args, **kwargs)

    def counting_load(self, ptrs, mask, *args, **kwargs):
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        count.bytes_loaded += int(np.count_nonzero(mask.data)) * itemsize
        return original_load(self, ptrs, mask, *args, **kwargs)

    def counting_store(self, ptrs, value, mask, *args, **kwargs):
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        count.bytes_stored += int(np.count_nonzero(mask.data)) * itemsize
        return original_store(self, ptrs, value, mask, *args, **kwargs)

    def counting_unary(name):
        original = original_unary[name]

        def counted(self, arg):
            count.transcendentals += int(np.size(arg.data))
            return original(self, arg)

        return counted

    for name in TRANSCENDENTALS:
        setattr(InterpreterBuilder, name, counting_unary(name))
    InterpreterBuilder.create_dot = counting_dot
    InterpreterBuilder.create_masked_load = counting_load
    InterpreterBuilder.create_masked_store = counting_store
    try:
        yield count
    finally:
        InterpreterBuilder.create_dot = original_dot
        InterpreterBuilder.create_masked_load = original_load
        InterpreterBuilder.create_masked_store = original_store
        for name, original in original_unary.items():
            setattr(InterpreterBuilder, name, original)


def gemm_passes(flops: int, n: int, m: int, d: int) -> float:
    """FLOPs expressed in GEMM passes over the similarity matrix: one pass = 2·n·m·d."""
    return flops / (2 * n * m * d)
