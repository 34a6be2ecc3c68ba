"""gpu-check's parts that need no GPU: the "binaries match" verdict on fake launched binaries, finding the
installed compile table, what it runs on a GPU the compile table has no checked binaries for, ``--plan``, the
sections' isolation (a crashing one leaves the others' answers), ``--summarize``, the compile pool, and the
measurements' pure parts. The whole ``--dry`` run, every section in its own subprocess, is in test_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ops.simulated_gpu import simulate_gpu

from fastcontrast.tools import binaries, check, gpu_check

ROW = {"key": "0123456789abcdef", "kernel": "gradient_kernel", "arch": "sm_90", "dtype": "bf16", "precision": "ieee",
       "constexprs": "HAS_POSITIVES", "block": "128x64x64", "warps": 8, "stages": 3, "registers": 168,
       "shared": 98304, "spill_stores": 0}


def _binary(**changes) -> dict:
    """A launched binary as binaries.binary_record makes it, identical to ROW unless changed."""
    binary = {"kernel": ROW["kernel"], "key": ROW["key"], "constexprs": ROW["constexprs"], "block": ROW["block"],
              "warps": ROW["warps"], "stages": ROW["stages"], "registers": ROW["registers"], "spills": 0,
              "shared": ROW["shared"]}
    binary.update(changes)
    return binary


def test_binaries_identical_to_the_table_pass():
    result = binaries.compare_with_table([_binary()], [ROW], "sm_90")
    assert result["status"] == "ok", result
    assert result["binaries"] == 1


@pytest.mark.parametrize("field, value", [("registers", 170), ("shared", 65536)])
def test_a_binary_whose_registers_or_shared_memory_differ_from_the_table_fails(field, value):
    result = binaries.compare_with_table([_binary(**{field: value})], [ROW], "sm_90")
    assert result["status"] == "fail", f"{field} {value} against the table's {ROW[field]} passed: {result}"
    [difference] = result["differing_from_table"]
    assert difference[field] == value and difference[f"table_{field}"] == [ROW[field]], difference


def test_a_spilling_binary_fails_even_when_it_matches_the_table():
    result = binaries.compare_with_table([_binary(spills=16)], [ROW], "sm_90")
    assert result["status"] == "fail" and result["spilling"], result


def test_a_binary_the_table_does_not_hold_fails():
    other_tile = _binary(key="fedcba9876543210", block="64x64x64")
    result = binaries.compare_with_table([other_tile], [ROW], "sm_90")
    assert result["status"] == "fail" and result["not_in_table"][0]["block"] == "64x64x64", result


def test_rows_of_another_architecture_do_not_vouch_for_a_binary():
    result = binaries.compare_with_table([_binary()], [ROW], "sm_80")
    assert result["status"] == "fail" and result["not_in_table"], result


def test_a_binary_without_a_rebuilt_key_is_matched_by_kernel_flags_and_tile():
    matched = binaries.compare_with_table([_binary(key=None)], [ROW], "sm_90")
    assert matched["status"] == "ok", matched
    differing = binaries.compare_with_table([_binary(key=None, registers=200)], [ROW], "sm_90")
    assert differing["status"] == "fail" and differing["differing_from_table"], differing


def test_the_compile_table_is_found_where_the_package_is_installed():
    document, where = binaries.load_table()
    # kernels/ in a checkout (editable install), fastcontrast/kernels/ in an installed wheel.
    assert where.replace("\\", "/").endswith("kernels/compile_table.json"), where
    assert document["rows"] and {"key", "arch", "registers", "shared"} <= set(document["rows"][0])


def test_a_missing_compile_table_is_an_error_not_a_silent_not_found(monkeypatch, tmp_path):
    monkeypatch.setattr(binaries, "TABLE_RESOURCE", ("fastcontrast.kernels", "no_such_table.json"))
    with pytest.raises(FileNotFoundError, match="not installed"):
        binaries.load_table()
    with pytest.raises(FileNotFoundError):
        binaries.load_table(str(tmp_path / "missing.json"))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no rows"):
        binaries.load_table(str(empty))


def test_the_binaries_check_reports_a_missing_table_as_a_failure(tmp_path):
    report = gpu_check.Report(None, budget_s=60)
    plan = gpu_check.Plan("triton", "simulated", "sm_90")
    gpu_check.check_binaries(report, torch.device("cpu"), str(tmp_path / "missing.json"), plan)
    [record] = report.records
    assert record["status"] == "fail" and "FileNotFoundError" in record["error"], record


@pytest.mark.parametrize("label, backend, table_arch", [("sm_75", "torch", None), ("sm_70", "torch", None),
                                                        ("sm_120", "torch", None), ("gfx1100", "torch", None),
                                                        ("sm_86", "triton", "sm_80"), ("sm_90", "triton", "sm_90")])
def test_gpu_check_tests_the_engine_auto_picks_on_the_device(monkeypatch, label, backend, table_arch):
    simulate_gpu(monkeypatch, label)
    plan = gpu_check.engine_under_test(torch.device("cuda"), dry=False)
    assert (plan.backend, plan.table_arch) == (backend, table_arch), plan
    assert label in plan.reason, plan.reason
    assert (plan.triton_only() is None) == (backend == "triton")


def test_check_skips_triton_on_an_unchecked_gpu_with_the_reason(monkeypatch):
    simulate_gpu(monkeypatch, "sm_75")
    backends, skipped = check.available_backends(torch.device("cuda"), interpreter=False)
    assert [b.backend for b in backends] == ["torch", "torch"]
    assert skipped[0][0] == "triton" and "Tesla T4 (cuda:0, sm_75)" in skipped[0][1], skipped
    simulate_gpu(monkeypatch, "sm_80")
    backends, skipped = check.available_backends(torch.device("cuda"), interpreter=False)
    assert [b.backend for b in backends] == ["torch", "torch", "triton"] and not skipped, skipped


def test_gpu_check_on_an_unchecked_gpu_runs_the_torch_engine_and_skips_the_triton_checks(monkeypatch, tmp_path,
                                                                                       capsys):
    """Every section at --dry sizes in this process (so the patched plan holds), with the plan a T4 gets (the
    tensors stay on the CPU)."""
    reason = "no Triton binary is compiled and checked for Tesla T4 (cuda:0, sm_75): simulated"
    monkeypatch.setattr(gpu_check, "engine_under_test", lambda device, dry: gpu_check.Plan("torch", reason, None))
    failed = gpu_check.gpu_check(str(tmp_path), budget_s=600, dry=True, isolate=False)
    records = gpu_check.read_records(str(tmp_path / "gpu_check.jsonl"))
    assert failed == 0, [r for r in records if r["status"] == "fail"]
    by_check = {r["check"]: r for r in records}
    assert by_check["engine under test"]["backend"] == "torch" and "sm_75" in by_check["engine under test"]["reason"]
    for name in ("int64 offsets past 2^31 elements", "single-pass vs two-pass forward", "argmax ties",
                 "launched binaries match the compile table", "fp32 near one-hot batch at scale 100"):
        assert by_check[name]["status"] == "skip" and "sm_75" in by_check[name]["reason"], by_check[name]
    numerics = [r for r in records if "numerics" in r["check"] and not r["check"].startswith("section")]
    assert numerics and all(r["status"] == "ok" for r in numerics), numerics
    probes = [r for r in records if r["check"].startswith("probe ")]
    assert len(probes) == 3 and all(r["backend"] == "torch" for r in probes), probes
    assert "engine under test: backend=torch" in capsys.readouterr().out
    assert (tmp_path / "gpu_check.md").read_text().startswith("# gpu-check")


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastcontrast", "gpu-check", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TRITON_INTERPRET": "1", **(env or {})})


def test_plan_prints_the_variant_count_the_sections_and_the_estimate_without_a_gpu():
    proc = _cli("--plan", "--dry", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    variants = int(out.split(" variants to compile")[0].rsplit("\n", 1)[-1])
    assert variants > 20, out
    for section in gpu_check.SECTIONS:
        assert f"  {section} " in out, f"{section} missing from the plan:\n{out}"
    # Every workload recorded, none failing, each section with a timeout and an estimate.
    assert "ERROR" not in out and "Estimate" in out, out
    for _, label, _ in gpu_check.workloads(gpu_check.DRY_SIZES, torch.device("cpu")):
        assert label in out, label


def test_plan_at_gpu_shapes_finds_every_variant_in_the_compile_table():
    # The run's own workloads at their GPU shapes (the probe at N = 65,536, d = 768; multi-panel numerics at
    # N = 10,007, d = 768 and 1280; determinism at 16,384; the host-sync steps at d = 16; ...), recorded for
    # sm_90 on this CPU: every binary an H100 / H200 run launches must be in the compile table, or its binaries
    # section fails on the first GPU (about 30 s here).
    proc = _cli("--plan", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert int(out.split(" variants to compile")[0].rsplit("\n", 1)[-1]) > 100, out
    assert "every one of them is in the compile table for sm_90" in out, out[-3000:]


def test_a_crashing_section_leaves_the_others_answers_and_is_reported_as_failed(tmp_path):
    proc = _cli("--dry", "--out", str(tmp_path), "--sections", "binaries", "ring",
                env={gpu_check.CRASH_ENV: "ring"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = gpu_check.read_records(str(tmp_path / "gpu_check.jsonl"))
    by_check = {r["check"]: r for r in records}
    ring = by_check["section ring"]
    assert ring["status"] == "fail" and "crashed (signal 6)" in ring["reason"], ring
    # The section before it answered, from its own process.
    assert by_check["section binaries"]["status"] == "done"
    table = by_check["launched binaries match the compile table"]
    assert table["section"] == "binaries" and table["status"] == "skip", table
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| ring | fail |" in summary and "## Failures" in summary, summary


def test_a_hanging_section_is_killed_at_its_timeout_and_reported_as_failed(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv(gpu_check.HANG_ENV, "ring")
    start = time.monotonic()
    record = gpu_check._run_isolated("ring", str(tmp_path), True, None, timeout=8)
    assert time.monotonic() - start < 60
    assert record["status"] == "fail" and "killed after its 8 s timeout" in record["reason"], record


def _synthetic_run(path, cut_short=True):
    """A run's JSONL as the sections write it: environment, a probe and its model, a panel check, a section
    that timed out."""
    model = {"check": "model CLIP N=65536 d=768", "status": "info", "section": "model", "loss": "CLIP", "n": 65536,
             "d": 768, "flops": 2.6e13, "gpus": {"H200": {"modelled_s": 0.040, "passes": 4.0, "naive_best_s": 0.12,
                                                          "kernels": {"lse_forward_kernel": {"modelled_s": 0.010}}}}}
    probe = {"check": "probe CLIP N=65536 d=768 bf16", "status": "ok", "section": "probe", "loss": "CLIP",
             "n": 65536, "d": 768, "median_s": 0.050, "peak_bytes": 2**30, "tflops": 527.0,
             "percent_of_dense_peak": 53.3, "naive_n": 65536, "naive_median_s": 0.15, "naive_peak_bytes": 40 * 2**30,
             "speedup_over_naive": 3.0, "flops_counted": "analytic",
             "kernels": {"lse_forward_kernel": {"ms": 12.5, "launches": 1}},
             "kernel_times_s": {"lse_forward_kernel": 0.0125}, "naive_best_s": 0.15}
    panel = {"check": "multi-panel numerics N=10007 d=768 bfloat16", "status": "ok", "section": "numerics",
             "bound": 0.02, "gradient": {"clip": 0.004, "siglip": 0.005}, "negatives": {"clip": 0.006},
             "negatives_bound": {"clip": 0.05}}
    timed_out = {"check": "section numerics", "status": "fail", "seconds": 90.0,
                 "reason": "killed after its 90 s timeout"}
    env = {"check": "environment", "status": "info", "dry": False, "device_name": "NVIDIA H200 (cuda:0)",
           "fastcontrast": "0.1.0", "torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8"}
    with open(path, "w") as f:
        for record in (env, model, {"check": "section probe", "status": "done", "seconds": 40.0}, probe, panel,
                       timed_out):
            f.write(json.dumps(record) + "\n")
        if cut_short:
            f.write('{"check": "cut short by a kill')  # the last line of a killed process


def test_summarize_rebuilds_the_markdown_from_the_jsonl(tmp_path):
    from fastcontrast.__main__ import main

    _synthetic_run(tmp_path / "gpu_check.jsonl")
    assert main(["gpu-check", "--summarize", str(tmp_path)]) == 0
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H200" in summary
    # The probe beside the H200 model: 50 ms measured over 40 ms modelled, per kernel 12.5 ms over 10 ms.
    probe_row = next(line for line in summary.splitlines() if line.startswith("| CLIP | 65536 |"))
    assert "| 1.25 |" in probe_row and "527" in probe_row, probe_row
    kernel_row = next(line for line in summary.splitlines() if line.startswith("| CLIP | lse_forward_kernel |"))
    assert kernel_row.endswith("| 1.25 |"), kernel_row
    assert "killed after its 90 s timeout" in summary
    assert "6.00e-03 (clip; 0.05)" in summary


def test_the_probes_records_are_what_the_work_models_calibration_reads(tmp_path, monkeypatch):
    # `python -m fastcontrast model --calibrate DIR/gpu_check.jsonl` takes the probe's lines; the probe's own
    # record (here on the CPU, no profiler) carries the same fields.
    from fastcontrast.tools import gpu_measure, model

    _synthetic_run(tmp_path / "gpu_check.jsonl", cut_short=False)
    [probe] = model.read_gpu_check(str(tmp_path / "gpu_check.jsonl"))
    assert (probe["loss"], probe["n"], probe["d"]) == ("CLIP", 65536, 768) and probe["naive_best_s"] == 0.15
    monkeypatch.setattr(gpu_measure, "kernel_times", lambda step, device: {
        "lse_forward_kernel": {"ms": 2.0, "launches": 1}, "other": {"ms": 1.0, "launches": 7}})
    record = gpu_measure.probe("CLIP", 32, 16, torch.device("cpu"), "torch", 1, "cpu", dry=True)
    assert record["kernel_times_s"] == {"lse_forward_kernel": 0.002}, record["kernel_times_s"]
    assert record["naive_best_s"] == record["naive_median_s"] and record["naive_n"] == 32
    assert record["loss"] in model.LOSSES


def test_largest_n_doubles_then_bisects():
    from fastcontrast.tools.gpu_measure import largest_n

    assert largest_n(lambda n: n <= 1000, 64, 4096) == 960
    assert largest_n(lambda n: n <= 10**9, 64, 4096) == 4096
    assert largest_n(lambda n: False, 64, 4096) is None


def test_max_n_extrapolates_the_fused_peak_and_searches_the_naive_one(monkeypatch):
    from fastcontrast.tools import gpu_measure

    # Fused: 1 GiB + 4 KiB per row; naive: 16 bytes per logit. Budget 100 GiB.
    def fake_peak(loss, n, d, device, provider, backend):
        peak = 2**30 + 4096 * n if provider == "fused" else 16 * n * n
        return peak if peak <= 100 * 2**30 else None

    monkeypatch.setattr(gpu_measure, "step_peak", fake_peak)
    record = gpu_measure.max_n("CLIP", 768, "cuda", "triton", 100 * 2**30, 65536, 16384, 2**22)
    assert record["fused_largest_n"] == (99 * 2**30) // 4096, record
    naive = record["naive_largest_n"]
    assert 16 * naive**2 <= 100 * 2**30 < 16 * (naive + naive // 8) ** 2, record
    assert record["fused_over_naive_n"] == record["fused_largest_n"] / naive
    assert record["fused_peak_4n_over_linear"] == pytest.approx(1.0)


@pytest.mark.parametrize("loss", ["CLIP", "SigLIP", "NT-Xent"])
def test_the_probes_naive_loss_is_the_work_models_best_naive_loss(loss):
    from fastcontrast.tools import gpu_measure, model

    grads = []
    for run in (lambda a, b: model._run_naive_best(loss, a, b), lambda a, b: gpu_measure.naive_best_step(loss, a, b)):
        a, b = gpu_measure.probe_inputs(48, 16, "cpu", dtype=torch.float64)
        run(a, b)
        grads.append((a.grad, b.grad))
    for name, x, y in zip(("grad_a", "grad_b"), *grads):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-15), name


@pytest.mark.parametrize("loss", ["clip", "siglip", "nt_xent", "memory_bank", "dcl"])
def test_the_negatives_term_is_the_gradient_minus_the_positives(loss):
    # The positive part has a gradient for every loss that splits; on CLIP the loss's gradient minus it is the
    # negatives' term alone: dA = s·(½(P_row + P_col)·B − B) / n, the positive part −s·mean(aᵢ·bᵢ) being the −B.
    a = gpu_check._unit(24, 8, torch.float64, "cpu", 1).requires_grad_()
    b = gpu_check._unit(24, 8, torch.float64, "cpu", 2).requires_grad_()
    positive = torch.autograd.grad(gpu_check._positive_part(loss, a, b, 14.3), [a, b])
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in positive)
    if loss == "clip":
        logits = 14.3 * a @ b.T
        softmax = (torch.softmax(logits, 1) + torch.softmax(logits, 0)) / 2
        expected_negatives = 14.3 * softmax @ b / 24
        expected_whole = expected_negatives - 14.3 * b / 24
        got_whole = gpu_check._loss_and_grads("clip", a.detach(), b.detach(), 14.3, "torch")[1]
        assert torch.allclose(got_whole, expected_whole, atol=1e-12)
        assert torch.allclose(got_whole - positive[0], expected_negatives, atol=1e-12)


_POOL = """
import json, torch
from fastcontrast.tools import gpu_compile, gpu_measure

