"""Distributed losses on real process groups: gloo over 127.0.0.1, spawned with torch.multiprocessing.

Spawning and initialising a group costs seconds, so there is one spawn per world size (2 and 3): its ranks
run every case below inside the group and save their losses and gradients, and the tests then compare them,
in this process, with

- one process computing the whole global batch (``fastcontrast.reference``, fp64), after a DDP-style average
  across ranks (per-rank feature gradients concatenated and divided by W, scalar gradients averaged), for
  every mode that is exact under DDP;
- a faithful copy of open_clip's ``gather_features``/``get_logits`` (and of lightly's ``GatherLayer`` loss)
  run in the same group, for the modes where the original is inexact by design, and a single-process
  reproduction of that same behaviour for unequal batch sizes, which the originals cannot run at all.

Every spawn has a deadline and every collective a gloo timeout, so a hang fails the tests instead of stalling.
Set ``FASTCONTRAST_DIST_REPORT=path.json`` to write the largest max-abs difference of every comparison.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import socket
import time
import traceback
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _helpers import (
    DCL_REFERENCE_WEIGHTS,
    DCL_VARIANTS,
    DISTRIBUTED,
    assert_close,
    dcl_variant_loss,
    leave_process_group,
)

import fastcontrast
from fastcontrast import reference
from fastcontrast.functional import normalize_rows
from fastcontrast.losses import ClipLoss, DCLLoss, DCLWLoss, DistillClipLoss, NTXentLoss, SigLipLoss, SupConLoss
from fastcontrast.memory_bank import MemoryBank

WORLD_SIZES = (2, 3)
EQUAL_ROWS = 4
UNEQUAL_SIZES = {2: (5, 3), 3: (5, 3, 4)}
SUBGROUP_SIZES = (3, 4)  # ranks 0 and 2 of three, as a group of two
DIM = 8
SEED = 1234
TEMPERATURE = 0.3
BANK_ROWS = 16
SPAWN_DEADLINE_S = 150
COLLECTIVE_TIMEOUT_S = 30
SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")
CLIP_MODES = {  # name -> (local_loss, gather_with_grad)
    "global-nograd": (False, False),
    "global-grad": (False, True),
    "local-nograd": (True, False),
    "local-grad": (True, True),
}
TEACHER_DIM = 5
DISTILL_WEIGHT = 0.7  # the distillation term's weight in the loss that is differentiated
DISTILL_FEATURES = ("image", "text", "dist_image", "dist_text")
DISTILL_SCALARS = ("scale", "dist_scale")
TOLERANCE = DISTRIBUTED

pytestmark = pytest.mark.timeout(SPAWN_DEADLINE_S + 60)


def _triton_engine_spec():
    try:
        return importlib.util.find_spec("fastcontrast.kernels.engine")
    except ModuleNotFoundError:  # the parent package fastcontrast.kernels is missing
        return None


TRITON_MISSING = _triton_engine_spec() is None
skip_without_triton = pytest.mark.skipif(
    TRITON_MISSING, reason="fastcontrast.kernels.engine is not installed"
)


def _backend_dtype(backend: str) -> torch.dtype:
    # The Triton engine takes fp16/bf16/fp32; the torch engine and the reference run the exact cases in fp64.
    return torch.float32 if backend == "triton" else torch.float64


def _offsets(sizes):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _global_batch(sizes, dtype, seed=SEED):
    """The whole global batch; rank r holds rows ``_offsets(sizes)[r]``. Scale and bias in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    image = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    out0 = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    out1 = out0 + 0.6 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return {
        "image": image.to(dtype),
        "text": text.to(dtype),
        "out0": out0.to(dtype),
        "out1": out1.to(dtype),
        "scale": torch.tensor(6.5, dtype=dtype),
        "bias": torch.tensor(-2.5, dtype=dtype),
    }


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _rank_weight(sizes, rank):
    """W·n_k/N, the factor fastcontrast puts on a rank's mean loss when the sizes differ (1 when equal)."""
    return len(sizes) * sizes[rank] / sum(sizes)


# ---- faithful copies of the originals' distributed math, run inside the group ---------------------------


