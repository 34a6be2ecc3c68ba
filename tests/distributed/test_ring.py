"""``exchange="ring"`` against ``exchange="gather"`` on real gloo groups of 2, 3 and 4 processes.

The ring (:mod:`fastcontrast.ring`) must give the gather's losses and every input's gradients: fp64 to
1e-12, fp32 to rounding, on the torch engine and on Triton's (interpreter), with equal and unequal per-rank
batches, DDP-averaged gradients of a shared layer, a process group of some of the ranks, and a bad input on
one rank raising on all of them. Its per-rank memory must not grow with the world size, where the gather's
grows by the gathered towers.

One spawn per world size runs every case and writes what it saw; the tests read it. Every spawn has a
deadline and every collective a gloo timeout, so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _helpers import leave_process_group

import fastcontrast
from fastcontrast import functional

WORLD_SIZES = (2, 3, 4)
UNEQUAL = {2: (5, 3), 3: (5, 3, 4), 4: (2, 5, 1, 3)}
DIM, TEACHER_DIM = 8, 5
SPAWN_DEADLINE_S = 240
COLLECTIVE_TIMEOUT_S = 60
# ring vs gather: the same math summed in another order.
TOLERANCE = {"fp64": 1e-12, "fp32": 2e-5}
# Memory: B rows per rank at any W; the gather holds W·B rows of each tower (and their gradients).
MEMORY_ROWS, MEMORY_DIM = 256, 64

pytestmark = pytest.mark.timeout(SPAWN_DEADLINE_S + 60)


def _features(sizes, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    image = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    image_t = F.normalize(torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1)
    text_t = F.normalize(image_t + 0.5 * torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1)
    return {k: v.to(dtype) for k, v in dict(image=image, text=text, image_t=image_t, text_t=text_t).items()}


def _loss_and_inputs(name, rows, rank, world, backend, exchange, dtype, group=None):
    """The loss of case ``name`` on this rank and the leaves whose gradients are compared."""
    image, text, image_t, text_t = (x.clone().requires_grad_() for x in rows)
    scale = torch.tensor(7.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=dtype, requires_grad=True)
    scale_t = torch.tensor(4.0, dtype=dtype, requires_grad=True)
    common = dict(backend=backend, exchange=exchange)
    dist_args = dict(process_group=group) if group is not None else dict(rank=rank, world_size=world)
    gather_args = dict(gather_distributed=True, process_group=group)
    if name == "clip":
        loss = functional.clip_loss(image, text, scale, bias, local_loss=True, gather_with_grad=True, **dist_args,
                                    **common)
        return loss, [image, text, scale, bias]
    if name == "siglip":
        loss = functional.siglip_loss(image, text, scale, bias, dist_impl="shift", **dist_args, **common)
        return loss, [image, text, scale, bias]
    if name == "ntxent":
        return functional.nt_xent_loss(image, text, 0.3, **gather_args, **common), [image, text]
    if name == "dcl":
        # A differentiable weight: the gradient also flows through the weights.
        loss = functional.dcl_loss(image, text, 0.3, lambda a, b: ((a - b) ** 2).sum(1), **gather_args, **common)
        return loss, [image, text]
    if name == "dclw":
        loss = functional.dcl_loss(image, text, 0.3, fastcontrast.negative_mises_fisher_weights, **gather_args,
                                   **common)
        return loss, [image, text]
    if name == "distill":
        contrastive, distill = functional.distill_clip_loss(
            image, text, scale, image_t, text_t, scale_t, local_loss=True, gather_with_grad=True, **dist_args,
            **common,
        )
        return contrastive + 0.7 * distill, [image, text, scale, image_t, text_t, scale_t]
    raise AssertionError(name)


LOSSES = ("clip", "siglip", "ntxent", "dcl", "dclw", "distill")
ENGINES = {"torch-fp64": ("torch", torch.float64), "torch-fp32": ("torch", torch.float32),
           "triton-fp32": ("triton", torch.float32)}


def _difference(name, rows, rank, world, backend, dtype, group=None):
    """(loss, max |ring − gather| over the loss and every gradient, largest gradient magnitude)."""
    results = {}
    for exchange in ("gather", "ring"):
        loss, leaves = _loss_and_inputs(name, rows, rank, world, backend, exchange, dtype, group)
        results[exchange] = (loss.detach(), torch.autograd.grad(loss, leaves))
    (loss_g, grads_g), (loss_r, grads_r) = results["gather"], results["ring"]
    diff = max([abs(loss_g - loss_r).item()] + [(a - b).abs().max().item() for a, b in zip(grads_g, grads_r)])
    scale = max([abs(loss_g).item()] + [g.abs().max().item() for g in grads_g])
    return {"loss": loss_g.item(), "diff": diff, "magnitude": scale}


class _Towers(torch.nn.Module):
    """Two linear towers, the model DDP wraps."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(12, DIM), torch.nn.Linear(12, DIM)

    def forward(self, x_image, x_text):
        return self.image(x_image), self.text(x_text)


