"""The work model (``python -m fastcontrast model``): its counting rule, and the compute-bound design it shows.

The model counts program 0 of each launch in the interpreter and multiplies by the programs (with loops
extended linearly from one and two iterations). Here that rule is checked against full counts of every
program at small tile-aligned sizes, and then the design claim of the fast-by-design issue is asserted on
the model's counts at N = 65 536, bf16, d ∈ {512, 768, 1024, 1280} on an H100: every kernel's modelled time,
and each loss's forward + backward, within 1.25× of its own tensor-core time.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="work is counted in the interpreter (TRITON_INTERPRET=1)"
)

HOPPER = ("cuda", 90)


def _recorded(loss, n, d):
    from fastcontrast.kernels.configs import assume_target
    from fastcontrast.kernels.launches import recorded_launches

    from fastcontrast.tools import model

    a, b = model._inputs(loss, n, d)
    with assume_target(HOPPER), recorded_launches() as launches:
        model._run_loss(loss, a, b, "triton")
    return launches


@pytest.mark.parametrize("loss,d", [("CLIP", 64), ("CLIP", 384), ("SigLIP", 128), ("NT-Xent", 384)],
                         ids=["CLIP-fused", "CLIP-panel", "SigLIP-fused", "NT-Xent-panel"])
def test_program_zero_times_programs_is_the_full_count(loss, d):
    from fastcontrast.kernels.configs import assume_target
    from fastcontrast.kernels.work_count import count_work

    from fastcontrast.tools import model

    n = 256
    launches = _recorded(loss, n, d)
    assert {launch.name for launch in launches} >= ({"gradient_kernel"} if d <= 256 and loss != "NT-Xent" else
                                                    {"ds_panel_kernel", "panel_matmul_kernel"})
    seen = set()
    for launch in launches:
        key = model._launch_key(launch)
        if key in seen:
            continue
        seen.add(key)
        with assume_target(HOPPER), count_work() as full:
            launch.kernel[launch.grid](*launch.args, **launch.kwargs)
        modelled = model.count_launch(launch)
        for field in ("flops", "dots", "transcendentals", "bytes_loaded", "bytes_stored"):
            assert getattr(modelled, field) == getattr(full, field), (launch.name, field)


@pytest.fixture(scope="module")
def modelled_losses():
    """Every loss × d of the model on an H100, from the model's own counts."""
    from fastcontrast.tools import model

    out = {}
    for loss in model.LOSSES:
        for d in model.DIMS:
            launches, glue_bytes = model.count_loss(loss, d, model.N_TARGET)
            out[(loss, d)] = model.time_loss(loss, d, model.N_TARGET, launches, glue_bytes, model.GPUS["H100"])
    return out


def test_every_kernel_is_within_1_25x_of_its_tensor_core_time(modelled_losses):
    slow = [f"{k.loss} d={k.d} {k.kernel}: modelled {k.modelled_s * 1e3:.2f} ms vs tensor {k.tensor_s * 1e3:.2f} ms "
            f"(memory {k.memory_s * 1e3:.2f}, SFU {k.sfu_s * 1e3:.2f})"
            for kernels, _ in modelled_losses.values() for k in kernels if k.modelled_s > 1.25 * k.tensor_s]
    assert not slow, "\n".join(slow)


def test_every_loss_forward_backward_is_within_1_25x_of_its_tensor_core_time(modelled_losses):
    for (loss, d), (_, total) in modelled_losses.items():
        assert total["modelled_s"] <= 1.25 * total["tensor_s"], (loss, d, total)


def test_the_counted_passes_are_four_at_clip_widths(modelled_losses):
    # Forward 1 (row and column LSE from one pass) + backward 3 (dS once per panel, then dS·B and dSᵀ·A).
    for (loss, d), (_, total) in modelled_losses.items():
        assert total["passes"] == pytest.approx(4.0, abs=1e-9), (loss, d)


def test_the_model_is_calibrated_against_a_published_measurement():
    from fastcontrast.tools import model

    cal = model.calibration(model.GPUS["H100"])
    # The reference is a measured 420 TFLOP/s; the model must land within 2× of it either way, or its
    # efficiency assumptions are off and every figure it prints with them.
    assert 0.5 < cal["measured_over_modelled"] < 2.0
    assert cal["measured_s"] == model.REFERENCE["measured_s"]


def test_the_quick_model_runs_from_the_command_line(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "model.json"
    result = subprocess.run([sys.executable, "-m", "fastcontrast", "model", "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    fields = {"loss", "kernel", "d", "n", "flops", "bytes", "bytes_hbm", "tensor_s", "sfu_s", "memory_s",
              "modelled_s", "naive_s"}
    loss_fields = fields | {"naive_as_written_s", "naive_best_s", "naive_best_passes"}
    assert data["kernels"] and data["losses"]
    for record in data["kernels"]:
        assert fields <= set(record), fields - set(record)
    for record in data["losses"]:
        assert loss_fields <= set(record), loss_fields - set(record)
        assert record["naive_as_written_s"] == record["naive_s"]
    assert {r["d"] for r in data["losses"]} == {512, 1280}
    assert torch.isfinite(torch.tensor([r["modelled_s"] for r in data["losses"]])).all()


@pytest.mark.parametrize("loss", ["CLIP", "SigLIP", "NT-Xent"])
def test_the_best_naive_loss_is_counted_at_three_gemm_passes(loss):
    # One logits GEMM (CLIP's other direction is its transpose; NT-Xent one 2n×2n matrix) and autograd's two
    # gradient GEMMs: the bar the fused kernels are held to. open_clip's single-process CLIP as written takes 6.
    from fastcontrast.tools import model

    best = model.naive_model(loss, 64, 4096, model.GPUS["H100"], best=True)
    as_written = model.naive_model(loss, 64, 4096, model.GPUS["H100"])
    assert best["passes"] == pytest.approx(3.0, rel=1e-6), best
    assert as_written["passes"] == pytest.approx(6.0 if loss == "CLIP" else 3.0, rel=1e-6), as_written