class _AllGatherSummedGrad(torch.autograd.Function):
    """What ``torch.distributed.nn.all_gather`` and lightly's ``GatherLayer`` compute: a list all-gather
    forward; backward, the gradients of all ranks all-reduced (summed) and this rank's slice kept. Written
    apart from fastcontrast.distributed (all_reduce rather than reduce_scatter), for an independent check."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def _open_clip_loss_copy(
    image, text, logit_scale, logit_bias, *, local_loss, gather_with_grad, rank, world_size
):
    """open_clip 3.x ``gather_features`` + ``ClipLoss.get_logits`` + ``forward``, line for line."""
    if gather_with_grad:
        all_image = torch.cat(_AllGatherSummedGrad.apply(image), dim=0)
        all_text = torch.cat(_AllGatherSummedGrad.apply(text), dim=0)
    else:
        gathered_image = [torch.zeros_like(image) for _ in range(world_size)]
        gathered_text = [torch.zeros_like(text) for _ in range(world_size)]
        dist.all_gather(gathered_image, image)
        dist.all_gather(gathered_text, text)
        if not local_loss:
            # ensure grads for local rank when all_* features don't have a gradient
            gathered_image[rank] = image
            gathered_text[rank] = text
        all_image = torch.cat(gathered_image, dim=0)
        all_text = torch.cat(gathered_text, dim=0)
    if local_loss:
        logits_per_image = logit_scale * image @ all_text.T
        logits_per_text = logit_scale * text @ all_image.T
    else:
        logits_per_image = logit_scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], dtype=torch.long)
    if local_loss:
        labels = labels + logits_per_image.shape[0] * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _lightly_nt_xent_copy(out0, out1, temperature, *, rank, world_size):
    """lightly 1.6 ``NTXentLoss(gather_distributed=True)`` without memory bank, line for line."""
    batch_size = out0.shape[0]
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)
    out0_large = torch.cat(_AllGatherSummedGrad.apply(out0), 0)
    out1_large = torch.cat(_AllGatherSummedGrad.apply(out1), 0)
    rows = torch.arange(batch_size, dtype=torch.long)  # lightly's dist.eye_rank
    diag_mask = torch.zeros((batch_size, batch_size * world_size), dtype=torch.bool)
    diag_mask[(rows, rows + rank * batch_size)] = True
    logits_00 = torch.einsum("nc,mc->nm", out0, out0_large) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1_large) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0_large) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1_large) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = (torch.arange(batch_size, dtype=torch.long) + rank * batch_size).repeat(2)
    return F.cross_entropy(logits, labels)


def _lightly_dcl_copy(out0, out1, temperature, weight_fn, *, rank, world_size):
    """lightly 1.6 ``DCLLoss(gather_distributed=True)`` (``DCLWLoss``: its weight_fn), line for line."""
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)
    out0_all = torch.cat(_AllGatherSummedGrad.apply(out0), 0)
    out1_all = torch.cat(_AllGatherSummedGrad.apply(out1), 0)

    def _loss(out0, out1, out0_all, out1_all):
        batch_size = out0.shape[0]
        rows = torch.arange(batch_size, dtype=torch.long)  # lightly's dist.eye_rank
        diag_mask = torch.zeros((batch_size, batch_size * world_size), dtype=torch.bool)
        diag_mask[(rows, rows + rank * batch_size)] = True
        sim_00 = torch.einsum("nc,mc->nm", out0, out0_all) / temperature
        sim_01 = torch.einsum("nc,mc->nm", out0, out1_all) / temperature
        positive_loss = -sim_01[diag_mask]
        if weight_fn:
            positive_loss = positive_loss * weight_fn(out0, out1)
        sim_00 = sim_00[~diag_mask].view(batch_size, -1)
        sim_01 = sim_01[~diag_mask].view(batch_size, -1)
        all_negs = torch.cat([sim_00, sim_01], dim=1)
        negative_loss = torch.logsumexp(all_negs, dim=1)
        return (positive_loss + negative_loss).mean()

    loss0 = _loss(out0, out1, out0_all, out1_all)
    loss1 = _loss(out1, out0, out1_all, out0_all)
    return 0.5 * (loss0 + loss1)


# ---- what each rank runs ---------------------------------------------------------------------------------


def _run_clip(rank, world_size, *, mode, sizes, backend, impl="fastcontrast"):
    local_loss, gather_with_grad = CLIP_MODES[mode]
    batch = _global_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank]
    image, text = _leaf(batch["image"][start:stop]), _leaf(batch["text"][start:stop])
    scale, bias = _leaf(batch["scale"]), _leaf(batch["bias"])
    if impl == "open_clip_copy":
        loss = _open_clip_loss_copy(
            image,
            text,
            scale,
            bias,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world_size,
        )
    else:
        loss_fn = ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world_size,
            backend=backend,
        )
        loss = loss_fn(image, text, scale, bias)
    loss.backward()
    return {
        "loss": loss.detach(),
        "image": image.grad,
        "text": text.grad,
        "scale": scale.grad,
        "bias": bias.grad,
    }


def _run_clip_accuracy(rank, world_size, *, mode, sizes, backend):
    local_loss, gather_with_grad = CLIP_MODES[mode]
    batch = _global_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank]
    out = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size,
                   backend=backend, return_accuracy=True)(
        batch["image"][start:stop], batch["text"][start:stop], batch["scale"], output_dict=True
    )
    return {k: v.detach() for k, v in out.items()}


def _distill_batch(sizes, dtype):
    """Student features and scale of ``_global_batch`` plus a teacher of another dim and scale."""
    batch = _global_batch(sizes, dtype)
    g = torch.Generator().manual_seed(SEED + 7)
    n = sum(sizes)
    batch["dist_image"] = F.normalize(torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1).to(dtype)
    batch["dist_text"] = F.normalize(torch.randn(n, TEACHER_DIM, generator=g, dtype=torch.float64), dim=1).to(dtype)
    batch["dist_scale"] = torch.tensor(9.0, dtype=dtype)
    return batch


def _run_distill(rank, world_size, *, mode, sizes, backend):
    """DistillClipLoss on this rank; the teacher requires grad too, so its routes are checked as well."""
    local_loss, gather_with_grad = CLIP_MODES[mode]
    batch = _distill_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank]
    leaves = {k: _leaf(batch[k][start:stop]) for k in DISTILL_FEATURES}
    leaves.update({k: _leaf(batch[k]) for k in DISTILL_SCALARS})
    loss_fn = DistillClipLoss(
        local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size, backend=backend
    )
    contrastive, distill = loss_fn(
        leaves["image"], leaves["text"], leaves["scale"], leaves["dist_image"], leaves["dist_text"],
        leaves["dist_scale"],
    )
    loss = contrastive + DISTILL_WEIGHT * distill
    loss.backward()
    return {"loss": loss.detach(), "contrastive": contrastive.detach(), "distill": distill.detach(),
            **{k: v.grad for k, v in leaves.items()}}


def _run_siglip(rank, world_size, *, dist_impl, sizes, backend, process_group=None, group_rank=None):
    batch = _global_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank if group_rank is None else group_rank]
    image, text = _leaf(batch["image"][start:stop]), _leaf(batch["text"][start:stop])
    scale, bias = _leaf(batch["scale"]), _leaf(batch["bias"])
    if process_group is None:
        loss_fn = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl, backend=backend)
    else:
        loss_fn = SigLipLoss(dist_impl=dist_impl, backend=backend, process_group=process_group)
    loss = loss_fn(image, text, scale, bias)
    loss.backward()
    return {
        "loss": loss.detach(),
        "image": image.grad,
        "text": text.grad,
        "scale": scale.grad,
        "bias": bias.grad,
    }


def _run_nt_xent(
    rank, world_size, *, sizes, backend, impl="fastcontrast", process_group=None, group_rank=None
):
    batch = _global_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank if group_rank is None else group_rank]
    out0, out1 = _leaf(batch["out0"][start:stop]), _leaf(batch["out1"][start:stop])
    if impl == "lightly_copy":
        loss = _lightly_nt_xent_copy(out0, out1, TEMPERATURE, rank=rank, world_size=world_size)
    else:
        loss_fn = NTXentLoss(
            TEMPERATURE, gather_distributed=True, backend=backend, process_group=process_group
        )
        loss = loss_fn(out0, out1)
    loss.backward()
    return {"loss": loss.detach(), "out0": out0.grad, "out1": out1.grad}


def _run_dcl(
    rank, world_size, *, variant, sizes, backend, impl="fastcontrast", process_group=None, group_rank=None
):
    """One DCL variant (DCLLoss, DCLWLoss, dcl_loss with a differentiable weight_fn) with gather_distributed."""
    batch = _global_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank if group_rank is None else group_rank]
    out0, out1 = _leaf(batch["out0"][start:stop]), _leaf(batch["out1"][start:stop])
    if impl == "lightly_copy":
        weight_fn = DCL_REFERENCE_WEIGHTS[variant]
        loss = _lightly_dcl_copy(out0, out1, TEMPERATURE, weight_fn, rank=rank, world_size=world_size)
    else:
        loss = dcl_variant_loss(
            variant, out0, out1, TEMPERATURE, gather_distributed=True, backend=backend, process_group=process_group
        )
    loss.backward()
    return {"loss": loss.detach(), "out0": out0.grad, "out1": out1.grad}


def _supcon_labels(sizes):
    g = torch.Generator().manual_seed(SEED + 11)
    return torch.randint(0, 3, (sum(sizes),), generator=g)


def _run_supcon(rank, world_size, *, sizes, backend):
    batch = _global_batch(sizes, _backend_dtype(backend))
    start, stop = _offsets(sizes)[rank]
    embeddings = _leaf(batch["out0"][start:stop])
    labels = _supcon_labels(sizes)[start:stop]
    loss = SupConLoss(TEMPERATURE, gather_distributed=True, backend=backend)(embeddings, labels)
    loss.backward()
    return {"loss": loss.detach(), "embeddings": embeddings.grad}


def _run_memory_bank(rank, world_size, *, sizes):
    torch.manual_seed(SEED)  # the bank starts as the same random unit vectors on every rank
    loss_fn = NTXentLoss(
        TEMPERATURE, memory_bank_size=(BANK_ROWS, DIM), gather_distributed=True, backend="torch"
    )
    losses = []
    for step in range(2):
        batch = _global_batch(sizes, torch.float64, seed=SEED + step)
        start, stop = _offsets(sizes)[rank]
        out0, out1 = _leaf(batch["out0"][start:stop]), _leaf(batch["out1"][start:stop])
        loss = loss_fn(out0, out1)
        loss.backward()
        losses.append(loss.detach())
    # An evaluation step (no grad) reads the bank but leaves it, and its pointer, as they are.
    with torch.no_grad():
        loss_fn(batch["out0"][start:stop], batch["out1"][start:stop])
    return {"losses": torch.stack(losses), "bank": loss_fn.memory_bank.bank.clone()}


def _expect_error(fn):
    try:
        fn()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None, "message": ""}


def _run_errors(rank, world_size):
    """Each call must fail on every rank, leaving the group usable (same collectives on every rank)."""
    batch = _global_batch((EQUAL_ROWS,) * world_size, torch.float64)
    image, text = batch["image"][:EQUAL_ROWS], batch["text"][:EQUAL_ROWS]
    out = {}
    narrow = 6 if rank == 1 else DIM
    out["dim_mismatch_clip"] = _expect_error(
        lambda: ClipLoss(rank=rank, world_size=world_size)(image[:, :narrow], text[:, :narrow], 5.0)
    )
    out["dim_mismatch_nt_xent"] = _expect_error(
        lambda: NTXentLoss(gather_distributed=True)(image[:, :narrow], text[:, :narrow])
    )
    out["dim_mismatch_dcl"] = _expect_error(
        lambda: DCLWLoss(gather_distributed=True)(image[:, :narrow], text[:, :narrow])
    )
    short_out1 = text[:-1] if rank == 1 else text
    out["bad_input_on_rank_1_dcl"] = _expect_error(lambda: DCLLoss(gather_distributed=True)(image, short_out1))
    dtype = torch.float32 if rank == 1 else torch.float64
    out["dtype_mismatch_siglip"] = _expect_error(
        lambda: SigLipLoss(rank=rank, world_size=world_size)(image.to(dtype), text.to(dtype), 5.0, -1.0)
    )
    short_text = text[:-1] if rank == 1 else text
    out["bad_input_on_rank_1"] = _expect_error(
        lambda: ClipLoss(rank=rank, world_size=world_size)(image, short_text, 5.0)
    )
    out["world_size_disagrees"] = _expect_error(
        lambda: ClipLoss(rank=rank, world_size=world_size + 1)(image, text, 5.0)
    )
    out["rank_disagrees"] = _expect_error(
        lambda: SigLipLoss(rank=(rank + 1) % world_size, world_size=world_size)(image, text, 5.0, -1.0)
    )
    # After all of the above, the group still works.
    out["after_errors"] = _run_clip(
        rank, world_size, mode="local-grad", sizes=(EQUAL_ROWS,) * world_size, backend="torch"
    )
    return out


def _run_warnings(rank, world_size):
    """Forward and backward of every loss across ranks must not warn (e.g. deprecated collective names)."""
    sizes = UNEQUAL_SIZES[world_size]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in CLIP_MODES:
            _run_clip(rank, world_size, mode=mode, sizes=sizes, backend="torch")
        _run_siglip(rank, world_size, dist_impl=None, sizes=sizes, backend="torch")
        _run_nt_xent(rank, world_size, sizes=sizes, backend="torch")
        for variant in DCL_VARIANTS:
            _run_dcl(rank, world_size, variant=variant, sizes=sizes, backend="torch")
        _run_memory_bank(rank, world_size, sizes=sizes)
        _run_distill(rank, world_size, mode="local-grad", sizes=sizes, backend="torch")
        _run_supcon(rank, world_size, sizes=sizes, backend="torch")
    return {"warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


def _run_subgroup(rank, world_size):
    """Ranks 0 and 2 of three gather over a group of two: rank and world size come from the group."""
    group = dist.new_group([0, 2])  # every rank must take part in creating it
    if rank == 1:
        return {"non_member": _expect_error(lambda: ClipLoss(process_group=group))}
    group_rank = dist.get_rank(group)
    batch = _global_batch(SUBGROUP_SIZES, torch.float64)
    start, stop = _offsets(SUBGROUP_SIZES)[group_rank]
    image, text = _leaf(batch["image"][start:stop]), _leaf(batch["text"][start:stop])
    scale, bias = _leaf(batch["scale"]), _leaf(batch["bias"])
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, process_group=group)
    loss = loss_fn(image, text, scale, bias)
    loss.backward()
    return {
        "module_rank_world": torch.tensor([loss_fn.rank, loss_fn.world_size]),
        "clip": {
            "loss": loss.detach(),
            "image": image.grad,
            "text": text.grad,
            "scale": scale.grad,
            "bias": bias.grad,
        },
        "siglip": _run_siglip(
            rank,
            world_size,
            dist_impl="gather",
            sizes=SUBGROUP_SIZES,
            backend="torch",
            process_group=group,
            group_rank=group_rank,
        ),
        "nt_xent": _run_nt_xent(
            rank,
            world_size,
            sizes=SUBGROUP_SIZES,
            backend="torch",
            process_group=group,
            group_rank=group_rank,
        ),
        "dcl_loss-weight_fn": _run_dcl(
            rank,
            world_size,
            variant="dcl_loss-weight_fn",
            sizes=SUBGROUP_SIZES,
            backend="torch",
            process_group=group,
            group_rank=group_rank,
        ),
        "contradicting_rank": _expect_error(
            lambda: ClipLoss(rank=1 - group_rank, world_size=2, process_group=group)
        ),
        "contradicting_world_size": _expect_error(
            lambda: SigLipLoss(rank=group_rank, world_size=3, process_group=group)
        ),
        "matching_explicit": _expect_error(
            lambda: ClipLoss(rank=group_rank, world_size=2, process_group=group)
        ),
    }


def _run_host_exchange(rank, world_size):
    """The layout exchange must not touch the loss's (NCCL) group: simulate one and record every all-gather."""
    from fastcontrast import distributed as fc_dist

    calls = []
    real_gather, real_backend = fc_dist._all_gather_single, fc_dist.backend_name

    def recording_gather(output, tensor, group):
        calls.append({"group_is_default": group is None, "device": str(tensor.device), "dtype": str(tensor.dtype),
                      "group_id": id(group)})
        return real_gather(output, tensor, group)

    fc_dist._all_gather_single = recording_gather
    # Every group reports NCCL: its CPU twin must carry the exchange, the features still go through it.
    fc_dist.backend_name = lambda group: "nccl"
    try:
        batch = _global_batch(UNEQUAL_SIZES[world_size], torch.float64)
        start, stop = _offsets(UNEQUAL_SIZES[world_size])[rank]
        results = []
        for _ in range(2):  # the twin is created once, then reused
            image, text = _leaf(batch["image"][start:stop]), _leaf(batch["text"][start:stop])
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)(
                image, text, batch["scale"]
            )
            loss.backward()
            results.append(loss.detach())
    finally:
        fc_dist._all_gather_single, fc_dist.backend_name = real_gather, real_backend
    exchanges = [c for c in calls if c["dtype"] == "torch.int64"]
    gathers = [c for c in calls if c["dtype"] != "torch.int64"]
    return {
        "loss": results[0],
        "loss_again": results[1],
        "exchange_on_default_group": torch.tensor([c["group_is_default"] for c in exchanges]),
        "exchange_on_cpu": torch.tensor([c["device"] == "cpu" for c in exchanges]),
        "exchange_groups": torch.tensor(len({c["group_id"] for c in exchanges})),
        "gathers_on_default_group": torch.tensor([c["group_is_default"] for c in gathers]),
    }


