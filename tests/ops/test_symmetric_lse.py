"""Single-tower LSE by symmetry on the torch engine (fastcontrast/blockwise_symmetric.py): the same LSEs, positives
and gradients as the two-tower route, over the lower block triangle of S only, with its GEMM work counted."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcontrast as fc
from fastcontrast.autograd import BlockwiseLogSumExp
from fastcontrast.blockwise import TorchEngine
from fastcontrast.ops import IMPLEMENTATIONS


def _partner(rows: int) -> torch.Tensor:
    """NT-Xent's positive index over [z0; z1]: row i's other view, an involution."""
    return torch.arange(rows).add_(rows // 2).remainder_(rows)


def _run(z, scale, engine, exclude_positive, symmetric, weights):
    lse, _, positives, _, _, low, _ = BlockwiseLogSumExp.apply(
        z, None, scale, engine, True, False, _partner(z.shape[0]), 0, exclude_positive, 0, False, symmetric)
    # Weights on both outputs, so the positives' gradient and the LSE's are checked apart.
    loss = (weights[0] * lse).sum() - (weights[1] * positives).sum()
    return (lse, positives, low) + torch.autograd.grad(loss, (z, scale))


@pytest.mark.parametrize("rows, d", [(2, 16), (14, 48), (100, 48), (64, 1000)])
@pytest.mark.parametrize("exclude_positive", [False, True], ids=["ntxent", "dcl"])
@pytest.mark.parametrize("chunk_bytes", [1, 2048, 2**20], ids=["one-row-chunks", "some-chunks", "one-chunk"])
def test_symmetric_equals_the_two_tower_route_in_fp64(rows, d, exclude_positive, chunk_bytes):
    g = torch.Generator().manual_seed(rows + d)
    z = torch.nn.functional.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1)
    z.requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, rows, generator=g, dtype=torch.float64)
    engine = TorchEngine(chunk_bytes)
    expected = _run(z, scale, engine, exclude_positive, False, weights)
    actual = _run(z, scale, engine, exclude_positive, True, weights)
    for name, x, y in zip(("lse", "positives", "low", "grad z", "grad scale"), actual, expected):
        if name == "low":  # the low parts of two roundings of the same LSE differ; hi + lo may not
            torch.testing.assert_close(x + actual[0], y + expected[0], rtol=1e-12, atol=1e-12, equal_nan=True)
            continue
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


def test_symmetric_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def loss(z, scale):
        lse, _, positives, *_ = BlockwiseLogSumExp.apply(z, None, scale, TorchEngine(64), True, False, _partner(10),
                                                        0, False, 0, False, True)
        return lse - 1.5 * positives

    assert torch.autograd.gradcheck(loss, (z, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ntxent_on_the_symmetric_route_matches_the_reference_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    out0, out1 = (torch.randn(37, 48, generator=g).to(dtype).requires_grad_() for _ in range(2))
    loss = fc.nt_xent_loss(out0, out1, 0.2, backend="torch", chunk_bytes=4096)
    grads = torch.autograd.grad(loss, (out0, out1))
    ref0, ref1 = (x.detach().double().requires_grad_() for x in (out0, out1))
    expected = fc.reference.nt_xent_loss_reference(ref0, ref1, 0.2)
    expected_grads = torch.autograd.grad(expected, (ref0, ref1))
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=tolerance)
    for x, y in zip(grads, expected_grads):
        torch.testing.assert_close(x.double(), y, rtol=tolerance, atol=tolerance * y.abs().max().item())


def test_a_one_hot_row_still_gives_exactly_zero():
    """Positives come from the tiles the LSE reduced, also when a row's positive is a later chunk's row."""
    z = torch.eye(8, 16)
    z = torch.cat([z, z])  # row i and i + 8 identical, orthogonal to the rest: at scale 100 one-hot rows
    lse, _, positives, *_ = BlockwiseLogSumExp.apply(z, None, torch.tensor(100.0), TorchEngine(16 * 4), True,
                                                    False, _partner(16), 0, False, 0, False, True)
    assert torch.equal(lse - positives, torch.zeros(16))


class _MatmulFlops(TorchDispatchMode):
    """Counts 2·m·n·k of every matrix product run under it, inside the engine's custom ops too (their Python
    bodies, :data:`fastcontrast.ops.IMPLEMENTATIONS`, run under the mode, as the work model does)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", "") == "fastcontrast":
            with self:  # the mode is off inside its own handler: entered again, it sees the body's ops
                return IMPLEMENTATIONS[func._schema.name](*args, **kwargs)
        name = func.overloadpacket.__name__
        # Composite ops (matmul) reach the mode whole, in-place ones under their own name (addmm_).
        if name in ("mm", "matmul", "addmm", "addmm_"):
            left, right = (args[0], args[1]) if name in ("mm", "matmul") else (args[1], args[2])
            assert left.dim() == right.dim() == 2, (name, left.shape, right.shape)
            self.flops += 2 * left.shape[0] * left.shape[1] * right.shape[1]
        return func(*args, **kwargs)


