"""DistillClipLoss (open_clip 3.x) against open_clip's math (``fastcontrast.reference``), in one process.

Both engines (the blockwise torch engine; the Triton kernels in triton's interpreter), fp64 gradcheck,
fp32 / bf16 / fp16 tolerances, teacher and student dims that differ, teacher features with and without
grad, the memory bound, the FLOP count, and every bad input. The distributed modes are in
``tests/distributed/test_distributed.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    BOUND,
    BOUND_D,
    BOUND_N,
    KERNEL_RELATIVE,
    TensorSizeRecorder,
    assert_close,
)

import fastcontrast as fc
from fastcontrast import DistillClipLoss, reference
from fastcontrast.blockwise import TorchEngine

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")


# Weight of the distillation term in the combined loss whose gradients are compared, so that a swapped or
# missing term shows (the two parts have different gradients).
DISTILL_WEIGHT = 0.7


NAMES = ("image", "text", "scale", "dist_image", "dist_text", "dist_scale")


def _features(n, d, dtype, seed, *, normalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (F.normalize(x, dim=1) if normalize else x).to(dtype)


def _inputs(n, d, d_t, dtype, *, teacher_grad, scale=14.3, dist_scale=30.0, seed=0):
    """Student and teacher leaves; the teacher's image features are a noisy copy of the student's when the
    dims agree, so the two softmaxes are related as in real distillation."""
    image = _features(n, d, dtype, seed + 1).requires_grad_()
    text = _features(n, d, dtype, seed + 2).requires_grad_()
    dist_image = _features(n, d_t, dtype, seed + 3).requires_grad_(teacher_grad)
    dist_text = _features(n, d_t, dtype, seed + 4).requires_grad_(teacher_grad)
    # Scales stay fp32 for half features, as under AMP; fp64 for fp64 (gradcheck).
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=scale_dtype, requires_grad=True)
    s_t = torch.tensor(dist_scale, dtype=scale_dtype, requires_grad=teacher_grad)
    return [image, text, s, dist_image, dist_text, s_t]


def _fp64(tensors):
    return [t.detach().to(torch.float64).requires_grad_(t.requires_grad) for t in tensors]


def _losses_and_grads(fn, tensors):
    contrastive, distill = fn(*tensors)
    wanted = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(contrastive + DISTILL_WEIGHT * distill, wanted, allow_unused=True)
    it = iter(grads)
    return contrastive, distill, [next(it) if t.requires_grad else None for t in tensors]


def _compare(fn, tensors, atol_of_max, loss_atol):
    contrastive, distill, grads = _losses_and_grads(fn, tensors)
    ref_c, ref_d, ref_grads = _losses_and_grads(reference.distill_clip_loss_reference, _fp64(tensors))
    for name, value in (("contrastive", contrastive), ("distill", distill)):
        expected_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        assert value.dtype == expected_dtype, f"{name} loss dtype {value.dtype}, expected {expected_dtype}"
    assert_close("contrastive loss", contrastive, ref_c, atol=loss_atol, rtol=loss_atol)
    assert_close("distill loss", distill, ref_d, atol=loss_atol, rtol=loss_atol)
    for name, t, grad, ref in zip(NAMES, tensors, grads, ref_grads):
        if not t.requires_grad:
            assert grad is None
            continue
        assert grad is not None and grad.dtype == t.dtype, f"d{name}: dtype {None if grad is None else grad.dtype}"
        bound = atol_of_max * max(ref.abs().max().item(), 0.05)
        assert_close(f"d{name}", grad, ref, atol=bound)


SHAPES = [(1, 8, 5), (17, 48, 30), (130, 64, 100), (37, 1000, 48)]


SHAPE_IDS = [f"N{n}-D{d}-Dt{dt}" for n, d, dt in SHAPES]


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["teacher-frozen", "teacher-grad"])
@pytest.mark.parametrize("n,d,d_t", SHAPES, ids=SHAPE_IDS)
def test_distill_clip_loss_matches_open_clip_in_fp32(n, d, d_t, teacher_grad):
    tensors = _inputs(n, d, d_t, torch.float32, teacher_grad=teacher_grad)
    # 3 rows per chunk: ragged chunks, the online column merge across many chunks.
    engine_bytes = 6 * n * 4
    _compare(
        lambda *t: fc.distill_clip_loss(*t, backend="torch", chunk_bytes=engine_bytes),
        tensors, atol_of_max=2e-5, loss_atol=2e-5,
    )


@pytest.mark.parametrize(
    "dtype,rtol",
    [pytest.param(torch.bfloat16, 2**-7, id="bf16"), pytest.param(torch.float16, 2**-10, id="fp16")],
)
def test_distill_clip_loss_half_precision_keeps_fp32_loss_and_one_rounding_of_gradients(dtype, rtol):
    # The fp64 reference runs on the same rounded inputs: what is left is fastcontrast's own error.
    tensors = _inputs(64, 48, 32, dtype, teacher_grad=True, scale=100.0, dist_scale=100.0)
    _compare(lambda *t: fc.distill_clip_loss(*t, backend="torch"), tensors, atol_of_max=rtol, loss_atol=2e-5)


def test_distill_clip_loss_gradcheck_fp64():
    tensors = _inputs(7, 5, 3, torch.float64, teacher_grad=True, scale=2.0, dist_scale=3.0)

    def fn(*t):
        contrastive, distill = fc.distill_clip_loss(*t, backend="torch", chunk_bytes=2 * 7 * 8)
        return contrastive + DISTILL_WEIGHT * distill

    assert torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)], ids=["rows-cols", "rows", "cols"])
def test_blockwise_distill_core_gradcheck_on_rectangles(rows, cols):
    g = torch.Generator().manual_seed(3)
    n, m, d, d_t = 5, 8, 4, 3
    a, b = (torch.randn(k, d, generator=g, dtype=torch.float64, requires_grad=True) for k in (n, m))
    a_t, b_t = (torch.randn(k, d_t, generator=g, dtype=torch.float64, requires_grad=True) for k in (n, m))
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    s_t = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([1, 0, 7, 3, 2])
    engine = TorchEngine(chunk_bytes=2 * m * 8)
    weights = [torch.randn(k, generator=g, dtype=torch.float64) for k in (n, m, n, m, n)]

    def fn(*t):
        outs = fc.blockwise_distill(*t, engine, positives, rows=rows, cols=cols)
        return sum((o * w).sum() for o, w in zip(outs, weights) if o is not None)

    assert torch.autograd.gradcheck(fn, (a, b, s, a_t, b_t, s_t), eps=1e-6, atol=1e-8)


def test_distill_clip_loss_module_returns_a_tuple_or_open_clip_dict():
    tensors = _inputs(9, 6, 4, torch.float32, teacher_grad=False)
    pair = DistillClipLoss(backend="torch")(*tensors)
    as_dict = DistillClipLoss(backend="torch")(*tensors, output_dict=True)
    assert isinstance(pair, tuple) and len(pair) == 2
    assert set(as_dict) == {"contrastive_loss", "distill_loss"}
    assert_close("contrastive_loss", as_dict["contrastive_loss"], pair[0], atol=0.0)
    assert_close("distill_loss", as_dict["distill_loss"], pair[1], atol=0.0)
    # The contrastive part is exactly ClipLoss's.
    assert_close("contrastive vs ClipLoss", pair[0], fc.ClipLoss(backend="torch")(*tensors[:3]), atol=1e-6)


def test_distill_clip_loss_reference_backend_is_open_clip_math():
    tensors = _inputs(11, 6, 4, torch.float64, teacher_grad=False)
    ours = fc.distill_clip_loss(*tensors, backend="reference")
    theirs = reference.distill_clip_loss_reference(*tensors)
    for name, a, b in zip(("contrastive", "distill"), ours, theirs):
        assert_close(name, a, b, atol=0.0)


def test_distill_clip_loss_creates_no_n_squared_tensor(monkeypatch):
    monkeypatch.delenv("FASTCONTRAST_BACKEND", raising=False)
    tensors = _inputs(BOUND_N, BOUND_D, BOUND_D // 2, torch.float32, teacher_grad=False)
    with TensorSizeRecorder() as forward:
        contrastive, distill = DistillClipLoss()(*tensors)
    with TensorSizeRecorder() as backward:
        (contrastive + distill).backward()
    assert tensors[0].grad is not None
    for phase, recorder in (("forward", forward), ("backward", backward)):
        numel, op = recorder.largest()
        assert numel < BOUND, f"{phase}: {op} created a tensor of {numel} elements (bound N²/4 = {BOUND})"


def test_distill_clip_loss_input_errors_name_the_argument():
    image, text, s, dist_image, dist_text, s_t = _inputs(4, 6, 3, torch.float32, teacher_grad=False)
    loss = DistillClipLoss(backend="torch")
    with pytest.raises(ValueError, match="`dist_image_features` must have the student's batch size"):
        loss(image, text, s, dist_image[:3], dist_text[:3], s_t)
    with pytest.raises(TypeError, match="`dist_image_features` must have the student's dtype"):
        loss(image, text, s, dist_image.double(), dist_text.double(), s_t)
    with pytest.raises(ValueError, match="`dist_image_features` and `dist_text_features` must have the same feature"):
        loss(image, text, s, dist_image, dist_text[:, :2], s_t)
    with pytest.raises(ValueError, match="`dist_logit_scale` must be a finite positive number"):
        loss(image, text, s, dist_image, dist_text, -1.0)
    with pytest.raises(ValueError, match="`dist_text_features` must be 2-D"):
        loss(image, text, s, dist_image, dist_text[0], s_t)
    with pytest.raises(ValueError, match="use_horovod"):
        DistillClipLoss(use_horovod=True)


TRITON_TOLERANCE = KERNEL_RELATIVE


TRITON_SHAPES = [(1, 48, 1), (17, 1, 48), (64, 64, 300), (130, 300, 64)]


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d,d_t", TRITON_SHAPES, ids=[f"N{n}-D{d}-Dt{dt}" for n, d, dt in TRITON_SHAPES])
def test_distill_clip_loss_triton_matches_reference(n, d, d_t, dtype):
    tensors = _inputs(n, d, d_t, dtype, teacher_grad=True)
    _compare(
        lambda *t: fc.distill_clip_loss(*t, backend="triton"), tensors,
        atol_of_max=TRITON_TOLERANCE[dtype], loss_atol=1e-5,
    )


@needs_interpreter
@pytest.mark.interpreter
def test_distill_triton_two_pass_forward_matches_single_pass(monkeypatch):
    from fastcontrast.kernels import engine

    tensors = _inputs(70, 40, 24, torch.float32, teacher_grad=True)
    single = _losses_and_grads(lambda *t: fc.distill_clip_loss(*t, backend="triton"), tensors)
    monkeypatch.setattr(engine, "SINGLE_PASS_SCRATCH_BYTES", 0)
    two_pass = _losses_and_grads(lambda *t: fc.distill_clip_loss(*t, backend="triton"), tensors)
    assert_close("contrastive", two_pass[0], single[0], atol=1e-6)
    assert_close("distill", two_pass[1], single[1], atol=1e-6)
    for name, a, b in zip(NAMES, two_pass[2], single[2]):
        assert_close(f"d{name}", a, b, atol=1e-6)


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True)], ids=["rows", "cols"])
def test_blockwise_distill_triton_matches_torch_engine_on_rectangles(rows, cols):
    from fastcontrast.kernels.engine import TritonEngine

    g = torch.Generator().manual_seed(5)
    n, m, d, d_t = 17, 130, 48, 20
    base = [torch.randn(k, dim, generator=g) / dim**0.5 for k, dim in ((n, d), (m, d), (n, d_t), (m, d_t))]
    positives = torch.randint(0, m, (n,), generator=g)
    weights = [torch.randn(k, generator=g) for k in (n, m, n, m, n)]
    results = []
    for engine in (TritonEngine(), TorchEngine()):
        a, b, a_t, b_t = (x.clone().requires_grad_() for x in base)
        s = torch.tensor(12.0, requires_grad=True)
        s_t = torch.tensor(20.0, requires_grad=True)
        outs = fc.blockwise_distill(a, b, s, a_t, b_t, s_t, engine, positives, rows=rows, cols=cols)
        total = sum((o * w).sum() for o, w in zip(outs, weights) if o is not None)
        results.append([total, *torch.autograd.grad(total, (a, b, s, a_t, b_t, s_t))])
    for name, x, y in zip(("total",) + NAMES, *results):
        assert_close(name, x, y, atol=2e-5 * max(y.abs().max().item(), 1.0))


@needs_interpreter
@pytest.mark.interpreter
def test_distill_triton_gradients_are_bitwise_deterministic():
    tensors = _inputs(70, 48, 24, torch.float16, teacher_grad=True)
    first = _losses_and_grads(lambda *t: fc.distill_clip_loss(*t, backend="triton"), tensors)
    second = _losses_and_grads(lambda *t: fc.distill_clip_loss(*t, backend="triton"), tensors)
    for name, a, b in zip(NAMES, first[2], second[2]):
        assert torch.equal(a, b), f"d{name} differs between two runs"


@needs_interpreter
def test_distill_forward_and_backward_gemm_passes_are_counted():
    """Counted tl.dot work, in GEMM passes of 2·n·m·d (teacher and student of equal d here).

    Forward: one pass computes both tiles (2 passes) and, with the column partials, both directions.
    Backward, frozen teacher: dA and dB, each recomputing both tiles plus dS·Y (3 + 3). A teacher that
    requires grad adds its own two kernels (3 + 3). Naive (open_clip): 2 logits GEMMs forward, 2 for the
    student's gradients (4 passes), 2 more for a teacher with grad.
    """
    from fastcontrast.kernels.work_count import count_work, gemm_passes

    n, d = 256, 64
    for teacher_grad, expected_backward in ((False, 6.0), (True, 12.0)):
        tensors = _inputs(n, d, d, torch.float16, teacher_grad=teacher_grad)
        with count_work() as forward:
            contrastive, distill = fc.distill_clip_loss(*tensors, backend="triton")
        with count_work() as backward:
            (contrastive + distill).backward()
        assert gemm_passes(forward.flops, n, n, d) == 2.0
        assert gemm_passes(backward.flops, n, n, d) == expected_backward
