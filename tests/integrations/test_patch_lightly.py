"""``patch_lightly``: ``lightly.loss.NTXentLoss`` (and DCL where fastcontrast has it) become fastcontrast's."""

from __future__ import annotations

import pytest
import torch

import fastcontrast
from fastcontrast.integrations import patch_lightly

lightly_loss = pytest.importorskip("lightly.loss")

import lightly.loss.ntx_ent_loss  # noqa: E402

ORIGINAL = lightly_loss.NTXentLoss
DCL_NAMES = ("DCLLoss", "DCLWLoss")
DCL_ORIGINALS = {name: getattr(lightly_loss, name) for name in DCL_NAMES}


@pytest.fixture(autouse=True)
def lightly_restored():
    yield
    assert lightly_loss.NTXentLoss is lightly.loss.ntx_ent_loss.NTXentLoss is ORIGINAL, "a test left lightly patched"


def views(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).requires_grad_(), torch.randn(n, d, generator=g).requires_grad_()


def value_and_grads(loss_fn, out0, out1):
    out0, out1 = out0.detach().clone().requires_grad_(), out1.detach().clone().requires_grad_()
    loss = loss_fn(out0, out1)
    loss.backward()
    return loss.detach(), out0.grad, out1.grad


def test_lightly_loss_lookup_returns_fastcontrasts_class_while_patched():
    with patch_lightly() as handle:
        assert lightly_loss.NTXentLoss is fastcontrast.NTXentLoss
        assert lightly.loss.ntx_ent_loss.NTXentLoss is fastcontrast.NTXentLoss
        assert type(lightly_loss.NTXentLoss(temperature=0.2)) is fastcontrast.NTXentLoss
        assert {"lightly.loss.NTXentLoss", "lightly.loss.ntx_ent_loss.NTXentLoss"} <= set(handle.patched)
    assert lightly_loss.NTXentLoss is ORIGINAL


def test_undo_is_idempotent_and_restores_lightlys_class():
    handle = patch_lightly(backend="torch", chunk_bytes=512)
    loss = lightly_loss.NTXentLoss()
    assert isinstance(loss, fastcontrast.NTXentLoss)
    assert (type(loss).__name__, loss.backend, loss.chunk_bytes) == ("NTXentLoss", "torch", 512)
    handle.undo()
    handle.undo()
    assert lightly_loss.NTXentLoss is ORIGINAL


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.5}, {"temperature": 0.1}, {"temperature": 0.2, "memory_bank_size": (48, 16)}],
    ids=["simclr-t0.5", "simclr-t0.1", "memory-bank-48x16"],
)
def test_patched_ntxent_gives_lightlys_values_and_gradients(kwargs):
    torch.manual_seed(0)  # the memory bank starts as random unit vectors from the global generator
    original = ORIGINAL(**kwargs)
    with patch_lightly():
        torch.manual_seed(0)
        patched = lightly_loss.NTXentLoss(**kwargs)
    # Three steps, so that a memory bank is read after it has been written to.
    for step in range(3):
        out0, out1 = views(20, 16, seed=step)
        expected = value_and_grads(original, out0, out1)
        got = value_and_grads(patched, out0, out1)
        for name, a, b in zip(("loss", "grad out0", "grad out1"), got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


@pytest.mark.parametrize("name", DCL_NAMES)
def test_dcl_losses_are_patched_exactly_when_fastcontrast_provides_them(name):
    ours = getattr(fastcontrast, name, None)
    with patch_lightly():
        bound = getattr(lightly_loss, name)
        if ours is None:
            assert bound is DCL_ORIGINALS[name]
            pytest.skip(f"fastcontrast has no {name} yet: lightly's is left in place")
        assert bound is ours
        patched = bound(temperature=0.1)
    out0, out1 = views(20, 16, seed=7)
    expected = value_and_grads(DCL_ORIGINALS[name](temperature=0.1), out0, out1)
    got = value_and_grads(patched, out0, out1)
    for label, a, b in zip(("loss", "grad out0", "grad out1"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=label)
    assert getattr(lightly_loss, name) is DCL_ORIGINALS[name]
