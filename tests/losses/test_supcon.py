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


def _mined(n, m, pairs, seed, *, triplets=False):
    """Random mined index tuples over n anchors and m references: pairs (a1, p, a2, n), or triplets."""
    g = torch.Generator().manual_seed(seed + 200)
    if triplets:  # positives from the first half of the references, negatives from the second: never both
        a = torch.randint(0, n, (pairs,), generator=g)
        return a, torch.randint(0, m // 2, (pairs,), generator=g), torch.randint(m // 2, m, (pairs,), generator=g)
    keys = torch.randperm(n * m, generator=g)[: 2 * pairs]  # distinct pairs, none both positive and negative
    pos, neg = keys[:pairs], keys[pairs:]
    return pos // m, pos % m, neg // m, neg % m


def _mined_reference(embeddings, labels, indices_tuple, ref_emb=None):
    return reference.supcon_loss_reference(embeddings, labels, TEMPERATURE, ref_emb, None if ref_emb is None
                                           else torch.zeros(ref_emb.shape[0], dtype=torch.long),
                                           indices_tuple=indices_tuple)


@pytest.mark.parametrize("n,m,pairs", [(9, 9, 20), (40, 40, 300), (1, 1, 1), (30, 45, 100)],
                         ids=["N9", "N40", "N1", "N30-M45"])
@pytest.mark.parametrize("triplets", [False, True], ids=["pairs", "triplets"])
def test_supcon_mined_pairs_match_pmls_masked_softmax(n, m, pairs, triplets):
    embeddings = _embeddings(n, 48, torch.float64, n)
    ref_emb = None if m == n else _embeddings(m, 48, torch.float64, m)
    if triplets and m < 2:
        pytest.skip("a triplet needs two distinct references")
    indices_tuple = _mined(n, m, pairs, n, triplets=triplets)
    tensors = [embeddings] + ([] if ref_emb is None else [ref_emb])
    ref_labels = None if ref_emb is None else torch.zeros(m, dtype=torch.long)
    loss = fc.supcon_loss(embeddings, None, ref_emb, ref_labels, TEMPERATURE, indices_tuple=indices_tuple,
                          backend="torch")
    expected = _mined_reference(embeddings, None, indices_tuple, ref_emb)
    assert_close("loss", loss, expected, atol=1e-12)
    for grad, ref in zip(_grads(loss, tensors), _grads(expected, tensors)):
        assert_close("grad", grad, ref, atol=1e-12)


def test_supcon_mined_pairs_gradcheck_fp64():
    embeddings, ref_emb = _embeddings(8, 5, torch.float64, 21), _embeddings(6, 5, torch.float64, 22)
    indices_tuple = _mined(8, 6, 10, 21)
    ref_labels = torch.zeros(6, dtype=torch.long)
    assert torch.autograd.gradcheck(
        lambda e, r: fc.supcon_loss(e, None, r, ref_labels, 0.5, indices_tuple=indices_tuple, backend="torch"),
        (embeddings, ref_emb), eps=1e-6, atol=1e-8,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_supcon_mined_pairs_in_low_precision_keep_an_fp32_loss(dtype):
    embeddings = _embeddings(50, 32, dtype, 23)
    indices_tuple = _mined(50, 50, 400, 23)
    loss = fc.supcon_loss(embeddings, None, indices_tuple=indices_tuple, backend="torch")
    exact = embeddings.detach().double().requires_grad_()
    expected = _mined_reference(exact, None, indices_tuple)
    assert loss.dtype == torch.float32
    # Normalised in fp32 and rounded once to the input dtype, then fp32 dot products: u/(4τ) on the loss.
    unit_roundoff = torch.finfo(dtype).eps / 2
    assert_close("loss", loss, expected, atol=max(unit_roundoff / (4 * TEMPERATURE), 1e-6), rtol=0)
    (grad,), (ref,) = _grads(loss, [embeddings]), _grads(expected, [exact])
    assert grad.dtype == dtype
    assert_close("grad", grad, ref, atol=KERNEL_RELATIVE[dtype] * ref.abs().max().item())


def test_supcon_mined_pairs_use_only_the_mined_entries():
    # Changing an embedding that no mined pair touches leaves the loss unchanged; the all-pairs loss moves.
    embeddings, labels = _embeddings(12, 8, torch.float64, 24).detach(), _labels(12, "3", 24)
    indices_tuple = (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2]),
                     torch.tensor([6, 7, 8]))
    moved = embeddings.clone()
    moved[11] = torch.randn(8, dtype=torch.float64)
    for backend in ("torch", "reference"):
        mined = [fc.supcon_loss(e, labels, indices_tuple=indices_tuple, backend=backend) for e in (embeddings, moved)]
        assert mined[0] == mined[1], backend
    everything = [fc.supcon_loss(e, labels, backend="torch") for e in (embeddings, moved)]
    assert everything[0] != everything[1]


