"""The Triton engine's masked log-sum-exp (kernels/masked.py), in triton's interpreter: candidates left out by a
rule computed in the tile (the model's own similarity or a guide's against a per-row threshold), the positive
protected, self excluded, against the fp64 full-matrix reference of the same inputs; ties with the threshold;
every route (one panel or several, d in one K chunk or many, N = 1, N ≠ M); the fp16 gradient scale; the GEMM
work counted: the forward one pass (two with a guide), the backward three (four).
"""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import TOLERANCES, assert_close

from fastcontrast.losses._masked_lse import false_negative_lse, guide_masked_lse, rule_similarity

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on CPU-only machines with TRITON_INTERPRET=1 (set in conftest.py)",
    ),
]

SCALE = 9.0


def _unit(n, d, g, dtype):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _reference(a, b, scale, rule, threshold, protect, exclude):
    """fp64 (lse, positives) of the masked LSE on full matrices: rule [n, m] compared with threshold [n]."""
    a, b = a.double(), b.double()
    n, m = a.shape[0], b.shape[0]
    rows, cols = torch.arange(n).unsqueeze(1), torch.arange(m).unsqueeze(0)
    dropped = rule > threshold.double().unsqueeze(1)
    if protect is not None:
        dropped &= cols != rows + protect
    if exclude is not None:
        dropped |= cols == rows + exclude
    logits = scale * a @ b.T
    lse = torch.logsumexp(logits.masked_fill(dropped, float("-inf")), dim=1)
    positives = logits[torch.arange(n), torch.arange(n) + protect] if protect is not None else None
    return lse, positives


