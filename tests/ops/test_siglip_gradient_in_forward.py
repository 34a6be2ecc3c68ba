"""SigLIP's gradient formed in the forward sweep (docs/kernels.md#kernels): what runs when, and that the
gradients are the reference's for every subset of inputs that takes one, a second backward, and any upstream
gradient. Values and gradients over dtypes and shapes are in tests/losses/test_siglip.py and
tests/kernels/test_triton_interpreter.py; the pass count in tests/kernels/test_kernel_work.py."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastcontrast as fc
from fastcontrast import reference
from fastcontrast.blockwise import TorchEngine


@pytest.fixture
def engine_calls(monkeypatch):
    """The names of the torch engine's SigLIP methods, in the order they run."""
    calls = []
    for name in ("siglip_forward", "siglip_forward_backward"):
        original = getattr(TorchEngine, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TorchEngine, name, recording)
    return calls


def _inputs(requires=(True, True, True, True), n=37, d=48, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    image = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    text = torch.randn(n, d, generator=g, dtype=dtype) / d**0.5
    scale = torch.tensor(10.0, dtype=dtype)
    bias = torch.tensor(-5.0, dtype=dtype)
    return [x.requires_grad_(r) for x, r in zip((image, text, scale, bias), requires)]


def _reference_grads(inputs, upstream=1.0):
    copies = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    loss = reference.siglip_loss_reference(*copies)
    wanted = [x for x in copies if x.requires_grad]
    if not wanted:
        return loss, {}
    return loss, dict(zip([i for i, x in enumerate(copies) if x.requires_grad],
                          torch.autograd.grad(loss * upstream, wanted)))


def test_forward_under_grad_is_one_engine_sweep_and_backward_calls_no_engine(engine_calls):
    image, text, scale, bias = _inputs()
    loss = fc.siglip_loss(image, text, scale, bias, backend="torch")
    assert engine_calls == ["siglip_forward_backward"]
    loss.backward()
    assert engine_calls == ["siglip_forward_backward"], "the backward only multiplies by its upstream gradient"


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_forward_without_a_gradient_is_the_plain_sum(engine_calls, context):
    requires = (False,) * 4 if context == "nothing_requires_grad" else (True,) * 4
    image, text, scale, bias = _inputs(requires)
    manager = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with manager():
        loss = fc.siglip_loss(image, text, scale, bias, backend="torch")
    assert engine_calls == ["siglip_forward"]
    expected, _ = _reference_grads(_inputs((False,) * 4))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("requires", [r for r in itertools.product((False, True), repeat=4) if any(r)],
                         ids=lambda r: "".join("IT sb"[i] if x else "-" for i, x in enumerate(r)))
def test_every_subset_of_inputs_gets_the_reference_gradient(requires):
    inputs = _inputs(requires)
    loss = fc.siglip_loss(*inputs, backend="torch")
    expected_loss, expected = _reference_grads(inputs, upstream=0.37)
    wanted = [x for x in inputs if x.requires_grad]
    got = dict(zip(expected, torch.autograd.grad(loss * 0.37, wanted)))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for index, value in expected.items():
        torch.testing.assert_close(got[index], value, rtol=1e-10, atol=1e-12, msg=f"input {index}")


@pytest.mark.interpreter
@pytest.mark.parametrize("requires", [(True, True, True, True), (False, True, False, False),
                                      (True, False, True, False), (False, False, False, True)],
                         ids=["all", "text", "image-scale", "bias"])
def test_the_triton_engine_keeps_the_same_gradients_from_its_forward(requires):
    # d = 48 takes the fused kernels, d = 100 the panel path (interpreter widths); fp32 against fp64.
    for d in (48, 100):
        inputs = _inputs(requires, d=d, dtype=torch.float32)
        loss = fc.siglip_loss(*inputs, backend="triton")
        expected_loss, expected = _reference_grads([x.double() if not x.requires_grad else
                                                    x.detach().double().requires_grad_() for x in inputs], 0.37)
        wanted = [x for x in inputs if x.requires_grad]
        got = dict(zip(expected, torch.autograd.grad(loss * 0.37, wanted)))
        torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
        for index, value in expected.items():
            torch.testing.assert_close(got[index].double(), value, rtol=1e-4, atol=1e-6, msg=f"d={d} input {index}")


def test_a_second_backward_with_retain_graph_gives_the_same_gradients():
    image, text, scale, bias = _inputs()
    loss = fc.siglip_loss(image, text, scale, bias, backend="torch")
    first = torch.autograd.grad(loss * 2.0, [image, text, scale, bias], retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, [image, text, scale, bias])
    for a, b in zip(first, second):
        assert torch.equal(a, b), "the kept products were changed in place by the first backward"


def test_a_forward_whose_backward_never_runs_still_returns_the_reference_loss():
    image, text, scale, bias = _inputs()
    loss = fc.siglip_loss(image, text, scale, bias, backend="torch")
    expected, _ = _reference_grads(_inputs((False,) * 4))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)


def test_gradcheck_through_the_gradient_kept_from_the_forward():
    image, text, scale, bias = _inputs(n=6, d=5)
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: fc.siglip_loss(i, t, s, b, backend="torch", chunk_bytes=64), (image, text, scale, bias)
    )
