"""Retrieval top-1 from the loss's own forward pass: ``ClipLoss(return_accuracy=True)`` and the core's argmax.

The argmax of every row and column must equal ``torch.argmax`` of the materialised reference logits
(the first, i.e. lowest, index on ties), in both engines, across chunk / tile / column-split / row-block
boundaries, and the default output must stay open_clip's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close

import fastcontrast as fc
from fastcontrast import reference
from fastcontrast.blockwise import TorchEngine

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
ENGINES = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not INTERPRETER, reason="needs the interpreter")),
]


def _engine(name):
    if name == "torch":
        return TorchEngine(chunk_bytes=7 * 4 * 130)  # 7-row chunks: ties across chunk boundaries
    from fastcontrast.kernels.engine import TritonEngine

    return TritonEngine()


def _features_with_ties(n, d, seed, *, duplicates=()):
    """Quantised unit-ish rows (exact dot products) with some rows duplicated: exact ties in the logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (n, d), generator=g).float() / 8
    for src, dst in duplicates:
        x[dst] = x[src]
    return x


def _expected_argmax(a, b, exclude_offset=None):
    logits = a.double() @ b.double().T
    if exclude_offset is not None:
        logits = logits.diagonal_scatter(torch.full_like(logits.diagonal(exclude_offset), float("-inf")),
                                         exclude_offset)
    return logits.argmax(dim=1), logits.argmax(dim=0)


@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize(
    "n,m", [(17, 17), (70, 70), (17, 130), (130, 17)], ids=["N17", "N70", "N17-M130", "N130-M17"]
)
def test_argmax_equals_materialised_argmax_with_ties(engine_name, n, m):
    # Duplicated rows and columns far apart (other tiles, chunks, splits), and a duplicate next to its source.
    a = _features_with_ties(n, 24, 1, duplicates=[(0, n - 1), (2, 3)] if n > 3 else [])
    b = _features_with_ties(m, 24, 2, duplicates=[(1, m - 1), (4, 5), (1, m // 2)] if m > 5 else [])
    engine = _engine(engine_name)
    scale = torch.tensor(3.0)
    positives = torch.arange(n) % m
    _, _, _, argmax_row, argmax_col = fc.blockwise_lse_and_positives(
        a, b, scale, engine, positives, rows=True, cols=True, return_argmax=True
    )
    expected_row, expected_col = _expected_argmax(a, b)
    assert torch.equal(argmax_row, expected_row), (argmax_row, expected_row)
    assert torch.equal(argmax_col, expected_col), (argmax_col, expected_col)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_argmax_leaves_the_excluded_diagonal_out(engine_name):
    z = _features_with_ties(40, 16, 3, duplicates=[(0, 39)])
    _, _, _, argmax_row, _ = fc.blockwise_lse_and_positives(
        z, None, torch.tensor(2.0), _engine(engine_name), torch.arange(40).flip(0), exclude_offset=0,
        return_argmax=True,
    )
    assert torch.equal(argmax_row, _expected_argmax(z, z, exclude_offset=0)[0])


@pytest.mark.skipif(not INTERPRETER, reason="needs the interpreter")
def test_triton_column_argmax_from_a_second_pass_matches(monkeypatch):
    from fastcontrast.kernels import engine

    monkeypatch.setattr(engine, "SINGLE_PASS_SCRATCH_BYTES", 0)
    a = _features_with_ties(70, 24, 4, duplicates=[(3, 60)])
    b = _features_with_ties(70, 24, 5, duplicates=[(7, 65)])
    _, _, _, argmax_row, argmax_col = fc.blockwise_lse_and_positives(
        a, b, torch.tensor(3.0), engine.TritonEngine(), torch.arange(70), rows=True, cols=True, return_argmax=True
    )
    expected_row, expected_col = _expected_argmax(a, b)
    assert torch.equal(argmax_row, expected_row) and torch.equal(argmax_col, expected_col)


@pytest.mark.parametrize("backend", ["torch", "reference", pytest.param("triton", marks=ENGINES[1].marks)])
def test_clip_loss_accuracy_matches_reference_logits_and_leaves_the_loss_unchanged(backend):
    g = torch.Generator().manual_seed(6)
    image = F.normalize(torch.randn(50, 32, generator=g), dim=1).requires_grad_()
    text = F.normalize(image.detach() + 0.8 * torch.randn(50, 32, generator=g), dim=1).requires_grad_()
    scale, bias = torch.tensor(14.3, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    plain = fc.ClipLoss(backend=backend)(image, text, scale, bias, output_dict=True)
    with_accuracy = fc.ClipLoss(backend=backend, return_accuracy=True)(image, text, scale, bias, output_dict=True)
    assert set(plain) == {"contrastive_loss"}
    assert set(with_accuracy) == {"contrastive_loss", "i2t_top1", "t2i_top1"}
    assert torch.equal(plain["contrastive_loss"], with_accuracy["contrastive_loss"])
    logits_per_image, logits_per_text = reference.clip_logits_reference(image, text, scale, bias)
    target = torch.arange(50)
    expected_i2t = (logits_per_image.argmax(dim=1) == target).float().mean()
    expected_t2i = (logits_per_text.argmax(dim=1) == target).float().mean()
    assert 0 < expected_i2t < 1 and 0 < expected_t2i < 1, "the test needs a non-trivial accuracy"
    for name, expected in (("i2t_top1", expected_i2t), ("t2i_top1", expected_t2i)):
        value = with_accuracy[name]
        assert value.dtype == torch.float32 and not value.requires_grad, name
        assert_close(name, value, expected, atol=0.0)
    # Gradients are those of the plain loss.
    grads = torch.autograd.grad(with_accuracy["contrastive_loss"], (image, text, scale))
    ref_grads = torch.autograd.grad(plain["contrastive_loss"], (image, text, scale))
    for name, grad, ref in zip(("image", "text", "scale"), grads, ref_grads):
        assert_close(f"d{name}", grad, ref, atol=0.0)


def test_clip_loss_accuracy_without_output_dict_is_a_tuple_and_other_losses_reject_it():
    image, text = F.normalize(torch.randn(9, 8), dim=1), F.normalize(torch.randn(9, 8), dim=1)
    loss, i2t, t2i = fc.ClipLoss(backend="torch", return_accuracy=True)(image, text, 10.0)
    assert_close("loss", loss, fc.ClipLoss(backend="torch")(image, text, 10.0), atol=0.0)
    assert i2t.shape == () and t2i.shape == ()
    with pytest.raises(ValueError, match="`return_accuracy` is a ClipLoss option"):
        fc.DistillClipLoss(return_accuracy=True)
    with pytest.raises(TypeError, match="`return_accuracy` must be a bool"):
        fc.ClipLoss(return_accuracy=1)
