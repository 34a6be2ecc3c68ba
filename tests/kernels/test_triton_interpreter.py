"""The Triton kernels in triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) against the references.

Every kernel runs through every loss (CLIP, NT-Xent, DCL, memory bank, SigLIP) and through the core directly
(rectangular n ≠ m, offsets), in fp32, bf16 and fp16, with ragged sizes. Sizes stay small: the
interpreter executes tiles as numpy arrays.
"""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import KERNEL_RELATIVE, assert_close, dcl_variant_loss, dcl_variant_reference

import fastcontrast as fc
from fastcontrast import reference

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on CPU-only machines with TRITON_INTERPRET=1 (set in conftest.py)",
    ),
]

# Max error relative to the largest reference magnitude of that tensor (the package's tolerance table).
RELATIVE_TOLERANCE = KERNEL_RELATIVE


def _features(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Unit-norm rows, as CLIP models hand them over; the scale then sets the logit range.
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype).requires_grad_()


def _as_fp64_leaf(x):
    return x.detach().to(torch.float64).requires_grad_()


def _check(name, dtype, actual, expected):
    # Relative to the tensor's largest magnitude, with a floor for tensors that are exactly 0 in the
    # reference (N = 1: a one-element softmax has zero gradient; rounding leaves ~1e-7 behind).
    floor = 1.0 if name == "loss" else 0.05
    scale = max(expected.detach().abs().max().item(), floor)
    assert_close(name, actual, expected, atol=RELATIVE_TOLERANCE[dtype] * scale)


def _compare(loss_fn, ref_fn, tensors, names, dtype):
    """Run loss_fn on ``tensors`` and ref_fn on fp64 copies; compare the loss and every gradient by name."""
    loss = loss_fn(*tensors)
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}, expected fp32"
    grads = torch.autograd.grad(loss, tensors)
    ref_tensors = [_as_fp64_leaf(t) for t in tensors]
    ref_loss = ref_fn(*ref_tensors)
    ref_grads = torch.autograd.grad(ref_loss, ref_tensors)
    if torch.isneginf(ref_loss):  # DCL at N = 1: no negatives, −inf in lightly too
        assert torch.isneginf(loss), f"loss {loss.item()}, expected -inf"
    else:
        _check("loss", dtype, loss, ref_loss)
    for name, tensor, grad, ref_grad in zip(names, tensors, grads, ref_grads):
        assert grad.dtype == tensor.dtype, f"d{name} dtype {grad.dtype}, expected {tensor.dtype}"
        _check(f"d{name}", dtype, grad, ref_grad)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (n, d) covering every n in {1, 17, 64, 130} and every d in {1, 48, 64, 300} at least once per loss,