def _cases(world_size, with_triton):
    """Case name -> callable(rank, world_size). Triton cases run last, so their failure disturbs no other."""
    cases = {}
    equal, unequal = (EQUAL_ROWS,) * world_size, UNEQUAL_SIZES[world_size]
    for batch_name, sizes in (("equal", equal), ("unequal", unequal)):
        for backend in ("torch", "reference"):
            for mode in CLIP_MODES:
                cases[f"clip-{mode}-{batch_name}-{backend}"] = partial(
                    _run_clip, mode=mode, sizes=sizes, backend=backend
                )
            for dist_impl in SIGLIP_DIST_IMPLS:
                cases[f"siglip-{dist_impl}-{batch_name}-{backend}"] = partial(
                    _run_siglip, dist_impl=dist_impl, sizes=sizes, backend=backend
                )
            cases[f"nt_xent-{batch_name}-{backend}"] = partial(_run_nt_xent, sizes=sizes, backend=backend)
            for variant in DCL_VARIANTS:
                cases[f"{variant}-{batch_name}-{backend}"] = partial(
                    _run_dcl, variant=variant, sizes=sizes, backend=backend
                )
            cases[f"supcon-{batch_name}-{backend}"] = partial(_run_supcon, sizes=sizes, backend=backend)
            for mode in ("global-grad", "local-grad"):
                cases[f"clip_accuracy-{mode}-{batch_name}-{backend}"] = partial(
                    _run_clip_accuracy, mode=mode, sizes=sizes, backend=backend
                )
            for mode in CLIP_MODES:
                cases[f"distill-{mode}-{batch_name}-{backend}"] = partial(
                    _run_distill, mode=mode, sizes=sizes, backend=backend
                )
        cases[f"memory_bank-{batch_name}"] = partial(_run_memory_bank, sizes=sizes)
    for mode in CLIP_MODES:
        cases[f"clip-{mode}-equal-open_clip_copy"] = partial(
            _run_clip, mode=mode, sizes=equal, backend="torch", impl="open_clip_copy"
        )
    cases["nt_xent-equal-lightly_copy"] = partial(
        _run_nt_xent, sizes=equal, backend="torch", impl="lightly_copy"
    )
    for variant in DCL_VARIANTS:
        cases[f"{variant}-equal-lightly_copy"] = partial(
            _run_dcl, variant=variant, sizes=equal, backend="torch", impl="lightly_copy"
        )
    cases["errors"] = _run_errors
    cases["warnings"] = _run_warnings
    cases["host_exchange"] = _run_host_exchange
    if world_size == 3:
        cases["subgroup"] = _run_subgroup
    if with_triton:
        for mode in CLIP_MODES:
            cases[f"clip-{mode}-unequal-triton"] = partial(
                _run_clip, mode=mode, sizes=unequal, backend="triton"
            )
        for dist_impl in SIGLIP_DIST_IMPLS:
            cases[f"siglip-{dist_impl}-unequal-triton"] = partial(
                _run_siglip, dist_impl=dist_impl, sizes=unequal, backend="triton"
            )
        cases["nt_xent-unequal-triton"] = partial(_run_nt_xent, sizes=unequal, backend="triton")
        if world_size == 2:  # EXACT_PARAMS checks Triton on two ranks only
            for variant in DCL_VARIANTS:
                cases[f"{variant}-unequal-triton"] = partial(
                    _run_dcl, variant=variant, sizes=unequal, backend="triton"
                )
        cases["supcon-unequal-triton"] = partial(_run_supcon, sizes=unequal, backend="triton")
        for mode in ("global-grad", "local-grad"):
            cases[f"clip_accuracy-{mode}-unequal-triton"] = partial(
                _run_clip_accuracy, mode=mode, sizes=unequal, backend="triton"
            )
        for mode in CLIP_MODES:
            cases[f"distill-{mode}-unequal-triton"] = partial(
                _run_distill, mode=mode, sizes=unequal, backend="triton"
            )
    return cases


