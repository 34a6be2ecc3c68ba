"""``patch_lightly``: ``lightly.loss.NTXentLoss``, ``DCLLoss`` and ``DCLWLoss`` become fastcontrast's."""

from __future__ import annotations

import inspect

import pytest
import torch
from _helpers import squared_distance_weights

import fastcontrast
from fastcontrast import reference
from fastcontrast.integrations import patch_lightly

lightly_loss = pytest.importorskip("lightly.loss")

import lightly.loss.dcl_loss  # noqa: E402
import lightly.loss.ntx_ent_loss  # noqa: E402

ORIGINAL = lightly_loss.NTXentLoss
DCL_NAMES = ("DCLLoss", "DCLWLoss")
DCL_ORIGINALS = {name: getattr(lightly_loss, name) for name in DCL_NAMES}


@pytest.fixture(autouse=True)
def lightly_restored():
    yield
    assert lightly_loss.NTXentLoss is lightly.loss.ntx_ent_loss.NTXentLoss is ORIGINAL, "a test left lightly patched"
    for name in DCL_NAMES:
        assert getattr(lightly_loss, name) is getattr(lightly.loss.dcl_loss, name) is DCL_ORIGINALS[name], name


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
def test_dcl_losses_are_patched_and_restored(name):
    with patch_lightly() as handle:
        assert getattr(lightly_loss, name) is getattr(fastcontrast, name)
        assert getattr(lightly.loss.dcl_loss, name) is getattr(fastcontrast, name)
        assert type(getattr(lightly_loss, name)(temperature=0.1)) is getattr(fastcontrast, name)
        assert {f"lightly.loss.{name}", f"lightly.loss.dcl_loss.{name}"} <= set(handle.patched)
    assert getattr(lightly_loss, name) is getattr(lightly.loss.dcl_loss, name) is DCL_ORIGINALS[name]


def test_patch_options_reach_the_dcl_losses():
    with patch_lightly(backend="torch", chunk_bytes=256):
        for name in DCL_NAMES:
            loss = getattr(lightly_loss, name)()
            assert isinstance(loss, getattr(fastcontrast, name))
            assert (type(loss).__name__, loss.backend, loss.chunk_bytes) == (name, "torch", 256)


# (name, positional args, keyword args) as a lightly user writes them; lightly's sigma default is 0.5.
DCL_CONSTRUCTIONS = [
    pytest.param("DCLLoss", (), {}, id="DCLLoss-defaults"),
    pytest.param("DCLLoss", (0.5,), {}, id="DCLLoss-t0.5"),
    pytest.param("DCLLoss", (0.2, squared_distance_weights), {}, id="DCLLoss-weight_fn-positional"),
    pytest.param("DCLLoss", (), {"temperature": 0.07, "weight_fn": squared_distance_weights}, id="DCLLoss-weight_fn"),
    pytest.param("DCLLoss", (0.1, None, True), {}, id="DCLLoss-gather-single-process"),
    pytest.param("DCLWLoss", (), {}, id="DCLWLoss-defaults"),
    pytest.param("DCLWLoss", (0.2, 0.3), {}, id="DCLWLoss-t0.2-sigma0.3"),
    pytest.param("DCLWLoss", (), {"temperature": 0.5, "sigma": 2.0, "gather_distributed": True}, id="DCLWLoss-kw"),
]


@pytest.mark.parametrize("n, d", [(1, 16), (20, 16), (37, 48), (9, 1000)], ids=["N1", "N20-D16", "N37-D48", "N9-D1000"])
@pytest.mark.parametrize("name, args, kwargs", DCL_CONSTRUCTIONS)
def test_patched_dcl_losses_give_lightlys_values_and_gradients(name, args, kwargs, n, d):
    original = DCL_ORIGINALS[name](*args, **kwargs)
    with patch_lightly():
        patched = getattr(lightly_loss, name)(*args, **kwargs)
    assert isinstance(patched, getattr(fastcontrast, name))
    out0, out1 = views(n, d, seed=7)
    expected = value_and_grads(original, out0, out1)
    got = value_and_grads(patched, out0, out1)
    if n == 1:  # no negatives: lightly's logsumexp over an empty row is −inf, and so is ours
        assert torch.isneginf(expected[0]) and torch.isneginf(got[0]), (expected[0], got[0])
        expected, got = expected[1:], got[1:]
        labels = ("grad out0", "grad out1")
    else:
        labels = ("loss", "grad out0", "grad out1")
    for label, a, b in zip(labels, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=label)


@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_constructor_positional_parameters_and_defaults_are_lightlys(name):
    ours = getattr(fastcontrast, name).__init__
    theirs = {"NTXentLoss": ORIGINAL, **DCL_ORIGINALS}[name].__init__

    def positional(init):
        params = list(inspect.signature(init).parameters.values())[1:]
        return [(p.name, p.default) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    assert positional(ours) == positional(theirs)


@pytest.mark.parametrize("rank, world_size", [(0, 2), (1, 2), (2, 3)])
@pytest.mark.parametrize("name, args", [("DCLLoss", ()), ("DCLLoss", (0.2, squared_distance_weights)),
                                        ("DCLWLoss", (0.2, 0.3))], ids=["DCLLoss", "DCLLoss-weight_fn", "DCLWLoss"])
def test_dcl_gathered_reference_is_lightlys_dcl_on_a_simulated_rank(name, args, rank, world_size, monkeypatch):
    """lightly's DCLLoss(gather_distributed=True) on one rank of a simulated group (its dist helpers
    monkeypatched: the other ranks' views are constants, as lightly's gather hands them back) against
    fastcontrast.reference.dcl_loss_gathered_reference, which the distributed tests hold fastcontrast to."""
    from lightly.utils import dist as lightly_dist

    n, d = 6, 10
    g = torch.Generator().manual_seed(rank)
    others = {k: torch.nn.functional.normalize(torch.randn(world_size * n, d, generator=g), dim=1) for k in (0, 1)}
    monkeypatch.setattr(lightly_dist, "world_size", lambda: world_size)
    monkeypatch.setattr(lightly_dist, "rank", lambda: rank)
    calls = []

    def gather(x):  # every rank's rows in rank order, this rank's slot live
        view = others[len(calls) % 2]
        calls.append(1)
        return tuple(x if r == rank else view[r * n : (r + 1) * n] for r in range(world_size))

    monkeypatch.setattr(lightly_dist, "gather", gather)
    out0, out1 = views(n, d, seed=3)
    expected = value_and_grads(DCL_ORIGINALS[name](*args, gather_distributed=True), out0, out1)
    assert len(calls) == 2, "lightly's forward no longer gathers out0 then out1"

    def ours(x0, x1):
        z0, z1 = torch.nn.functional.normalize(x0, dim=1), torch.nn.functional.normalize(x1, dim=1)
        z0_all = torch.cat([others[0][: rank * n], z0, others[0][(rank + 1) * n :]])
        z1_all = torch.cat([others[1][: rank * n], z1, others[1][(rank + 1) * n :]])
        weight_fn = DCL_ORIGINALS[name](*args).weight_fn
        return reference.dcl_loss_gathered_reference(z0, z1, z0_all, z1_all, 0.1 if not args else args[0],
                                                     weight_fn, offset=rank * n)

    got = value_and_grads(ours, out0, out1)
    for label, a, b in zip(("loss", "grad out0", "grad out1"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=label)
