"""benchmarks/distributed_exchange.py, run as a user would, at tiny sizes on real gloo groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed_exchange.py"
LOSSES = ("clip", "siglip", "ntxent")
SPAWN_DEADLINE_S = 60  # per spawned group, enforced by the script itself
SUBPROCESS_TIMEOUT_S = SPAWN_DEADLINE_S * len(LOSSES) + 60

pytestmark = pytest.mark.timeout(SUBPROCESS_TIMEOUT_S + 30)


def test_distributed_exchange_script_reports_both_exchanges_and_ring_not_above_gather(tmp_path):
    json_path = tmp_path / "exchange.json"
    # tests/conftest.py sets TRITON_INTERPRET=1 for the kernel tests; a user's shell does not have it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "64", "--dim", "64", "--world-sizes", "2", "--repeats", "1",
         "--losses", *LOSSES, "--deadline", str(SPAWN_DEADLINE_S), "--collective-timeout", "30",
         "--markdown", "--json", str(json_path)],
        capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"script exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "| peak ratio ring/gather |" in proc.stdout, f"no Markdown table in the output:\n{proc.stdout}"
    data = json.loads(json_path.read_text())
    assert data["meta"]["label"].startswith("CPU / gloo, ") and "torch " in data["meta"]["label"]

    above = []
    for loss in LOSSES:
        rows = {r["exchange"]: r for r in data["results"] if r["loss"] == loss and r["world_size"] == 2}
        assert set(rows) == {"gather", "ring"}, f"{loss}: exchanges reported: {sorted(rows)}"
        for exchange, row in rows.items():
            assert row["status"] == "ok", f"{loss}/{exchange}: {row['status']}: {row.get('reason')}"
            assert row["peak_bytes"] > 0 and row["time_s"] > 0, (
                f"{loss}/{exchange}: peak_bytes={row['peak_bytes']}, time_s={row['time_s']}"
            )
        if rows["ring"]["peak_bytes"] > rows["gather"]["peak_bytes"]:
            above.append(f"{loss}: ring {rows['ring']['peak_bytes']} B > gather {rows['gather']['peak_bytes']} B")
    assert not above, "ring's peak per rank above gather's at W=2: " + "; ".join(above)
