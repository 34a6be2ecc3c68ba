"""The covering design of shapes, scales and chunkings every loss family runs against
fastcontrast.reference on the blockwise torch engine, and the helpers those comparisons share.

Every batch size (1, 2, 7, 64, 257, 1000), every feature dim (3, 48, 64, 1000), every scale (1, 14.3, 100),
bias on and off and three chunkings (default, one row per chunk, chunks that do not divide the rows) each
appear, with the awkward combinations (N=1, N=257 with d=1000) included.
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


def check_open_clip_case(kind, case, dtype, atol, rtol):
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


def check_open_clip_exponentiated_scale(kind):
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


def check_open_clip_gradient_flow(kind):
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
