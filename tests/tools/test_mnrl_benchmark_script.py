"""benchmarks/mnrl_vs_sentence_transformers.py, run as a user would, at tiny sizes: both losses in their own
workers, the same loss value, JSON written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers.sentence_transformer.losses")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mnrl_vs_sentence_transformers.py"
SUBPROCESS_TIMEOUT_S = 240

pytestmark = pytest.mark.timeout(SUBPROCESS_TIMEOUT_S + 30)


def test_mnrl_benchmark_script_measures_both_losses_with_equal_values(tmp_path):
    json_path = tmp_path / "mnrl.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "96", "--d", "16", "--negatives", "2", "--repeats", "0",
                           "--json", str(json_path)], capture_output=True, text=True, env=env,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"script exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(json_path.read_text())
    original, ours = report["results"]
    assert (original["provider"], ours["provider"]) == ("sentence-transformers 6.2.0", "fastcontrast (torch engine)")
    assert ours["loss"] == pytest.approx(original["loss"], rel=1e-5), (ours["loss"], original["loss"])
    for result in (original, ours):
        assert result["peak_bytes"] >= 0 and result["step_s"] > 0, result
    assert "| fastcontrast (torch engine) |" in proc.stdout
