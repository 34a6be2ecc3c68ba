"""Kernel launches recorded instead of run: the engine's own host code decides what would launch.

The compile checks (:mod:`fastcontrast.kernels.aot`) and the work model (:mod:`fastcontrast.kernels.
work_model`) both need to know exactly which kernels the engine launches, with which arguments, tile
configs and flags, for a given call. Rather than repeat the launchers' decisions (a second source of truth
that drifts), they run the real :class:`~fastcontrast.kernels.engine.TritonEngine` on CPU tensors inside
:func:`recorded_launches`, which replaces the launch of every ``@triton.jit`` function (compiled or
interpreted) by a record. Nothing is computed: outputs keep whatever their buffers held.

The tile configs follow the target :func:`fastcontrast.kernels.configs.assume_target` names, so a record
taken on this CPU machine is what an sm_90 (or sm_80, gfx942, …) GPU would launch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional


@dataclass
class Launch:
    """One recorded launch: the jit function, its grid and its arguments (keywords as the launcher passed them)."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    @property
    def programs(self) -> int:
        grid = tuple(self.grid) + (1, 1)
        return int(grid[0]) * int(grid[1]) * int(grid[2])


@contextlib.contextmanager
def recorded_launches(keep: Optional[Callable[[Launch], Launch]] = None) -> Iterator[list[Launch]]:
    """Within the block, every ``kernel[grid](...)`` appends a :class:`Launch` to the yielded list instead of
    running (with and without ``TRITON_INTERPRET=1``, triton 3.2 and newer: ``kernel[grid]`` is the one
    launch syntax every version shares).

    ``keep``, if given, maps each record to what the list keeps of it: a record holds its launch's tensors, so
    at real sizes (thousands of launches, each with its own split-K slab) the list would otherwise hold them
    all; :func:`without_storage` keeps their shapes alone."""
    launches: list[Launch] = []

    def index(self, grid):
        def record(*args, **kwargs):
            launch = Launch(self, tuple(grid(kwargs) if callable(grid) else grid), args, kwargs)
            launches.append(launch if keep is None else keep(launch))

        return record

    with patched_launch_index(index):
        yield launches


def without_storage(launch: Launch) -> Launch:
    """``launch`` with every tensor argument replaced by a meta-device tensor of the same shape, strides and
    dtype: what a record needs for shapes and bytes, without keeping the launch's memory alive."""
    import torch

    def twin(value):
        if isinstance(value, torch.Tensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return value

    return Launch(launch.kernel, launch.grid, tuple(twin(a) for a in launch.args),
                  {name: twin(value) for name, value in launch.kwargs.items()})


def kernel_classes() -> list:
    """The classes whose instances ``@triton.jit`` returns, compiled and interpreted."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every triton 3.x has the interpreter
        pass
    return classes


@contextlib.contextmanager
def patched_launch_index(index) -> Iterator[None]:
    """Replace ``kernel[grid]`` of every jit function by ``index(kernel, grid)`` within the block."""
    saved = [(cls, cls.__dict__.get("__getitem__")) for cls in kernel_classes()]
    for cls, _ in saved:
        cls.__getitem__ = index
    try:
        yield
    finally:
        for cls, original in saved:
            if original is None:
                del cls.__getitem__  # it was inherited (JITFunction takes KernelInterface's)
            else:
                cls.__getitem__ = original