def main():
    workload = [("probe", "clip", lambda device, backend: gpu_measure.fused_step(
        "CLIP", *gpu_measure.probe_inputs(64, 32, device), backend))]
    variants, _ = gpu_compile.record_variants(workload, ("cuda", 80), torch.device("cpu"))
    specs = [gpu_compile.variant_spec(v) for v in variants][:2]
    print(json.dumps([gpu_compile.compile_in_pool(specs, 2) for _ in range(2)]))

if __name__ == "__main__":
    main()
"""


def test_the_compile_pool_fills_tritons_cache_so_the_second_compile_hits(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(_POOL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(first) == 2 and not any("error" in r for r in first + second), (first, second)
    assert [r["cache_hit"] for r in first] == [False, False], first
    assert [r["cache_hit"] for r in second] == [True, True], second


def test_the_host_sync_section_runs_every_loss_per_dtype_and_fails_on_a_sync(monkeypatch):
    report = gpu_check.Report(None, budget_s=600)
    gpu_check.check_host_syncs(report, torch.device("cpu"))
    records = [r for r in report.records if r["check"].startswith("no host sync per step")]
    assert [r["status"] for r in records] == ["ok"] * 3, records
    assert all(r["losses"] >= 9 for r in records), records

    # A sync brought back into a loss's step fails the section, naming it.
    from fastcontrast.losses import clip

    real = clip.clip_loss

    def syncing_clip_loss(image_features, *args, **kwargs):
        image_features.detach().sum().item()  # a host read, as a stray .item() in a loss would be
        return real(image_features, *args, **kwargs)

    monkeypatch.setattr(clip, "clip_loss", syncing_clip_loss)
    report = gpu_check.Report(None, budget_s=600)
    gpu_check.check_host_syncs(report, torch.device("cpu"))
    records = [r for r in report.records if r["check"].startswith("no host sync per step")]
    assert all(r["status"] == "fail" and r["syncs"] for r in records), records


def test_every_kernel_of_the_compile_table_is_looked_up_among_the_launched_binaries():
    # launched_binaries reads the in-memory cache of each jit kernel of binaries.KERNEL_MODULES: a kernel that
    # moved to another module would otherwise never be compared with the table on a GPU.
    import importlib

    document, _ = binaries.load_table()
    in_table = {row["kernel"] for row in document["rows"]}
    looked_up = set()
    for module_name in binaries.KERNEL_MODULES:
        module = importlib.import_module(f"fastcontrast.kernels.{module_name}")
        looked_up |= {name for name in dir(module) if name.endswith("_kernel")}
    assert in_table <= looked_up, f"kernels in the table that gpu-check never looks up: {sorted(in_table - looked_up)}"
