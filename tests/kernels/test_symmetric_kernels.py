"""The Triton engine's single-tower LSE by symmetry (lse_forward_kernel's and ds_panel_kernel's SYMMETRIC), in
triton's interpreter: the same LSEs, positives and gradients as the two-tower route and the fp64 reference, on
every route (one band of row blocks or several, one panel or diagonal and off-diagonal ones, the fused
gradient at small d), with its GEMM work counted: NT-Xent, DCL and SupCon ≤ 2.5 passes of the 2N×2N matrix.
"""

from __future__ import annotations

import os

import pytest
import torch
from fastcontrast.kernels import configs
from fastcontrast.kernels import engine as triton_engine
from fastcontrast.kernels.engine import TritonEngine

import fastcontrast as fc
from fastcontrast.autograd import BlockwiseLogSumExp
from fastcontrast.blockwise import TorchEngine

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on CPU-only machines with TRITON_INTERPRET=1 (set in conftest.py)",
    ),
]


def _partner(rows: int) -> torch.Tensor:
    """NT-Xent's positive index over [z0; z1]: row i's other view, an involution (rows even)."""
    return torch.arange(rows).add_(rows // 2).remainder_(rows)


def _run(z, scale, engine, positives, exclude_positive, symmetric, weights):
    index = _partner(z.shape[0]) if positives else None
    lse, _, pos, _, _, low, _ = BlockwiseLogSumExp.apply(
        z, None, scale, engine, True, False, index, 0, exclude_positive, 0, False, symmetric)
    loss = (weights[0] * lse).sum()
    if positives:
        loss = loss - (weights[1] * pos).sum()
    return (lse, pos, low) + torch.autograd.grad(loss, (z, scale))


@pytest.fixture
def bands(request, monkeypatch):
    """``many``: a scratch bound that holds one row block per band (every band merged into the running pair)."""
    if request.param == "many":
        monkeypatch.setattr(triton_engine, "SINGLE_PASS_SCRATCH_BYTES", 0)
    return request.param


CASES = [  # rows (of the 2N×2N problem), d: the fused gradient (d ≤ 64 here) and the panel path, ragged rows
    (2, 48), (66, 48), (130, 200), (100, 1000),
]


@pytest.mark.parametrize("bands", ["one", "many"], indirect=True)
@pytest.mark.parametrize("rows, d", CASES)
@pytest.mark.parametrize("kind", ["ntxent", "dcl", "supcon"])
def test_symmetric_route_matches_the_two_tower_route_and_fp64(rows, d, kind, bands):
    g = torch.Generator().manual_seed(rows + d)
    z = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    weights = torch.rand(2, rows, generator=g)
    positives, exclude_positive = kind != "supcon", kind == "dcl"
    got = _run(z, scale, TritonEngine(), positives, exclude_positive, True, weights)
    two_tower = _run(z, scale, TritonEngine(), positives, exclude_positive, False, weights)
    z64, s64 = z.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    exact = _run(z64, s64, TorchEngine(2**20), positives, exclude_positive, False, weights.double())
    names = ("lse", "positives", "low", "grad z", "grad scale")
    for name, x, y, e in zip(names, got, two_tower, exact):
        if name == "low":
            # hi + lo is the LSE to the log-sum's rounding on both routes.
            torch.testing.assert_close((x.double() + got[0]), e.to(torch.float64) + exact[0], rtol=0, atol=2e-6)
            continue
        if not e.numel():  # no positives (SupCon)
            assert not x.numel() and not y.numel()
            continue
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6, msg=name)
        torch.testing.assert_close(x.double(), e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()), msg=name)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_ntxent_on_the_symmetric_kernels_matches_the_reference_in_16_bit(dtype, tolerance):
    g = torch.Generator().manual_seed(5)
    out0, out1 = (torch.randn(65, 200, generator=g).to(dtype).requires_grad_() for _ in range(2))
    loss = fc.nt_xent_loss(out0, out1, 0.2, backend="triton")
    grads = torch.autograd.grad(loss, (out0, out1))
    ref0, ref1 = (x.detach().double().requires_grad_() for x in (out0, out1))
    expected = fc.reference.nt_xent_loss_reference(ref0, ref1, 0.2)
    expected_grads = torch.autograd.grad(expected, (ref0, ref1))
    torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=tolerance)
    for x, y in zip(grads, expected_grads):
        torch.testing.assert_close(x.double(), y, rtol=tolerance, atol=tolerance * y.abs().max().item())


