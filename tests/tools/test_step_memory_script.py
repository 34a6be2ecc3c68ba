"""benchmarks/step_memory.py, run as a user would, at tiny sizes: every point in its own worker, JSON written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_memory.py"
SUBPROCESS_TIMEOUT_S = 240

pytestmark = pytest.mark.timeout(SUBPROCESS_TIMEOUT_S + 30)


def test_step_memory_script_reports_both_steps_and_skips_plain_above_its_limit(tmp_path):
    json_path, png_path = tmp_path / "step.json", tmp_path / "step.png"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "64", "128", "--plain-max", "64", "--chunk", "32", "--width", "16",
         "--tokens", "2", "--in-dim", "8", "--dim", "8", "--phases", "--json", str(json_path), "--png", str(png_path)],
        capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"script exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(json_path.read_text())
    points = {(p["n"], p["mode"]): p for p in report["points"]}
    assert set(points) == {(64, "plain"), (64, "cached"), (128, "plain"), (128, "cached")}
    assert "skipped" in points[(128, "plain")], points[(128, "plain")]
    for key in ((64, "plain"), (64, "cached"), (128, "cached")):
        point = points[key]
        assert "error" not in point, f"{key}: {point.get('error')}"
        assert point["peak_bytes"] >= 0 and point["step_s"] > 0, f"{key}: {point}"
        assert point["measure"] in report["measure"], f"{key}: measure {point['measure']} not described"
    # --phases: the cached step's peak is the largest of its phases' (where VmHWM works).
    for key in ((64, "cached"), (128, "cached")):
        point = points[key]
        if point["measure"] == "cpu_vmhwm":
            phases = point["phase_peak_mib"]
            assert list(phases) == ["embed", "loss", "re-forward", "optimizer"], f"{key}: {phases}"
            assert point["peak_mib"] == max(phases.values()), f"{key}: {point}"
        else:
            assert "phase_peak_mib" not in point, f"{key}: {point}"
    assert "phase_peak_mib" not in points[(64, "plain")]
    # Same model and data; the dropout masks differ (the chunks interleave the two dropout layers' draws), so
    # the losses agree only roughly.
    assert points[(64, "cached")]["loss"] == pytest.approx(points[(64, "plain")]["loss"], rel=0.05)
    assert report["command"].startswith("benchmarks/step_memory.py --sizes 64 128")
