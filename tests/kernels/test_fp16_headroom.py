"""fp16 headroom of dS (docs/numerics.md#dtypes).

dS ≈ P/(2N) is cast to fp16 for the second ``tl.dot``. Scaled by a power of two so that Σ max|bound| (a bound
of every |dS|) lands in [0.5, 1), almost every off-diagonal entry is still an fp16 subnormal from N ≳ 16k and
the negatives' term Σⱼ≠ᵢ dSᵢⱼ·Bⱼ loses precision; max-relative tolerances on the whole gradient cannot see it,
because the positive's term dominates. ``gradient_scale`` lands the bound in [2¹³, 2¹⁴) instead.

No GPU here, so the N = 65,536 cases reproduce the tile arithmetic in torch, exactly as the kernels do it:
dS in fp32 → times the factor from ``fastcontrast.kernels.engine.gradient_scale`` → cast to fp16 → times fp16 B
with fp32 accumulation → divided by the factor in fp32. Each case also runs the old factor (2⁻ᵉ for the
frexp exponent e of the bound) and checks that it misses the same bound, so the test fails if the scale
goes back. The interpreter case checks that the kernels undo any power-of-two factor exactly.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")

N = 65_536


def _engine():
    from fastcontrast.kernels import engine

    return engine


def _old_scale(*bounds: torch.Tensor) -> torch.Tensor:
    """The factor before issue 19: 2⁻ᵉ, bringing Σ max|bound| into [0.5, 1)."""
    total = sum(b.abs().amax().float() for b in bounds)
    _, exponent = torch.frexp(total.reshape(1))
    return torch.ldexp(torch.ones(1), -exponent)


def _negatives_term_error(ds32: torch.Tensor, ds64: torch.Tensor, b16: torch.Tensor, factor: torch.Tensor) -> float:
    """‖tile arithmetic − fp64‖ / ‖fp64‖ of Σⱼ dSⱼ·Bⱼ for one row's dS [N] (the positive zeroed), B [N, d] fp16.

    The route of the gradient kernels: (dS·factor) cast to fp16, fp16 × fp16 products accumulated in fp32
    (each product is exact in fp32), then divided by the factor in fp32."""
    scaled = (ds32 * factor).to(torch.float16)
    got = (scaled.float() @ b16.float()) / factor
    exact = ds64 @ b16.double()
    return ((got.double() - exact).norm() / exact.norm()).item()


def _trained_like_pairs(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, d] fp16 unit image and text features shaped like a trained CLIP's at logit_scale 100: rows in a cone
    (negatives' cosine ≈ 0.17 ± 0.05), each text near its image (positives' cosine ≈ 0.55)."""
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(d, generator=g), dim=0)
    image = F.normalize(centre + 1.5 * torch.randn(N, d, generator=g) / math.sqrt(d), dim=1)
    text = F.normalize(image + 1.5 * torch.randn(N, d, generator=g) / math.sqrt(d), dim=1)
    return image.half(), text.half()


def _isotropic_pairs(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, d] fp16 unit features as at initialisation: independent random directions (cosines ≈ 0 ± d^-½)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(N, d, generator=g), dim=1).half() for _ in range(2))


