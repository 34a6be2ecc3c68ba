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
def modelled_losses(tmp_path_factory):
    """Every loss × d of the model on an H100, from the model's own command line (``model --json``).

    It runs in a child process: at N = 65,536 the counting holds GBs of split-K slabs for a while, and a
    process's heap does not give such peaks back, so in the test process they would add to whatever the
    suite had grown to before (a CI run was OOM-killed that way)."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("model") / "model.json"
    result = subprocess.run([sys.executable, "-m", "fastcontrast", "model", "--gpus", "H100", "--json", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def _gemm_kernels(modelled_losses):
    """The kernels with tensor-core work. The merge of the LSE partials (O(N) bytes, no dot) is not a GEMM to
    hold to the tensor cores; its time is in every loss's total, which the tests below bound."""
    gemm = [k for k in modelled_losses["kernels"] if k["flops"] > 0]
    assert {k["kernel"] for k in modelled_losses["kernels"]} - {k["kernel"] for k in gemm} <= {"merge_partials_kernel"}
    return gemm


def test_every_kernel_but_its_partial_last_wave_is_within_1_25x_of_its_tensor_core_time(modelled_losses):
    # The counted design: each kernel's work, with full waves, is tensor-core bound.
    slow = [f"{k['loss']} d={k['d']} {k['kernel']}: modelled {k['modelled_s'] * 1e3:.2f} ms (of which partial "
            f"waves {k['wave_s'] * 1e3:.2f}) vs tensor {k['tensor_s'] * 1e3:.2f} ms (memory "
            f"{k['memory_s'] * 1e3:.2f}, SFU {k['sfu_s'] * 1e3:.2f})"
            for k in _gemm_kernels(modelled_losses) if k["modelled_s"] - k["wave_s"] > 1.25 * k["tensor_s"]]
    assert not slow, "\n".join(slow)


def test_every_loss_kernels_but_partial_waves_are_within_1_25x_of_their_tensor_core_time(modelled_losses):
    for total in modelled_losses["losses"]:
        assert total["kernels_s"] - total["wave_s"] <= 1.25 * total["tensor_s"], total


def test_every_kernel_is_within_1_25x_of_its_tensor_core_time(modelled_losses):
    # Partial last waves included: the grown panels give the GEMMs grids of many waves (at d = 1280 the
    # 4096² panels' 640-tile grids left the last of 5 waves part-empty, 1.31x).
    slow = [(k["loss"], k["d"], k["kernel"]) for k in _gemm_kernels(modelled_losses)
            if k["modelled_s"] > 1.25 * k["tensor_s"]]
    assert not slow, slow


def test_every_loss_step_with_its_torch_ops_and_partial_waves_is_within_1_25x_of_its_tensor_core_time(
        modelled_losses):
    # Everything the step issues: the Triton launches with their partial last waves, the torch ops around and
    # inside the engines (a handful, now that split reductions add up in the kernels), 4 µs per launch.
    for total in modelled_losses["losses"]:
        assert total["modelled_s"] <= 1.25 * total["tensor_s"], total
        assert total["torch_ops"] <= 16, (total["loss"], total["d"], total["torch_op_names"])


def test_the_torch_ops_and_partial_waves_are_in_the_step(modelled_losses):
    for total in modelled_losses["losses"]:
        assert total["launches"] == total["triton_launches"] + total["torch_ops"] + total["torch_ops_outside"]
        assert total["glue_bytes"] == total["torch_op_bytes"] + total["torch_op_bytes_outside"] > 0
        assert total["modelled_s"] == pytest.approx(total["kernels_s"] + total["glue_s"], rel=1e-12)
        assert total["launches_without_table_row"] == 0, "every launch's binary is in the compile table"
    for k in modelled_losses["kernels"]:
        assert k["resident_programs"] >= 1 and k["wave_factor"] >= 1.0