def _worker(rank, world_size, port, out_dir, with_triton):
    # The Triton case runs in triton's interpreter on these CPU tensors: the switch must be set before
    # triton is first imported, which happens only when the Triton engine is first asked for.
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results = {}
    try:
        for name, case in _cases(world_size, with_triton).items():
            try:
                results[name] = case(rank, world_size)
            except Exception:
                results[name] = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        leave_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_group(world_size, out_dir, with_triton):
    """Run every case on ``world_size`` spawned ranks; returns one result dict per rank."""
    context = mp.start_processes(
        _worker,
        args=(world_size, _free_port(), str(out_dir), with_triton),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(
                f"the {world_size}-rank process group did not finish within {SPAWN_DEADLINE_S}s (a hang in a "
                "collective?); its processes were killed."
            )
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


_GROUP_RESULTS: dict = {}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """``group_results(world_size)`` -> per-rank results, spawning that group once for the whole module."""

    def get(world_size):
        if world_size not in _GROUP_RESULTS:
            out_dir = tmp_path_factory.mktemp(f"dist_ws{world_size}")
            try:
                _GROUP_RESULTS[world_size] = _spawn_group(world_size, out_dir, with_triton=not TRITON_MISSING)
            except Exception as exc:
                _GROUP_RESULTS[world_size] = exc
        results = _GROUP_RESULTS[world_size]
        if isinstance(results, Exception):
            pytest.fail(
                f"spawning the {world_size}-rank gloo group failed: {type(results).__name__}: {results}"
            )
        return results

    return get


def _case(results, name):
    per_rank = [r[name] for r in results]
    for rank, result in enumerate(per_rank):
        if "crash" in result:
            pytest.fail(f"case {name} raised on rank {rank}:\n{result['crash']}")
    return per_rank


# ---- comparisons -------------------------------------------------------------------------------------------

_REPORT: dict = {}


def _record(label, name, actual, expected):
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    key = f"{label}/{name}"
    _REPORT[key] = max(err, _REPORT.get(key, 0.0))


def _write_report():
    path = os.environ.get("FASTCONTRAST_DIST_REPORT")
    if path and _REPORT:
        Path(path).write_text(json.dumps(dict(sorted(_REPORT.items())), indent=1))


atexit.register(_write_report)


def _check(label, name, actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    _record(label, name, actual, expected)
    assert_close(f"{label}: {name}", actual, expected, atol=atol, rtol=rtol)


def _ddp_average(per_rank, feature_names, scalar_names):
    """What DDP sees: features are per-rank slices of the global batch (concatenated, divided by W as DDP
    divides the summed parameter gradients), scalars are replicated parameters (averaged)."""
    world_size = len(per_rank)
    out = {"loss": torch.stack([r["loss"] for r in per_rank]).mean()}
    for name in feature_names:
        out[name] = torch.cat([r[name] for r in per_rank]) / world_size
    for name in scalar_names:
        out[name] = torch.stack([r[name] for r in per_rank]).mean()
    return out


def _global_clip(batch):
    leaves = {k: _leaf(batch[k].double()) for k in ("image", "text", "scale", "bias")}
    loss = reference.clip_loss_reference(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"])
    loss.backward()
    return {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}}


def _global_siglip(batch):
    leaves = {k: _leaf(batch[k].double()) for k in ("image", "text", "scale", "bias")}
    loss = reference.siglip_loss_reference(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"])
    loss.backward()
    return {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}}


def _global_nt_xent(batch):
    leaves = {k: _leaf(batch[k].double()) for k in ("out0", "out1")}
    loss = reference.nt_xent_loss_reference(leaves["out0"], leaves["out1"], TEMPERATURE)
    loss.backward()
    return {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}}


def _per_rank_clip_local(batch, sizes):
    b = {k: v.double() for k, v in batch.items()}
    return [
        _rank_weight(sizes, r)
        * reference.clip_loss_local_reference(
            b["image"][start:stop],
            b["text"][start:stop],
            b["image"],
            b["text"],
            b["scale"],
            b["bias"],
            offset=start,
        )
        for r, (start, stop) in enumerate(_offsets(sizes))
    ]


def _per_rank_siglip(batch, sizes):
    b = {k: v.double() for k, v in batch.items()}
    return [
        _rank_weight(sizes, r)
        * reference.siglip_loss_reference(
            b["image"][start:stop], b["text"], b["scale"], b["bias"], positive_offset=start
        )
        for r, (start, stop) in enumerate(_offsets(sizes))
    ]


def _dcl_as_ranks_compute_it(variant, batch, sizes):
    """lightly's DCL on each rank (the gathered reference, weighted by W·n_k/N when the sizes differ) as a
    function of the whole batch, in one process: the per-rank losses, and the mean loss and its gradient
    with respect to the whole batch, which is what DDP averages (gather-with-grad sums each rank's
    contributions to every rank's rows). DCLW's weights are a softmax over each rank's own batch, as in
    lightly, so DCLW is not the global batch's loss; DCL with per-sample weights is."""
    leaves = {k: _leaf(batch[k].double()) for k in ("out0", "out1")}
    z0, z1 = F.normalize(leaves["out0"], dim=1), F.normalize(leaves["out1"], dim=1)
    per_rank = [
        _rank_weight(sizes, r)
        * reference.dcl_loss_gathered_reference(
            z0[start:stop], z1[start:stop], z0, z1, TEMPERATURE, DCL_REFERENCE_WEIGHTS[variant], offset=start
        )
        for r, (start, stop) in enumerate(_offsets(sizes))
    ]
    loss = torch.stack(per_rank).mean()
    loss.backward()
    return {"per_rank": [x.detach() for x in per_rank], "loss": loss.detach(),
            **{k: v.grad for k, v in leaves.items()}}


def _global_dcl(variant, batch):
    leaves = {k: _leaf(batch[k].double()) for k in ("out0", "out1")}
    loss = reference.dcl_loss_reference(leaves["out0"], leaves["out1"], TEMPERATURE, DCL_REFERENCE_WEIGHTS[variant])
    loss.backward()
    return {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}}