def _ddp_difference(rank, world):
    """The DDP-averaged gradients of two towers (and the scale's, averaged by hand as a trainer's optimizer
    step would see it), ring vs gather: torch engine, fp64."""
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(11 + rank)
    x_image = torch.randn(3 + rank, 12, generator=g, dtype=torch.float64)  # unequal batches too
    x_text = torch.randn(3 + rank, 12, generator=g, dtype=torch.float64)
    grads = {}
    for exchange in ("gather", "ring"):
        torch.manual_seed(3)
        model = DistributedDataParallel(_Towers().double())
        scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        loss_fn = fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                                        backend="torch", exchange=exchange)
        loss_fn(*model(x_image, x_text), scale).backward()
        dist.all_reduce(scale.grad)
        grads[exchange] = [p.grad.clone() for p in model.parameters()] + [scale.grad / world]
    return max((a - b).abs().max().item() for a, b in zip(grads["gather"], grads["ring"]))


def _peak_bytes(exchange, rank, world):
    """Peak extra live tensor bytes of one ClipLoss forward + backward with B rows per rank."""
    from fastcontrast.tools.bench.meters import MemoryMeter

    g = torch.Generator().manual_seed(rank)
    image = torch.randn(MEMORY_ROWS, MEMORY_DIM, generator=g).requires_grad_()
    text = torch.randn(MEMORY_ROWS, MEMORY_DIM, generator=g).requires_grad_()
    loss_fn = fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                                    backend="torch", chunk_bytes=16 * 2**10, exchange=exchange)
    meter = MemoryMeter(torch.device("cpu"), prefer="tensor_bytes")
    _, peak = meter.measure(lambda: loss_fn(image, text, 10.0).backward())
    return peak


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    report = {"cases": {}, "errors": {}}
    try:
        for engine, (backend, dtype) in ENGINES.items():
            layouts = (("equal", (4,) * world), ("unequal", UNEQUAL[world]))
            if backend == "triton":  # the interpreter is slow: the unequal layout covers the general case
                layouts = layouts[1:]
            for layout_name, sizes in layouts:
                data = _features(sizes, dtype)
                start = sum(sizes[:rank])
                rows = [data[k][start : start + sizes[rank]] for k in ("image", "text", "image_t", "text_t")]
                for name in LOSSES:
                    key = f"{engine}/{layout_name}/{name}"
                    report["cases"][key] = _difference(name, rows, rank, world, backend, dtype)
        report["ddp"] = _ddp_difference(rank, world)
        if world >= 3:
            # A group of ranks 0 and 2 only: the ring's peers are global ranks of that group.
            members = [0, 2]
            group = dist.new_group(members)
            if rank in members:
                data = _features((4, 3), torch.float64)
                local = members.index(rank)
                start = (0, 4)[local]
                rows = [data[k][start : start + (4, 3)[local]] for k in ("image", "text", "image_t", "text_t")]
                for name in ("clip", "ntxent", "distill"):
                    report["cases"][f"subgroup/{name}"] = _difference(name, rows, local, 2, "torch", torch.float64,
                                                                      group)
        # A bad input on rank 0 only: every rank must raise, not wait in the ring.
        for name in ("clip", "ntxent"):
            dim = DIM - 1 if rank == 0 else DIM
            rows = [torch.randn(3, dim, dtype=torch.float64)] * 2 + [torch.randn(3, TEACHER_DIM)] * 2
            try:
                _loss_and_inputs(name, rows, rank, world, "torch", "ring", torch.float64)[0].backward()
                report["errors"][name] = None
            except ValueError as exc:
                report["errors"][name] = str(exc)
        report["memory"] = {exchange: _peak_bytes(exchange, rank, world) for exchange in ("gather", "ring")}
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the tests with it
        report["crash"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        leave_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"W{w}" for w in WORLD_SIZES])
def run(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"ring{world}")
    context = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = SPAWN_DEADLINE_S
    import time

    start = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - start > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-process ring run passed its {deadline} s deadline (a hang?)")
    reports = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    crashes = [r["crash"] for r in reports if "crash" in r]
    assert not crashes, crashes[0]
    return world, reports


def test_ring_gives_the_gathers_losses_and_gradients(run):
    world, reports = run
    failures = []
    for rank, report in enumerate(reports):
        for key, case in report["cases"].items():
            precision = "fp64" if "fp64" in key or key.startswith("subgroup") else "fp32"
            allowed = TOLERANCE[precision] * max(1.0, case["magnitude"])
            if not case["diff"] <= allowed:
                failures.append(f"W={world} rank {rank} {key}: |ring − gather| = {case['diff']:.3e} > {allowed:.1e}")
    assert not failures, "\n".join(failures)
    expected = (2 + 2 + 1) * len(LOSSES) + (3 if world >= 3 else 0)
    assert len(reports[0]["cases"]) == expected


