"""Property tests (hypothesis) over shapes, scales and chunk sizes.

The blockwise core is compared with a direct computation on the materialised matrix (torch.logsumexp,
softplus), value and gradients, in fp64; the losses are compared with fastcontrast.reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import DCL_VARIANTS, TOLERANCES, assert_close, assert_loss_close, dcl_variant_loss, dcl_variant_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcontrast
from fastcontrast import reference
from fastcontrast.blockwise import TorchEngine

ATOL, RTOL = TOLERANCES[torch.float64]

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

sizes = st.integers(min_value=1, max_value=33)
dims = st.integers(min_value=1, max_value=20)
# Scales from tiny to CLIP's clamp, both signs: the core takes any real s (NT-Xent's 1/τ may be negative).
scales = st.one_of(
    st.floats(min_value=0.01, max_value=100.0),
    st.floats(min_value=-100.0, max_value=-0.01),
)
# Logits rows per chunk: from one row to more than the whole matrix.
chunk_rows = st.integers(min_value=1, max_value=40)


def fp64_pair(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=g), dim=1)
    b = F.normalize(torch.randn(m, d, dtype=torch.float64, generator=g), dim=1)
    return a.requires_grad_(), b.requires_grad_()


def engine_for(rows_per_chunk: int, m: int) -> TorchEngine:
    return TorchEngine(chunk_bytes=rows_per_chunk * m * 8)


def offset_mask(n: int, m: int, offset: int) -> torch.Tensor:
    """Boolean [n, m], True at (i, i + offset)."""
    return torch.arange(m)[None, :] == torch.arange(n)[:, None] + offset


@st.composite
def lse_problems(draw):
    n, m = draw(sizes), draw(sizes)
    exclude = draw(st.booleans())
    offset = None
    # An exclusion that empties a whole row or column (n or m = 1) makes its LSE −inf; that edge has its
    # own test in test_gradcheck.py, so here every row and column keeps a candidate.
    if exclude and n >= 2 and m >= 2:
        offset = draw(st.integers(min_value=-(n - 1), max_value=m - 1))
    rows, cols = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    return (
        n,
        m,
        draw(dims),
        draw(scales),
        draw(chunk_rows),
        rows,
        cols,
        offset,
        draw(st.integers(0, 2**31 - 1)),
    )


@PROPERTY_SETTINGS
@given(lse_problems())
def test_blockwise_lse_equals_logsumexp_of_the_materialised_matrix(problem):
    n, m, d, scale_value, rows_per_chunk, rows, cols, offset, seed = problem
    a, b = fp64_pair(n, m, d, seed)
    scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    w_row, w_col = (
        torch.randn(n, dtype=torch.float64, generator=g),
        torch.randn(m, dtype=torch.float64, generator=g),
    )

    lse_row, lse_col = fastcontrast.blockwise_lse(
        a, b, scale, engine_for(rows_per_chunk, m), rows=rows, cols=cols, exclude_offset=offset
    )
    logits = scale * a @ b.T
    if offset is not None:
        logits = logits.masked_fill(offset_mask(n, m, offset), float("-inf"))
    ref_row, ref_col = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)

    objective, ref_objective = 0.0, 0.0
    if rows:
        assert_close("lse_row", lse_row, ref_row, ATOL, RTOL)
        objective, ref_objective = objective + lse_row @ w_row, ref_objective + ref_row @ w_row
    else:
        assert lse_row is None
    if cols:
        assert_close("lse_col", lse_col, ref_col, ATOL, RTOL)
        objective, ref_objective = objective + lse_col @ w_col, ref_objective + ref_col @ w_col
    else:
        assert lse_col is None
    grads = torch.autograd.grad(objective, (a, b, scale))
    ref_grads = torch.autograd.grad(ref_objective, (a, b, scale))
    for name, grad, ref_grad in zip(("d_a", "d_b", "d_scale"), grads, ref_grads):
        assert_close(name, grad, ref_grad, ATOL, RTOL)


@PROPERTY_SETTINGS
@given(
    n=sizes,
    m=sizes,
    d=dims,
    scale_value=scales,
    rows_per_chunk=chunk_rows,
    self_similarity=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_blockwise_lse_and_positives_equal_the_materialised_matrix(
    n, m, d, scale_value, rows_per_chunk, self_similarity, seed
):
    a, b = fp64_pair(n, m, d, seed)
    if self_similarity:  # NT-Xent's form: S = s·a·aᵀ, self excluded, one gradient for a
        b, m = None, n
    g = torch.Generator().manual_seed(seed + 2)
    positive_index = torch.randint(0, m, (n,), generator=g)
    exclude = 0 if self_similarity and n >= 2 else None
    scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    w_row, w_pos = (
        torch.randn(n, dtype=torch.float64, generator=g),
        torch.randn(n, dtype=torch.float64, generator=g),
    )

    lse_row, _, positives = fastcontrast.blockwise_lse_and_positives(
        a, b, scale, engine_for(rows_per_chunk, m), positive_index, rows=True, exclude_offset=exclude
    )
    other = a if b is None else b
    logits = scale * a @ other.T
    ref_positives = logits[torch.arange(n), positive_index]
    if exclude is not None:
        logits = logits.masked_fill(offset_mask(n, m, exclude), float("-inf"))
    ref_row = torch.logsumexp(logits, dim=1)
    assert_close("lse_row", lse_row, ref_row, ATOL, RTOL)
    assert_close("positives", positives, ref_positives, ATOL, RTOL)

    inputs = (a, scale) if b is None else (a, b, scale)
    names = ("d_a", "d_scale") if b is None else ("d_a", "d_b", "d_scale")
    grads = torch.autograd.grad(lse_row @ w_row + positives @ w_pos, inputs)
    ref_grads = torch.autograd.grad(ref_row @ w_row + ref_positives @ w_pos, inputs)
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert_close(name, grad, ref_grad, ATOL, RTOL)


@PROPERTY_SETTINGS
@given(
    n=sizes,
    m=sizes,
    d=dims,
    scale_value=scales,
    bias_value=st.one_of(st.none(), st.floats(min_value=-20.0, max_value=20.0)),
    rows_per_chunk=chunk_rows,
    offset_fraction=st.floats(min_value=-1.5, max_value=1.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_blockwise_siglip_sum_equals_softplus_sum_of_the_materialised_matrix(
    n, m, d, scale_value, bias_value, rows_per_chunk, offset_fraction, seed
):
    # Offsets beyond the matrix (no positive at all in some or every row) are legal too.
    offset = int(offset_fraction * max(n, m))
    a, b = fp64_pair(n, m, d, seed)
    scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    bias = None if bias_value is None else torch.tensor(bias_value, dtype=torch.float64, requires_grad=True)

    total = fastcontrast.blockwise_siglip_sum(
        a, b, scale, bias, engine_for(rows_per_chunk, m), positive_offset=offset
    )
    logits = scale * a @ b.T + (0.0 if bias is None else bias)
    signs = torch.where(offset_mask(n, m, offset), 1.0, -1.0).to(torch.float64)
    ref_total = F.softplus(-signs * logits, threshold=1e6).sum()

    assert_close("siglip_sum", total, ref_total, ATOL, RTOL)
    inputs = (a, b, scale) if bias is None else (a, b, scale, bias)
    grads = torch.autograd.grad(total, inputs)
    ref_grads = torch.autograd.grad(ref_total, inputs)
    for name, grad, ref_grad in zip(("d_a", "d_b", "d_scale", "d_bias"), grads, ref_grads):
        assert_close(name, grad, ref_grad, ATOL, RTOL)


LOSS_KINDS = ("clip", "siglip", "nt_xent", "nt_xent_memory_bank") + DCL_VARIANTS


@pytest.mark.parametrize("kind", LOSS_KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=sizes,
    d=dims,
    scale_value=st.floats(min_value=0.5, max_value=100.0),
    bias_value=st.one_of(st.none(), st.floats(min_value=-10.0, max_value=10.0)),
    rows_per_chunk=chunk_rows,
    bank_size=st.integers(min_value=1, max_value=40),
    seed=st.integers(0, 2**31 - 1),
)
def test_loss_equals_reference(kind, n, d, scale_value, bias_value, rows_per_chunk, bank_size, seed):
    a, b = fp64_pair(n, n, d, seed)
    if kind.startswith("nt_xent") or kind in DCL_VARIANTS:
        with torch.no_grad():  # unnormalised inputs: lightly normalises inside the loss
            a.mul_(3.0)
        inputs, scale, bias = (a, b), None, None
    else:
        scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
        bias = (
            None if bias_value is None else torch.tensor(bias_value, dtype=torch.float64, requires_grad=True)
        )
        inputs = (a, b, scale) if bias is None else (a, b, scale, bias)
    bank = F.normalize(torch.randn(bank_size, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    temperature = 1.0 / scale_value

    if kind == "clip":
        chunk_bytes = rows_per_chunk * n * 8
        loss = fastcontrast.clip_loss(a, b, scale, bias, backend="torch", chunk_bytes=chunk_bytes)
        ref_loss = reference.clip_loss_reference(a, b, scale, bias)
    elif kind == "siglip":
        chunk_bytes = rows_per_chunk * n * 8
        loss = fastcontrast.siglip_loss(a, b, scale, bias, backend="torch", chunk_bytes=chunk_bytes)
        ref_loss = reference.siglip_loss_reference(a, b, scale, bias)
    elif kind == "nt_xent":
        chunk_bytes = rows_per_chunk * 2 * n * 8
        loss = fastcontrast.nt_xent_loss(a, b, temperature, backend="torch", chunk_bytes=chunk_bytes)
        ref_loss = reference.nt_xent_loss_reference(a, b, temperature)
    elif kind in DCL_VARIANTS:
        chunk_bytes = rows_per_chunk * 2 * n * 8
        loss = dcl_variant_loss(kind, a, b, temperature, backend="torch", chunk_bytes=chunk_bytes)
        ref_loss = dcl_variant_reference(kind, a, b, temperature)
    else:
        chunk_bytes = rows_per_chunk * bank_size * 8
        loss = fastcontrast.nt_xent_memory_bank_loss(
            a, b, bank, temperature, backend="torch", chunk_bytes=chunk_bytes
        )
        ref_loss = reference.nt_xent_memory_bank_loss_reference(a, b, bank, temperature)

    assert_loss_close("loss", loss, ref_loss, ATOL, RTOL)  # DCL at n = 1: −inf, as in lightly
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    names = ("d_features_a", "d_features_b", "d_logit_scale", "d_logit_bias")
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert_close(name, grad, ref_grad, ATOL, RTOL)