def test_the_counted_passes_are_four_for_clip_three_for_siglip_and_at_most_two_and_a_half_for_nt_xent(
        modelled_losses):
    # Forward 1 (row and column LSE from one pass) + backward 3 (dS once per panel, then dS·B and dSᵀ·A);
    # SigLIP forms its gradient in the forward: S and dS once per panel, dS·B, dSᵀ·A, and no backward pass;
    # NT-Xent's single-tower matrix by symmetry: its upper block triangle in the forward and for G = dS + dSᵀ,
    # then G·Z (2 + 1/row blocks + 1/(2·panels per side), in passes of its 2N × 2N matrix).
    from fastcontrast.tools import model

    assert {(t["loss"], t["d"]) for t in modelled_losses["losses"]} == {
        (loss, d) for loss in model.LOSSES for d in model.DIMS}
    for total in modelled_losses["losses"]:
        if total["loss"] == "NT-Xent":
            assert 2.0 < total["passes"] <= 2.1, (total["loss"], total["d"], total["passes"])
            continue
        expected = 3.0 if total["loss"] == "SigLIP" else 4.0
        assert total["passes"] == pytest.approx(expected, abs=1e-9), (total["loss"], total["d"])


def test_launch_overhead_is_at_most_3_percent_of_every_modelled_step(modelled_losses):
    # Every launch, Triton or torch, costs the model's LAUNCH_S; the panels grow with N·d so that a step at
    # N = 65,536 makes about a hundred launches, not ~800.
    from fastcontrast.tools import model

    for total in modelled_losses["losses"]:
        overhead = total["launches"] * model.LAUNCH_S
        assert overhead <= 0.03 * total["modelled_s"], (
            f"{total['loss']} d={total['d']}: {total['launches']} launches, {overhead * 1e3:.2f} ms of "
            f"{total['modelled_s'] * 1e3:.2f} ms")


def test_the_model_records_carry_their_fields(modelled_losses):
    from fastcontrast.tools import model

    fields = {"loss", "kernel", "d", "n", "flops", "bytes", "bytes_hbm", "tensor_s", "sfu_s", "memory_s",
              "modelled_s", "naive_s"}
    loss_fields = fields | {"naive_as_written_s", "naive_best_s", "naive_best_passes"}
    assert modelled_losses["kernels"] and modelled_losses["losses"]
    for record in modelled_losses["kernels"]:
        assert fields <= set(record), fields - set(record)
    for record in modelled_losses["losses"]:
        assert loss_fields <= set(record), loss_fields - set(record)
        assert record["naive_as_written_s"] == record["naive_s"]
        assert record["gpu"] == model.GPUS["H100"].name
    assert torch.isfinite(torch.tensor([r["modelled_s"] for r in modelled_losses["losses"]])).all()


def test_the_model_is_calibrated_against_a_published_measurement():
    from fastcontrast.tools import model

    cal = model.calibration(model.GPUS["H100"])
    # The reference is a measured 420 TFLOP/s; the model must land within 2× of it either way, or its
    # efficiency assumptions are off and every figure it prints with them.
    assert 0.5 < cal["measured_over_modelled"] < 2.0
    assert cal["measured_s"] == model.REFERENCE["measured_s"]


@pytest.mark.parametrize("loss", ["CLIP", "SigLIP", "NT-Xent"])
def test_the_best_naive_loss_is_counted_at_three_gemm_passes(loss):
    # One logits GEMM (CLIP's other direction is its transpose; NT-Xent one 2n×2n matrix) and autograd's two
    # gradient GEMMs: the bar the fused kernels are held to. open_clip's single-process CLIP as written takes 6.
    from fastcontrast.tools import model

    best = model.naive_model(loss, 64, 4096, model.GPUS["H100"], best=True)
    as_written = model.naive_model(loss, 64, 4096, model.GPUS["H100"])
    assert best["passes"] == pytest.approx(3.0, rel=1e-6), best
    assert as_written["passes"] == pytest.approx(6.0 if loss == "CLIP" else 3.0, rel=1e-6), as_written