# (n, m, d): N = 1, ragged rows and columns, N ≠ M both ways, d in one K chunk (≤ 64 here) or many (1000),
# several panels (the interpreter's are 64 × 96).
SHAPES = [(1, 1, 48), (1, 7, 16), (37, 70, 48), (70, 37, 48), (100, 130, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, m, d", SHAPES, ids=[f"{n}x{m}-d{d}" for n, m, d in SHAPES])
@pytest.mark.parametrize("guided", [False, True], ids=["own", "guide"])
def test_masked_lse_matches_the_fp64_reference(n, m, d, dtype, guided):
    g = torch.Generator().manual_seed(n + m + d)
    a, b = _unit(n, d, g, dtype), _unit(m, d, g, dtype)
    protect = 0 if n <= m else None
    exclude = 1 if n + 1 <= m and protect is not None else None
    if guided:
        a_guide, b_guide = _unit(n, 24, g, torch.float32), _unit(m, 24, g, torch.float32)
        reference_rule = a_guide.double() @ b_guide.double().T
    else:
        a_guide = b_guide = None
        reference_rule = a.double() @ b.double().T
    # Thresholds as the losses build them: the reference pair's similarity in the kernels' arithmetic, a margin.
    if protect is not None:
        pair = rule_similarity(a_guide if guided else a, b_guide if guided else b, protect, backend="triton",
                               guide=guided, model_dtype=dtype)
        threshold = pair - 0.02
    else:
        threshold = torch.full((n,), 0.1)
    assert (reference_rule > threshold.double().unsqueeze(1)).any() or n == 1, "the rule leaves nothing out"
    live = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    weights = torch.rand(n, generator=g)
    lse = guide_masked_lse(*live, a_guide, b_guide, threshold, SCALE, protect_offset=protect, exclude_offset=exclude,
                           backend="triton")
    grads = torch.autograd.grad((weights * lse).sum(), live)
    ref_live = [a.double().requires_grad_(), b.double().requires_grad_()]
    ref_lse, _ = _reference(*ref_live, SCALE, reference_rule, threshold, protect, exclude)
    ref_grads = torch.autograd.grad((weights.double() * ref_lse).sum(), ref_live)
    atol, rtol = TOLERANCES[dtype]
    assert_close("lse", lse, ref_lse, atol, rtol)
    for name, got, expected in zip(("dA", "dB"), grads, ref_grads):
        assert_close(name, got.double(), expected, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_false_negative_rule_with_positives_argmax_and_a_learned_scale(dtype):
    """CLIP's call: positives from the same tiles, argmax of the unmasked similarity, the scale's gradient; at
    scale 100 (open_clip's cap), where fp16's dS needs its power-of-two scale (tiles.as_dot_operand)."""
    g = torch.Generator().manual_seed(3)
    n, m, d = 45, 45, 48
    a, b = _unit(n, d, g, dtype), _unit(m, d, g, dtype)
    for scale_value, margin in ((SCALE, 0.0), (100.0, -0.05)):
        live = [a.clone().requires_grad_(), b.clone().requires_grad_(), torch.tensor(scale_value, requires_grad=True)]
        lse, pos, argmax = false_negative_lse(*live[:2], live[2], margin, positive_offset=0, need_argmax=True,
                                              backend="triton")
        grads = torch.autograd.grad((lse - pos).mean(), live)
        ref_live = [a.double().requires_grad_(), b.double().requires_grad_(),
                    torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)]
        sim = ref_live[0] @ ref_live[1].T
        threshold = sim.diagonal().detach() + margin
        ref_lse, ref_pos = _reference(ref_live[0], ref_live[1], 1.0, sim.detach(), threshold, 0, None)
        # The scale enters as s·sim: rebuild with the tensor scale so that its gradient flows.
        logits = ref_live[2] * sim
        kept = ~((sim.detach() > threshold.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool))
        ref_lse = torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=1)
        ref_pos = logits.diagonal()
        ref_grads = torch.autograd.grad((ref_lse - ref_pos).mean(), ref_live)
        atol, rtol = TOLERANCES[dtype]
        what = f"{dtype} scale={scale_value}"
        assert_close(f"{what}: lse − positive", lse - pos, (ref_lse - ref_pos).detach(), atol * scale_value / SCALE,
                     rtol)
        assert torch.equal(argmax, (a.double() @ b.double().T).argmax(dim=1)), f"{what}: argmax"
        for name, got, expected in zip(("dA", "dB", "ds"), grads, ref_grads):
            assert torch.isfinite(got).all(), f"{what}: {name} not finite"
            assert_close(f"{what}: {name}", got.double(), expected, atol, rtol)


def test_a_candidate_equal_to_the_positive_ties_with_the_threshold_in_forward_and_backward():
    """Columns 10 and 11 repeat row 0's and row 1's positives. At margin 0 each scores exactly its row's threshold
    (the kernels' own arithmetic, pair_similarity_kernel) and stays, in the forward's LSE and in the backward's
    dS alike: the loss and gradients equal the reference that keeps them, and differ from one that drops them."""
    g = torch.Generator().manual_seed(5)
    n, m, d = 12, 40, 200  # d > one K chunk: the tie must survive the chunked accumulation too
    a, b = _unit(n, d, g, torch.float32), _unit(m, d, g, torch.float32)
    b[10], b[11] = b[0], b[1]
    live = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    lse, pos, _ = false_negative_lse(*live, SCALE, 0.0, positive_offset=0, backend="triton")
    grads = torch.autograd.grad((lse - pos).sum(), live)
    for keep in (True, False):
        ref_live = [a.double().requires_grad_(), b.double().requires_grad_()]
        sim = ref_live[0] @ ref_live[1].T
        dropped = sim.detach() > sim.detach().diagonal().unsqueeze(1)
        dropped.fill_diagonal_(False)
        dropped[0, 10] = dropped[1, 11] = not keep
        logits = SCALE * sim
        ref = (torch.logsumexp(logits.masked_fill(dropped, float("-inf")), 1) - logits.diagonal()).sum()
        ref_grads = torch.autograd.grad(ref, ref_live)
        close = abs((lse - pos).sum().item() - ref.item()) < 1e-4 and all(
            torch.allclose(x.double(), y, atol=1e-5) for x, y in zip(grads, ref_grads))
        assert close == keep, f"the duplicated positives were {'dropped' if keep else 'kept'}"


def test_a_row_with_every_candidate_left_out_has_lse_minus_inf_and_no_gradient():
    g = torch.Generator().manual_seed(6)
    a, b = _unit(5, 16, g, torch.float32), _unit(9, 16, g, torch.float32)
    threshold = torch.tensor([-2.0, 2.0, -2.0, 2.0, -2.0])  # rows 0, 2, 4 drop every column
    live = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    lse = guide_masked_lse(*live, None, None, threshold, SCALE, backend="triton")
    assert torch.isinf(lse[[0, 2, 4]]).all() and torch.isfinite(lse[[1, 3]]).all()
    grad_a, grad_b = torch.autograd.grad(lse[[1, 3]].sum(), live)
    assert (grad_a[[0, 2, 4]] == 0).all() and torch.isfinite(grad_b).all()


def _count_passes(guided):
    from fastcontrast.kernels.work_count import count_work

    g = torch.Generator().manual_seed(0)
    n, m, d = 64, 128, 64  # multiples of the interpreter's tiles and panels: the counts are exact
    a, b = _unit(n, d, g, torch.float16).requires_grad_(), _unit(m, d, g, torch.float16).requires_grad_()
    guides = (_unit(n, d, g, torch.float32), _unit(m, d, g, torch.float32)) if guided else (None, None)
    threshold = torch.zeros(n)
    with count_work() as forward:
        lse = guide_masked_lse(a, b, *guides, threshold, SCALE, protect_offset=0, backend="triton")
    with count_work() as backward:
        lse.sum().backward()
    with count_work() as pair:
        rule_similarity(guides[0] if guided else a, guides[1] if guided else b, 0, backend="triton", guide=guided,
                        model_dtype=torch.float16)
    one_pass = 2 * n * m * d
    return forward.flops / one_pass, backward.flops / one_pass, pair.flops / one_pass


@pytest.fixture
def aligned_panels(monkeypatch):
    """Interpreter panels whose sides are multiples of every tile (the default 64 × 96 is ragged on purpose, and
    its GEMMs' K chunks would count padding)."""
    from fastcontrast.kernels import configs

    monkeypatch.setattr(configs, "INTERPRETER_PANEL", configs.PanelConfig(rows=64, cols=128))


@pytest.mark.parametrize("guided", [False, True], ids=["own", "guide"])
def test_gemm_work_is_one_pass_forward_and_three_backward_plus_the_guides(guided, aligned_panels):
    """Counted in the interpreter: the forward reads S once (and the guide's tile beside it), the backward
    recomputes S once for its dS panels (and the guide's tile for the mask) and multiplies them out in two GEMMs.
    A threshold's pair similarities cost one tile per row block: BLOCK_M / m of a pass."""
    forward, backward, pair = _count_passes(guided)
    assert forward == 1 + guided
    assert backward == 3 + guided
    assert pair == 32 / 128  # the interpreter's BLOCK_M = 32 against m = 128 columns
