"""gpu-check's parts that need no GPU: the "binaries match" verdict on fake launched binaries, finding the
installed compile table, and what it runs on a GPU the compile table has no checked binaries for."""

from __future__ import annotations

import json

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
    """The whole script at --dry sizes, with the plan a T4 gets (the tensors stay on the CPU)."""
    reason = "no Triton binary is compiled and checked for Tesla T4 (cuda:0, sm_75): simulated"
    monkeypatch.setattr(gpu_check, "engine_under_test", lambda device, dry: gpu_check.Plan("torch", reason, None))
    failed = gpu_check.gpu_check(str(tmp_path), budget_s=600, dry=True)
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert failed == 0, [r for r in records if r["status"] == "fail"]
    by_check = {r["check"]: r for r in records}
    assert by_check["engine under test"]["backend"] == "torch" and "sm_75" in by_check["engine under test"]["reason"]
    for name in ("int64 offsets past 2^31 elements", "single-pass vs two-pass forward", "argmax ties",
                 "launched binaries match the compile table", "fp32 near one-hot batch at scale 100"):
        assert by_check[name]["status"] == "skip" and "sm_75" in by_check[name]["reason"], by_check[name]
    numerics = [r for r in records if r["check"].startswith("numerics")]
    assert numerics and all(r["status"] == "ok" for r in numerics), numerics
    performance = [r for r in records if r["check"].startswith("performance")]
    assert performance and all(r["backend"] == "torch" for r in performance), performance
    assert "engine under test: backend=torch" in capsys.readouterr().out


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
