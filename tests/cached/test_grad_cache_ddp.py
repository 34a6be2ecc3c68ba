"""``GradCache`` under DistributedDataParallel on a real gloo group of 2 processes, fp64, dropout on.

Each rank trains a two-tower model wrapped in one DDP module (``find_unused_parameters=False``: every
parameter, ``logit_scale`` and ``logit_bias`` included, must get its gradient in the one synchronised
backward, or DDP fails at the next step), 3 steps with ``GradCache(chunk_size=4)`` on its own 16 rows, with
``ClipLoss(local_loss=True, gather_with_grad=True)`` (exchange "gather" and "ring") and ``SigLipLoss``. The
reference on each rank is the same model without DDP: the plain step (same chunks, same RNG state), then the
gradients all-reduced and averaged by hand, which is what DDP's synchronised backward must produce. Both
runs' gradients and parameters must agree to 1e-10 relative at every step.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import leave_process_group
from torch import nn

import fastcontrast

WORLD, ROWS, CHUNK, STEPS = 2, 16, 4, 3
IN_DIM, HIDDEN, DIM = 10, 12, 6
RELATIVE = 1e-10
SPAWN_DEADLINE_S = 240
COLLECTIVE_TIMEOUT_S = 60

pytestmark = pytest.mark.timeout(SPAWN_DEADLINE_S + 60)


class Pair(nn.Module):
    """open_clip's layout: one module, ``forward(images, texts)`` → both towers' features."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Dropout(0.3), nn.Linear(HIDDEN, DIM))
        self.text = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Dropout(0.3), nn.Linear(HIDDEN, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, images, texts):
        return self.image(images), self.text(texts)


LOSSES = {
    "clip-gather": lambda rank: fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                      world_size=WORLD, backend="torch"),
    "clip-ring": lambda rank: fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                    world_size=WORLD, backend="torch", exchange="ring"),
    "siglip": lambda rank: fastcontrast.SigLipLoss(rank=rank, world_size=WORLD, backend="torch"),
}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def _case(name: str, rank: int) -> dict:
    torch.manual_seed(0)
    reference = Pair().double()
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(reference))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (model, reference)]
    loss_fn = LOSSES[name](rank)
    cache = fastcontrast.GradCache(model, loss_fn, chunk_size=CHUNK)
    torch.manual_seed(100 + rank)  # each rank its own dropout stream
    worst = {}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(10 * step + rank)
        images, texts = (torch.randn(ROWS, IN_DIM, generator=g, dtype=torch.float64) for _ in range(2))
        for optimizer in optimizers:
            optimizer.zero_grad()
        state = torch.get_rng_state()
        inner = model.module
        cache.step((images, texts), loss_args=(inner.logit_scale.exp(), inner.logit_bias))
        torch.set_rng_state(state)
        pieces = [reference(images[i:i + CHUNK], texts[i:i + CHUNK]) for i in range(0, ROWS, CHUNK)]
        features = [torch.cat([p[k] for p in pieces]) for k in range(2)]
        loss_fn(*features, reference.logit_scale.exp(), reference.logit_bias).backward()
        for p in reference.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        for (key, p), q in zip(model.module.named_parameters(), reference.parameters()):
            worst[f"step {step} {key}.grad"] = _relative_error(p.grad, q.grad)
        for optimizer in optimizers:
            optimizer.step()
    for (key, p), q in zip(model.module.named_parameters(), reference.parameters()):
        worst[f"{key} after {STEPS} steps"] = _relative_error(p.detach(), q.detach())
    return worst


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    report = {}
    try:
        report["cases"] = {name: _case(name, rank) for name in LOSSES}
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test with it
        report["crash"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        # The DDP models (and their reducers' gloo work) must go before the process group does.
        leave_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cached_ddp_steps_match_plain_steps_with_averaged_gradients_on_two_gloo_ranks(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    start = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - start > SPAWN_DEADLINE_S:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD}-process GradCache run passed its {SPAWN_DEADLINE_S} s deadline (a hang?)")
    reports = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(WORLD)]
    crashes = [r["crash"] for r in reports if "crash" in r]
    assert not crashes, crashes[0]
    failures = [f"rank {rank} {name} {key}: relative error {error:.3e} > {RELATIVE:.0e}"
                for rank, report in enumerate(reports) for name, errors in report["cases"].items()
                for key, error in errors.items() if not error <= RELATIVE]
    assert not failures, "\n".join(failures)
    assert all(len(r["cases"]) == len(LOSSES) for r in reports)