def test_ring_gives_the_gathers_ddp_averaged_gradients(run):
    world, reports = run
    for rank, report in enumerate(reports):
        assert report["ddp"] <= 1e-12, (world, rank, report["ddp"])


def test_a_bad_input_on_one_rank_raises_on_every_rank(run):
    world, reports = run
    for rank, report in enumerate(reports):
        for name, message in report["errors"].items():
            assert message is not None, f"W={world} rank {rank} {name}: no error"
            assert "dim" in message or "feature" in message, message


def test_ring_memory_per_rank_is_a_few_blocks_and_the_gathers_grows(run):
    world, reports = run
    peaks = {exchange: max(r["memory"][exchange] for r in reports) for exchange in ("gather", "ring")}
    tower = MEMORY_ROWS * MEMORY_DIM * 4  # one rank's rows of one tower, fp32
    # The gather holds both gathered towers and their gradients: 4·W towers. The ring holds a bounded
    # number of B-row blocks whatever W is: its fp32 gradient sums, the block in use and the next one in
    # flight, the sums in transit (docs/distributed.md counts them).
    assert peaks["gather"] >= 4 * world * tower, peaks
    assert peaks["ring"] <= 13 * tower, peaks
    RUN_MEMORY[world] = peaks


RUN_MEMORY: dict = {}


def test_ring_memory_at_four_ranks_is_that_at_two_and_three(run):
    world, _ = run
    if world != 4 or not {2, 3} <= set(RUN_MEMORY):
        pytest.skip("compares the W=4 run with the W=2 and W=3 runs of this session")
    tower = MEMORY_ROWS * MEMORY_DIM * 4
    ring = {w: RUN_MEMORY[w]["ring"] for w in (2, 3, 4)}
    gather = {w: RUN_MEMORY[w]["gather"] for w in (2, 3, 4)}
    # From W = 3 on a block is always in flight while another is in use; at W = 2 the last step has none
    # to fetch, so W = 2 needs one travelling block (both towers' B rows) less. Beyond that: flat.
    assert ring[4] <= ring[3] + 4096, ring
    assert ring[4] <= ring[2] + 2 * tower + 4096, ring
    assert gather[4] - gather[2] >= 2 * 4 * tower, gather  # two more ranks' rows of both towers, and grads


# ---- single process: the option's checks ------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: fastcontrast.ClipLoss(exchange="ring"), "local_loss=True and gather_with_grad=True"),
    (lambda: fastcontrast.ClipLoss(local_loss=True, exchange="ring"), "gather_with_grad=True"),
    (lambda: fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, return_accuracy=True, exchange="ring"),
     "return_accuracy"),
    (lambda: fastcontrast.DistillClipLoss(gather_with_grad=True, exchange="ring"), "local_loss=True"),
    (lambda: fastcontrast.SigLipLoss(backend="reference", exchange="ring"), "backend='reference'"),
    (lambda: fastcontrast.NTXentLoss(exchange="ring"), "gather_distributed=True"),
    (lambda: fastcontrast.NTXentLoss(memory_bank_size=(8, 4), gather_distributed=True, exchange="ring"),
     "memory bank"),
    (lambda: fastcontrast.DCLLoss(exchange="ring"), "gather_distributed=True"),
    (lambda: fastcontrast.DCLWLoss(exchange="ring"), "gather_distributed=True"),
    (lambda: fastcontrast.ClipLoss(exchange="rings"), "`exchange` must be one of"),
], ids=["clip-global", "clip-local-nograd", "clip-accuracy", "distill-global", "siglip-reference", "ntxent-nogather",
        "ntxent-bank", "dcl-nogather", "dclw-nogather", "typo"])
def test_flag_combinations_the_ring_cannot_take_are_errors_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_ring_in_one_process_is_the_single_process_loss():
    data = _features((6,), torch.float64)
    image, text = data["image"], data["text"]
    ring = fastcontrast.ClipLoss(local_loss=True, gather_with_grad=True, backend="torch", exchange="ring")
    assert ring(image, text, 5.0) == fastcontrast.clip_loss(image, text, 5.0, backend="torch")
    assert fastcontrast.SigLipLoss(backend="torch", exchange="ring")(image, text, 5.0, -1.0) == \
        fastcontrast.siglip_loss(image, text, 5.0, -1.0, backend="torch")
    assert fastcontrast.NTXentLoss(gather_distributed=True, backend="torch", exchange="ring")(image, text) == \
        fastcontrast.nt_xent_loss(image, text, backend="torch")
