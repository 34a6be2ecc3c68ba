"""Counted work of the Triton kernels (docs/kernels.md#work-counted), counted in the interpreter, not estimated.

One GEMM pass is 2·n·m·d FLOPs over the similarity matrix. Budgets: symmetric CLIP ≤ 6 passes forward +
backward, 5 with the single-pass forward (naive = 3, Inf-CL's two one-directional calls = 10). NT-Xent
(2n×2n matrix, one direction) is held to 2.5 on the panel path (test_symmetric_kernels.py); SigLIP, whose
gradient is formed in the forward, to 5 with the fused gradient and 3 on the panel path (every real CLIP width).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastcontrast as fc

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="tl.dot is counted in the interpreter (TRITON_INTERPRET=1)"
)

N, D = 256, 64


def _count(loss_fn, *tensors):
    from fastcontrast.kernels.work_count import count_work, gemm_passes

    with count_work() as forward:
        loss = loss_fn(*tensors)
    with count_work() as backward:
        loss.backward()
    return forward, backward, gemm_passes


def _inputs(n=N, d=D):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g, dtype=torch.float16).requires_grad_()
    b = torch.randn(n, d, generator=g, dtype=torch.float16).requires_grad_()
    return a, b


def test_clip_forward_and_backward_cost_five_gemm_passes():
    a, b = _inputs()
    scale = torch.tensor(10.0, requires_grad=True)
    forward, backward, passes = _count(lambda x, y: fc.clip_loss(x, y, scale, backend="triton"), a, b)
    assert passes(forward.flops, N, N, D) == 1.0, "single-pass forward: row and column LSE from one pass"
    assert passes(backward.flops, N, N, D) == 4.0, "backward: dA and dB kernels, each S recompute + dS·X"
    assert passes(forward.flops + backward.flops, N, N, D) <= 6


def test_clip_forward_falls_back_to_two_passes_when_column_scratch_is_too_big(monkeypatch):
    from fastcontrast.kernels import engine

    monkeypatch.setattr(engine, "SINGLE_PASS_SCRATCH_BYTES", 0)
    a, b = _inputs()
    forward, backward, passes = _count(lambda x, y: fc.clip_loss(x, y, 10.0, backend="triton"), a, b)
    assert passes(forward.flops, N, N, D) == 2.0
    assert passes(forward.flops + backward.flops, N, N, D) == 6.0


def test_siglip_computes_its_gradient_in_the_forward_sweep_and_the_backward_launches_nothing():
    # Fused width (d ≤ the on-chip accumulator): the forward kernel's sum, then the dA and dB kernels, each
    # S recompute + dS·X: 5 passes, all in the forward; the backward only multiplies by its upstream gradient.
    a, b = _inputs()
    forward, backward, passes = _count(lambda x, y: fc.siglip_loss(x, y, 10.0, -10.0, backend="triton"), a, b)
    assert passes(forward.flops, N, N, D) == 5.0
    assert backward.flops == 0 and backward.bytes_requested == 0


def test_siglip_without_a_gradient_is_one_pass():
    a, b = _inputs()
    from fastcontrast.kernels.work_count import count_work, gemm_passes

    for context in (torch.no_grad(), torch.enable_grad()):
        with context, count_work() as forward:
            fc.siglip_loss(a.detach(), b.detach(), 10.0, -10.0, backend="triton")
        assert gemm_passes(forward.flops, N, N, D) == 1.0


def test_nt_xent_at_the_fused_width_costs_its_triangle_forward_and_four_backward_passes():
    # S is symmetric: the forward reduces its upper block triangle (8 row blocks of 32: ½ + 1/16). The fused
    # gradient (d ≤ 64) forms dS·Z and dSᵀ·Z, each recomputing S; above it, test_symmetric_kernels.py (≤ 2.5).
    a, b = _inputs(N // 2)
    forward, backward, passes = _count(lambda x, y: fc.nt_xent_loss(x, y, 0.1, backend="triton"), a, b)
    assert passes(forward.flops, N, N, D) == 0.5 + 1 / 16
    assert passes(backward.flops, N, N, D) == 4.0


def test_bytes_are_counted_and_cover_at_least_the_inputs():
    a, b = _inputs()
    forward, backward, _ = _count(lambda x, y: fc.clip_loss(x, y, 10.0, backend="triton"), a, b)
    # Each pass reads all of A and B at least once (fp16: 2 bytes per element).
    assert forward.bytes_loaded >= 2 * N * D * 2
    assert backward.bytes_stored >= 2 * N * D * 4, "fp32 dA and dB are written"


@pytest.fixture
def aligned_panels(monkeypatch):
    """Interpreter panels whose sides are multiples of every tile (the default 64 × 96 is ragged on purpose):
    FLOPs then count whole passes exactly."""
    from fastcontrast.kernels import configs

    monkeypatch.setattr(configs, "INTERPRETER_PANEL", configs.PanelConfig(rows=64, cols=128))


def test_above_the_fused_width_the_panel_backward_costs_three_passes(aligned_panels):
    # d > the fused gradient's width: dS is written once per panel and multiplied out by two GEMMs
    # (dS·B and dSᵀ·A), so the backward recomputes S once instead of twice.
    d = 128
    a, b = _inputs(d=d)
    forward, backward, passes = _count(lambda x, y: fc.clip_loss(x, y, 10.0, backend="triton"), a, b)
    assert passes(forward.flops, N, N, d) == 1.0
    assert passes(backward.flops, N, N, d) == 3.0


@pytest.mark.parametrize("d", [128, 256])
def test_siglip_above_the_fused_width_costs_three_passes_in_all(d, aligned_panels):
    # SigLIP's dS needs no LSE: the forward under grad writes each dS panel as it computes S (and sums the
    # loss from the same tile) and multiplies it out: S, dS·B, dSᵀ·A; the backward launches nothing.
    a, b = _inputs(d=d)
    forward, backward, passes = _count(lambda x, y: fc.siglip_loss(x, y, 10.0, -10.0, backend="triton"), a, b)
    assert passes(forward.flops, N, N, d) == 3.0
    assert backward.flops == 0 and backward.bytes_requested == 0


def test_panel_backward_moves_no_n_m_d_sized_read_modify_write(aligned_panels):
    # The old d > 256 path read-modify-wrote fp32 output rows once per column block: 8·n·m·d/BLOCK_N bytes.
    # The panel path stores dS once (n·m input-dtype elements) and each output block once per panel.
    from fastcontrast.kernels.configs import INTERPRETER_CONFIG, INTERPRETER_PANEL

    d = 128
    a, b = _inputs(d=d)
    forward, backward, _ = _count(lambda x, y: fc.clip_loss(x, y, 10.0, backend="triton"), a, b)
    old_path_bytes = 8 * N * N * d // INTERPRETER_CONFIG.block_n
    ds_bytes = N * N * 2
    # dA: every row panel's output once per column panel (fp32), dB likewise.
    outputs = 4 * d * (N * (N // INTERPRETER_PANEL.cols) + N * (N // INTERPRETER_PANEL.rows))
    assert backward.bytes_stored <= ds_bytes + outputs + 8 * N * d  # + the final casts of dA, dB
    assert backward.bytes_stored < old_path_bytes


MNRL_WORK_CASES = {  # directions, hardness mode, candidate columns per query row (n = 64, k = 1 hard negative)
    "q2d": (("query_to_doc",), None, 2),
    "q2d-all-negatives": (("query_to_doc",), "all_negatives", 2),
    "all4-all-negatives": (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "all_negatives", 6),
}


@pytest.mark.parametrize("case", list(MNRL_WORK_CASES))
def test_mnrl_costs_one_forward_and_three_backward_passes_over_its_candidate_blocks(case, aligned_panels):
    """sentence-transformers' MNRL on the engine's general features: a rectangular candidate set (n queries ×
    n·(1 + k) documents), structural masks (self in query_to_query, the own entries of each block under a
    hardness mode), the hardness term (each block's LSE at its own scale). However the blocks are split, S is
    read once forward and its panels recomputed once backward: 1 + 3 passes over every candidate column the
    directions build (the own entries are O(n·d) row dots, not a pass)."""
    directions, hardness, columns = MNRL_WORK_CASES[case]
    n, d = 64, 128
    g = torch.Generator().manual_seed(1)
    embeddings = [torch.randn(n, d, generator=g, dtype=torch.float16).requires_grad_() for _ in range(3)]
    loss = fc.MultipleNegativesRankingLoss(None, directions=directions, hardness_mode=hardness,
                                           hardness_strength=2.0 if hardness else 0.0, backend="triton")
    forward, backward, passes = _count(lambda *e: loss.compute_loss_from_embeddings(list(e), None), *embeddings)
    assert passes(forward.flops, n, n * columns, d) == 1.0
    assert passes(backward.flops, n, n * columns, d) == 3.0