# with the chunked-d path (d = 300 > BLOCK_D = 64) and ragged blocks (17, 130 vs block 32).
CLIP_SHAPES = [(1, 48), (17, 1), (64, 64), (130, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", CLIP_SHAPES, ids=[f"N{n}-D{d}" for n, d in CLIP_SHAPES])
def test_clip_loss_triton_matches_reference(n, d, dtype):
    image, text = _features(n, d, dtype, 1), _features(n, d, dtype, 2)
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-2.5, requires_grad=True)
    _compare(
        lambda i, t, s, b: fc.clip_loss(i, t, s, b, backend="triton"),
        reference.clip_loss_reference,
        [image, text, scale, bias], ["image", "text", "scale", "bias"], dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", CLIP_SHAPES, ids=[f"N{n}-D{d}" for n, d in CLIP_SHAPES])
def test_siglip_loss_triton_matches_reference(n, d, dtype):
    image, text = _features(n, d, dtype, 3), _features(n, d, dtype, 4)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    _compare(
        lambda i, t, s, b: fc.siglip_loss(i, t, s, b, backend="triton"),
        reference.siglip_loss_reference,
        [image, text, scale, bias], ["image", "text", "scale", "bias"], dtype,
    )


NTXENT_SHAPES = [(1, 64), (17, 48), (64, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", NTXENT_SHAPES, ids=[f"N{n}-D{d}" for n, d in NTXENT_SHAPES])
def test_nt_xent_loss_triton_matches_reference(n, d, dtype):
    out0, out1 = _features(n, d, dtype, 5), _features(n, d, dtype, 6)
    _compare(
        lambda a, b: fc.nt_xent_loss(a, b, 0.1, backend="triton"),
        lambda a, b: reference.nt_xent_loss_reference(a, b, 0.1),
        [out0, out1], ["out0", "out1"], dtype,
    )


# DCL: the same kernels with each row's positive masked out of its LSE (EXCLUDE_POSITIVE). A covering
# design rather than the product: every variant, dtype and shape appears, with N = 1 (−inf, no negatives),
# ragged N (17, 33 vs block 32), d = 48, d = 1000 (chunked d) and N = 128 (several row blocks).
DCL_TRITON_CASES = [
    ("DCLLoss", 1, 64, torch.float32),
    ("DCLLoss", 17, 48, torch.bfloat16),
    ("DCLLoss", 33, 1000, torch.float16),
    ("DCLWLoss", 17, 48, torch.float16),
    ("DCLWLoss", 128, 64, torch.float32),
    ("dcl_loss-weight_fn", 17, 48, torch.float32),
    ("dcl_loss-weight_fn", 33, 1000, torch.bfloat16),
]


@pytest.mark.parametrize(
    "variant,n,d,dtype", DCL_TRITON_CASES,
    ids=[f"{v}-N{n}-D{d}-{DTYPE_IDS[DTYPES.index(t)]}" for v, n, d, t in DCL_TRITON_CASES],
)
def test_dcl_loss_triton_matches_reference(variant, n, d, dtype):
    out0, out1 = _features(n, d, dtype, 5), _features(n, d, dtype, 6)
    _compare(
        lambda a, b: dcl_variant_loss(variant, a, b, 0.1, backend="triton"),
        lambda a, b: dcl_variant_reference(variant, a, b, 0.1),
        [out0, out1], ["out0", "out1"], dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_memory_bank_loss_triton_matches_reference(dtype):
    n, d, bank_size = 17, 48, 130
    out0, out1 = _features(n, d, dtype, 7), _features(n, d, dtype, 8)
    bank = torch.nn.functional.normalize(torch.randn(bank_size, d, generator=torch.Generator().manual_seed(9)), dim=1)
    _compare(
        lambda a, b: fc.nt_xent_memory_bank_loss(a, b, bank, 0.2, backend="triton"),
        lambda a, b: reference.nt_xent_memory_bank_loss_reference(a, b, bank.double(), 0.2),
        [out0, out1], ["out0", "out1"], dtype,
    )


def test_nt_xent_module_with_memory_bank_runs_triton_kernels():
    torch.manual_seed(0)
    loss_fn = fc.NTXentLoss(temperature=0.3, memory_bank_size=(64, 48), backend="triton")
    ref_bank = loss_fn.memory_bank.bank.clone()
    out0, out1 = _features(17, 48, torch.float32, 10), _features(17, 48, torch.float32, 11)
    loss = loss_fn(out0, out1)
    expected = reference.nt_xent_memory_bank_loss_reference(out0, out1, ref_bank, 0.3)
    assert_close("loss", loss, expected, atol=1e-5)


# The core on rectangles (n ≠ m), with exclusion / positive offsets whose diagonal falls partly outside.
# (A single row with its only entry of some column excluded would leave that column empty: LSE −inf in
# the reference too, so the single-row and single-column cases run without exclusion.)
RECTANGLES = [(17, 130, 1, 5), (130, 17, 48, -3), (64, 1, 64, None), (1, 64, 300, None)]
RECTANGLE_IDS = [f"N{n}-M{m}-D{d}-off{o}" for n, m, d, o in RECTANGLES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,m,d,offset", RECTANGLES, ids=RECTANGLE_IDS)
def test_blockwise_lse_triton_matches_materialised_logsumexp_on_rectangles(n, m, d, offset, dtype):
    a, b = _features(n, d, dtype, 12), _features(m, d, dtype, 13)
    scale = torch.tensor(7.0, requires_grad=True)
    g = torch.Generator().manual_seed(14)
    grad_row, grad_col = torch.randn(n, generator=g), torch.randn(m, generator=g)

    def core(a, b, s):
        engine = fc._dispatch.resolve_engine("triton", a.device)
        row, col = fc.blockwise_lse(a, b, s, engine, rows=True, cols=True, exclude_offset=offset)
        return (row * grad_row).sum() + (col * grad_col).sum()

    def materialised(a, b, s):
        logits = s * a @ b.T
        if offset is not None:
            rows = torch.arange(n)
            keep = (rows + offset >= 0) & (rows + offset < m)
            minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype)
            logits = logits.index_put((rows[keep], rows[keep] + offset), minus_inf)
        return (torch.logsumexp(logits, 1) * grad_row.double()).sum() + (
            torch.logsumexp(logits, 0) * grad_col.double()
        ).sum()

    _compare(core, materialised, [a, b, scale], ["a", "b", "scale"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,m,d,offset", RECTANGLES, ids=RECTANGLE_IDS)
def test_siglip_sum_triton_matches_reference_on_rectangles(n, m, d, offset, dtype):
    a, b = _features(n, d, dtype, 15), _features(m, d, dtype, 16)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    offset = 3 if offset is None else offset

    def core(a, b, s, bias):
        engine = fc._dispatch.resolve_engine("triton", a.device)
        return fc.blockwise_siglip_sum(a, b, s, bias, engine, positive_offset=offset)

    def ref(a, b, s, bias):
        return reference.siglip_loss_reference(a, b, s, bias, positive_offset=offset) * a.shape[0]

    _compare(core, ref, [a, b, scale, bias], ["a", "b", "scale", "bias"], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scale_100_in_half_precision_does_not_overflow(dtype):
    # Logits up to ±100 overflow nothing in fp32, but exp(100) would overflow fp16 if any stage used it.
    image, text = _features(64, 48, dtype, 17), _features(64, 48, dtype, 18)
    scale = torch.tensor(100.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    for loss_fn, ref_fn in ((fc.clip_loss, reference.clip_loss_reference),
                            (fc.siglip_loss, reference.siglip_loss_reference)):
        _compare(
            lambda i, t, s, b, loss_fn=loss_fn: loss_fn(i, t, s, b, backend="triton"),
            ref_fn, [image, text, scale, bias], ["image", "text", "scale", "bias"], dtype,
        )


def test_triton_gradients_are_bitwise_deterministic():
    image, text = _features(130, 48, torch.bfloat16, 19), _features(130, 48, torch.bfloat16, 20)
    scale = torch.tensor(20.0, requires_grad=True)
    runs = []
    for _ in range(2):
        loss = fc.clip_loss(image, text, scale, backend="triton")
        runs.append([loss, *torch.autograd.grad(loss, [image, text, scale])])
    for name, first, second in zip(["loss", "dimage", "dtext", "dscale"], *runs):
        assert torch.equal(first, second), f"{name} differs between two identical runs"


def test_new_scale_value_needs_no_recompile_and_is_read_from_the_tensor():
    image, text = _features(17, 48, torch.float32, 21), _features(17, 48, torch.float32, 22)
    for value in (1.0, 50.0):
        scale = torch.tensor(value)
        assert_close(
            f"loss at scale {value}",
            fc.clip_loss(image, text, scale, backend="triton"),
            reference.clip_loss_reference(image.double(), text.double(), value),
            atol=1e-5,
        )


@pytest.mark.parametrize("d", [1000, 4096], ids=["D1000", "D4096"])
def test_large_feature_dims_accumulate_in_fp32_rows(d):
    # d far above BLOCK_D: the S tile loops over d and the gradient read-modify-writes its fp32 rows.
    image, text = _features(5, d, torch.float16, 23), _features(5, d, torch.float16, 24)
    scale = torch.tensor(30.0, requires_grad=True)
    _compare(
        lambda i, t, s: fc.clip_loss(i, t, s, backend="triton"),
        reference.clip_loss_reference,
        [image, text, scale], ["image", "text", "scale"], torch.float16,
    )


def test_non_contiguous_features_give_the_same_result():
    base = _features(48, 17, torch.float32, 25).detach()
    image = base.T  # [17, 48] with row stride 1: copied once, since the kernels need unit stride along d
    text = _features(34, 48, torch.float32, 26).detach()[::2]  # every other row: row stride 96, kept as is
    expected = fc.clip_loss(image.contiguous(), text.contiguous(), 10.0, backend="triton")
    assert_close("loss", fc.clip_loss(image, text, 10.0, backend="triton"), expected, atol=1e-6)


def test_float64_features_are_refused_by_the_triton_engine_with_a_pointer_to_torch():
    a = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        fc.clip_loss(a, a, 10.0, backend="triton")


# ---- the GPU tile configs and the split-K panel GEMM, in the interpreter -------------------------------------


@pytest.mark.parametrize("d", [200, 320], ids=["fused-D200", "panel-D320"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hopper_tile_configs_give_the_reference(d, dtype):
    # The interpreter normally runs small tiles; here the engine takes the configs an H100 would: 128-row
    # tiles, the fused gradient with its accumulator up to d = 256 (bf16; fp32 up to 128, then the panel path),
    # 4096-wide panels, column splits sized for 132 SMs.
    from fastcontrast.kernels.configs import assume_target

    image, text = _features(150, d, dtype, 31), _features(150, d, dtype, 32)
    scale = torch.tensor(14.3, requires_grad=True)
    with assume_target(("cuda", 90)):
        _compare(
            lambda i, t, s: fc.clip_loss(i, t, s, backend="triton"),
            reference.clip_loss_reference,
            [image, text, scale], ["image", "text", "scale"], dtype,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_panel_gemm_split_along_the_reduction_gives_the_reference(dtype, monkeypatch):
    # Few rows against many columns (a per-rank local loss): the dSᵀ·A GEMM has few output tiles, so its
    # reduction is split across programs and the slabs summed in a fixed order.
    from fastcontrast.kernels import configs, gradient_launch, launch

    monkeypatch.setattr(launch, "INTERPRETER_TARGET_PROGRAMS", 64)
    # One panel over all 300 columns: dS·B reduces over 300, in two splits of 256 and a ragged 44.
    monkeypatch.setattr(configs, "INTERPRETER_PANEL", configs.PanelConfig(rows=64, cols=512))
    launches = []
    real = gradient_launch.panel_matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(gradient_launch, "panel_matmul_kernel", Spy())
    from fastcontrast._dispatch import resolve_engine

    rows, cols = _features(20, 100, dtype, 33), _features(300, 100, dtype, 34)
    scale = torch.tensor(9.0, requires_grad=True)
    positives = torch.arange(20) * 7
    triton_engine = resolve_engine("triton", rows.device, dtype, None)

    def loss(a, b, s):
        lse, _, pos = fc.blockwise_lse_and_positives(a, b, s, triton_engine, positives)
        return (lse - pos).sum()

    def expected(a, b, s):
        return (torch.logsumexp(s * a @ b.T, dim=1) - s * (a * b[positives]).sum(dim=1)).sum()

    _compare(loss, expected, [rows, cols, scale], ["rows", "cols", "scale"], dtype)
    assert any(grid[1] > 1 for grid in launches), f"no split-K launch: {launches}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_reductions_add_up_over_many_panels_in_one_slab(dtype, monkeypatch):
    # Ragged panels in both directions (350 rows and 330 columns in 160 × 160 panels, 32-deep K blocks), each
    # GEMM's reduction split in two (a ragged last panel in one): the splits of every panel add into one slab
    # per output, in the kernel, summed once at the end. No torch op per panel: one sum per output is left.
    from fastcontrast.kernels import configs, gradient_launch, launch

    monkeypatch.setattr(launch, "INTERPRETER_TARGET_PROGRAMS", 256)
    monkeypatch.setattr(configs, "INTERPRETER_PANEL", configs.PanelConfig(rows=160, cols=160))
    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", configs.KernelConfig(32, 32, 32, num_warps=1, num_stages=1))
    grids, slab_sums = [], []
    real = gradient_launch.panel_matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(gradient_launch, "panel_matmul_kernel", Spy())
    result = gradient_launch.PanelOutput.result

    def counted_result(self):
        slab_sums.append(self.splits)
        return result(self)

    monkeypatch.setattr(gradient_launch.PanelOutput, "result", counted_result)
    from fastcontrast._dispatch import resolve_engine

    rows, cols = _features(350, 48, dtype, 35), _features(330, 48, dtype, 36)
    scale = torch.tensor(7.0, requires_grad=True)
    positives = (torch.arange(350) * 7) % 330
    triton_engine = resolve_engine("triton", rows.device, dtype, None)

    def loss(a, b, s):
        lse, _, pos = fc.blockwise_lse_and_positives(a, b, s, triton_engine, positives)
        return (lse - pos).sum()

    def expected(a, b, s):
        return (torch.logsumexp(s * a @ b.T, dim=1) - s * (a * b[positives]).sum(dim=1)).sum()

    _compare(loss, expected, [rows, cols, scale], ["rows", "cols", "scale"], dtype)
    assert len(grids) == 2 * 3 * 3, grids  # 3 × 3 panels, a dA and a dB GEMM each
    assert {grid[1] for grid in grids} == {1, 2}, grids  # full panels in two splits, the ragged last in one
    assert slab_sums == [2, 2]
