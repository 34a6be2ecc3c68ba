"""``patch_pytorch_metric_learning``: ``pytorch_metric_learning.losses.SupConLoss`` becomes fastcontrast's."""

from __future__ import annotations

import pytest
import torch

import fastcontrast
from fastcontrast.integrations import patch_pytorch_metric_learning

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

import pytorch_metric_learning.losses.supcon_loss  # noqa: E402

ORIGINAL = pml_losses.SupConLoss


@pytest.fixture(autouse=True)
def pml_restored():
    yield
    assert pml_losses.SupConLoss is pytorch_metric_learning.losses.supcon_loss.SupConLoss is ORIGINAL, (
        "a test left pytorch-metric-learning patched"
    )


def batch(n: int, d: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def value_and_grad(loss_fn, embeddings, labels, **kwargs):
    embeddings = embeddings.clone().requires_grad_()
    loss = loss_fn(embeddings, labels, **kwargs)
    loss.backward()
    return loss.detach(), embeddings.grad


def test_pml_lookup_returns_fastcontrasts_class_while_patched():
    with patch_pytorch_metric_learning() as handle:
        assert pml_losses.SupConLoss is fastcontrast.SupConLoss
        assert pytorch_metric_learning.losses.supcon_loss.SupConLoss is fastcontrast.SupConLoss
        assert type(pml_losses.SupConLoss(temperature=0.07)) is fastcontrast.SupConLoss
        assert set(handle.patched) >= {"pytorch_metric_learning.losses.SupConLoss",
                                       "pytorch_metric_learning.losses.supcon_loss.SupConLoss"}
    assert pml_losses.SupConLoss is ORIGINAL


def test_undo_is_idempotent_and_options_reach_the_loss():
    handle = patch_pytorch_metric_learning(backend="reference", chunk_bytes=2048)
    loss = pml_losses.SupConLoss(temperature=0.2)
    assert (type(loss).__name__, loss.backend, loss.chunk_bytes) == ("SupConLoss", "reference", 2048)
    handle.undo()
    handle.undo()
    assert pml_losses.SupConLoss is ORIGINAL


@pytest.mark.parametrize(
    "temperature, classes, with_reference",
    [(0.1, 4, False), (0.5, 9, False), (0.1, 4, True)],
    ids=["t0.1-4-classes", "t0.5-9-classes", "t0.1-reference-set"],
)
def test_patched_supcon_gives_pmls_values_and_gradients(temperature, classes, with_reference):
    embeddings, labels = batch(24, 16, classes, seed=classes)
    kwargs = {}
    if with_reference:
        ref_emb, ref_labels = batch(10, 16, classes, seed=99)
        kwargs = {"ref_emb": ref_emb, "ref_labels": ref_labels}
    expected = value_and_grad(ORIGINAL(temperature=temperature), embeddings, labels, **kwargs)
    with patch_pytorch_metric_learning():
        patched = pml_losses.SupConLoss(temperature=temperature)
    got = value_and_grad(patched, embeddings, labels, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6, msg="loss")
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6, msg="gradient")