@pytest.mark.parametrize("side", [1024, 384], ids=["one-panel", "panels"])
def test_symmetric_panels_with_a_split_reduction_write_every_split_before_adding(side, monkeypatch):
    """Each output row range's first product (full depth, not accumulating) must write every split of the slab:
    many programs and deep panels split the GEMMs' reductions (3 splits in one panel; 2, then 1 in the last,
    smaller panels)."""
    from fastcontrast.kernels import gradient_launch

    monkeypatch.setattr(gradient_launch, "target_programs", lambda device: 256)
    monkeypatch.setattr(configs, "INTERPRETER_PANEL", configs.PanelConfig(rows=side, cols=side))
    splits = []
    monkeypatch.setattr(gradient_launch.PanelOutput, "result",
                        lambda self, result=gradient_launch.PanelOutput.result: splits.append(self.splits) or
                        result(self))
    rows = 520
    g = torch.Generator().manual_seed(side)
    z = torch.nn.functional.normalize(torch.randn(rows, 80, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    weights = torch.rand(2, rows, generator=g)
    got = _run(z, scale, TritonEngine(), True, False, True, weights)
    z64, s64 = z.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    exact = _run(z64, s64, TorchEngine(2**20), True, False, False, weights.double())
    for name, x, e in zip(("grad z", "grad scale"), got[3:], exact[3:]):
        torch.testing.assert_close(x.double(), e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=name)
    assert splits == [3 if side == 1024 else 2]


def test_a_one_hot_row_gives_exactly_zero_when_its_positive_is_an_earlier_rows_column():
    """Row i + 8's positive (row i) lies before its own program's columns: the partner's program writes it, from
    the tile the LSE reduced, so lse − positive is exactly 0 on both rows."""
    z = torch.eye(40, 48)[:40]
    z = torch.cat([z, z])  # rows i and i + 40 identical, orthogonal to the rest: one-hot rows at scale 100
    lse, _, positives, *_ = BlockwiseLogSumExp.apply(z, None, torch.tensor(100.0), TritonEngine(), True, False,
                                                     _partner(80), 0, False, 0, False, True)
    assert torch.equal(lse - positives, torch.zeros(80))


@pytest.fixture
def aligned_panels(monkeypatch):
    """Square interpreter panels whose side is a multiple of every tile: FLOPs then count whole tiles."""
    monkeypatch.setattr(configs, "INTERPRETER_PANEL", configs.PanelConfig(rows=64, cols=128))


@pytest.mark.parametrize("d", [256, 320])
@pytest.mark.parametrize("loss_name", ["nt_xent", "dcl", "supcon"])
def test_single_tower_losses_cost_at_most_two_and_a_half_passes(loss_name, d, aligned_panels):
    """Counted in the interpreter, in passes of 2·M²·d over the M = 2N single-tower matrix: the forward's upper
    block triangle (½ + 1/(2·row blocks)), the backward's G = dS + dSᵀ from one tile (the same) and its
    products (1). The two-tower route takes 4."""
    from fastcontrast.kernels.work_count import count_work, gemm_passes

    n = 128
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, d, generator=g, dtype=torch.float16).requires_grad_() for _ in range(2))
    labels = torch.arange(n).repeat(2)
    losses = {
        "nt_xent": lambda: fc.nt_xent_loss(a, b, 0.1, backend="triton"),
        "dcl": lambda: fc.dcl_loss(a, b, 0.1, backend="triton"),
        "supcon": lambda: fc.supcon_loss(torch.cat([a, b]), labels, temperature=0.1, backend="triton"),
    }
    with count_work() as forward:
        loss = losses[loss_name]()
    with count_work() as backward:
        loss.backward()
    rows = 2 * n
    assert gemm_passes(forward.flops, rows, rows, d) <= 0.5 + 1 / (rows // 32)
    assert gemm_passes(forward.flops + backward.flops, rows, rows, d) <= 2.5
