"""Input dtypes (fp32, bf16, fp16), mixed-precision scales, large scales, non-contiguous views, scale forms.

Half-precision inputs are compared with the fp64 reference computed from the *same rounded* inputs
upcast, so the only errors left are fastcontrast's own: the CLIP and SigLIP losses are accumulated in fp32
(fp32-level error whatever the input dtype), and gradients are rounded to their input's dtype at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    DCL_SIGMA,
    DCL_VARIANTS,
    TOLERANCES,
    assert_close,
    dcl_variant_loss,
    dcl_variant_reference,
    lightly_mises_fisher_weights,
)

import fastcontrast
from fastcontrast import reference

LOSS_ATOL, LOSS_RTOL = TOLERANCES[torch.float32]

# (dtype, rtol, atol as a fraction of the largest reference entry).
# rtol: a gradient rounded once to the input dtype is off by at most the unit roundoff u, 2^-8 for bf16
# (8 significant bits) and 2^-11 for fp16; for fp32 it is fp32 accumulation noise. atol: near-zero entries
# carry the absolute error of the large ones (a gradient is a sum of terms that cancel, e.g. softmax minus
# one-hot), so allow 2u of the largest entry. The NT-Xent and DCL losses are different: like lightly, fastcontrast
# rounds the unit vectors to the input dtype before the similarity GEMM (the memory bank too: its fp32
# bank is cast to them, as lightly's einsum does under autocast, so that half inputs reach the tensor
# cores), which moves every logit by about u·s (s = 1/τ); their loss tolerance is s·u/4 (observed errors
# are about s·u/16).
DTYPES = [
    pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2**-8, 2**-7, id="bf16"),
    pytest.param(torch.float16, 2**-11, 2**-10, id="fp16"),
]
HALF_DTYPES = [p for p in DTYPES if p.values[0] != torch.float32]

KINDS = ("clip_loss", "siglip_loss", "nt_xent_loss", "nt_xent_memory_bank_loss") + DCL_VARIANTS
# lightly's losses: they normalise inside, take τ = 1/scale as a Python float and have no bias.
LIGHTLY_KINDS = ("nt_xent_loss", "nt_xent_memory_bank_loss") + DCL_VARIANTS
N, D = 37, 24
# 5 rows of fp32 logits per chunk for the N×N and N×2N matrices: ragged chunks in every loss.
CHUNK_BYTES = 5 * N * 4


def features(n: int, d: int, dtype: torch.dtype, seed: int, normalize: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return (F.normalize(x, dim=1) if normalize else x).to(dtype)


def bank_for(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return F.normalize(torch.randn(N + 4, d, generator=g), dim=1)  # lightly's bank is fp32


def run(kind: str, a, b, scale, bias, *, chunk_bytes=CHUNK_BYTES, backend="torch"):
    """The loss under test; NT-Xent and DCL take 1/scale as their temperature (scale must be a number there)."""
    if kind in DCL_VARIANTS:
        return dcl_variant_loss(kind, a, b, 1 / scale, backend=backend, chunk_bytes=chunk_bytes)
    if kind == "clip_loss":
        return fastcontrast.clip_loss(a, b, scale, bias, backend=backend, chunk_bytes=chunk_bytes)
    if kind == "siglip_loss":
        return fastcontrast.siglip_loss(a, b, scale, bias, backend=backend, chunk_bytes=chunk_bytes)
    if kind == "nt_xent_loss":
        return fastcontrast.nt_xent_loss(a, b, 1 / scale, backend=backend, chunk_bytes=chunk_bytes)
    return fastcontrast.nt_xent_memory_bank_loss(
        a, b, bank_for(a.shape[1]), 1 / scale, backend=backend, chunk_bytes=chunk_bytes
    )


def run_reference(kind: str, a, b, scale, bias, input_dtype=torch.float64):
    if kind == "DCLWLoss":
        # DCLW's weights are constants that lightly computes in the inputs' dtype (fastcontrast too): in half
        # precision they are off by ~u, which moves the loss by ~u/τ. The reference rounds them the same way.
        def weights(z0, z1):
            return lightly_mises_fisher_weights(z0.to(input_dtype), z1.to(input_dtype), DCL_SIGMA).to(z0.dtype)

        return reference.dcl_loss_reference(a, b, 1 / scale, weights)
    if kind in DCL_VARIANTS:
        return dcl_variant_reference(kind, a, b, 1 / scale)
    if kind == "clip_loss":
        return reference.clip_loss_reference(a, b, scale, bias)
    if kind == "siglip_loss":
        return reference.siglip_loss_reference(a, b, scale, bias)
    if kind == "nt_xent_loss":
        return reference.nt_xent_loss_reference(a, b, 1 / scale)
    return reference.nt_xent_memory_bank_loss_reference(a, b, bank_for(a.shape[1]), 1 / scale)


def fp64_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).requires_grad_()


def check_against_fp64_reference(kind, a, b, scale, bias, rtol, atol_of_max, grad_atol=0.0, **kwargs):
    """Run ``kind`` on the given leaves and compare value, dtypes and gradients with the fp64 reference
    (``grad_atol`` is added to the gradients' bound)."""
    tensor_scale = isinstance(scale, torch.Tensor)
    leaves = [a, b] + ([scale] if tensor_scale else []) + ([bias] if bias is not None else [])
    names = ["d_features_a", "d_features_b", "d_logit_scale", "d_logit_bias"]
    names = (
        names[:2]
        + (["d_logit_scale"] if tensor_scale else [])
        + (["d_logit_bias"] if bias is not None else [])
    )
    loss = run(kind, a, b, scale, bias, **kwargs)
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [fp64_leaf(t) for t in leaves]
    ref_a, ref_b = ref_leaves[:2]
    ref_scale = ref_leaves[2] if tensor_scale else scale
    ref_bias = ref_leaves[-1] if bias is not None else None
    ref_loss = run_reference(kind, ref_a, ref_b, ref_scale, ref_bias, input_dtype=a.dtype)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)

    expected_loss_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_loss_dtype, f"loss dtype {loss.dtype} for {a.dtype} inputs"
    if kind in LIGHTLY_KINDS and a.dtype != torch.float32:
        assert_close("loss", loss, ref_loss, float(scale) * rtol / 4)
    else:
        assert_close("loss", loss, ref_loss, LOSS_ATOL, LOSS_RTOL)
    for name, leaf, grad, ref_grad in zip(names, leaves, grads, ref_grads):
        assert grad.dtype == leaf.dtype, f"{name}: dtype {grad.dtype}, input is {leaf.dtype}"
        assert grad.shape == leaf.shape, f"{name}: shape {tuple(grad.shape)}, input is {tuple(leaf.shape)}"
        assert_close(name, grad, ref_grad, atol_of_max * float(ref_grad.abs().max()) + 1e-7 + grad_atol, rtol)
    return loss, grads