@pytest.mark.parametrize("exclude_positive", [False, True], ids=["ntxent", "dcl"])
def test_counted_gemm_work_is_at_most_2_5_passes_of_the_two_view_matrix(exclude_positive):
    """M = 2N rows of z, d: one pass is 2·M²·d. The two-tower route counts 4 (forward 1, backward S again, dS·B,
    dSᵀ·A); the symmetric route 2 + 1/K with K chunks: the tile over the triangle and its diagonal blocks
    twice (forward and backward: 0.5 + 0.5/K each), the two products over the strict triangle (1 − 1/K) and
    the diagonal blocks' (D + Dᵀ)·Z (1/K)."""
    rows, d = 1024, 64
    z = torch.randn(rows, d, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    weights = torch.ones(2, rows)
    chunk_bytes = 64 * rows * 4  # 64-row chunks: the diagonal blocks add 64 / 1024 of the triangle

    def passes(symmetric):
        with _MatmulFlops() as counter:
            _run(z, scale, TorchEngine(chunk_bytes), exclude_positive, symmetric, weights)
        return counter.flops / (2 * rows * rows * d)

    two_tower, symmetric = passes(False), passes(True)
    assert two_tower == pytest.approx(4.0)
    assert symmetric <= 2.5, symmetric
    assert symmetric == pytest.approx(2.0 + 64 / rows)


def test_an_asymmetric_call_asking_for_symmetry_is_refused():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="symmetric=True needs b=None"):
        BlockwiseLogSumExp.apply(z, z, torch.tensor(1.0), TorchEngine(), True, False, None, None, False, 0, False,
                                 True)


@pytest.mark.parametrize("loss", ["nt_xent", "dcl", "supcon"])
def test_the_single_tower_losses_take_the_symmetric_route(loss):
    """Counted end to end through the public losses on one process: at most 2.5 passes of the M × M matrix
    (M = 2N rows for the two-view losses, N embeddings for SupCon against themselves)."""
    g = torch.Generator().manual_seed(2)
    n, d = 512, 32
    out0, out1 = (torch.randn(n, d, generator=g).requires_grad_() for _ in range(2))
    labels = torch.randint(0, 40, (n,), generator=g)
    chunk_bytes = 32 * 2 * n * 4  # 32-row chunks
    run = {
        "nt_xent": lambda: fc.nt_xent_loss(out0, out1, 0.5, backend="torch", chunk_bytes=chunk_bytes),
        "dcl": lambda: fc.dcl_loss(out0, out1, 0.1, backend="torch", chunk_bytes=chunk_bytes),
        "supcon": lambda: fc.supcon_loss(out0, labels, backend="torch", chunk_bytes=chunk_bytes),
    }[loss]
    rows = n if loss == "supcon" else 2 * n
    with _MatmulFlops() as counter:
        run().backward()
    assert counter.flops / (2 * rows * rows * d) <= 2.5