def _per_rank_nt_xent(batch, sizes):
    z0, z1 = F.normalize(batch["out0"].double(), dim=1), F.normalize(batch["out1"].double(), dim=1)
    return [
        _rank_weight(sizes, r)
        * reference.nt_xent_loss_gathered_reference(
            z0[start:stop], z1[start:stop], z0, z1, TEMPERATURE, offset=start
        )
        for r, (start, stop) in enumerate(_offsets(sizes))
    ]


def _open_clip_without_gather_grad_simulated(batch, sizes, local_loss):
    """open_clip's gather_with_grad=False behaviour, reproduced in one process for any batch sizes.

    global: every rank computes the full loss and only its own slot is live, so its features receive the
    gradient of the global loss with respect to its own rows (once, not summed over ranks).
    local: the gathered tensors are constants, so a rank's features receive only the gradient of its own
    local loss (weighted by W·n_k/N when the sizes differ).
    """
    b = {k: v.double() for k, v in batch.items()}
    expected = []
    for rank, (start, stop) in enumerate(_offsets(sizes)):
        image, text = _leaf(b["image"][start:stop]), _leaf(b["text"][start:stop])
        scale, bias = _leaf(b["scale"]), _leaf(b["bias"])
        if local_loss:
            loss = _rank_weight(sizes, rank) * reference.clip_loss_local_reference(
                image, text, b["image"], b["text"], scale, bias, offset=start
            )
        else:
            all_image = torch.cat([b["image"][:start], image, b["image"][stop:]])
            all_text = torch.cat([b["text"][:start], text, b["text"][stop:]])
            loss = reference.clip_loss_reference(all_image, all_text, scale, bias)
        loss.backward()
        expected.append(
            {
                "loss": loss.detach(),
                "image": image.grad,
                "text": text.grad,
                "scale": scale.grad,
                "bias": bias.grad,
            }
        )
    return expected


def _sizes(world_size, batch_name):
    return (EQUAL_ROWS,) * world_size if batch_name == "equal" else UNEQUAL_SIZES[world_size]


EXACT_PARAMS = [
    pytest.param(ws, batch_name, backend, id=f"ws{ws}-{batch_name}-{backend}")
    for ws in WORLD_SIZES
    for batch_name in ("equal", "unequal")
    for backend in ("torch", "reference")
] + [pytest.param(2, "unequal", "triton", id="ws2-unequal-triton", marks=skip_without_triton)]


# ---- ClipLoss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
@pytest.mark.parametrize("mode", ["global-grad", "local-grad"])
def test_clip_loss_with_gather_with_grad_matches_global_batch_after_ddp_average(
    group_results, world_size, batch_name, backend, mode
):
    sizes = _sizes(world_size, batch_name)
    dtype = _backend_dtype(backend)
    batch = _global_batch(sizes, dtype)
    label = f"clip-{mode}-ws{world_size}-{batch_name}-{backend}"
    per_rank = _case(group_results(world_size), f"clip-{mode}-{batch_name}-{backend}")
    expected = _global_clip(batch)
    expected_per_rank = (
        _per_rank_clip_local(batch, sizes) if mode == "local-grad" else [expected["loss"]] * world_size
    )
    for rank, (result, loss) in enumerate(zip(per_rank, expected_per_rank)):
        _check(label, f"loss on rank {rank}", result["loss"], loss, dtype)
        _check(
            label, f"logit_bias grad on rank {rank} (exactly zero)", result["bias"], torch.zeros(()), dtype
        )
    averaged = _ddp_average(per_rank, ("image", "text"), ("scale", "bias"))
    for name in ("loss", "image", "text", "scale", "bias"):
        _check(label, f"DDP-averaged {name}", averaged[name], expected[name], dtype)


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
@pytest.mark.parametrize("mode", ["global-grad", "local-grad"])
def test_clip_loss_accuracy_across_ranks_matches_the_materialised_logits(
    group_results, world_size, batch_name, backend, mode
):
    """Global loss: top-1 over all N rows on every rank; local loss: over this rank's own rows."""
    sizes = _sizes(world_size, batch_name)
    batch = _global_batch(sizes, torch.float64)
    per_rank = _case(group_results(world_size), f"clip_accuracy-{mode}-{batch_name}-{backend}")
    logits = batch["image"] @ batch["text"].T
    i2t_hit = (logits.argmax(dim=1) == torch.arange(sum(sizes))).double()
    t2i_hit = (logits.argmax(dim=0) == torch.arange(sum(sizes))).double()
    assert 0 < i2t_hit.mean() < 1, "the test needs a non-trivial accuracy"
    for rank, (start, stop) in enumerate(_offsets(sizes)):
        rows = slice(None) if mode == "global-grad" else slice(start, stop)
        for name, hits in (("i2t_top1", i2t_hit), ("t2i_top1", t2i_hit)):
            _check(f"clip_accuracy-{mode}-ws{world_size}-{batch_name}-{backend}", f"{name} on rank {rank}",
                   per_rank[rank][name], hits[rows].float().mean(), torch.float32)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("mode", list(CLIP_MODES))
