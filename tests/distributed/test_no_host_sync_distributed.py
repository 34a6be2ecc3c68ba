"""No host sync in a distributed loss step (issue 19 item 5): every loss's distributed modes (the gathers, the
ring, the memory bank's key gather) on a real 2-rank gloo group with unequal batches, under
:class:`fastcontrast.tools.sync_check.HostSyncRecorder`, taking the accelerator's branch of every input check.

The layout exchange (``distributed.exchange_layout``: CPU numbers over the gloo host group) is host-only by
design: its events are recorded as exempt, and the test checks that they were seen and exempted, not missed.
"""

from __future__ import annotations

import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import leave_process_group

ROWS = (6, 4)  # unequal batches: the padded gathers
DEADLINE_S = 150

pytestmark = pytest.mark.timeout(DEADLINE_S + 60)


def _worker(rank, world_size, port, out_dir):
    from fastcontrast import _validation
    from fastcontrast.tools.sync_check import HostSyncRecorder, loss_steps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    real = _validation.values_readable
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fastcontrast") and getattr(module, "values_readable",
                                                                                   None) is real:
            module.values_readable = lambda tensor: False
    results = {}
    try:
        for name, step in loss_steps("cpu", torch.float32, rows=ROWS[rank], distributed=True):
            try:
                with HostSyncRecorder() as recorder:
                    loss = step()
                results[name] = {
                    "events": [str(e) for e in recorder.events],
                    "exempt": [(str(e), reason) for e, reason in recorder.exempt],
                    "finite": bool(torch.isfinite(loss).all()),
                }
            except Exception:
                results[name] = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        leave_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("no_host_sync")
    context = mp.start_processes(_worker, args=(len(ROWS), _free_port(), str(out_dir)), nprocs=len(ROWS),
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the 2-rank gloo group did not finish within {DEADLINE_S}s; its processes were killed")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(len(ROWS))]


def test_every_distributed_loss_step_has_no_host_sync(rank_results):
    assert rank_results[0], "no step ran"
    for rank, results in enumerate(rank_results):
        for name, result in results.items():
            assert "crash" not in result, f"rank {rank}, {name}: {result.get('crash')}"
            assert result["events"] == [], f"rank {rank}, {name}: host syncs in one step: {result['events']}"
            assert result["finite"], f"rank {rank}, {name}: non-finite loss"


def test_the_gloo_layout_exchange_is_seen_and_exempted(rank_results):
    exempt = [reason for results in rank_results for result in results.values() for _, reason in
              result.get("exempt", [])]
    assert exempt, "no layout exchange was recorded: the exemption is untested"
    assert all("gloo" in reason for reason in exempt)