ROWS = (0, 1, 2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("d", [256, 512], ids=lambda d: f"N65536-D{d}")
def test_clip_negatives_term_keeps_fp16_precision_at_65536(d):
    """CLIP at N = 65,536, logit_scale 100: dSᵢⱼ = gᵣ·exp(Sᵢⱼ − rᵢ) + g꜀·exp(Sᵢⱼ − cⱼ), gᵣ = g꜀ = 1/(2N).

    The column LSEs c come from 256 rows scaled up to N: they only set dS's size, and both routes use the same
    values. Measured (4 rows each): new factor 1.4e-5 … 3.4e-5, old factor 2.0e-4 … 8.6e-4."""
    tolerance = 5e-5
    image, text = _trained_like_pairs(d, seed=d)
    scale = 100.0
    lse_col = torch.logsumexp(scale * (image[:256].float() @ text.float().T), dim=0) + math.log(N / 256)
    upstream = torch.full((N,), 1 / (2 * N))
    factor = _engine().gradient_scale(torch.float16, upstream, upstream)
    old = _old_scale(upstream, upstream)
    for i in ROWS:
        logits = scale * (image[i].double() @ text.double().T)
        lse_row = torch.logsumexp(logits, dim=0)
        ds64 = upstream[i].double() * (torch.exp(logits - lse_row) + torch.exp(logits - lse_col.double()))
        logits32 = logits.float()
        ds32 = upstream[i] * (torch.exp(logits32 - lse_row.float()) + torch.exp(logits32 - lse_col))
        ds64[i] = ds32[i] = 0  # the positive's term is the rest of the gradient
        error = _negatives_term_error(ds32, ds64, text, factor)
        assert error <= tolerance, f"row {i}: negatives' term relative error {error:.2e} > {tolerance:.0e}"
        old_error = _negatives_term_error(ds32, ds64, text, old)
        assert old_error > tolerance, (
            f"row {i}: the old [0.5, 1) factor was accurate too ({old_error:.2e}): the case does not test headroom"
        )


@pytest.mark.slow
@pytest.mark.parametrize("d,tolerance", [(256, 4e-5), (512, 6e-5)], ids=["N65536-D256", "N65536-D512"])
def test_siglip_negatives_term_keeps_fp16_precision_at_initial_bias(d, tolerance):
    """SigLIP at its initialisation (logit_scale 10, logit_bias −10, independent features): a negative's
    dS = σ(s·x + b) ≈ e⁻¹⁰ (the forward forms SigLIP's dS at upstream gradient 1; the loss's 1/N is applied
    to the fp32 products after), which the old factor put at ≈ 2.3e-5, below fp16's smallest normal 6.1e-5.
    The gain is smaller than CLIP's (those entries sat just below the normal range, not far below it).
    Measured (4 rows each): d = 256 new 2.4e-5 … 2.6e-5, old 5.7e-5 … 6.4e-5; d = 512 new 4.2e-5 … 4.6e-5,
    old 1.3e-4 … 1.4e-4. The floor grows with d: Σⱼ dSⱼ·Bⱼ of independent rows cancels more."""
    image, text = _isotropic_pairs(d, seed=d)
    upstream = torch.tensor(1.0)  # siglip_forward_backward's upstream gradient
    factor = _engine().gradient_scale(torch.float16, upstream)
    old = _old_scale(upstream)
    for i in ROWS:
        logits = 10.0 * (image[i].double() @ text.double().T) - 10.0
        ds64 = torch.sigmoid(logits)
        ds32 = torch.sigmoid(logits.float())
        ds64[i] = ds32[i] = 0
        error = _negatives_term_error(ds32, ds64, text, factor)
        assert error <= tolerance, f"row {i}: negatives' term relative error {error:.2e} > {tolerance:.0e}"
        old_error = _negatives_term_error(ds32, ds64, text, old)
        assert old_error > tolerance, (
            f"row {i}: the old [0.5, 1) factor was accurate too ({old_error:.2e}): the case does not test headroom"
        )


def _is_power_of_two(x: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(x)
    return bool((mantissa == 0.5).all())


@pytest.mark.parametrize(
    "bounds",
    [
        (torch.full((8,), 1 / (2 * N)), torch.full((8,), 1 / (2 * N))),  # CLIP at N = 65,536
        (torch.tensor(1 / N),),  # SigLIP's upstream gradient
        (torch.tensor([1.0]),),
        (torch.tensor([3.0, -7.5]), None, torch.tensor([0.25])),  # Σ max|bound| = 7.75
        (torch.tensor([2.0**13]),),  # the bound already in range: factor 1
        (torch.tensor([2.0**14]),),
    ],
    ids=["clip-65536", "siglip-65536", "one", "summed-with-none", "2^13", "2^14"],
)
def test_gradient_scale_brings_the_bound_into_2_13_to_2_14(bounds):
    factor = _engine().gradient_scale(torch.float16, *bounds)
    total = sum(b.abs().amax().float() for b in bounds if b is not None)
    assert factor.dtype == torch.float32 and factor.numel() == 1
    assert _is_power_of_two(factor), f"factor {factor.item()} is not a power of two"
    scaled = (total * factor).item()
    assert 2.0**13 <= scaled < 2.0**14, f"scaled bound {scaled} outside [2^13, 2^14) (factor {factor.item()})"


@pytest.mark.parametrize(
    "bound", [0.0, 1e-45, 1e-38, 1e-30, 1e30, 3e38], ids=["zero", "fp32-subnormal", "tiny", "1e-30", "1e30", "huge"]
)
def test_gradient_scale_is_a_finite_nonzero_power_of_two_for_extreme_bounds(bound):
    factor = _engine().gradient_scale(torch.float16, torch.tensor([bound], dtype=torch.float32))
    assert torch.isfinite(factor).all() and (factor > 0).all(), f"factor {factor.item()} for bound {bound}"
    assert _is_power_of_two(factor), f"factor {factor.item()} for bound {bound} is not a power of two"
    if bound == 0.0:  # nothing to scale: the factor changes nothing
        assert factor.item() == 1.0
    else:  # never past fp16's largest finite value
        assert bound * factor.item() < 2.0**14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_gradient_scale_is_none_for_dtypes_with_fp32_range(dtype):
    assert _engine().gradient_scale(dtype, torch.tensor([1e-30])) is None


def _loss_and_inputs(kind: str):
    """Small fp16 inputs whose every dS stays an fp16 normal under any factor in [2¹⁷, 2²¹]: unit features at
    scale 5 keep every softmax probability above e⁻¹⁰/64."""
    g = torch.Generator().manual_seed(3)
    n, d = 64, 32
    image = F.normalize(torch.randn(n, d, generator=g), dim=1).half().requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=1).half().requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    if kind == "clip":
        return (lambda: fc.clip_loss(image, text, scale, backend="triton")), [image, text, scale]
    bias = torch.tensor(-2.0, requires_grad=True)
    return (lambda: fc.siglip_loss(image, text, scale, bias, backend="triton")), [image, text, scale, bias]


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_kernels_undo_a_forced_gradient_scale_exactly(kind, monkeypatch):
    """With ``gradient_scale`` forced to two other powers of two the fp16 gradients are bit-equal to the
    unforced ones: the factor is applied before the fp16 cast and removed in fp32 after the product, and every
    scaled dS is an fp16 normal. CLIP's bound is 2/(2n) = 2⁻⁶ (natural factor 2¹⁹; forced 2¹⁷, 2²¹); SigLIP's
    gradient is formed in the forward at upstream gradient 1, bound 1 (natural 2¹³; forced 2¹¹, 2¹⁵). A kernel
    that forgot to remove the factor would be off by 2¹¹ or more."""
    engine = _engine()
    loss_fn, inputs = _loss_and_inputs(kind)
    names = ["dimage", "dtext", "dscale", "dbias"][: len(inputs)]
    natural = torch.autograd.grad(loss_fn(), inputs)
    calls = []

    def forced(exponent):
        def gradient_scale(dtype, *bounds):
            calls.append(dtype)
            device = next(b.device for b in bounds if b is not None)
            return torch.full((1,), 2.0**exponent, dtype=torch.float32, device=device)

        return gradient_scale

    exponents = (17, 21) if kind == "clip" else (11, 15)
    results = {}
    for exponent in exponents:
        monkeypatch.setattr(engine, "gradient_scale", forced(exponent))
        results[exponent] = torch.autograd.grad(loss_fn(), inputs)
    assert calls and all(dtype == torch.float16 for dtype in calls), "the engine never asked for the fp16 scale"
    for name, unforced, *forced_grads in zip(names, natural, *(results[e] for e in exponents)):
        for exponent, got in zip(exponents, forced_grads):
            worst = (got.double() - unforced.double()).abs().max().item()
            assert torch.equal(got, unforced), f"{name}: factor 2^{exponent} changed the gradient (max abs {worst:.3e})"
