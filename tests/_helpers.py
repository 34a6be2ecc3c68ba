"""Shared test helpers: named comparisons whose failure message shows the tensor, the error and the bound."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastcontrast.tools.tolerances import DISTRIBUTED, ELEMENTWISE, KERNEL_RELATIVE  # noqa: F401 (re-exported)

# (atol, rtol) per input dtype against the fp64 reference: the package's one table.
TOLERANCES = ELEMENTWISE


def assert_close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0
) -> None:
    """Fail with the tensor's name, max abs error and tolerance when |actual − expected| is too big."""
    if actual is None or expected is None:
        if actual is None and expected is None:
            return
        raise AssertionError(
            f"{name}: one gradient is None (actual={actual is None}, expected={expected is None})"
        )
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values in result")
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if (err > bound).any():
        worst = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name}: max abs error {err.max().item():.3e} exceeds tolerance atol={atol:.1e} rtol={rtol:.1e} "
            f"(worst at flat index {worst}: got {actual.reshape(-1)[worst].item():.6e}, "
            f"expected {expected.reshape(-1)[worst].item():.6e})"
        )


# The memory-bound tests' size: at N = 4096, d = 64 the naive losses create N×N logits (16.8M elements);
# nothing of BOUND = N²/4 elements or more may be created by the blockwise losses.
BOUND_N, BOUND_D = 4096, 64
BOUND = BOUND_N * BOUND_N // 4


class TensorSizeRecorder(TorchDispatchMode):
    """Records (numel, op name) of every tensor returned by every aten op run while the mode is active."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.created.append((item.numel(), str(func)))
        return out

    def largest(self) -> tuple[int, str]:
        return max(self.created, default=(0, "no op"))
