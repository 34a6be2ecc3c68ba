"""lightly 1.6's ``NTXentLoss`` (with its memory bank), ``DCLLoss`` and ``DCLWLoss`` against lightly's math
(``fastcontrast.reference``) on the blockwise torch engine, and the lightly rules the modules keep: defaults, the
memory bank's start, order of read and enqueue, wrap-around, and fp16-safe normalisation (from lightly's sources:
``lightly/loss/ntx_ent_loss.py``, ``dcl_loss.py``, ``lightly/models/modules/memory_bank.py``).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DCL_VARIANTS,
    TOLERANCES,
    assert_close,
    assert_loss_close,
    dcl_variant_loss,
    dcl_variant_reference,
    lightly_mises_fisher_weights,
)
from _reference_cases import (
    CASES,
    DTYPES,
    case_seed,
    check_grads,
    chunk_bytes_for,
    leaves,
    nt_xent_loss,
    nt_xent_reference,
)

import fastcontrast
from fastcontrast import DCLLoss, DCLWLoss, NTXentLoss, reference
from fastcontrast.functional import normalize_rows

NT_XENT_KINDS = ("nt_xent_loss", "NTXentLoss", "nt_xent_memory_bank_loss")

# NT-Xent has no bias; its scale is 1/τ, so τ = 1, 0.07 and 0.01. Every shape and chunking of the table
# also runs through NT-Xent. The DCL variants differ from each other only in the O(n) weights of the
# positives, so every variant runs the cases up to N = 64 (every dim, chunking and τ, N = 1, 2, 7, 64) and
# the plain DCLLoss also the N = 257 ones; N = 1000 adds nothing more for DCL and costs seconds a case.
# DCL at N = 1 has no negatives: its loss is −inf, as in lightly.
LIGHTLY_CASES = [
    pytest.param(kind, case, id=f"{kind}-{case.nt_xent_id}")
    for kind in NT_XENT_KINDS + DCL_VARIANTS
    for case in CASES
    if kind in NT_XENT_KINDS or case.n <= 64 or (kind == "DCLLoss" and case.n == 257)
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("kind, case", LIGHTLY_CASES)
def test_nt_xent_and_dcl_losses_match_reference_value_and_gradients(kind, case, dtype, atol, rtol):
    g = torch.Generator().manual_seed(case_seed(case, kind))
    # lightly normalises inside the loss, so raw projections with uneven norms go in.
    out0 = (torch.randn(case.n, case.d, dtype=torch.float64, generator=g) * 3).to(dtype)
    out1 = (torch.randn(case.n, case.d, dtype=torch.float64, generator=g) * 0.2).to(dtype)
    temperature = 1.0 / case.scale
    bank_size = case.n + 5
    bank = F.normalize(torch.randn(bank_size, case.d, generator=g), dim=1)  # lightly's bank is fp32
    if kind == "nt_xent_memory_bank_loss":
        chunk_bytes = chunk_bytes_for(case.chunking, case.n, bank_size, dtype)
    else:
        chunk_bytes = chunk_bytes_for(case.chunking, 2 * case.n, 2 * case.n, dtype)

    inputs = leaves(out0, out1)
    loss = nt_xent_loss(kind, *inputs, temperature, bank, chunk_bytes)
    grads = torch.autograd.grad(loss, inputs)

    ref_inputs = leaves(out0, out1)
    ref_loss = nt_xent_reference(kind, *ref_inputs, temperature, bank)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)

    assert loss.dim() == 0 and loss.dtype == dtype
    assert_loss_close("loss", loss, ref_loss, atol, rtol)
    check_grads(["d_out0", "d_out1"], grads, ref_grads, atol, rtol)


@pytest.mark.parametrize("kind", NT_XENT_KINDS + DCL_VARIANTS)
def test_nt_xent_and_dcl_losses_match_reference_for_negative_temperature(kind):
    # lightly's NT-Xent only rejects |τ| < 1e-8 (its DCL nothing), so a negative temperature is a legal input.
    g = torch.Generator().manual_seed(3)
    out0, out1 = (torch.randn(9, 5, dtype=torch.float64, generator=g) for _ in range(2))
    bank = F.normalize(torch.randn(11, 5, generator=g), dim=1)
    inputs, ref_inputs = leaves(out0, out1), leaves(out0, out1)
    loss = nt_xent_loss(kind, *inputs, -0.3, bank, 1)
    ref_loss = nt_xent_reference(kind, *ref_inputs, -0.3, bank)
    atol, rtol = TOLERANCES[torch.float64]
    assert_close("loss", loss, ref_loss, atol, rtol)
    check_grads(
        ["d_out0", "d_out1"],
        torch.autograd.grad(loss, inputs),
        torch.autograd.grad(ref_loss, ref_inputs),
        atol,
        rtol,
    )


# lightly calls weight_fn(out0, out1) on the normalised views, then weight_fn(out1, out0), and multiplies
# its [n] positives by whatever comes back: one weight per sample or a scalar both broadcast.
DCL_WEIGHT_FNS = {
    "first-view-only": lambda a, b: 1.0 + 3.0 * a[:, 0] - b[:, 1] ** 2,  # asymmetric: catches swapped views
    "unnormalised-would-differ": lambda a, b: a.norm(dim=1) + (a * b).sum(1),
    "python-float": lambda a, b: 0.7,
    "0-dim-tensor": lambda a, b: (a * b).sum() / a.shape[0],
    "1-element-tensor": lambda a, b: torch.full((1,), 1.5, dtype=a.dtype),
}


@pytest.mark.parametrize("n", [1, 9], ids=["N1", "N9"])
@pytest.mark.parametrize("name", DCL_WEIGHT_FNS)
def test_dcl_weight_fn_gets_normalised_views_in_lightlys_order_and_may_return_a_scalar(name, n):
    weight_fn = DCL_WEIGHT_FNS[name]
    g = torch.Generator().manual_seed(11)
    out0 = torch.randn(n, 6, dtype=torch.float64, generator=g) * 4
    out1 = torch.randn(n, 6, dtype=torch.float64, generator=g)
    inputs, ref_inputs = leaves(out0, out1), leaves(out0, out1)
    loss = fastcontrast.dcl_loss(*inputs, 0.2, weight_fn, backend="torch", chunk_bytes=2 * 2 * n * 8)
    ref_loss = reference.dcl_loss_reference(*ref_inputs, 0.2, weight_fn)
    atol, rtol = TOLERANCES[torch.float64]
    assert_loss_close("loss", loss, ref_loss, atol, rtol)
    check_grads(
        ["d_out0", "d_out1"],
        torch.autograd.grad(loss, inputs),
        torch.autograd.grad(ref_loss, ref_inputs),
        atol,
        rtol,
    )


def unit(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


def test_nt_xent_module_matches_reference():
    out0 = torch.randn(11, 6, generator=torch.Generator().manual_seed(9)) * 4
    out1 = torch.randn(11, 6, generator=torch.Generator().manual_seed(10))
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(
        "loss", NTXentLoss(0.2)(out0, out1), reference.nt_xent_loss_reference(out0, out1, 0.2), atol, rtol
    )


@pytest.mark.parametrize("variant", DCL_VARIANTS)
def test_dcl_module_matches_reference_with_default_options(variant):
    out0 = torch.randn(11, 6, generator=torch.Generator().manual_seed(9)) * 4
    out1 = torch.randn(11, 6, generator=torch.Generator().manual_seed(10))
    atol, rtol = TOLERANCES[torch.float32]
    expected = dcl_variant_reference(variant, out0, out1, 0.2)
    assert_close("loss", dcl_variant_loss(variant, out0, out1, 0.2), expected, atol, rtol)


def test_dcl_modules_defaults_are_lightlys():
    # τ = 0.1 for both, DCLW's σ = 0.5: the weights of the default module are lightly's default weights.
    out0, out1 = unit(9, 5, seed=15) * 3, unit(9, 5, seed=16)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("DCLLoss()", DCLLoss()(out0, out1), reference.dcl_loss_reference(out0, out1, 0.1), atol, rtol)
    weights = functools.partial(lightly_mises_fisher_weights, sigma=0.5)
    expected = reference.dcl_loss_reference(out0, out1, 0.1, weights)
    assert_close("DCLWLoss()", DCLWLoss()(out0, out1), expected, atol, rtol)


@pytest.mark.parametrize("name", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_gather_distributed_in_a_single_process_matches_plain_loss(name):
    # lightly accepts gather_distributed=True without an initialised process group: it gathers nothing.
    assert not torch.distributed.is_initialized()
    out0, out1 = unit(7, 5, seed=11), unit(7, 5, seed=12)
    cls = getattr(fastcontrast, name)
    assert torch.equal(cls(gather_distributed=True)(out0, out1), cls()(out0, out1))




class LightlyBank:
    """lightly 1.6's MemoryBankModule rules, restated: read a copy, then enqueue if asked, wrapping at K."""

    def __init__(self, bank: torch.Tensor):
        self.bank = bank.clone()
        self.ptr = 0

    def read_then_enqueue(self, keys: torch.Tensor, update: bool) -> torch.Tensor:
        current = self.bank.clone()
        if update:
            size = self.bank.shape[0]
            if self.ptr + keys.shape[0] >= size:
                self.bank[self.ptr :] = keys[: size - self.ptr]
                self.ptr = 0
            else:
                self.bank[self.ptr : self.ptr + keys.shape[0]] = keys
                self.ptr += keys.shape[0]
        return current