def test_the_model_counts_every_launch_the_recorder_sees_at_65536(modelled_losses):
    # Recorded apart, without the model's code: the Triton launches by kernel, and the torch ops by
    # torch.profiler (the model uses a dispatch mode), inside the engines' custom ops and around them.
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "record_step.py")
    result = subprocess.run([sys.executable, script, "CLIP", "768", "65536"], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads(result.stdout.strip().splitlines()[-1])
    (total,) = [t for t in modelled_losses["losses"] if t["loss"] == "CLIP" and t["d"] == 768]

    def in_place_as_out_of_place(names):
        # The autograd engine's gradient accumulation is add_ to the profiler, add to a dispatch mode.
        merged = {}
        for name, count in names.items():
            key = name[:-1] if name.endswith("_") and not name.endswith("__") else name
            merged[key] = merged.get(key, 0) + count
        return merged

    assert total["triton_launch_names"] == recorded["triton"]
    assert total["torch_op_names"] == recorded["torch_inside"]
    assert in_place_as_out_of_place(total["torch_op_names_outside"]) == in_place_as_out_of_place(
        recorded["torch_outside"])
    assert total["triton_launches"] == sum(recorded["triton"].values())
    assert total["torch_ops"] == sum(recorded["torch_inside"].values())
    assert total["launches"] == (sum(recorded["triton"].values()) + sum(recorded["torch_inside"].values())
                                 + sum(recorded["torch_outside"].values()))


def test_wave_factor_counts_a_partial_last_wave_as_a_whole_one():
    from fastcontrast.tools import model

    h100 = model.GPUS["H100"]
    assert model.wave_factor(132 * 2, 2, h100) == 1.0
    assert model.wave_factor(132 * 2 + 1, 2, h100) == pytest.approx(2 / ((132 * 2 + 1) / 264))
    assert model.wave_factor(1, None, h100) == 132.0  # one program on one of 132 SMs


def _probe_line(loss, d, n, times, naive=None):
    import json

    record = {"section": "performance", "loss": loss, "d": d, "n": n, "kernel_times_s": times}
    if naive is not None:
        record["naive_best_s"] = naive
    return json.dumps(record) + "\n"


def test_calibrate_scales_each_kernel_kind_by_its_measured_factor(tmp_path):
    from fastcontrast.tools import model

    h100 = model.GPUS["H100"]
    n, d = 4096, 128
    launches, torch_ops = model.count_loss("CLIP", d, n)
    kernels, total = model.time_loss("CLIP", d, n, launches, torch_ops, h100)
    modelled = {k.kernel: k.modelled_s for k in kernels}
    first, *rest = sorted(modelled)
    naive_best = model.naive_model("CLIP", d, n, h100, best=True)["naive_s"]
    results = tmp_path / "gpu_check.jsonl"
    results.write_text('{"section": "environment"}\n'
                       + _probe_line("CLIP", d, n, {first: 2 * modelled[first], "not_a_kernel": 1.0}, 3 * naive_best))
    measured = model.measured_calibration(str(results), h100)
    assert measured["kernels"] == {first: pytest.approx(2.0)}
    assert measured["naive_best"] == pytest.approx(3.0)

    total.update(gpu=h100.name, naive_s=1.0, naive_best_s=1.0)
    result = {"kernels": [{**k.__dict__, "gpu": h100.name} for k in kernels], "losses": [total]}
    calibrated = model.apply_calibration(result, measured)
    (loss,) = calibrated["losses"]
    assert loss["calibrated_s"] == pytest.approx(loss["modelled_s"] + modelled[first])
    assert loss["naive_best_calibrated_s"] == pytest.approx(3.0)
    assert calibrated["measured_calibration"]["unmeasured_kernels"] == rest


def test_calibrate_refuses_a_file_without_a_performance_probe(tmp_path):
    from fastcontrast.tools import model

    empty = tmp_path / "gpu_check.jsonl"
    empty.write_text('{"section": "environment"}\n')
    with pytest.raises(ValueError, match="no performance-probe record"):
        model.read_gpu_check(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        model.read_gpu_check(str(broken))
    # A run killed while writing its last line leaves it without a newline: the lines before still count.
    cut = tmp_path / "cut.jsonl"
    cut.write_text(_probe_line("CLIP", 128, 4096, {"lse_forward_kernel": 1e-3}) + '{"check": "probe SigL')
    assert [r["loss"] for r in model.read_gpu_check(str(cut))] == ["CLIP"]
