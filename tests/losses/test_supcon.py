"""SupConLoss against pytorch-metric-learning's math (``fastcontrast.reference.supcon_loss_reference``).

Labels with 1 to 10 classes, all singletons, all the same; a separate reference set; fp64 gradcheck;
fp32 / bf16 / fp16; the memory bound; the Triton path in the interpreter; bad inputs. Distributed cases are
in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import BOUND, BOUND_D, BOUND_N, KERNEL_RELATIVE, TensorSizeRecorder, assert_close

import fastcontrast as fc
from fastcontrast import SupConLoss, reference

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
TEMPERATURE = 0.1


def _embeddings(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _labels(n, kind, seed):
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "same":
        return torch.zeros(n, dtype=torch.long)
    if kind == "singletons":
        return torch.randperm(n, generator=g) * 7 - 3  # any ints, negative ones too
    return torch.randint(0, int(kind), (n,), generator=g)


def _grads(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    # PML's zero loss (sum(embeddings·0)) leaves a reference set out of the graph; ours gives it zeros.
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _compare(tensors, labels, *, ref_labels=None, backend="torch", chunk_bytes=None, atol_of_max, loss_tol):
    ref_args = () if ref_labels is None else (tensors[1], ref_labels)
    loss = fc.supcon_loss(
        tensors[0], labels, *ref_args, temperature=TEMPERATURE, backend=backend, chunk_bytes=chunk_bytes
    )
    grads = _grads(loss, tensors)
    exact = [t.detach().double().requires_grad_() for t in tensors]
    exact_ref_args = () if ref_labels is None else (exact[1], ref_labels)
    expected = reference.supcon_loss_reference(exact[0], labels, TEMPERATURE, *exact_ref_args)
    expected_grads = _grads(expected, exact)
    assert loss.dtype == (torch.float64 if tensors[0].dtype == torch.float64 else torch.float32)
    assert_close("loss", loss, expected, atol=loss_tol, rtol=loss_tol)
    for name, grad, ref, t in zip(("embeddings", "ref_emb"), grads, expected_grads, tensors):
        assert grad.dtype == t.dtype, f"d{name} dtype {grad.dtype}"
        assert_close(f"d{name}", grad, ref, atol=atol_of_max * max(ref.abs().max().item(), 1e-3))


LABEL_KINDS = ["1", "2", "3", "10", "singletons", "same"]


@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 48), (17, 48), (130, 64)], ids=["N1", "N2", "N17", "N130"])
def test_supcon_loss_matches_pytorch_metric_learning(n, d, kind):
    # 3 rows of logits per chunk: ragged chunks.
    _compare([_embeddings(n, d, torch.float32, n)], _labels(n, kind, n), chunk_bytes=3 * n * 4,
             atol_of_max=2e-5, loss_tol=2e-5)


@pytest.mark.parametrize("kind", ["3", "singletons", "same"])
@pytest.mark.parametrize("n,m", [(5, 7), (1, 2), (17, 30), (2, 1)], ids=["N5-M7", "N1-M2", "N17-M30", "N2-M1"])
def test_supcon_loss_with_reference_set_matches_pytorch_metric_learning(n, m, kind):
    tensors = [_embeddings(n, 24, torch.float32, 1), _embeddings(m, 24, torch.float32, 2)]
    _compare(tensors, _labels(n, kind, 3), ref_labels=_labels(m, kind, 4), atol_of_max=2e-5, loss_tol=2e-5)


def test_supcon_loss_same_labels_tensor_as_reference_labels_leaves_the_diagonal_out_like_pml():
    labels = _labels(9, "3", 5)
    tensors = [_embeddings(9, 16, torch.float64, 6), _embeddings(9, 16, torch.float64, 7)]
    loss = fc.supcon_loss(tensors[0], labels, tensors[1], labels, TEMPERATURE, backend="torch")
    expected = reference.supcon_loss_reference(tensors[0], labels, TEMPERATURE, tensors[1], labels)
    assert_close("loss", loss, expected, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_supcon_loss_embeddings_passed_again_as_reference_with_other_labels_keep_the_diagonal(backend):
    # ref_emb is the embeddings tensor itself but ref_labels is another tensor: PML's identity check on the
    # labels does not fire, so (i, i) counts as a positive; it must not be mistaken for "no reference set".
    embeddings, labels = _embeddings(9, 16, torch.float64, 14), _labels(9, "3", 14)
    loss = fc.supcon_loss(embeddings, labels, embeddings, labels.clone(), TEMPERATURE, backend=backend)
    expected = reference.supcon_loss_reference(embeddings, labels, TEMPERATURE, embeddings, labels.clone())
    without_diagonal = reference.supcon_loss_reference(embeddings, labels, TEMPERATURE)
    assert (expected - without_diagonal).abs() > 1e-3, "the case must tell the two rules apart"
    assert_close("loss", loss, expected, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,rtol",
    [pytest.param(torch.bfloat16, 2**-7, id="bf16"), pytest.param(torch.float16, 2**-10, id="fp16")],
)
def test_supcon_loss_half_precision_keeps_an_fp32_loss(dtype, rtol):
    # The reference runs in fp64 on the same rounded inputs. Like PML, the unit vectors are rounded to the
    # input dtype before the GEMM (so that half inputs reach the tensor cores), which moves each logit by
    # about u/τ: the loss bound is u/(4τ) (tests/losses/test_dtypes.py), gradients one rounding.
    unit_roundoff = rtol / 2
    _compare([_embeddings(64, 32, dtype, 8)], _labels(64, "10", 8), atol_of_max=rtol,
             loss_tol=unit_roundoff / (4 * TEMPERATURE))


def test_supcon_loss_gradcheck_fp64():
    embeddings = _embeddings(9, 5, torch.float64, 9)
    ref_emb = _embeddings(6, 5, torch.float64, 10)
    labels, ref_labels = _labels(9, "3", 9), _labels(6, "3", 10)
    assert torch.autograd.gradcheck(
        lambda e: fc.supcon_loss(e, labels, temperature=0.5, backend="torch", chunk_bytes=2 * 9 * 8),
        (embeddings,), eps=1e-6, atol=1e-8,
    )
    assert torch.autograd.gradcheck(
        lambda e, r: fc.supcon_loss(e, labels, r, ref_labels, 0.5, backend="torch"),
        (embeddings, ref_emb), eps=1e-6, atol=1e-8,
    )


def test_supcon_loss_module_matches_functional_and_reference_backend():
    embeddings, labels = _embeddings(20, 8, torch.float64, 11), _labels(20, "4", 11)
    module = SupConLoss(temperature=0.2, backend="torch")(embeddings, labels)
    assert_close("module", module, fc.supcon_loss(embeddings, labels, temperature=0.2, backend="torch"), atol=0.0)
    naive = SupConLoss(temperature=0.2, backend="reference")(embeddings, labels)
    assert_close("reference backend", naive, reference.supcon_loss_reference(embeddings, labels, 0.2), atol=0.0)
    assert_close("engine vs reference", module, naive, atol=1e-12)


def test_supcon_loss_creates_no_n_squared_tensor(monkeypatch):
    monkeypatch.delenv("FASTCONTRAST_BACKEND", raising=False)
    embeddings, labels = _embeddings(BOUND_N, BOUND_D, torch.float32, 12), _labels(BOUND_N, "10", 12)
    with TensorSizeRecorder() as forward:
        loss = SupConLoss()(embeddings, labels)
    with TensorSizeRecorder() as backward:
        loss.backward()
    for phase, recorder in (("forward", forward), ("backward", backward)):
        numel, op = recorder.largest()
        assert numel < BOUND, f"{phase}: {op} created a tensor of {numel} elements (bound N²/4 = {BOUND})"


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")
@pytest.mark.parametrize("dtype,tol", list(KERNEL_RELATIVE.items()), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d", [(17, 48), (130, 300)], ids=["N17-D48", "N130-D300"])
def test_supcon_loss_triton_matches_reference(n, d, dtype, tol):
    # Half inputs: the unit vectors are rounded to the input dtype (see the half-precision test above).
    loss_tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps / 2 / (4 * TEMPERATURE)
    _compare([_embeddings(n, d, dtype, 13)], _labels(n, "10", 13), backend="triton", atol_of_max=tol,
             loss_tol=loss_tol)


def test_supcon_loss_bad_inputs_are_clear_errors():
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"`labels` must have shape \[4\]"):
        fc.supcon_loss(embeddings, labels[:3])
    with pytest.raises(TypeError, match="`labels` must hold integer class labels"):
        fc.supcon_loss(embeddings, labels.float())
    with pytest.raises(TypeError, match="`labels` must be a 1-D integer torch.Tensor"):
        fc.supcon_loss(embeddings, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="`ref_emb` and `ref_labels` must be given together"):
        fc.supcon_loss(embeddings, labels, torch.randn(2, 3))
    with pytest.raises(ValueError, match="same feature dim"):
        fc.supcon_loss(embeddings, labels, torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`temperature` must be a finite positive number"):
        SupConLoss(temperature=0.0)
    with pytest.raises(ValueError, match="`indices_tuple`"):
        SupConLoss()(embeddings, labels, indices_tuple=(labels, labels, labels))
    with pytest.raises(ValueError, match="`labels` is required"):
        SupConLoss()(embeddings)
    with pytest.raises(ValueError, match="only used with gather_distributed=True"):
        SupConLoss(process_group=object())