def test_supcon_mined_pairs_create_no_n_squared_tensor(monkeypatch):
    monkeypatch.delenv("FASTCONTRAST_BACKEND", raising=False)
    embeddings = _embeddings(BOUND_N, BOUND_D, torch.float32, 25)
    indices_tuple = _mined(BOUND_N, BOUND_N, 4 * BOUND_N, 25)
    with TensorSizeRecorder() as forward:
        loss = SupConLoss()(embeddings, None, indices_tuple)
    with TensorSizeRecorder() as backward:
        loss.backward()
    for phase, recorder in (("forward", forward), ("backward", backward)):
        numel, op = recorder.largest()
        assert numel < BOUND, f"{phase}: {op} created a tensor of {numel} elements (bound N²/4 = {BOUND})"


def test_supcon_pair_dots_chunks_give_the_unchunked_values_and_gradients():
    from fastcontrast.autograd import pair_dots

    x, y = _embeddings(7, 5, torch.float64, 26), _embeddings(4, 5, torch.float64, 27)
    rows, cols = torch.randint(0, 7, (30,)), torch.randint(0, 4, (30,))
    whole = pair_dots(x, y, rows, cols)
    chunked = pair_dots(x, y, rows, cols, chunk_elements=3 * 5)  # 3 pairs a chunk, a ragged last one
    assert torch.equal(whole, (x[rows] * y[cols]).sum(dim=1))
    assert torch.equal(chunked, whole)
    assert torch.autograd.gradcheck(lambda a, b: pair_dots(a, b, rows, cols, chunk_elements=15), (x, y))


@pytest.mark.parametrize("indices_tuple,error,match", [
    ((torch.tensor([0]), torch.tensor([1])), ValueError, "pairs .* or triplets"),
    ("abc", ValueError, "pairs .* or triplets"),
    ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), TypeError, "entry `a` must be a 1-D integer"),
    ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), ValueError,
     "`a1` and `p` must have the same length"),
    ((torch.tensor([0]), torch.tensor([9]), torch.tensor([2])), ValueError, "out of range"),
    ((torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])), ValueError, "out of range"),
    ((torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([1, 0])), ValueError,
     "either positive or negative"),
], ids=["two-entries", "string", "float", "lengths", "too-large", "negative", "overlap"])
def test_supcon_bad_indices_tuple_is_a_clear_error(indices_tuple, error, match):
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(error, match=match):
        SupConLoss()(embeddings, labels, indices_tuple)



def test_supcon_duplicated_mined_pairs_count_once_with_bit_equal_values_and_gradients():
    # PML writes the pairs into masks, so a pair mined twice counts once. The blockwise path masks repeats
    # (no torch.unique, whose data-dependent size would sync the host), adding the same terms in the same
    # order as the deduplicated pairs: equal to the last bit.
    embeddings = _embeddings(20, 16, torch.float32, 28)
    a1, p, a2, n = _mined(20, 20, 60, 28)
    repeated = (torch.cat([a1, a1[:7], a1[:2]]), torch.cat([p, p[:7], p[:2]]), torch.cat([a2[5:9], a2]),
                torch.cat([n[5:9], n]))
    losses = [fc.supcon_loss(embeddings, None, indices_tuple=t, backend="torch") for t in ((a1, p, a2, n), repeated)]
    grads = [_grads(loss, [embeddings])[0] for loss in losses]
    assert torch.equal(losses[0], losses[1]), f"loss: {losses[0].item()!r} deduplicated vs {losses[1].item()!r}"
    assert torch.equal(grads[0], grads[1]), f"grad: max abs difference {(grads[0] - grads[1]).abs().max():.3e}"
    expected = _mined_reference(embeddings.detach().double(), None, repeated)
    assert_close("loss", losses[1], expected, atol=1e-6)


@pytest.mark.parametrize("indices_tuple,match", [
    ((torch.tensor([0]), torch.tensor([9]), torch.tensor([2])), "out of range"),
    ((torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])), "out of range"),
    ((torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([1, 0])),
     "either positive or negative"),
], ids=["too-large", "negative", "overlap"])
def test_supcon_bad_indices_tuple_on_an_accelerator_fails_a_device_side_assert(indices_tuple, match, monkeypatch):
    # On a GPU the checks must not read the indices back (a host sync every step): they become asynchronous
    # device-side asserts. The CPU runs the same branch when values_readable says False; there the assert
    # raises RuntimeError with its message at once.
    from fastcontrast import _validation
    from fastcontrast.losses import supcon

    for module in (_validation, supcon):
        monkeypatch.setattr(module, "values_readable", lambda tensor: False)
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match=match):
        SupConLoss()(embeddings, labels, indices_tuple)