def test_clip_loss_matches_open_clip_copy_run_in_same_group(group_results, world_size, mode):
    results = group_results(world_size)
    ours = _case(results, f"clip-{mode}-equal-torch")
    theirs = _case(results, f"clip-{mode}-equal-open_clip_copy")
    label = f"clip-{mode}-ws{world_size}-vs-open_clip-copy"
    for rank in range(world_size):
        for name in ("loss", "image", "text", "scale", "bias"):
            _check(label, f"{name} on rank {rank}", ours[rank][name], theirs[rank][name], torch.float64)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_name", ["equal", "unequal"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mode", ["global-nograd", "local-nograd"])
def test_clip_loss_without_gather_with_grad_reproduces_open_clip_inexact_gradients(
    group_results, world_size, batch_name, backend, mode
):
    """open_clip without gather_with_grad is inexact by design; we reproduce it on purpose, per rank."""
    sizes = _sizes(world_size, batch_name)
    batch = _global_batch(sizes, torch.float64)
    per_rank = _case(group_results(world_size), f"clip-{mode}-{batch_name}-{backend}")
    expected = _open_clip_without_gather_grad_simulated(batch, sizes, local_loss=mode.startswith("local"))
    label = f"clip-{mode}-ws{world_size}-{batch_name}-{backend}-vs-open_clip-semantics"
    for rank in range(world_size):
        for name in ("loss", "image", "text", "scale", "bias"):
            _check(label, f"{name} on rank {rank}", per_rank[rank][name], expected[rank][name], torch.float64)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("mode", ["global-nograd", "local-nograd"])
def test_clip_loss_without_gather_with_grad_is_inexact_under_ddp_but_logit_scale_is_exact(
    group_results, world_size, mode
):
    """As docs/distributed.md#which-flags-and-which-are-exact says: feature gradients differ from the global
    batch's, the scale's does not.

    global: each rank's live slot gets the global loss's gradient once, not summed over the W ranks, so the
    DDP average is exactly 1/W of the true feature gradient. local: a rank's features get only the gradient
    of its own rows of the logits; the terms from the other ranks' losses are missing.
    """
    sizes = (EQUAL_ROWS,) * world_size
    per_rank = _case(group_results(world_size), f"clip-{mode}-equal-torch")
    expected = _global_clip(_global_batch(sizes, torch.float64))
    averaged = _ddp_average(per_rank, ("image", "text"), ("scale", "bias"))
    label = f"clip-{mode}-ws{world_size}-equal-torch"
    _check(label, "DDP-averaged loss", averaged["loss"], expected["loss"], torch.float64)
    _check(label, "DDP-averaged scale", averaged["scale"], expected["scale"], torch.float64)
    for name in ("image", "text"):
        feature_error = (averaged[name] - expected[name]).abs().max().item()
        assert feature_error > 1e-3, (
            f"{label}: expected open_clip's inexact {name} gradient, got {feature_error:.2e}"
        )
        if mode == "global-nograd":
            _check(
                label, f"W × DDP-averaged {name}", world_size * averaged[name], expected[name], torch.float64
            )


# ---- DistillClipLoss --------------------------------------------------------------------------------------


def _distill_leaves(b, start=None, stop=None):
    leaves = {k: _leaf(b[k] if start is None else b[k][start:stop]) for k in DISTILL_FEATURES}
    leaves.update({k: _leaf(b[k]) for k in DISTILL_SCALARS})
    return leaves


def _distill_result(contrastive, distill, leaves):
    loss = contrastive + DISTILL_WEIGHT * distill
    loss.backward()
    return {"loss": loss.detach(), "contrastive": contrastive.detach(), "distill": distill.detach(),
            **{k: v.grad for k, v in leaves.items()}}


def _global_distill(batch):
    leaves = _distill_leaves({k: v.double() for k, v in batch.items()})
    contrastive, distill = reference.distill_clip_loss_reference(
        leaves["image"], leaves["text"], leaves["scale"], leaves["dist_image"], leaves["dist_text"],
        leaves["dist_scale"],
    )
    return _distill_result(contrastive, distill, leaves)


def _distill_per_rank_simulated(batch, sizes, *, local_loss):
    """open_clip's DistillClipLoss on each rank, in one process: its get_logits on the student and on the
    teacher with the same gathers. With gather_with_grad=False the gathered copies are constants (local) or
    constants with the live slot (global); with it, only the per-rank losses are simulated here (their
    gradients are compared after the DDP average with ``_global_distill``)."""
    b = {k: v.double() for k, v in batch.items()}
    out = []
    for rank, (start, stop) in enumerate(_offsets(sizes)):
        leaves = _distill_leaves(b, start, stop)
        if local_loss:
            student = reference.distill_logits_reference(
                leaves["image"], leaves["text"], leaves["scale"], b["image"], b["text"]
            )
            teacher = reference.distill_logits_reference(
                leaves["dist_image"], leaves["dist_text"], leaves["dist_scale"], b["dist_image"], b["dist_text"],
            )
            weight = _rank_weight(sizes, rank)
            contrastive, distill = (
                weight * loss
                for loss in reference.distill_clip_loss_from_logits_reference(*student, *teacher, offset=start)
            )
        else:
            live = {k: torch.cat([b[k][:start], leaves[k], b[k][stop:]]) for k in DISTILL_FEATURES}
            contrastive, distill = reference.distill_clip_loss_reference(
                live["image"], live["text"], leaves["scale"], live["dist_image"], live["dist_text"],
                leaves["dist_scale"],
            )
        out.append(_distill_result(contrastive, distill, leaves))
    return out


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
@pytest.mark.parametrize("mode", ["global-grad", "local-grad"])
def test_distill_clip_loss_with_gather_with_grad_matches_global_batch_after_ddp_average(
    group_results, world_size, batch_name, backend, mode
):
    sizes = _sizes(world_size, batch_name)
    dtype = _backend_dtype(backend)
    batch = _distill_batch(sizes, dtype)
    label = f"distill-{mode}-ws{world_size}-{batch_name}-{backend}"
    per_rank = _case(group_results(world_size), f"distill-{mode}-{batch_name}-{backend}")
    simulated = _distill_per_rank_simulated(batch, sizes, local_loss=mode == "local-grad")
    for rank in range(world_size):
        for name in ("contrastive", "distill"):
            _check(label, f"{name} loss on rank {rank}", per_rank[rank][name], simulated[rank][name], dtype)
    expected = _global_distill(batch)
    averaged = _ddp_average(per_rank, DISTILL_FEATURES, DISTILL_SCALARS)
    for name in ("loss",) + DISTILL_FEATURES + DISTILL_SCALARS:
        _check(label, f"DDP-averaged {name}", averaged[name], expected[name], dtype)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_name", ["equal", "unequal"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mode", ["global-nograd", "local-nograd"])
