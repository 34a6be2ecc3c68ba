"""`python -m fastcontrast bench | check | info | gpu-check | model`, run as a user would, at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ops.simulated_gpu import CHECKED, DEVICES, simulate_gpu

from fastcontrast import __main__ as cli
from fastcontrast.tools import bench as _bench
from fastcontrast.tools.bench import Case, largest_n, model_flops, parse_bytes


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # tests/conftest.py sets TRITON_INTERPRET=1 for the kernel tests; a user's shell does not have it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastcontrast", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_bench_cli_json_has_every_provider_with_positive_memory(tmp_path):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = _run_cli("bench", "--loss", "clip", "siglip", "nt_xent", "--n", "512", "1024", "--d", "64",
                    "--repeats", "1", "--memory-budget", "1GiB", "--time-limit", "120",
                    "--search-max", "2048", "--no-progress", "--json", str(json_path),
                    "--plot", str(png_path))
    assert proc.returncode == 0, f"bench exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(json_path.read_text())
    assert data["meta"]["memory_measure"] in _bench.MEASURES
    assert data["meta"]["environment"]["torch"]
    for loss in ("clip", "siglip", "nt_xent"):
        rows = [r for r in data["results"] if r["loss"] == loss]
        assert {r["provider"] for r in rows} == set(_bench.PROVIDERS), f"{loss}: providers missing"
        for r in rows:
            if r["status"] == "skipped":
                assert r["provider"] == "triton" and r["reason"], f"{loss}/triton skipped without a reason"
                continue
            name = f"{loss}/{r['provider']}/N{r['n']}"
            assert r["status"] == "ok", f"{name}: {r['status']} ({r['reason']})"
            assert r["peak_bytes"] > 0, f"{name}: peak_bytes {r['peak_bytes']}"
            assert r["total_bytes"] > r["peak_bytes"], f"{name}: total_bytes must include the inputs"
            assert r["time_s"] > 0 and r["flops_per_s"] > 0, f"{name}: time {r['time_s']}"
            assert r["flops"] == model_flops(loss, r["n"], 64, "forward+backward")
    searched = {(s["loss"], s["provider"]) for s in data["largest_n"]}
    assert {("clip", "reference"), ("clip", "torch")} <= searched
    for s in data["largest_n"]:
        assert s["largest_n"] is not None and s["largest_n"] >= 512, s
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "memory vs naive" in proc.stdout and "Largest N within a 1.00 GiB budget" in proc.stdout


def test_check_cli_passes_on_this_machine():
    proc = _run_cli("check", timeout=550)  # every loss family: ~2.5 min on 2 busy cores
    output = proc.stdout[-2000:] + "\n" + proc.stderr[-2000:]
    assert proc.returncode == 0, f"check exited {proc.returncode}:\n{output}"
    assert "FAIL" not in proc.stdout
    assert "passed" in proc.stdout
    checked = {line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")}
    for loss in ("clip", "siglip", "nt_xent", "memory_bank", "dcl", "dclw", "distill", "coca", "supcon", "mnrl"):
        assert loss in checked, f"check does not cover {loss}: {sorted(checked)}"


def test_info_cli_reports_auto_backend():
    proc = _run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert 'backend="auto" picks' in proc.stdout
    assert "torch" in proc.stdout


def _hide_the_compile_checks(monkeypatch):
    """Make ``from fastcontrast.kernels import aot`` raise ImportError, even where another test imported it."""
    import fastcontrast.kernels

    monkeypatch.setitem(sys.modules, "fastcontrast.kernels.aot", None)
    monkeypatch.delattr(fastcontrast.kernels, "aot", raising=False)


def test_info_kernels_exits_nonzero_when_the_compile_checks_do_not_import(monkeypatch, capsys):
    _hide_the_compile_checks(monkeypatch)
    assert cli.main(["info", "--kernels"]) == 1
    assert "cannot build the kernel table" in capsys.readouterr().err


def test_info_without_kernels_does_not_need_the_compile_checks(monkeypatch, capsys):
    _hide_the_compile_checks(monkeypatch)
    assert cli.main(["info"]) == 0


def test_info_kernels_json_has_one_row_per_binary_with_its_resources(tmp_path):
    """One target, dtype and dim, written as JSON (the whole table takes ~45 minutes; the compile checks
    cover it through the committed table)."""
    path = tmp_path / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastcontrast", "info", "--kernels", "--arch", "gfx942",
                           "--dtypes", "bf16", "--dims", "48", "--json", str(path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(path.read_text())
    assert (table["archs"], table["dtypes"], table["dims"]) == (["gfx942"], ["bf16"], [48])
    # The LSE partials' merge has no features: its one binary is fp32 whatever the features' dtype; so is the
    # masked LSE's pair kernel for a guide (guides enter as fp32).
    fp32_only = [r for r in table["rows"] if r["kernel"] == "merge_partials_kernel"
                 or r["kernel"] == "pair_similarity_kernel" and r["dtype"] == "fp32"]
    others = [r for r in table["rows"] if r not in fp32_only]
    assert others and {(r["arch"], r["dtype"]) for r in others} == {("gfx942", "bf16")}
    assert {(r["arch"], r["dtype"]) for r in fp32_only} == {("gfx942", "fp32")}
    # d = 48 launches the forward and the fused gradient, never the core's panel path (the masked LSE's
    # backward is always panels: its dS kernel and the panel GEMMs).
    kernels = {r["kernel"] for r in table["rows"]}
    assert kernels >= {"lse_forward_kernel", "siglip_forward_kernel", "gradient_kernel", "masked_lse_kernel",
                       "masked_ds_panel_kernel", "pair_similarity_kernel"}
    assert "ds_panel_kernel" not in kernels
    for key in ("kernel", "arch", "dtype", "precision", "constexprs", "registers", "spill_stores", "stack",
                "shared"):
        assert all(key in row for row in table["rows"]), key


def test_gpu_check_dry_runs_every_section_in_its_own_subprocess(tmp_path):
    """The one-shot GPU check at tiny sizes on the CPU, every section in its own subprocess as on a GPU, so that
    the script cannot rot before a GPU comes."""
    from fastcontrast.tools import gpu_check

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastcontrast", "gpu-check", "--dry", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    records = gpu_check.read_records(str(tmp_path / "gpu_check.jsonl"))
    assert not [r for r in records if r["status"] == "fail"]
    by_check = {r["check"]: r for r in records}
    # Each section ran in its own process and wrote its own lines (the model beside the probe too).
    for section in gpu_check.SECTIONS:
        assert by_check[f"section {section}"]["status"] == "done", by_check.get(f"section {section}")
        assert [r for r in records if r.get("section") == section], f"section {section} wrote no record"
    assert [r for r in records if r.get("section") == "model" and r["status"] == "info"]
    checks = {r["check"].split(" d=")[0].split(" N=")[0] for r in records}
    for expected in ("compile plan", "compile into triton's cache", "probe CLIP", "probe SigLIP", "probe NT-Xent",
                     "multi-panel numerics", "numerics", "fp32 under the new TF32 API",
                     "fp16 gradients with dS below fp16 subnormals", "fp32 near one-hot batch at scale 100",
                     "no host sync per step bfloat16", "int64 offsets past 2^31 elements",
                     "single-pass vs two-pass forward", "argmax ties", "bitwise determinism",
                     "launched binaries match the compile table", "ring per-block shapes",
                     "largest N in 90% of memory CLIP"):
        assert expected in checks, f"{expected!r} missing from {sorted(checks)}"
    assert by_check["engine under test"]["backend"] == "triton"
    assert by_check["compile plan"]["variants"] > 20 and not by_check["compile plan"]["errors"]
    assert "--dry" in by_check["compile into triton's cache"]["reason"]
    # The interpreter launches no binary, but the installed compile table must be found.
    assert by_check["launched binaries match the compile table"]["table"].endswith("compile_table.json")
    panels = [r for r in records if r["check"].startswith("multi-panel numerics")]
    assert {"bfloat16", "float16"} == {r["check"].rsplit(" ", 1)[1] for r in panels}
    for loss in ("clip", "siglip", "nt_xent", "memory_bank", "dcl", "dclw", "supcon", "distill", "coca"):
        assert all(loss in r["gradient"] for r in panels), f"gpu-check's numerics leave out {loss}"
    assert "meaningless" in by_check["probe CLIP N=128 d=32 bf16"]["note"]
    # The work model's records (from its own process) joined to the probe's once both are in.
    assert by_check["measured over modelled CLIP N=128 d=32"]["measured_over_modelled"] > 0
    summary = (tmp_path / "gpu_check.md").read_text()
    probe_row = next(line for line in summary.splitlines() if line.startswith("| CLIP | 128 |"))
    assert not probe_row.endswith("| - |"), probe_row
    for heading in ("## Sections", "## Performance probe", "## Multi-panel numerics", "## Ring per-block shapes",
                    "## Compilation"):
        assert heading in summary, heading


def test_cli_module_imports_without_triton_matplotlib_or_cuda():
    code = ("import sys, fastcontrast.__main__, torch; "
            "heavy = [m for m in ('triton', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy; assert not torch.cuda.is_initialized()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_plot_without_matplotlib_asks_for_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        _bench.plot_results([], str(tmp_path / "x.png"))


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("512M", 512 * 2**20), ("1.5g", 3 * 2**29),
                                            ("2GB", 2 * 10**9), ("4096", 4096)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_unknown_units():
    with pytest.raises(ValueError, match="8GiB"):
        parse_bytes("8 parsecs")


def test_model_flops_is_the_naive_gemm_work():
    n, d = 1000, 64
    assert model_flops("clip", n, d, "forward") == 2 * 2 * n * n * d
    assert model_flops("siglip", n, d, "forward+backward") == 3 * 2 * n * n * d
    assert model_flops("nt_xent", n, d, "forward") == 2 * (2 * n) ** 2 * d
    assert model_flops("mnrl", n, d, "forward") == 2 * n * (2 * n) * d  # N queries × 2N candidates


def test_mnrl_bench_step_gives_the_naive_gradients_on_the_torch_engine():
    from fastcontrast.tools.bench.cases import make_inputs, make_step

    grads = {}
    for provider in ("reference", "torch"):
        case = Case("mnrl", provider, 33, 48, "fp64")
        grads[provider] = make_step(case, make_inputs(case, seed=1))()
    assert len(grads["torch"]) == 3, "queries, positives and hard negatives each get a gradient"
    for name, ours, naive in zip(("queries", "positives", "negatives"), grads["torch"], grads["reference"]):
        assert (ours - naive).abs().max() < 1e-12, f"d {name}: {(ours - naive).abs().max():.2e}"


def _fake_step(case: Case, *, memory_per_row: int, limit_rows: int = 10**9, time_limit_rows: int = 10**9):
    row = _bench.empty_row(case)
    if case.n > limit_rows:
        row.update(status="oom", reason="out of memory")
    elif case.n > time_limit_rows:
        row.update(status="time-limited", reason="one call took too long")
    else:
        row.update(time_s=1e-3 * case.n, input_bytes=case.n, peak_bytes=memory_per_row * case.n,
                   total_bytes=(memory_per_row + 1) * case.n)
    return row


def test_largest_n_stops_on_out_of_memory_and_reports_the_last_fit():
    template = Case("clip", "reference", 0, 8)
    search = largest_n(lambda c: _fake_step(c, memory_per_row=10, limit_rows=5000), template,
                       budget=10**6, start=1024, max_n=2**20, hard_budget=True)
    assert (search.largest_n, search.stopped_at_n, search.stop) == (4096, 8192, "memory")


def test_largest_n_calls_a_time_limit_a_time_limit_and_projects_memory():
    template = Case("clip", "torch", 0, 8)
    search = largest_n(lambda c: _fake_step(c, memory_per_row=10, time_limit_rows=3000), template,
                       budget=110_000, start=512, max_n=2**20, hard_budget=True)
    assert (search.largest_n, search.stop) == (2048, "time")
    assert search.projected_memory_limit_n == 10_000  # 11 bytes per row within a 110 kB budget


def test_largest_n_reuses_known_results():
    template = Case("clip", "torch", 0, 8)
    calls = []

    def run(case):
        calls.append(case.n)
        return _fake_step(case, memory_per_row=1, limit_rows=4096)

    known = {1024: _fake_step(Case("clip", "torch", 1024, 8), memory_per_row=1)}
    search = largest_n(run, template, budget=10**9, start=1024, max_n=2**20, hard_budget=True, known=known)
    assert calls == [2048, 4096, 8192] and search.largest_n == 4096


def test_largest_n_without_hard_budget_does_not_run_a_step_projected_over_budget():
    template = Case("clip", "reference", 0, 8)
    calls = []

    def run(case):
        calls.append(case.n)
        row = _fake_step(case, memory_per_row=0)
        row["total_bytes"] = case.n**2  # quadratic, like the naive loss
        return row

    search = largest_n(run, template, budget=5 * 10**6, start=256, max_n=2**20, hard_budget=False)
    assert search.largest_n == 2048 and search.stop == "memory" and calls[-1] == 2048


def test_largest_n_does_not_run_a_step_projected_past_the_time_limit():
    template = Case("clip", "torch", 0, 8)
    calls = []

    def run(case):
        calls.append(case.n)
        return _fake_step(case, memory_per_row=1)  # 1 ms per row: N=2048 takes 2 s, N=4096 would take ~8 s

    search = largest_n(run, template, budget=10**9, start=1024, max_n=2**20, hard_budget=True, time_limit=5)
    assert calls == [1024, 2048]
    assert (search.largest_n, search.stopped_at_n, search.stop) == (2048, 4096, "time")
    assert "projected" in search.stop_reason


@pytest.mark.parametrize("label", sorted(DEVICES))
def test_info_says_which_engine_auto_picks_on_each_gpu_and_why(monkeypatch, capsys, label):
    simulate_gpu(monkeypatch, label)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    name = DEVICES[label][0]
    assert f"{name}, {label}," in out, out
    binaries = [" ".join(line.split()) for line in out.splitlines() if "Triton binaries" in line]
    picks = [" ".join(line.split()) for line in out.splitlines() if line.strip().startswith("cuda:0 bfloat16")]
    assert len(binaries) == 1 and len(picks) == 1, out
    if label in CHECKED:
        assert binaries[0].startswith("Triton binaries checked for "), binaries[0]
        assert picks[0].startswith("cuda:0 bfloat16 triton: ") and "compiled and checked for" in picks[0], picks[0]
    else:
        assert binaries[0].startswith("Triton binaries none checked: "), binaries[0]
        assert picks[0].startswith(f"cuda:0 bfloat16 torch: no Triton binary is compiled and checked for {name} "
                                   f"(cuda:0, {label})"), picks[0]