def lightly_own_gradient_error(kind, a, b, scale) -> float:
    """Max-abs error of the feature gradients of lightly's math run in the inputs' dtype (the reference on
    the half-precision tensors) against fp64: PyTorch's own error, the FlashAttention rule's yardstick."""
    errors = []
    for dtype in (a.dtype, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (a, b)]
        errors.append(torch.autograd.grad(run_reference(kind, *leaves, scale, None, input_dtype=a.dtype), leaves))
    return max((low.double() - exact).abs().max().item() for low, exact in zip(*errors))


@pytest.mark.parametrize("scale_in_fp32", [False, True], ids=["scale-same-dtype", "scale-fp32"])
@pytest.mark.parametrize("dtype, rtol, atol_of_max", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_loss_matches_fp64_reference_on_rounded_inputs(kind, dtype, rtol, atol_of_max, scale_in_fp32):
    if scale_in_fp32 and dtype == torch.float32:
        pytest.skip("same as scale-same-dtype for fp32 features")
    a = features(N, D, dtype, seed=1, normalize=kind in ("clip_loss", "siglip_loss")).requires_grad_()
    b = features(N, D, dtype, seed=2, normalize=kind in ("clip_loss", "siglip_loss")).requires_grad_()
    if kind in LIGHTLY_KINDS:
        scale, bias = 14.3, None  # τ = 1/14.3 is a Python float in lightly
    else:
        scale_dtype = torch.float32 if scale_in_fp32 else dtype
        scale = torch.tensor(14.3, dtype=scale_dtype, requires_grad=True)
        bias = torch.tensor(-3.0, dtype=scale_dtype, requires_grad=True)
    check_against_fp64_reference(kind, a, b, scale, bias, rtol, atol_of_max)


@pytest.mark.parametrize("kind", ("clip_loss", "siglip_loss"))
def test_bf16_features_with_fp32_logit_scale_give_fp32_scale_gradient(kind):
    # The AMP case: the model runs in bf16 under autocast, the logit_scale parameter stays fp32.
    a = features(N, D, torch.bfloat16, seed=3).requires_grad_()
    b = features(N, D, torch.bfloat16, seed=4).requires_grad_()
    log_scale = torch.tensor(2.659, requires_grad=True)  # open_clip's init, log(1/0.07)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = run(kind, a, b, log_scale.exp(), bias)
    loss.backward()
    assert loss.dtype == torch.float32
    assert log_scale.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16

    ref_a, ref_b, ref_log_scale, ref_bias = (fp64_leaf(t) for t in (a, b, log_scale, bias))
    run_reference(kind, ref_a, ref_b, ref_log_scale.exp(), ref_bias).backward()
    assert_close("d_log_scale", log_scale.grad, ref_log_scale.grad, 1e-6, 1e-5)
    assert_close("d_logit_bias", bias.grad, ref_bias.grad, 1e-6, 1e-5)
    for name, grad, ref_grad in (
        ("d_image_features", a.grad, ref_a.grad),
        ("d_text_features", b.grad, ref_b.grad),
    ):
        assert_close(name, grad, ref_grad, 2**-7 * float(ref_grad.abs().max()), 2**-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_clip_half_precision_feature_gradient_is_rounded_once(dtype):
    # docs/numerics.md#dtypes: accumulate in fp32, return gradients in the input dtype (one rounding). CLIP's
    # dA = s·(Σⱼ Pᵢⱼ·Bⱼ − Bᵢ) cancels near convergence; if the LSE part and the positive part reached the
    # input through separate autograd edges, each would be rounded to half precision before the sum and a
    # near-zero entry would carry the rounding error of the large terms (this failed before the positives
    # moved into the LSE Function).
    u = 2**-8 if dtype == torch.bfloat16 else 2**-11
    a = features(N, D, dtype, seed=1).requires_grad_()
    b = features(N, D, dtype, seed=2).requires_grad_()
    fastcontrast.clip_loss(a, b, 14.3, backend="torch").backward()
    ref_a, ref_b = fp64_leaf(a), fp64_leaf(b)
    reference.clip_loss_reference(ref_a, ref_b, 14.3).backward()
    assert_close("d_image_features", a.grad, ref_a.grad, 1e-6, u)
    assert_close("d_text_features", b.grad, ref_b.grad, 1e-6, u)


@pytest.mark.parametrize("scale_as_tensor", [True, False], ids=["tensor-scale", "float-scale"])
@pytest.mark.parametrize("dtype, rtol, atol_of_max", HALF_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_logit_scale_100_in_half_precision_is_finite_and_matches_reference(
    kind, dtype, rtol, atol_of_max, scale_as_tensor
):
    # s = 100 puts logits at ±100: exp overflows fp16 (max 65504) if any exp were taken in half precision.
    a = features(N, D, dtype, seed=5).requires_grad_()
    b = (a.detach().float() + 0.05 * features(N, D, torch.float32, seed=6)).to(dtype).requires_grad_()
    if kind in LIGHTLY_KINDS or not scale_as_tensor:
        scale = 100.0
        bias = None if kind in LIGHTLY_KINDS else -10.0
        if bias is not None:
            bias = torch.tensor(bias, dtype=dtype, requires_grad=True)
    else:
        scale = torch.tensor(100.0, dtype=dtype, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
    grad_atol = 0.0
    if kind in DCL_VARIANTS:
        # a ≈ b at s = 100: DCL leaves the positive out of the LSE, so its term s·z₁/n stays in dL/dz₀ and the
        # normalisation's projection (I − z₀z₀ᵀ) removes most of it; the unit vectors' rounding to the input
        # dtype (u per entry, as in lightly) survives the projection. So the gradients may also be off by as
        # much as lightly's own gradients in that dtype (about 5x fastcontrast's error here).
        grad_atol = lightly_own_gradient_error(kind, a, b, scale)
    loss, grads = check_against_fp64_reference(kind, a, b, scale, bias, rtol, atol_of_max, grad_atol)
    assert torch.isfinite(loss)
    for grad in grads:
        assert torch.isfinite(grad).all()


def non_contiguous_views(n: int, d: int, dtype: torch.dtype, seed: int):
    """A transposed view (strides (1, n)) and a strided slice of a bigger tensor, both [n, d]."""
    base_t = features(n, d, torch.float32, seed=seed).T.contiguous().to(dtype).requires_grad_()  # [d, n]
    base_s = features(2 * n + 1, d + 3, torch.float32, seed=seed + 1).to(dtype).requires_grad_()
    transposed = base_t.T
    sliced = base_s[1::2, 2 : d + 2]
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    assert transposed.shape == sliced.shape == (n, d)
    return base_t, transposed, base_s, sliced


@pytest.mark.parametrize("dtype, rtol, atol_of_max", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs_give_the_results_of_contiguous_copies(kind, dtype, rtol, atol_of_max):
    base_t, transposed, base_s, sliced = non_contiguous_views(N, D, dtype, seed=7)
    scale = 10.0 if kind in LIGHTLY_KINDS else torch.tensor(10.0)
    loss = run(kind, transposed, sliced, scale, None)
    loss.backward()

    a = transposed.detach().contiguous().requires_grad_()
    b = sliced.detach().contiguous().requires_grad_()
    expected_loss = run(kind, a, b, scale, None)
    expected_loss.backward()

    # Same values in, same kernels: only the memory layout differs, so allow fp32 reordering noise only.
    assert_close("loss", loss, expected_loss, LOSS_ATOL, LOSS_RTOL)
    for name, actual, expected in (
        ("d_features_a (transposed view)", base_t.grad.T, a.grad),
        ("d_features_b (sliced view)", base_s.grad[1::2, 2 : D + 2], b.grad),
    ):
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}"
        assert_close(name, actual, expected, atol_of_max * float(expected.abs().max()), rtol)
    untouched = base_s.grad.clone()
    untouched[1::2, 2 : D + 2] = 0
    assert torch.equal(untouched, torch.zeros_like(untouched)), "gradient leaked outside the sliced view"


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"]
)
@pytest.mark.parametrize("kind", ("clip_loss", "siglip_loss"))
def test_logit_scale_as_0dim_tensor_1element_tensor_or_float_gives_the_same_loss(kind, dtype):
    a, b = features(N, D, dtype, seed=8), features(N, D, dtype, seed=9)
    # A Python number becomes a tensor of the compute dtype (fp32, fp64 for fp64 features).
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    zero_dim = torch.tensor(14.3, dtype=scale_dtype, requires_grad=True)
    one_element = torch.tensor([14.3], dtype=scale_dtype, requires_grad=True)
    as_float = run(kind, a, b, 14.3, -1.5)
    as_zero_dim = run(kind, a, b, zero_dim, torch.tensor(-1.5, dtype=scale_dtype))
    as_one_element = run(kind, a, b, one_element, torch.tensor([-1.5], dtype=scale_dtype))
    assert as_float.shape == as_zero_dim.shape == as_one_element.shape == ()
    assert torch.equal(as_float, as_zero_dim), f"float {as_float.item()} != 0-dim {as_zero_dim.item()}"
    assert torch.equal(as_float, as_one_element), f"float {as_float.item()} != [1] {as_one_element.item()}"

    as_zero_dim.backward()
    as_one_element.backward()
    assert zero_dim.grad.shape == () and one_element.grad.shape == (1,)
    assert torch.equal(zero_dim.grad.reshape(1), one_element.grad)


@pytest.mark.parametrize("module", ["ClipLoss", "SigLipLoss"])
def test_module_accepts_every_logit_scale_form(module):
    a, b = features(N, D, torch.float32, seed=10), features(N, D, torch.float32, seed=11)
    loss_fn = getattr(fastcontrast, module)(chunk_bytes=CHUNK_BYTES)
    losses = [loss_fn(a, b, scale, -2.0) for scale in (20.0, torch.tensor(20.0), torch.tensor([20.0]))]
    assert all(torch.equal(losses[0], other) for other in losses[1:]), [float(x) for x in losses]
