"""Every loss on the blockwise torch engine against the naive full-matrix losses of fastcontrast.reference.

Value and every gradient (both feature tensors, logit_scale, logit_bias) are compared, in fp64 against the
fp64 reference and in fp32 against the fp32 reference. The shapes are a covering design rather than the
full product: every batch size (1, 2, 7, 64, 257, 1000), every feature dim (3, 48, 64, 1000), every scale
(1, 14.3, 100), bias on and off and three chunkings (default, one row per chunk, chunks that do not divide
the rows) each appear, with the awkward combinations (N=1, N=257 with d=1000) included. The DCL losses
(lightly's DCLLoss, DCLWLoss and a differentiable weight_fn) run through the NT-Xent table.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

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
)

import fastcontrast
from fastcontrast import reference


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    scale: float
    bias: bool
    chunking: str  # "default" | "one_row" | "ragged"

    @property
    def id(self) -> str:
        return f"N{self.n}-D{self.d}-s{self.scale:g}-{'bias' if self.bias else 'nobias'}-{self.chunking}"

    @property
    def nt_xent_id(self) -> str:
        return f"N{self.n}-D{self.d}-tau{1 / self.scale:.3g}-{self.chunking}"


# Every batch size, dim, scale, bias setting and chunking appears; each line is one combination.
CASES = [
    Case(1, 3, 1.0, False, "one_row"),
    Case(1, 1000, 100.0, True, "default"),
    Case(2, 48, 14.3, True, "one_row"),
    Case(2, 3, 100.0, False, "default"),
    Case(7, 64, 100.0, False, "ragged"),
    Case(7, 1000, 1.0, True, "one_row"),
    Case(64, 3, 14.3, True, "ragged"),
    Case(64, 48, 1.0, False, "default"),
    Case(257, 1000, 14.3, True, "ragged"),
    Case(257, 1000, 100.0, False, "default"),
    Case(64, 64, 100.0, False, "one_row"),
    Case(1000, 64, 1.0, True, "ragged"),
    Case(1000, 48, 100.0, True, "default"),
]

DTYPES = [
    pytest.param(torch.float64, *TOLERANCES[torch.float64], id="fp64"),
    pytest.param(torch.float32, *TOLERANCES[torch.float32], id="fp32"),
]

OPEN_CLIP_KINDS = ("clip_loss", "ClipLoss", "siglip_loss", "SigLipLoss")
NT_XENT_KINDS = ("nt_xent_loss", "NTXentLoss", "nt_xent_memory_bank_loss")


def chunk_bytes_for(chunking: str, rows: int, cols: int, dtype: torch.dtype) -> Optional[int]:
    """chunk_bytes giving the requested chunking of a [rows, cols] logits matrix (fp32/fp64 logits)."""
    itemsize = 8 if dtype == torch.float64 else 4
    if chunking == "default":
        return None
    if chunking == "one_row":
        return 1  # the engine always takes at least one row per chunk
    # A chunk height that leaves a short last chunk: 3 rows for small batches, ~rows/3 + 1 otherwise.
    rows_per_chunk = 3 if rows < 16 else rows // 3 + 1
    if rows > 1:
        assert rows % rows_per_chunk != 0, "the ragged chunking must not divide the rows"
    return rows_per_chunk * cols * itemsize


def unit_rows(n: int, d: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    # open_clip's models hand the loss L2-normalised features.
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    return F.normalize(x, dim=1).to(dtype)


def case_seed(case: Case, kind: str) -> int:
    # Stable across processes (str hashes are salted per process).
    return zlib.crc32(f"{kind}-{case.id}".encode())


def leaves(*tensors: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors if t is not None]


def check_grads(names, actual_grads, expected_grads, atol, rtol) -> None:
    for name, actual, expected in zip(names, actual_grads, expected_grads):
        assert actual is not None, f"{name}: no gradient"
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
        assert_close(name, actual, expected, atol, rtol)


def open_clip_loss(kind: str, image, text, scale, bias, chunk_bytes):
    if kind == "clip_loss":
        return fastcontrast.clip_loss(image, text, scale, bias, backend="torch", chunk_bytes=chunk_bytes)
    if kind == "siglip_loss":
        return fastcontrast.siglip_loss(image, text, scale, bias, backend="torch", chunk_bytes=chunk_bytes)
    if kind == "ClipLoss":
        return fastcontrast.ClipLoss(backend="torch", chunk_bytes=chunk_bytes)(image, text, scale, bias)
    return fastcontrast.SigLipLoss(backend="torch", chunk_bytes=chunk_bytes)(image, text, scale, bias)


def open_clip_reference(kind: str, image, text, scale, bias):
    if kind in ("clip_loss", "ClipLoss"):
        return reference.clip_loss_reference(image, text, scale, bias)
    return reference.siglip_loss_reference(image, text, scale, bias)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("kind", OPEN_CLIP_KINDS)
def test_open_clip_loss_matches_reference_value_and_gradients(kind, case, dtype, atol, rtol):
    g = torch.Generator().manual_seed(case_seed(case, kind))
    image = unit_rows(case.n, case.d, dtype, g)
    text = unit_rows(case.n, case.d, dtype, g)
    scale = torch.tensor(case.scale, dtype=dtype)
    bias = torch.tensor(-2.5, dtype=dtype) if case.bias else None
    chunk_bytes = chunk_bytes_for(case.chunking, case.n, case.n, dtype)

    inputs = leaves(image, text, scale, bias)
    loss = open_clip_loss(kind, *inputs[:3], inputs[3] if case.bias else None, chunk_bytes)
    grads = torch.autograd.grad(loss, inputs)

    ref_inputs = leaves(image, text, scale, bias)
    ref_loss = open_clip_reference(kind, *ref_inputs[:3], ref_inputs[3] if case.bias else None)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)

    assert loss.dim() == 0 and loss.dtype == dtype
    assert_close("loss", loss, ref_loss, atol, rtol)
    names = ["d_image_features", "d_text_features", "d_logit_scale", "d_logit_bias"][: len(inputs)]
    check_grads(names, grads, ref_grads, atol, rtol)
    if bias is not None and kind in ("clip_loss", "ClipLoss"):
        # A bias cannot move a softmax: open_clip's gradient is exactly zero, and it must be a tensor
        # (not None) so DDP with find_unused_parameters=False sees the parameter used.
        assert torch.equal(grads[3], torch.zeros_like(bias)), f"d_logit_bias is not an exact zero: {grads[3]}"


def nt_xent_loss(kind: str, out0, out1, temperature, bank, chunk_bytes):
    if kind in DCL_VARIANTS:
        return dcl_variant_loss(kind, out0, out1, temperature, backend="torch", chunk_bytes=chunk_bytes)
    if kind == "nt_xent_loss":
        return fastcontrast.nt_xent_loss(out0, out1, temperature, backend="torch", chunk_bytes=chunk_bytes)
    if kind == "NTXentLoss":
        return fastcontrast.NTXentLoss(temperature, backend="torch", chunk_bytes=chunk_bytes)(out0, out1)
    return fastcontrast.nt_xent_memory_bank_loss(
        out0, out1, bank, temperature, backend="torch", chunk_bytes=chunk_bytes
    )


def nt_xent_reference(kind: str, out0, out1, temperature, bank):
    if kind in DCL_VARIANTS:
        return dcl_variant_reference(kind, out0, out1, temperature)
    if kind == "nt_xent_memory_bank_loss":
        return reference.nt_xent_memory_bank_loss_reference(out0, out1, bank, temperature)
    return reference.nt_xent_loss_reference(out0, out1, temperature)


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


@pytest.mark.parametrize("kind", OPEN_CLIP_KINDS)
def test_open_clip_loss_matches_reference_for_exponentiated_non_leaf_scale(kind):
    # open_clip passes `logit_scale.exp()` (a non-leaf) and trains the log-scale parameter.
    g = torch.Generator().manual_seed(5)
    image, text = unit_rows(33, 17, torch.float64, g), unit_rows(33, 17, torch.float64, g)
    log_scale, bias = (
        torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
        torch.tensor(-10.0, dtype=torch.float64),
    )
    inputs, ref_inputs = leaves(image, text, log_scale, bias), leaves(image, text, log_scale, bias)
    loss = open_clip_loss(kind, inputs[0], inputs[1], inputs[2].exp(), inputs[3], 5 * 33 * 8)
    ref_loss = open_clip_reference(kind, ref_inputs[0], ref_inputs[1], ref_inputs[2].exp(), ref_inputs[3])
    atol, rtol = TOLERANCES[torch.float64]
    assert_close("loss", loss, ref_loss, atol, rtol)
    check_grads(
        ["d_image_features", "d_text_features", "d_log_scale", "d_logit_bias"],
        torch.autograd.grad(loss, inputs),
        torch.autograd.grad(ref_loss, ref_inputs),
        atol,
        rtol,
    )


@pytest.mark.parametrize("kind", ("clip_loss", "siglip_loss"))
def test_open_clip_loss_gradient_flows_only_to_inputs_that_require_it(kind):
    g = torch.Generator().manual_seed(8)
    image, text = unit_rows(12, 6, torch.float64, g), unit_rows(12, 6, torch.float64, g)
    text.requires_grad_()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    loss = open_clip_loss(kind, image, text, scale, bias, 3 * 12 * 8)
    (d_text,) = torch.autograd.grad(loss, [text])
    ref_text = text.detach().clone().requires_grad_()
    (ref_d_text,) = torch.autograd.grad(open_clip_reference(kind, image, ref_text, scale, bias), [ref_text])
    atol, rtol = TOLERANCES[torch.float64]
    assert_close("d_text_features", d_text, ref_d_text, atol, rtol)


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
