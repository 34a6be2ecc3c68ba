"""Shared test helpers: named comparisons whose failure message shows the tensor, the error and the bound;
the DCL variants (lightly's DCLLoss / DCLWLoss and a differentiable weight_fn) tested next to NT-Xent."""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastcontrast
from fastcontrast import reference
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


def squared_distance_weights(out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
    """A differentiable DCL ``weight_fn`` (lightly's docstring example): [n] weights through which the
    gradient flows, unlike DCLW's detached ones."""
    return ((out0 - out1) ** 2).sum(1)


def lightly_mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """lightly 1.6 ``negative_mises_fisher_weights``, restated for the references (no gradient)."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return (2 - out0.shape[0] * torch.softmax(similarity, dim=0)).detach()


# The DCL variants tested next to NT-Xent: the plain module, the DCLW module and the functional loss with a
# differentiable weight_fn. DCL_SIGMA is not lightly's default, so a sigma that is dropped on the way shows.
DCL_VARIANTS = ("DCLLoss", "DCLWLoss", "dcl_loss-weight_fn")
DCL_SIGMA = 0.3
DCL_REFERENCE_WEIGHTS = {
    "DCLLoss": None,
    "DCLWLoss": functools.partial(lightly_mises_fisher_weights, sigma=DCL_SIGMA),
    "dcl_loss-weight_fn": squared_distance_weights,
}


def dcl_variant_loss(variant: str, out0: torch.Tensor, out1: torch.Tensor, temperature: float, **options):
    """fastcontrast's loss for a DCL variant; ``options`` (backend, chunk_bytes, gather_distributed, ...)
    are passed as keywords."""
    if variant == "DCLLoss":
        return fastcontrast.DCLLoss(temperature, **options)(out0, out1)
    if variant == "DCLWLoss":
        return fastcontrast.DCLWLoss(temperature, DCL_SIGMA, **options)(out0, out1)
    if variant == "dcl_loss-weight_fn":
        return fastcontrast.dcl_loss(out0, out1, temperature, squared_distance_weights, **options)
    raise ValueError(variant)


def dcl_variant_reference(variant: str, out0: torch.Tensor, out1: torch.Tensor, temperature: float):
    """lightly's math (fastcontrast.reference) for a DCL variant, on one process."""
    return reference.dcl_loss_reference(out0, out1, temperature, DCL_REFERENCE_WEIGHTS[variant])


def assert_loss_close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0
) -> None:
    """:func:`assert_close` for a loss that may be −inf: DCL with one sample per view has no negatives, and
    lightly's logsumexp over an empty row gives −inf. Then the result must be exactly −inf too."""
    if expected.numel() == 1 and torch.isneginf(expected).item():
        if not (actual.numel() == 1 and torch.isneginf(actual).item()):
            got = actual.detach().reshape(-1)[:4].tolist()
            raise AssertionError(f"{name}: expected -inf (no negatives), got {got}")
        return
    assert_close(name, actual, expected, atol, rtol)


def leave_process_group() -> None:
    """End a spawned test worker's gloo group so that the process exits cleanly: the tensors and DDP reducers
    holding gloo work go first (gc), the ranks meet (barrier), then the group is destroyed. Left to the
    interpreter's exit, torch 2.13's gloo teardown aborts now and then ("terminate called without an active
    exception", no Python frame, after every result was written), failing a test whose results were right;
    more often on a loaded machine. A barrier that fails (the other rank died) still destroys the group."""
    import gc

    import torch.distributed as dist

    gc.collect()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
