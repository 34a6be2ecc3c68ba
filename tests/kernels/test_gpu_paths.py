"""Paths that only a GPU run takes, checked on the CPU machine (docs/kernels.md, docs/numerics.md; the GPU-ready issue).

- TF32: the decision reads whichever torch API the user set, never the legacy flag that raises after the
  new one was used.
- Device: every kernel launch happens inside a guard for its inputs' device (triton launches on the
  *current* device), recorded at launch time in the interpreter.
- Alignment: every launched kernel gets 16-aligned pointers, d and row strides, whatever the inputs, so
  only the binaries the compile checks cover ever run.
- fp16: dS far below fp16's smallest subnormal (tiny upstream gradients, as for CLIP at N ≳ 4k) still
  reaches the gradients.
- fp32: on a near one-hot batch at scale 100 the backward rebuilds probabilities exactly as the forward
  reduced them (no ln ↔ log₂ round trip of the LSE).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, squared_distance_weights

import fastcontrast as fc
from fastcontrast import reference
from fastcontrast.engine import tf32_matmul_enabled

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")


@contextlib.contextmanager
def _restore_tf32_settings():
    matmul = torch.backends.cuda.matmul
    saved = (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None))
    try:
        yield
    finally:
        if saved[1] is not None:
            torch.backends.fp32_precision = saved[1]
        if saved[0] is not None:
            matmul.fp32_precision = saved[0]


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("setting", ["matmul", "global", "set_float32_matmul_precision"])
def test_tf32_is_read_through_the_api_the_user_set_without_raising(setting, monkeypatch):
    from fastcontrast.kernels import launch

    # As on a GPU: the interpreter multiplies in fp32 whatever it is told, so these tests run without it.
    monkeypatch.setattr(launch, "triton_interpreter_enabled", lambda: False)

    def dot_settings(dtype, target=("cuda", 90)):
        return launch.dot_settings(dtype, target)

    with _restore_tf32_settings():
        if setting == "matmul":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        elif setting == "global":
            torch.backends.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("high")
        if setting != "set_float32_matmul_precision":
            # Since torch 2.9 the legacy flag raises once the new API is in use: the engine must not read it.
            with pytest.raises(RuntimeError):
                torch.backends.cuda.matmul.allow_tf32  # noqa: B018
        assert tf32_matmul_enabled()
        assert dot_settings(torch.float32) == (False, "tf32")
        assert dot_settings(torch.float32, ("cuda", 80)) == (False, "tf32")
        # Of triton's AMD targets only gfx942 takes "tf32" (XF32); gfx90a's backend rejects it at compile time.
        assert dot_settings(torch.float32, ("hip", "gfx942")) == (False, "tf32")
        assert dot_settings(torch.float32, ("hip", "gfx90a")) == (False, "ieee")
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert not tf32_matmul_enabled()
        assert dot_settings(torch.float32) == (False, "ieee")
        # Half operands never take the TF32 path.
        assert dot_settings(torch.bfloat16) == (False, "ieee")


@contextlib.contextmanager
def _record_launches():
    """Every kernel launch, run as usual: (kernel name, its keyword arguments, the guard device active then)."""
    from fastcontrast.kernels import engine
    from fastcontrast.kernels.launches import kernel_classes, patched_launch_index

    launches, active = [], []
    real_guard = engine.launch_device
    real_index = {cls: cls.__getitem__ for cls in kernel_classes()}

    @contextlib.contextmanager
    def recording_guard(x):
        active.append(x.device)
        try:
            with real_guard(x):
                yield
        finally:
            active.pop()

    def index(self, grid):
        def launch(*args, **kwargs):
            launches.append((self.fn.__name__, dict(kwargs), active[-1] if active else None))
            return real_index[type(self)](self, grid)(*args, **kwargs)

        return launch

    engine.launch_device = recording_guard
    try:
        with patched_launch_index(index):
            yield launches
    finally:
        engine.launch_device = real_guard


def _every_loss(dtype, d, n=33):
    """Forward and backward of every loss on the Triton engine, with every input requiring grad."""
    g = torch.Generator().manual_seed(d)

    def unit(rows):
        return F.normalize(torch.randn(rows, d, generator=g, dtype=torch.float64), dim=1).to(dtype).requires_grad_()

    a, b, a_t, b_t = unit(n), unit(n), unit(n), unit(n)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    bank = F.normalize(torch.randn(40, d, generator=g), dim=1)
    labels = torch.arange(n) % 5
    losses = [
        fc.clip_loss(a, b, scale, bias, backend="triton"),
        fc.clip_loss(a, b, scale, backend="triton", return_accuracy=True)[0],
        fc.siglip_loss(a, b, scale, bias, backend="triton"),
        fc.nt_xent_loss(a, b, 0.2, backend="triton"),
        fc.nt_xent_memory_bank_loss(a, b, bank, 0.2, backend="triton"),
        fc.dcl_loss(a, b, 0.2, squared_distance_weights, backend="triton"),
        sum(fc.distill_clip_loss(a, b, scale, a_t, b_t, 20.0, backend="triton")),
        fc.supcon_loss(a, labels, temperature=0.2, backend="triton"),
    ]
    sum(losses).backward()


@needs_interpreter
@pytest.mark.interpreter
def test_every_kernel_launch_runs_under_a_guard_for_its_inputs_device():
    with _record_launches() as launches:
        _every_loss(torch.float32, 48)
    kernels = {name for name, _, _ in launches}
    assert {"lse_forward_kernel", "merge_partials_kernel", "gradient_kernel", "siglip_forward_kernel",
            "distill_forward_kernel", "distill_gradient_kernel"} <= kernels, kernels
    # DCL's launches (each row's positive masked out) are among them, forward and backward.
    masked = {name for name, kwargs, _ in launches if kwargs.get("EXCLUDE_POSITIVE")}
    assert {"lse_forward_kernel", "gradient_kernel"} <= masked, masked
    unguarded = [name for name, _, device in launches if device is None]
    assert not unguarded, f"launched outside a device guard: {sorted(set(unguarded))}"
    def operand_device(kwargs):
        return next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).device

    wrong = [(name, device, operand_device(kwargs)) for name, kwargs, device in launches
             if device != operand_device(kwargs)]
    assert not wrong, f"launched under a guard for another device: {wrong}"


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("d,sliced", [(48, False), (1000, False), (257, False), (64, True)],
                         ids=["d48", "d1000", "d257", "column-slice"])
def test_every_launch_gets_16_aligned_pointers_dims_and_strides(d, sliced):
    """triton specialises divisibility by 16 per value: misaligned inputs would launch binaries nobody
    compiled or checked. The engine pads them into aligned buffers, so every launch is an aligned one."""
    with _record_launches() as launches:
        if sliced:
            # A column slice: d = 63, row stride 64, an address 4 bytes past an aligned one.
            g = torch.Generator().manual_seed(3)
            full = torch.randn(40, d, generator=g)
            a, b = full[:20, 1:].requires_grad_(), full[20:, 1:].detach().clone().requires_grad_()
            fc.clip_loss(a, b, 10.0, backend="triton").backward()
        else:
            _every_loss(torch.bfloat16, d, n=20)
    misaligned = []
    for name, kwargs, _ in launches:
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.data_ptr() % 16:
                misaligned.append((name, key, value.data_ptr() % 16))
            # A unit stride is specialised as 1 (a transposed panel read): a variant of its own, also aligned.
            if key in ("d", "d_t") or key.startswith("stride"):
                if value % 16 and value != 1:
                    misaligned.append((name, key, value))
    assert launches and not misaligned, f"misaligned launch arguments: {misaligned[:10]}"


def _clip_inputs(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()


@needs_interpreter
@pytest.mark.interpreter
def test_fp16_gradients_survive_dS_below_fp16_subnormals():
    """A tiny upstream gradient puts every dS ≈ P·g/(2N) far below fp16's smallest subnormal (6e-8), the
    situation of CLIP at N ≳ 4k; the gradients themselves stay normal fp16 numbers. Without the power-of-two
    scaling of dS the cast to fp16 flushes it and the gradients come out wrong."""
    from fastcontrast.kernels import engine

    # N = 256: dS ≈ factor/(2N²) ≈ 3e-8 sits at fp16's subnormal floor while the gradients (~1e-4) are normal.
    n, d, factor = 256, 32, 0.004
    image, text = _clip_inputs(n, d, torch.float16, 5)
    scale = torch.tensor(10.0)

    def grads(a, b):
        loss = fc.clip_loss(a, b, scale, backend="triton") * factor
        return torch.autograd.grad(loss, [a, b])

    exact = [x.detach().double().requires_grad_() for x in (image, text)]
    ref = torch.autograd.grad(reference.clip_loss_reference(*exact, scale.double()) * factor, exact)
    got = grads(image, text)
    for name, g, r in zip(("dimage", "dtext"), got, ref):
        assert g.dtype == torch.float16
        assert_close(name, g, r, atol=4e-3 * r.abs().max().item())
    # The same without the scaling loses the gradients (the test would not notice a regression otherwise).
    real = engine.gradient_scale
    engine.gradient_scale = lambda dtype, *bounds: None
    try:
        unscaled = grads(image, text)
    finally:
        engine.gradient_scale = real
    worst = max(((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(unscaled, ref))
    assert worst > 4e-3, f"unscaled fp16 gradients were accurate ({worst:.2e}): the case does not underflow"


@needs_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("d,noise", [(96, 0.05), (48, 0.2), (48, 0.3)], ids=["one-hot", "near-0.2", "near-0.3"])
def test_fp32_gradients_on_a_near_one_hot_batch_are_as_exact_as_the_torch_engine(d, noise):
    """Scale 100 and image ≈ text: each row's softmax is nearly one-hot and dA = s·(Σ P·B − B_pos) is a
    difference of nearly equal terms. Recomputing P as exp2(x·s·log₂e − lse·log₂e) from a natural-log LSE
    cost |logit|·ε there; the backward must rebuild P exactly as the forward reduced it. With noise 0.05 the
    softmax is one-hot to fp32 (the positive's exp2 argument is exactly 0); with 0.2 and 0.3 the negatives
    weigh ~e⁻¹⁰, where the round trip (mutated back in) gives 2.5–3× the torch engine's error, past the 2×."""
    n = 64
    g = torch.Generator().manual_seed(11)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(100.0)
    exact = [x.clone().requires_grad_() for x in (image, text)]
    ref = torch.autograd.grad(reference.clip_loss_reference(*exact, scale.double()), exact)
    errors = {}
    for backend in ("torch", "triton"):
        leaves = [x.float().requires_grad_() for x in (image, text)]
        got = torch.autograd.grad(fc.clip_loss(*leaves, scale, backend=backend), leaves)
        errors[backend] = max((x.double() - r).abs().max().item() for x, r in zip(got, ref))
    magnitude = max(r.abs().max().item() for r in ref)
    assert errors["triton"] <= 2 * errors["torch"] + 1e-9 * magnitude, errors


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[needs_interpreter,
                                                                              pytest.mark.interpreter])])
def test_a_one_hot_batch_gives_exactly_zero_loss_like_the_originals(backend):
    """lse − positive is exactly 0 where the softmax is exactly one-hot (the positive is read from the very
    tiles the LSE reduced): lightly's one-pair batch at τ = 0.1, open_clip's separable batch."""
    out0 = torch.tensor([[1.0, 2.0, 3.0]])
    assert fc.nt_xent_loss(out0, 2 * out0, 0.1, backend=backend).item() == 0.0
    image = torch.eye(8, 16)
    assert fc.clip_loss(image, image.clone(), 100.0, backend=backend).item() == 0.0
