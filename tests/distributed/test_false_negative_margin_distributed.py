"""``false_negative_margin`` across processes: ``ClipLoss`` (all four flag combinations of ``local_loss`` and
``gather_with_grad``) and ``NTXentLoss(gather_distributed=True)`` on a real 3-rank gloo group with unequal
batch sizes (5, 3, 4), so every rank's offset differs.

Each rank's loss and gradients on the torch engine must equal the reference backend's (full matrices over the
gathered features, the same open_clip / lightly gradient routes) in the same group; for the modes that are
exact under DDP, the DDP average must equal one process computing the global batch with the same margin: the
rule runs over the gathered candidates, each local row against its own positive, so it is the global rule.
One spawn runs every case; it has a deadline, and the collectives a gloo timeout.
"""

from __future__ import annotations

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
import torch.nn.functional as F
from _helpers import DISTRIBUTED, assert_close, leave_process_group

from fastcontrast import reference

SIZES = (5, 3, 4)
WORLD_SIZE = len(SIZES)
DIM = 6
MARGIN = 0.05
SCALE = 5.0
TEMPERATURE = 0.3
SPAWN_DEADLINE_S = 120
COLLECTIVE_TIMEOUT_S = 30
CLIP_MODES = {  # name -> (local_loss, gather_with_grad)
    "global-nograd": (False, False),
    "global-grad": (False, True),
    "local-nograd": (True, False),
    "local-grad": (True, True),
}
EXACT_UNDER_DDP = ("global-grad", "local-grad")

pytestmark = pytest.mark.timeout(SPAWN_DEADLINE_S + 60)


def _global_batch():
    """Clustered unit features, so the margin leaves out candidates in every rank's rows."""
    g = torch.Generator().manual_seed(21)
    n = sum(SIZES)
    centers = torch.randn(4, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,), generator=g)
    image = F.normalize(centers[labels] + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(centers[labels] + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    return image, text


def _rows(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _run_clip(rank, mode, backend):
    import fastcontrast

    local_loss, gather_with_grad = CLIP_MODES[mode]
    image, text = (x[_rows(rank)].clone().requires_grad_() for x in _global_batch())
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    loss = fastcontrast.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                 world_size=WORLD_SIZE, backend=backend, false_negative_margin=MARGIN)
    value = loss(image, text, scale)
    return {"loss": value.detach(), **dict(zip(("image", "text", "scale"),
                                               torch.autograd.grad(value, (image, text, scale))))}


def _run_nt_xent(rank, backend):
    import fastcontrast

    out0, out1 = (x[_rows(rank)].clone().requires_grad_() for x in _global_batch())
    loss = fastcontrast.NTXentLoss(TEMPERATURE, gather_distributed=True, backend=backend,
                                   false_negative_margin=MARGIN)
    value = loss(out0, out1)
    return {"loss": value.detach(), **dict(zip(("out0", "out1"), torch.autograd.grad(value, (out0, out1))))}


def _cases():
    cases = {}
    for backend in ("torch", "reference"):
        for mode in CLIP_MODES:
            cases[f"clip-{mode}-{backend}"] = lambda rank, mode=mode, backend=backend: _run_clip(rank, mode, backend)
        cases[f"nt_xent-{backend}"] = lambda rank, backend=backend: _run_nt_xent(rank, backend)
    return cases


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name, case in _cases().items():
            try:
                results[name] = case(rank)
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
    out_dir = tmp_path_factory.mktemp("fnm_dist")
    # The children run the torch engine and the reference only and never import triton. The variable is
    # restored at once: the rest of the session runs the kernels in the interpreter, which reads it on every call.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        context = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False,
                                     start_method="spawn")
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD_SIZE}-rank gloo group did not finish within {SPAWN_DEADLINE_S}s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _per_rank(rank_results, name):
    for rank, results in enumerate(rank_results):
        assert "crash" not in results[name], f"{name} crashed on rank {rank}:\n{results[name]['crash']}"
    return [results[name] for results in rank_results]


def _ddp_average(per_rank, features, scalars):
    """What DDP sees: per-rank feature slices concatenated and divided by W, replicated scalars averaged."""
    out = {"loss": torch.stack([r["loss"] for r in per_rank]).mean()}
    out.update({name: torch.cat([r[name] for r in per_rank]) / WORLD_SIZE for name in features})
    out.update({name: torch.stack([r[name] for r in per_rank]).mean() for name in scalars})
    return out


def _global(loss_fn, names):
    leaves = [x.clone().requires_grad_() for x in _global_batch()]
    extra = [torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)] if "scale" in names else []
    value = loss_fn(*leaves, *extra)
    return {"loss": value.detach(), **dict(zip(names, torch.autograd.grad(value, leaves + extra)))}


@pytest.mark.parametrize("case", [f"clip-{mode}" for mode in CLIP_MODES] + ["nt_xent"])
def test_torch_engine_equals_the_reference_backend_on_every_rank(rank_results, case):
    atol, rtol = DISTRIBUTED[torch.float64]
    ours, theirs = _per_rank(rank_results, f"{case}-torch"), _per_rank(rank_results, f"{case}-reference")
    for rank in range(WORLD_SIZE):
        for name, value in ours[rank].items():
            assert_close(f"{case} rank {rank}: {name}", value, theirs[rank][name], atol, rtol)


@pytest.mark.parametrize("case", [f"clip-{mode}" for mode in EXACT_UNDER_DDP] + ["nt_xent"])
def test_ddp_average_equals_the_global_batch_with_the_same_margin(rank_results, case):
    atol, rtol = DISTRIBUTED[torch.float64]
    if case == "nt_xent":
        names, scalars = ("out0", "out1"), ()
        expected = _global(lambda a, b: reference.nt_xent_loss_reference(a, b, TEMPERATURE,
                                                                         false_negative_margin=MARGIN), names)
    else:
        names, scalars = ("image", "text", "scale"), ("scale",)
        expected = _global(lambda a, b, s: reference.clip_loss_reference(a, b, s, false_negative_margin=MARGIN),
                           names)
    averaged = _ddp_average(_per_rank(rank_results, f"{case}-torch"), [n for n in names if n not in scalars],
                            scalars)
    for name in ("loss",) + names:
        assert_close(f"{case}: DDP-averaged {name}", averaged[name], expected[name], atol, rtol)


def test_the_margin_leaves_out_candidates_in_this_batch():
    image, text = _global_batch()
    sim = image @ text.T
    dropped = sim > sim.diagonal().unsqueeze(1) + MARGIN
    dropped.fill_diagonal_(False)
    per_rank = [int(dropped[_rows(rank)].sum()) for rank in range(WORLD_SIZE)]
    assert all(count > 0 for count in per_rank), f"candidates left out per rank: {per_rank}"
    unmasked = reference.clip_loss_reference(image, text, SCALE)
    masked = reference.clip_loss_reference(image, text, SCALE, false_negative_margin=MARGIN)
    assert (unmasked - masked).abs() > 1e-3
