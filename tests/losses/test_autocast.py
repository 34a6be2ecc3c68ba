"""Every loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Inside autocast, fp32 features are taken as bf16 (what autocast does to the original loss's matmul), and the
loss is then exactly the one for bf16 features outside autocast: computed in fp32, returned in fp32, with
fp32-level error against the fp64 reference on the same rounded inputs. Autocast must not turn the
engines' fp32 GEMMs into bf16 ones.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import DCL_VARIANTS, assert_close, dcl_variant_loss, dcl_variant_reference

import fastcontrast as fc
from fastcontrast import reference

N, D = 23, 16
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(N, D, generator=g), dim=1) for _ in range(4)]


LABELS = torch.randint(0, 4, (N,), generator=torch.Generator().manual_seed(7))
BANK = F.normalize(torch.randn(31, D, generator=torch.Generator().manual_seed(8)), dim=1)

# name -> (loss on the feature tensors and scale, fp64 reference, number of feature tensors)
LOSSES = {
    "clip": (lambda f, s, be: fc.clip_loss(f[0], f[1], s, backend=be),
             lambda f, s: reference.clip_loss_reference(f[0], f[1], s), 2),
    "siglip": (lambda f, s, be: fc.siglip_loss(f[0], f[1], s, -5.0, backend=be),
               lambda f, s: reference.siglip_loss_reference(f[0], f[1], s, -5.0), 2),
    "nt_xent": (lambda f, s, be: fc.nt_xent_loss(f[0], f[1], 0.2, backend=be),
                lambda f, s: reference.nt_xent_loss_reference(f[0], f[1], 0.2), 2),
    "memory_bank": (lambda f, s, be: fc.nt_xent_memory_bank_loss(f[0], f[1], BANK, 0.2, backend=be),
                    lambda f, s: reference.nt_xent_memory_bank_loss_reference(f[0], f[1], BANK.double(), 0.2), 2),
    "distill": (lambda f, s, be: sum(fc.distill_clip_loss(f[0], f[1], s, f[2], f[3], 20.0, backend=be)),
                lambda f, s: sum(reference.distill_clip_loss_reference(f[0], f[1], s, f[2], f[3], 20.0)), 4),
    "supcon": (lambda f, s, be: fc.supcon_loss(f[0], LABELS, temperature=0.2, backend=be),
               lambda f, s: reference.supcon_loss_reference(f[0], LABELS, 0.2), 1),
}
# DCL: the plain module, DCLW (its weights are computed under autocast as in lightly) and a weight_fn.
for _variant in DCL_VARIANTS:
    LOSSES[_variant] = (
        lambda f, s, be, v=_variant: dcl_variant_loss(v, f[0], f[1], 0.2, backend=be),
        lambda f, s, v=_variant: dcl_variant_reference(v, f[0], f[1], 0.2),
        2,
    )


def _run(name, features, backend, *, autocast):
    loss_fn, _, count = LOSSES[name]
    leaves = [f.clone().requires_grad_() for f in features[:count]]
    scale = torch.tensor(14.3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(leaves, scale, backend)
    grads = torch.autograd.grad(loss, leaves + [scale], allow_unused=True)
    return loss, grads


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETER, reason="needs the interpreter"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_under_bf16_autocast_equals_bf16_inputs_outside_and_stays_fp32(name, backend):
    fp32 = _tensors(1)
    bf16 = [f.to(torch.bfloat16) for f in fp32]
    inside, inside_grads = _run(name, fp32, backend, autocast=True)
    outside, outside_grads = _run(name, bf16, backend, autocast=False)
    assert inside.dtype == torch.float32, f"loss under autocast is {inside.dtype}"
    assert torch.equal(inside, outside), f"loss {inside.item()} under autocast != {outside.item()} for bf16 inputs"
    for index, (g_in, g_out) in enumerate(zip(inside_grads, outside_grads)):
        if g_in is None and g_out is None:
            continue
        assert g_in.dtype == torch.float32, f"gradient {index}: {g_in.dtype}, expected the fp32 input's dtype"
        assert torch.equal(g_in, g_out.float()), f"gradient {index} differs from the bf16-input run"
    # bf16 features inside autocast: the same again.
    again, _ = _run(name, bf16, backend, autocast=True)
    assert torch.equal(again, outside)
    # Computed in fp32: fp32-level error against fp64 on the same rounded inputs (a bf16 GEMM would be ~1e-2).
    # The losses that normalise (NT-Xent, memory bank, DCL, SupCon) are the exception tests/losses/test_dtypes.py
    # explains: like lightly and PML they round the unit vectors to the input dtype before the GEMM, which
    # moves each logit by about u/τ; their bound is u/(4τ), u = 2⁻⁸.
    _, ref_fn, count = LOSSES[name]
    expected = ref_fn([f.double() for f in bf16[:count]], torch.tensor(14.3, dtype=torch.float64))
    tol = 2**-8 / (4 * 0.2) if name in ("nt_xent", "memory_bank", "supcon", *DCL_VARIANTS) else 3e-5
    assert_close("loss vs fp64 reference", inside, expected, atol=tol, rtol=tol)