def test_distill_clip_loss_without_gather_with_grad_reproduces_open_clip_inexact_gradients(
    group_results, world_size, batch_name, backend, mode
):
    """As ClipLoss: open_clip without gather_with_grad is inexact by design, reproduced rank by rank."""
    sizes = _sizes(world_size, batch_name)
    batch = _distill_batch(sizes, torch.float64)
    per_rank = _case(group_results(world_size), f"distill-{mode}-{batch_name}-{backend}")
    expected = _distill_per_rank_simulated(
        batch, sizes, local_loss=mode.startswith("local")
    )
    label = f"distill-{mode}-ws{world_size}-{batch_name}-{backend}-vs-open_clip-semantics"
    for rank in range(world_size):
        for name in ("contrastive", "distill") + DISTILL_FEATURES + DISTILL_SCALARS:
            _check(label, f"{name} on rank {rank}", per_rank[rank][name], expected[rank][name], torch.float64)


# ---- SigLipLoss and NTXentLoss --------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
@pytest.mark.parametrize("dist_impl", SIGLIP_DIST_IMPLS, ids=str)
def test_siglip_loss_every_dist_impl_matches_global_batch_after_ddp_average(
    group_results, world_size, batch_name, backend, dist_impl
):
    sizes = _sizes(world_size, batch_name)
    dtype = _backend_dtype(backend)
    batch = _global_batch(sizes, dtype)
    label = f"siglip-{dist_impl}-ws{world_size}-{batch_name}-{backend}"
    per_rank = _case(group_results(world_size), f"siglip-{dist_impl}-{batch_name}-{backend}")
    for rank, loss in enumerate(_per_rank_siglip(batch, sizes)):
        _check(label, f"loss on rank {rank}", per_rank[rank]["loss"], loss, dtype)
    expected = _global_siglip(batch)
    averaged = _ddp_average(per_rank, ("image", "text"), ("scale", "bias"))
    for name in ("loss", "image", "text", "scale", "bias"):
        _check(label, f"DDP-averaged {name}", averaged[name], expected[name], dtype)


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
def test_nt_xent_gather_distributed_matches_global_batch_after_ddp_average(
    group_results, world_size, batch_name, backend
):
    sizes = _sizes(world_size, batch_name)
    dtype = _backend_dtype(backend)
    batch = _global_batch(sizes, dtype)
    label = f"nt_xent-ws{world_size}-{batch_name}-{backend}"
    per_rank = _case(group_results(world_size), f"nt_xent-{batch_name}-{backend}")
    for rank, loss in enumerate(_per_rank_nt_xent(batch, sizes)):
        _check(label, f"loss on rank {rank}", per_rank[rank]["loss"], loss, dtype)
    expected = _global_nt_xent(batch)
    averaged = _ddp_average(per_rank, ("out0", "out1"), ())
    for name in ("loss", "out0", "out1"):
        _check(label, f"DDP-averaged {name}", averaged[name], expected[name], dtype)


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
def test_supcon_gather_distributed_matches_global_batch_after_ddp_average(
    group_results, world_size, batch_name, backend
):
    """Each rank's loss is its share W·Σ(its nonzero anchor losses)/(nonzero anchors on all ranks), so the
    average over ranks, and the DDP-averaged gradient, are the global batch's."""
    sizes = _sizes(world_size, batch_name)
    dtype = _backend_dtype(backend)
    batch = _global_batch(sizes, dtype)
    label = f"supcon-ws{world_size}-{batch_name}-{backend}"
    per_rank = _case(group_results(world_size), f"supcon-{batch_name}-{backend}")
    embeddings = _leaf(batch["out0"].double())
    loss = reference.supcon_loss_reference(embeddings, _supcon_labels(sizes), TEMPERATURE)
    loss.backward()
    averaged = _ddp_average(per_rank, ("embeddings",), ())
    _check(label, "DDP-averaged loss", averaged["loss"], loss.detach(), dtype)
    _check(label, "DDP-averaged embeddings", averaged["embeddings"], embeddings.grad, dtype)


@pytest.mark.parametrize("world_size,batch_name,backend", EXACT_PARAMS)
@pytest.mark.parametrize("variant", DCL_VARIANTS)
def test_dcl_gather_distributed_matches_gathered_reference_and_ddp_average(
    group_results, world_size, batch_name, backend, variant
):
    sizes = _sizes(world_size, batch_name)
    dtype = _backend_dtype(backend)
    batch = _global_batch(sizes, dtype)
    label = f"{variant}-ws{world_size}-{batch_name}-{backend}"
    per_rank = _case(group_results(world_size), f"{variant}-{batch_name}-{backend}")
    expected = _dcl_as_ranks_compute_it(variant, batch, sizes)
    for rank, loss in enumerate(expected["per_rank"]):
        _check(label, f"loss on rank {rank}", per_rank[rank]["loss"], loss, dtype)
    averaged = _ddp_average(per_rank, ("out0", "out1"), ())
    for name in ("loss", "out0", "out1"):
        _check(label, f"DDP-averaged {name}", averaged[name], expected[name], dtype)
    if variant != "DCLWLoss":
        global_batch = _global_dcl(variant, batch)
        for name in ("loss", "out0", "out1"):
            _check(label, f"DDP-averaged {name} vs the global batch", averaged[name], global_batch[name], dtype)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("loss_name", ("nt_xent",) + DCL_VARIANTS)
def test_nt_xent_and_dcl_gather_distributed_match_lightly_copy_run_in_same_group(
    group_results, world_size, loss_name
):
    results = group_results(world_size)
    ours = _case(results, f"{loss_name}-equal-torch")
    theirs = _case(results, f"{loss_name}-equal-lightly_copy")
    label = f"{loss_name}-ws{world_size}-vs-lightly-copy"
    for rank in range(world_size):
        for name in ("loss", "out0", "out1"):
            _check(label, f"{name} on rank {rank}", ours[rank][name], theirs[rank][name], torch.float64)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_name", ["equal", "unequal"])
def test_memory_bank_gather_distributed_enqueues_the_keys_of_every_rank(
    group_results, world_size, batch_name
):
    sizes = _sizes(world_size, batch_name)
    per_rank = _case(group_results(world_size), f"memory_bank-{batch_name}")
    torch.manual_seed(SEED)
    bank = MemoryBank((BANK_ROWS, DIM))
    expected_losses = [[] for _ in range(world_size)]
    for step in range(2):
        batch = _global_batch(sizes, torch.float64, seed=SEED + step)
        before = bank.read()
        for rank, (start, stop) in enumerate(_offsets(sizes)):
            expected_losses[rank].append(
                reference.nt_xent_memory_bank_loss_reference(
                    batch["out0"][start:stop], batch["out1"][start:stop], before, TEMPERATURE
                )
            )
        bank.enqueue(normalize_rows(batch["out1"]))  # all ranks' keys, in rank order
    label = f"memory_bank-ws{world_size}-{batch_name}"
    for rank in range(world_size):
        _check(
            label,
            f"losses on rank {rank}",
            per_rank[rank]["losses"],
            torch.stack(expected_losses[rank]),
            torch.float64,
        )
        _check(label, f"bank on rank {rank}", per_rank[rank]["bank"], bank.bank, torch.float64)