def lightly_initial_bank(seed: int, k: int, d: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return F.normalize(torch.randn(k, d), dim=-1)


def test_memory_bank_with_k_d_size_starts_as_lightlys_seeded_random_unit_vectors():
    torch.manual_seed(123)
    loss_fn = NTXentLoss(memory_bank_size=(32, 6))
    expected = lightly_initial_bank(123, 32, 6)
    assert loss_fn.memory_bank.bank.dtype == torch.float32
    assert torch.equal(loss_fn.memory_bank.bank, expected)
    assert int(loss_fn.memory_bank.bank_ptr) == 0


@pytest.mark.parametrize("size", [20, 1])
def test_a_bare_int_memory_bank_size_is_a_value_error_as_in_lightly_1_6(size):
    # lightly 1.6 requires the feature dim ((K, D)); 1.4 guessed it at the first batch and warned.
    with pytest.raises(ValueError, match="feature dimension"):
        NTXentLoss(memory_bank_size=size)


@pytest.mark.parametrize("size", [-1, (4, -2), (4, 2, 1), (4,), True])
def test_a_malformed_memory_bank_size_is_a_value_error(size):
    with pytest.raises(ValueError, match="memory bank size|memory_bank_size"):
        NTXentLoss(memory_bank_size=size)


@pytest.mark.parametrize("size", ["8", (4.0, 2), None])
def test_a_memory_bank_size_of_the_wrong_type_is_a_type_error(size):
    with pytest.raises(TypeError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=size)


@pytest.mark.parametrize("size", [0, (0, 8)])
def test_a_zero_memory_bank_size_disables_the_bank(size):
    loss_fn = NTXentLoss(memory_bank_size=size, backend="torch")
    assert not loss_fn.memory_bank.enabled
    out0, out1 = unit(4, 6, seed=13), unit(4, 6, seed=14)
    assert torch.equal(loss_fn(out0, out1), fastcontrast.nt_xent_loss(out0, out1, backend="torch"))


@pytest.mark.parametrize("cls", ["NTXentLoss", "DCLLoss", "DCLWLoss"])
def test_gather_distributed_checks_that_torch_distributed_is_available_once(cls, monkeypatch):
    # lightly 1.6's tests: exactly one torch.distributed.is_available() call, ValueError when it is False.
    calls = []
    monkeypatch.setattr(torch.distributed, "is_available", lambda: calls.append(1) or True)
    getattr(fastcontrast, cls)(gather_distributed=True)
    assert len(calls) == 1
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        getattr(fastcontrast, cls)(gather_distributed=True)
    getattr(fastcontrast, cls)(gather_distributed=False)


def test_memory_bank_is_read_before_this_batch_is_enqueued():
    torch.manual_seed(0)
    loss_fn = NTXentLoss(memory_bank_size=(8, 5), backend="torch")
    initial = loss_fn.memory_bank.bank.clone()
    out0 = unit(8, 5, seed=15).requires_grad_()
    out1 = unit(8, 5, seed=16)
    loss = loss_fn(out0, out1)
    read_first = reference.nt_xent_memory_bank_loss_reference(out0.detach(), out1, initial)
    enqueued_first = reference.nt_xent_memory_bank_loss_reference(
        out0.detach(), out1, F.normalize(out1, dim=1)
    )
    assert abs(float(read_first) - float(enqueued_first)) > 0.1, "the test cannot tell the two orders apart"
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("loss", loss, read_first, atol, rtol)
    assert torch.equal(loss_fn.memory_bank.bank, F.normalize(out1, dim=1)), (
        "batch was not enqueued after reading"
    )


@pytest.mark.parametrize(
    "out0_requires_grad, out1_requires_grad, enqueued",
    [(True, False, True), (True, True, True), (False, True, False), (False, False, False)],
    ids=["out0-grad", "both-grad", "out1-grad-only", "no-grad"],
)
def test_memory_bank_is_updated_only_when_out0_requires_grad(
    out0_requires_grad, out1_requires_grad, enqueued
):
    torch.manual_seed(1)
    loss_fn = NTXentLoss(memory_bank_size=(10, 4), backend="torch")
    before = loss_fn.memory_bank.bank.clone()
    out0 = unit(3, 4, seed=17).requires_grad_(out0_requires_grad)
    out1 = unit(3, 4, seed=18).requires_grad_(out1_requires_grad)
    loss_fn(out0, out1)
    expected = before.clone()
    if enqueued:
        expected[:3] = F.normalize(out1.detach(), dim=1)
    assert torch.equal(loss_fn.memory_bank.bank, expected)
    assert int(loss_fn.memory_bank.bank_ptr) == (3 if enqueued else 0)


@pytest.mark.parametrize(
    "bank_size, batch_sizes, expected_pointers",
    [
        pytest.param(10, [4, 4, 4, 3], [4, 8, 0, 3], id="K10-tail-filled-rest-dropped"),
        pytest.param(8, [4, 4, 2], [4, 0, 2], id="K8-exact-fit-wraps-to-0"),
        pytest.param(3, [5, 1], [0, 1], id="K3-batch-larger-than-bank"),
    ],
)
def test_memory_bank_wraps_around_like_lightly(bank_size, batch_sizes, expected_pointers):
    torch.manual_seed(2)
    loss_fn = NTXentLoss(memory_bank_size=(bank_size, 4), backend="torch")
    bank = loss_fn.memory_bank.bank.clone()
    ptr = 0
    for step, (batch, expected_ptr) in enumerate(zip(batch_sizes, expected_pointers)):
        out0 = unit(batch, 4, seed=100 + step).requires_grad_()
        out1 = unit(batch, 4, seed=200 + step) * 3
        loss_fn(out0, out1)
        keys = F.normalize(out1, dim=1)
        if ptr + batch >= bank_size:  # lightly: fill the tail, drop the rest, restart at 0
            bank[ptr:] = keys[: bank_size - ptr]
            ptr = 0
        else:
            bank[ptr : ptr + batch] = keys
            ptr += batch
        assert ptr == expected_ptr
        assert int(loss_fn.memory_bank.bank_ptr) == expected_ptr, f"step {step}: pointer"
        assert torch.equal(loss_fn.memory_bank.bank, bank), f"step {step}: bank contents"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_consecutive_memory_bank_calls_match_the_reference_driven_by_the_same_bank(dtype):
    torch.manual_seed(3)
    loss_fn = NTXentLoss(temperature=0.1, memory_bank_size=(12, 5), backend="torch", chunk_bytes=64)
    lightly = LightlyBank(lightly_initial_bank(3, 12, 5))
    atol, rtol = TOLERANCES[dtype]
    for step, batch in enumerate([4, 7, 3, 9, 2, 5]):
        g = torch.Generator().manual_seed(step)
        out0 = (torch.randn(batch, 5, generator=g) * 2).to(dtype).requires_grad_()
        out1 = torch.randn(batch, 5, generator=g).to(dtype).requires_grad_()
        ref_out0, ref_out1 = (t.detach().clone().requires_grad_() for t in (out0, out1))
        bank = lightly.read_then_enqueue(F.normalize(ref_out1.detach(), dim=1).float(), update=True)
        ref_loss = reference.nt_xent_memory_bank_loss_reference(ref_out0, ref_out1, bank, 0.1)
        loss = loss_fn(out0, out1)
        assert_close(f"loss step {step}", loss, ref_loss, atol, rtol)
        grads = torch.autograd.grad(loss, (out0, out1))
        ref_grads = torch.autograd.grad(ref_loss, (ref_out0, ref_out1))
        for name, grad, ref_grad in zip(("d_out0", "d_out1"), grads, ref_grads):
            assert_close(f"{name} step {step}", grad, ref_grad, atol, rtol)
    assert loss_fn.memory_bank.bank.dtype == torch.float32  # lightly's bank stays fp32


def tiny_fp16_rows(seed: int) -> torch.Tensor:
    """fp16 rows whose norms fp16 cannot hold accurately: zero, subnormal (~1e-6) and near-normal (~3e-5)."""
    x = unit(6, 16, seed=seed)
    x[0] = 0.0
    x[1:3] *= 1e-6
    x[3:] *= 3e-5
    return x.half()


def test_fp16_inputs_with_tiny_values_normalise_without_blowing_up():
    # lightly issue #1259: F.normalize's eps = 1e-12 is 0 in fp16, so a row whose fp16 norm is 0 gives
    # 0/0 = NaN, and subnormal norms carry only a few significant bits.
    out0, out1 = tiny_fp16_rows(seed=19), tiny_fp16_rows(seed=20)
    assert torch.isnan(F.normalize(out0, dim=1)).any(), "inputs do not reproduce lightly's fp16 trap"

    normalised = normalize_rows(out0)
    assert normalised.dtype == torch.float16
    norms = normalised.float().norm(dim=1)
    # Like fp32 lightly: a zero row stays zero, every other row becomes a unit vector (to fp16 rounding).
    assert_close("row norms", norms, torch.tensor([0.0] + [1.0] * 5), 2e-3)

    out0.requires_grad_()
    out1.requires_grad_()
    loss = NTXentLoss(temperature=0.1, backend="torch")(out0, out1)
    loss.backward()
    # The same fp16 values in fp32, where F.normalize (lightly) is exact: the answer fp16 should give.
    ref_out0, ref_out1 = (t.detach().float().requires_grad_() for t in (out0, out1))
    expected = reference.nt_xent_loss_reference(ref_out0, ref_out1, 0.1)
    expected.backward()
    # Unit vectors rounded to fp16 (u = 2^-11) move each logit by about u/τ.
    assert_close("loss", loss, expected, 10 * 2**-11)
    for name, grad, ref_grad in (("d_out0", out0.grad, ref_out0.grad), ("d_out1", out1.grad, ref_out1.grad)):
        # d(x/|x|)/dx ~ 1/|x|: for these rows the true gradient can exceed fp16's range (65504) and is
        # inf there, as in any fp16 training step (GradScaler skips it). It must never be NaN, and it must
        # be finite wherever fp16 can hold it.
        assert not torch.isnan(grad).any(), f"{name}: NaN gradient"
        representable = ref_grad.abs() < 3e4
        assert representable.any()
        assert torch.isfinite(grad[representable]).all(), f"{name}: inf where the true gradient fits fp16"


def test_fp32_normalisation_is_bit_identical_to_lightlys_f_normalize():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(64, 33, generator=g) * torch.logspace(-20, 20, 64)[:, None]
    assert torch.equal(normalize_rows(x), F.normalize(x, dim=1))
    x64 = x.double()
    assert torch.equal(normalize_rows(x64), F.normalize(x64, dim=1))

    # And what the memory bank stores in fp32 is exactly lightly's normalised keys.
    torch.manual_seed(4)
    loss_fn = NTXentLoss(memory_bank_size=(64, 33), backend="torch")
    loss_fn(x.clone().requires_grad_(), x)
    assert torch.equal(loss_fn.memory_bank.bank, F.normalize(x, dim=1))
