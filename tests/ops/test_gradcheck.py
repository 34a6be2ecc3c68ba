"""torch.autograd.gradcheck in fp64 for the differentiable core and every loss, on the blockwise torch engine.

gradcheck compares the analytical backward with central finite differences of the forward, so it checks
the hand-written backward (and the scale / bias gradients) against the engine's own forward. Small shapes
and small chunk budgets keep the chunk loop running over several, ragged chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, squared_distance_weights
from torch.autograd import gradcheck

import fastcontrast
from fastcontrast.blockwise import TorchEngine

# 3 rows of fp64 logits per chunk for the 7-column matrices below: chunks of 3, 3 and a ragged 2.
CHUNK_BYTES = 3 * 7 * 8


def fp64(*shape, seed: int, requires_grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(requires_grad)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    "n, m, rows, cols, exclude_offset",
    [
        pytest.param(8, 7, True, True, None, id="N8-M7-rows-cols"),
        pytest.param(8, 7, True, False, None, id="N8-M7-rows"),
        pytest.param(8, 7, False, True, None, id="N8-M7-cols"),
        pytest.param(7, 7, True, False, 0, id="N7-M7-rows-exclude0"),
        pytest.param(7, 7, True, True, 0, id="N7-M7-rows-cols-exclude0"),
        pytest.param(8, 7, True, True, 3, id="N8-M7-rows-cols-exclude+3"),
        pytest.param(8, 7, False, True, -2, id="N8-M7-cols-exclude-2"),
        pytest.param(1, 7, True, True, None, id="N1-M7-rows-cols"),
        pytest.param(8, 1, True, True, None, id="N8-M1-rows-cols"),
    ],
)
def test_blockwise_lse_gradcheck(n, m, rows, cols, exclude_offset):
    a, b, scale = fp64(n, 4, seed=1), fp64(m, 4, seed=2), scalar(1.7)
    engine = TorchEngine(chunk_bytes=CHUNK_BYTES)
    # Random upstream weights, so that the row and column gradients are not just sums.
    w_row, w_col = fp64(n, seed=3, requires_grad=False), fp64(m, seed=4, requires_grad=False)

    def weighted_lse(a, b, scale):
        lse_row, lse_col = fastcontrast.blockwise_lse(
            a, b, scale, engine, rows=rows, cols=cols, exclude_offset=exclude_offset
        )
        assert (lse_row is None) != rows and (lse_col is None) != cols
        outputs = []
        if rows:
            outputs.append(lse_row * w_row)
        if cols:
            outputs.append(lse_col * w_col)
        return tuple(outputs)

    assert gradcheck(weighted_lse, (a, b, scale))


def test_blockwise_lse_gradcheck_with_one_output_unused():
    # Only the row LSE feeds the loss: the column output gets no upstream gradient at all (None).
    a, b, scale = fp64(8, 4, seed=1), fp64(7, 4, seed=2), scalar(0.6)
    engine = TorchEngine(chunk_bytes=CHUNK_BYTES)
    assert gradcheck(lambda a, b, s: fastcontrast.blockwise_lse(a, b, s, engine)[0].sum(), (a, b, scale))


@pytest.mark.parametrize(
    "self_similarity, rows, cols, exclude_offset",
    [
        pytest.param(False, True, True, None, id="A-B-rows-cols"),
        pytest.param(False, True, False, None, id="A-B-rows"),
        pytest.param(False, False, True, 2, id="A-B-cols-exclude+2"),
        pytest.param(False, False, False, None, id="A-B-positives-only"),
        pytest.param(True, True, False, 0, id="A-A-rows-exclude0"),
        pytest.param(True, True, True, 0, id="A-A-rows-cols-exclude0"),
    ],
)
def test_blockwise_lse_and_positives_gradcheck(self_similarity, rows, cols, exclude_offset):
    a, scale = fp64(8, 4, seed=31), scalar(1.9)
    b = None if self_similarity else fp64(7, 4, seed=32)
    m = 8 if self_similarity else 7
    engine = TorchEngine(chunk_bytes=3 * m * 8)
    # Repeated positives (two rows sharing a column) exercise the scatter-add of the B gradient.
    positive_index = torch.tensor([3, 0, 0, 6, 2, 5, 1, 4]) % m
    w_row, w_col = fp64(8, seed=33, requires_grad=False), fp64(m, seed=34, requires_grad=False)
    w_pos = fp64(8, seed=35, requires_grad=False)

    def weighted(a, *rest):
        b, scale = (None, rest[0]) if self_similarity else rest
        lse_row, lse_col, positives = fastcontrast.blockwise_lse_and_positives(
            a, b, scale, engine, positive_index, rows=rows, cols=cols, exclude_offset=exclude_offset
        )
        outputs = [positives * w_pos]
        if rows:
            outputs.append(lse_row * w_row)
        if cols:
            outputs.append(lse_col * w_col)
        return tuple(outputs)

    inputs = (a, scale) if self_similarity else (a, b, scale)
    assert gradcheck(weighted, inputs)


@pytest.mark.parametrize(
    "n, m, exclude_offset",
    [pytest.param(1, 4, 0, id="N1-M4-column0-empty"), pytest.param(4, 1, 2, id="N4-M1-row2-empty")],
)
def test_blockwise_lse_gradient_stays_finite_when_exclusion_empties_a_row_or_column(n, m, exclude_offset):
    # An emptied row/column has LSE −inf (as torch.logsumexp says); using only the finite outputs must give
    # torch's finite gradients, not NaN from exp(−inf − (−inf)) at the excluded entry.
    a, b, scale = fp64(n, 3, seed=21), fp64(m, 3, seed=22), scalar(1.3)
    lse_row, lse_col = fastcontrast.blockwise_lse(
        a, b, scale, TorchEngine(chunk_bytes=8), exclude_offset=exclude_offset
    )
    logits = scale * a @ b.T
    excluded = torch.zeros(n, m, dtype=torch.bool)
    rows = torch.arange(n)
    keep = (rows + exclude_offset >= 0) & (rows + exclude_offset < m)
    excluded[rows[keep], rows[keep] + exclude_offset] = True
    logits = logits.masked_fill(excluded, float("-inf"))
    ref_row, ref_col = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
    assert torch.equal(torch.isinf(lse_row), torch.isinf(ref_row)) and torch.equal(
        torch.isinf(lse_col), torch.isinf(ref_col)
    )

    def finite_part(lse_row, lse_col):
        return lse_row[torch.isfinite(lse_row)].sum() + 0.5 * lse_col[torch.isfinite(lse_col)].sum()

    grads = torch.autograd.grad(finite_part(lse_row, lse_col), (a, b, scale))
    ref_grads = torch.autograd.grad(finite_part(ref_row, ref_col), (a, b, scale))
    for name, actual, expected in zip(("d_a", "d_b", "d_scale"), grads, ref_grads):
        assert_close(name, actual, expected, 1e-12, 1e-10)


@pytest.mark.parametrize("positive_offset", [0, 2, -3, 9], ids=lambda o: f"offset{o:+d}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_blockwise_siglip_sum_gradcheck(positive_offset, with_bias):
    a, b, scale = fp64(8, 4, seed=5), fp64(7, 4, seed=6), scalar(2.3)
    engine = TorchEngine(chunk_bytes=CHUNK_BYTES)
    if with_bias:
        bias = scalar(-1.1)
        assert gradcheck(
            lambda a, b, s, bias: fastcontrast.blockwise_siglip_sum(
                a, b, s, bias, engine, positive_offset=positive_offset
            ),
            (a, b, scale, bias),
        )
    else:
        assert gradcheck(
            lambda a, b, s: fastcontrast.blockwise_siglip_sum(
                a, b, s, None, engine, positive_offset=positive_offset
            ),
            (a, b, scale),
        )


@pytest.mark.parametrize("n", [1, 7], ids=lambda n: f"N{n}")
def test_clip_loss_gradcheck_with_scale_and_bias(n):
    image, text = fp64(n, 5, seed=7), fp64(n, 5, seed=8)
    scale, bias = scalar(3.0), scalar(-0.4)
    # The bias gradient is an exact zero; gradcheck checks that finite differences agree.
    assert gradcheck(
        lambda i, t, s, b: fastcontrast.clip_loss(i, t, s, b, backend="torch", chunk_bytes=16),
        (image, text, scale, bias),
    )


@pytest.mark.parametrize("n", [1, 7], ids=lambda n: f"N{n}")
def test_clip_loss_module_gradcheck_with_scale_and_bias(n):
    image, text = fp64(n, 5, seed=9), fp64(n, 5, seed=10)
    loss_fn = fastcontrast.ClipLoss(backend="torch", chunk_bytes=16)
    assert gradcheck(
        lambda i, t, s, b: loss_fn(i, t, s, b, output_dict=True)["contrastive_loss"],
        (image, text, scalar(3.0), scalar(-0.4)),
    )


@pytest.mark.parametrize("n", [1, 6], ids=lambda n: f"N{n}")
def test_siglip_loss_gradcheck_with_scale_and_bias(n):
    image, text = fp64(n, 3, seed=11), fp64(n, 3, seed=12)
    assert gradcheck(
        lambda i, t, s, b: fastcontrast.siglip_loss(i, t, s, b, backend="torch", chunk_bytes=16),
        (image, text, scalar(3.0), scalar(-0.4)),
    )
    loss_fn = fastcontrast.SigLipLoss(backend="torch", chunk_bytes=16)
    assert gradcheck(lambda i, t, s, b: loss_fn(i, t, s, b), (image, text, scalar(3.0), scalar(-0.4)))


# (functional, module) of each two-view loss with τ. DCLW is not here: its weights are detached constants
# (lightly's), so finite differences of its forward see them move while its gradient rightly does not; its
# gradients are compared with the reference instead. The differentiable weight_fn is gradchecked.
TWO_VIEW_LOSSES = {
    "nt_xent": (
        lambda t: lambda x0, x1: fastcontrast.nt_xent_loss(x0, x1, t, backend="torch", chunk_bytes=16),
        lambda t: fastcontrast.NTXentLoss(t, backend="torch", chunk_bytes=16),
    ),
    "dcl": (
        lambda t: lambda x0, x1: fastcontrast.dcl_loss(x0, x1, t, backend="torch", chunk_bytes=16),
        lambda t: fastcontrast.DCLLoss(t, backend="torch", chunk_bytes=16),
    ),
    "dcl-weight_fn": (
        lambda t: lambda x0, x1: fastcontrast.dcl_loss(
            x0, x1, t, squared_distance_weights, backend="torch", chunk_bytes=16
        ),
        lambda t: fastcontrast.DCLLoss(t, squared_distance_weights, backend="torch", chunk_bytes=16),
    ),
}


# N = 1 for NT-Xent (a single negative); DCL needs N = 2 for any negative (at N = 1 its loss is −inf).
@pytest.mark.parametrize("temperature", [0.5, -0.2], ids=["tau0.5", "tau-0.2"])
@pytest.mark.parametrize(
    "kind, n",
    [(kind, n) for kind in TWO_VIEW_LOSSES for n in ((1, 6) if kind == "nt_xent" else (2, 6))],
    ids=lambda value: f"N{value}" if isinstance(value, int) else value,
)
def test_nt_xent_and_dcl_loss_gradcheck(kind, n, temperature):
    out0, out1 = fp64(n, 5, seed=13), fp64(n, 5, seed=14)
    functional, module = TWO_VIEW_LOSSES[kind]
    assert gradcheck(functional(temperature), (out0, out1))
    assert gradcheck(module(temperature), (out0, out1))


@pytest.mark.parametrize("n", [1, 6], ids=lambda n: f"N{n}")
def test_nt_xent_memory_bank_loss_gradcheck(n):
    out0, out1 = fp64(n, 5, seed=15), fp64(n, 5, seed=16)
    bank = F.normalize(fp64(9, 5, seed=17, requires_grad=False), dim=1)
    assert gradcheck(
        lambda x0, x1: fastcontrast.nt_xent_memory_bank_loss(
            x0, x1, bank, 0.3, backend="torch", chunk_bytes=16
        ),
        (out0, out1),
    )