# ---- errors, warnings, process groups -------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mismatches_across_ranks_raise_a_clear_error_on_every_rank(group_results, world_size):
    per_rank = _case(group_results(world_size), "errors")
    for rank, errors in enumerate(per_rank):
        dim = errors["dim_mismatch_clip"]
        assert dim["error"] == "ValueError" and "same feature dim on every rank" in dim["message"], dim
        assert "rank 1: 6" in dim["message"], dim
        dim = errors["dim_mismatch_nt_xent"]
        assert dim["error"] == "ValueError" and "same feature dim on every rank" in dim["message"], dim
        dim = errors["dim_mismatch_dcl"]
        assert dim["error"] == "ValueError" and "same feature dim on every rank" in dim["message"], dim
        bad = errors["bad_input_on_rank_1_dcl"]
        if rank == 1:
            assert bad["error"] == "ValueError" and "same batch size" in bad["message"], bad
        else:
            assert bad["error"] == "RuntimeError" and "failed on rank(s) [1]" in bad["message"], bad
        dtype = errors["dtype_mismatch_siglip"]
        assert dtype["error"] == "TypeError" and "same dtype on every rank" in dtype["message"], dtype
        bad = errors["bad_input_on_rank_1"]
        if rank == 1:
            assert bad["error"] == "ValueError" and "same batch size" in bad["message"], bad
        else:
            assert bad["error"] == "RuntimeError" and "failed on rank(s) [1]" in bad["message"], bad
        world = errors["world_size_disagrees"]
        assert world["error"] == "ValueError" and f"world_size={world_size + 1}" in world["message"], world
        wrong_rank = errors["rank_disagrees"]
        assert wrong_rank["error"] == "ValueError" and "get_rank()" in wrong_rank["message"], wrong_rank
        assert torch.isfinite(errors["after_errors"]["loss"]), "the group must still work after the errors"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_distributed_losses_emit_no_warnings(group_results, world_size):
    for rank, result in enumerate(_case(group_results(world_size), "warnings")):
        assert result["warnings"] == [], f"rank {rank} warned: {result['warnings']}"


def test_process_group_gives_rank_and_world_size_and_rejects_contradictions(group_results):
    per_rank = _case(group_results(3), "subgroup")
    non_member = per_rank[1]["non_member"]
    assert non_member["error"] == "ValueError" and "not a member" in non_member["message"], non_member
    members = [per_rank[0], per_rank[2]]
    batch = _global_batch(SUBGROUP_SIZES, torch.float64)
    for group_rank, result in enumerate(members):
        assert result["module_rank_world"].tolist() == [group_rank, 2]
        for key in ("contradicting_rank", "contradicting_world_size"):
            err = result[key]
            assert err["error"] == "ValueError" and "contradict `process_group`" in err["message"], err
        assert result["matching_explicit"]["error"] is None, result["matching_explicit"]
    checks = (
        ("clip", _global_clip, ("image", "text"), ("scale", "bias")),
        ("siglip", _global_siglip, ("image", "text"), ("scale", "bias")),
        ("nt_xent", _global_nt_xent, ("out0", "out1"), ()),
        ("dcl_loss-weight_fn", partial(_global_dcl, "dcl_loss-weight_fn"), ("out0", "out1"), ()),
    )
    for loss_name, global_fn, features, scalars in checks:
        averaged = _ddp_average([m[loss_name] for m in members], features, scalars)
        expected = global_fn(batch)
        for name in ("loss",) + features + scalars:
            _check(
                f"subgroup-{loss_name}", f"DDP-averaged {name}", averaged[name], expected[name], torch.float64
            )


# ---- single process: no group initialised ---------------------------------------------------------------


def test_world_size_above_one_without_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    image = torch.randn(4, DIM)
    with pytest.raises(RuntimeError, match=r"world_size=2.*init_process_group"):
        fastcontrast.clip_loss(image, image, 5.0, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match=r"world_size=3.*init_process_group"):
        SigLipLoss(rank=1, world_size=3)(image, image, 5.0, -1.0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClipLoss(process_group=object())


@pytest.mark.parametrize("module", [NTXentLoss, DCLLoss, DCLWLoss], ids=lambda m: m.__name__)
def test_gather_distributed_without_process_group_is_a_single_process(module):
    out0, out1 = torch.randn(5, DIM, dtype=torch.float64), torch.randn(5, DIM, dtype=torch.float64)
    gathered = module(TEMPERATURE, gather_distributed=True)(out0, out1)
    single = module(TEMPERATURE)(out0, out1)
    assert_close("loss", gathered, single, atol=0.0)


@pytest.mark.parametrize(
    "module, functional",
    [(NTXentLoss, fastcontrast.nt_xent_loss), (DCLLoss, fastcontrast.dcl_loss), (DCLWLoss, None)],
    ids=["NTXentLoss", "DCLLoss", "DCLWLoss"],
)
def test_process_group_without_gather_distributed_is_an_error(module, functional):
    with pytest.raises(ValueError, match="only used with gather_distributed=True"):
        module(process_group=object())
    if functional is not None:
        with pytest.raises(ValueError, match="only used with gather_distributed=True"):
            functional(torch.randn(3, 4), torch.randn(3, 4), process_group=object())


def test_invalid_rank_and_world_size_are_errors():
    image = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="`world_size` must be a positive int"):
        fastcontrast.clip_loss(image, image, 5.0, world_size=0)
    with pytest.raises(ValueError, match="`rank` must be smaller"):
        fastcontrast.siglip_loss(image, image, 5.0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="`dist_impl` must be one of"):
        fastcontrast.siglip_loss(image, image, 5.0, dist_impl="ring")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_layout_exchange_runs_on_a_host_group_not_the_losses_nccl_group(group_results, world_size):
    """The per-call layout exchange must not put numbers on the GPU stream: reading an NCCL tensor back
    (``.tolist()``) waits for all queued GPU work. With the group reported as NCCL, the exchange goes to one
    gloo twin of it, on CPU tensors; the feature gathers stay on the loss's group; the loss is unchanged."""
    per_rank = _case(group_results(world_size), "host_exchange")
    sizes = UNEQUAL_SIZES[world_size]
    for rank, result in enumerate(per_rank):
        assert result["exchange_on_cpu"].all(), f"rank {rank}: an exchange tensor was not on the CPU"
        assert result["exchange_on_cpu"].numel() >= 2, f"rank {rank}: expected one exchange per call"
        assert not result["exchange_on_default_group"].any(), f"rank {rank}: the exchange used the NCCL group"
        assert int(result["exchange_groups"]) == 1, f"rank {rank}: the host group was created more than once"
        assert result["gathers_on_default_group"].all(), f"rank {rank}: a feature gather left the loss's group"
        expected = _per_rank_clip_local(_global_batch(sizes, torch.float64), sizes)[rank]
        _check("host exchange", f"rank {rank} loss", result["loss"], expected, torch.float64)
        _check("host exchange", f"rank {rank} loss again", result["loss_again"], expected, torch.float64)
