"""No host sync per step (docs/numerics.md#dtypes): one forward + backward of every loss, and a
recorder that sees on the CPU what would block the host on an accelerator.

A loss step must not read a device value back (``.item()``, ``bool(tensor)``, ``int(tensor)``, ``.tolist()``),
copy Python data to the device (``torch.tensor(number, device=cuda)``), or make a tensor whose size depends
on its data (``nonzero``, ``unique``, boolean indexing): each blocks the host until the GPU catches up and
breaks CUDA-graph capture.

- On CUDA, :func:`run_one_step_of_every_loss` runs each step under ``torch.cuda.set_sync_debug_mode("error")``
  (after one unguarded warm-up step, which may compile kernels; the setup may copy buffers to the device). It
  sets the mode itself, step by step, so a caller need not (and if it does, the setup still runs).
- On the CPU nothing blocks, so :class:`HostSyncRecorder` records the operations that would: a
  ``TorchDispatchMode`` sees ``aten._local_scalar_dense`` (what ``.item()``, ``bool()``, ``int()``,
  ``float()`` and ``__index__`` call), ``aten.lift_fresh`` (what ``torch.tensor`` / ``torch.as_tensor`` of
  Python data make), host-to-device copies and the data-dependent-size ops; a ``TorchFunctionMode`` sees
  ``Tensor.tolist``, which reads the data without dispatching any aten op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose output size depends on the data: on CUDA they read a count back to the host.
DATA_DEPENDENT_SIZE = frozenset({
    "aten.nonzero.default", "aten.nonzero_static.default", "aten.masked_select.default", "aten._unique.default",
    "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
})
SCALAR_READ = "aten._local_scalar_dense.default"
FROM_PYTHON_DATA = frozenset({"aten.lift_fresh.default", "aten.lift_fresh_copy.default"})
COPIES = frozenset({"aten._to_copy.default", "aten.copy_.default", "aten.copy.default"})

# Host-only by design, with the reason. (file name, function) of a frame on the stack at the event.
HOST_ONLY_BY_DESIGN = {
    ("distributed.py", "exchange_layout"): "the layout exchange: CPU int64 numbers over the gloo host group, "
    "read back on the host; it waits for no GPU work (fastcontrast.distributed's module docstring)",
    ("_masked_lse.py", "_guide_mask"): "the torch engine's guide-masked LSE (GISTEmbedLoss, false_negative_margin) "
    "recomputes the entries within rounding of the threshold as sentence-transformers' per-pair sums, so the mask "
    "is the original's bit for bit; which entries those are is data-dependent: one sync per chunk of rows (the "
    "Triton engine's masked kernels sync nothing)",
}


@dataclasses.dataclass(frozen=True)
class SyncEvent:
    """One operation that would block the host: ``kind`` (scalar read, tensor from Python data, tolist,
    host-to-device copy, data-dependent size), the aten op or Python method, and where in fastcontrast."""

    kind: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where}"


def _where() -> tuple[str, Optional[str]]:
    """The innermost frame outside torch and this module (the line that asked for the sync), and the reason if
    the stack is in a frame that is host-only by design."""
    frames = traceback.extract_stack()
    exempt = None
    for frame in frames:
        key = (frame.filename.rsplit("/", 1)[-1], frame.name)
        if "fastcontrast" in frame.filename and key in HOST_ONLY_BY_DESIGN:
            exempt = HOST_ONLY_BY_DESIGN[key]
    callers = [f for f in frames if "/torch/" not in f.filename and not f.filename.endswith("sync_check.py")]
    frame = (callers or frames)[-1]
    return f"{frame.filename.rsplit('fastcontrast/', 1)[-1]}:{frame.lineno} ({frame.name})", exempt


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, record: Callable[[str, str], None]):
        super().__init__()
        self._record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self._record("tolist", "Tensor.tolist")
        return func(*args, **(kwargs or {}))


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, record: Callable[[str, str], None]):
        super().__init__()
        self._record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name == SCALAR_READ:
            self._record("scalar read", name)
        elif name in FROM_PYTHON_DATA:
            self._record("tensor from Python data", name)
        elif name in DATA_DEPENDENT_SIZE:
            self._record("data-dependent size", name)
        elif name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self._record("data-dependent size", name + " (boolean mask)")
        out = func(*args, **kwargs)
        if name in COPIES and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            sources = [a for a in args if isinstance(a, torch.Tensor)]
            source = sources[-1] if name != "aten._to_copy.default" else sources[0]
            if source.device.type == "cpu" and source.numel():
                self._record("host-to-device copy", name)
        return out


class HostSyncRecorder(contextlib.AbstractContextManager):
    """Context manager that records every :class:`SyncEvent` of the code it wraps, on any device.

    ``events`` holds the ones that count; ``exempt`` the ones inside frames that are host-only by design
    (:data:`HOST_ONLY_BY_DESIGN`), each with its reason.
    """

    def __init__(self):
        self.events: list[SyncEvent] = []
        self.exempt: list[tuple[SyncEvent, str]] = []
        self._stack = contextlib.ExitStack()

    def _record(self, kind: str, op: str) -> None:
        where, reason = _where()
        event = SyncEvent(kind, op, where)
        if reason is None:
            self.events.append(event)
        else:
            self.exempt.append((event, reason))

    def __enter__(self) -> HostSyncRecorder:
        self._stack.enter_context(_FunctionRecorder(self._record))
        self._stack.enter_context(_DispatchRecorder(self._record))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@contextlib.contextmanager
def accelerator_branches() -> Iterator[None]:
    """Within the block every fastcontrast module's ``_validation.values_readable`` answers False, as for a CUDA
    tensor: a step on the CPU then takes the branches a GPU step takes (device-side checks instead of host
    reads), so :class:`HostSyncRecorder` sees what a GPU step would do."""
    import sys

    from fastcontrast import _validation

    real = _validation.values_readable
    patched = [module for module in list(sys.modules.values())
               if getattr(module, "__name__", "").startswith("fastcontrast")
               and getattr(module, "values_readable", None) is real]
    for module in patched:
        module.values_readable = lambda tensor: False
    try:
        yield
    finally:
        for module in patched:
            module.values_readable = real


@contextlib.contextmanager
def cuda_sync_debug_mode(mode: int | str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block, the previous mode restored after. With
    ``"error"`` any synchronising CUDA call inside raises; with 0 (``"default"``) none is reported."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _unit(rows: int, dim: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=generator, device=generator.device).to(device=device)
    return F.normalize(x, dim=1).to(dtype).requires_grad_()


def loss_steps(
    device: torch.device | str, dtype: torch.dtype, *, rows: int = 12, distributed: bool = False
) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """``(name, step)`` for every loss: ``step()`` runs one forward + backward on fixed inputs of ``dtype`` on
    ``device`` and returns the loss, detached. The inputs and loss modules are built here, outside the steps
    (building them may copy buffers to the device); every constant a step needs is built on the device.

    Single process (``distributed=False``): CLIP (global, local_loss, with accuracy, with a bias), SigLIP,
    distillation, CoCa (and its zero CLIP part), NT-Xent, the memory bank, DCL, DCLW, SupCon (labels, a
    reference set, a miner's pairs and triplets, raw dot products when PML is installed).

    With ``distributed=True`` (``torch.distributed`` initialised; ``rows`` this rank's batch, which may differ
    between ranks): every loss's distributed modes over the default group instead, the gathers and the ring.

    Not here, because they synchronise by design: SupCon with a PML ``reducer=`` (PML's reducers branch on
    the losses on the host) or with a distance that has no blockwise form (PML's index-based masks).
    """
    from fastcontrast import functional
    from fastcontrast.losses import (
        ClipLoss,
        CoCaLoss,
        DCLLoss,
        DCLWLoss,
        DistillClipLoss,
        GISTEmbedLoss,
        MultipleNegativesRankingLoss,
        MultipleNegativesSymmetricRankingLoss,
        NTXentLoss,
        SigLipLoss,
        SupConLoss,
    )

    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, d_teacher, vocab, seq = rows, 16, 24, 11, 5
    image, text = _unit(n, d, dtype, device, g), _unit(n, d, dtype, device, g)
    teacher_image, teacher_text = (_unit(n, d_teacher, dtype, device, g).detach() for _ in range(2))
    scale = torch.full((), 10.0, device=device, requires_grad=True)
    teacher_scale = torch.full((), 20.0, device=device)
    bias = torch.full((), -2.0, device=device, requires_grad=True)
    caption_logits = torch.randn(n, seq, vocab, generator=g).to(device=device, dtype=dtype).requires_grad_()
    caption_labels = torch.randint(0, vocab, (n, seq), generator=g).to(device)
    labels = torch.randint(0, 3, (n,), generator=g).to(device)
    ref = _unit(n + 3, d, dtype, device, g)
    ref_labels = torch.randint(0, 3, (n + 3,), generator=g).to(device)
    anchors = torch.arange(n, device=device)
    positives, negatives = (anchors + 1) % n, (anchors + 5) % n
    # Duplicated pairs, as a miner may return them: they count once.
    pairs = (torch.cat([anchors, anchors[:3]]), torch.cat([positives, positives[:3]]), anchors, negatives)
    triplets = (anchors, positives, negatives)

    def sum_of(result) -> torch.Tensor:
        if isinstance(result, dict):
            result = list(result.values())
        if isinstance(result, (tuple, list)):
            return sum(r.float().sum() for r in result if isinstance(r, torch.Tensor) and r.requires_grad)
        return result

    def step(compute: Callable[[], object]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            loss = sum_of(compute())
            loss.backward()
            return loss.detach()

        return run

    if distributed:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        ranked = dict(rank=rank, world_size=world)
        clip_modes = {
            "global, gather_with_grad": ClipLoss(gather_with_grad=True, **ranked),
            "local, gather_with_grad": ClipLoss(local_loss=True, gather_with_grad=True, **ranked),
            "local, no grad gather": ClipLoss(local_loss=True, **ranked),
            "ring": ClipLoss(local_loss=True, gather_with_grad=True, exchange="ring", **ranked),
        }
        siglips = {impl: SigLipLoss(dist_impl=impl, **ranked) for impl in ("bidir", "shift", "reduce", "gather")}
        siglips["ring"] = SigLipLoss(exchange="ring", **ranked)
        distill = DistillClipLoss(local_loss=True, gather_with_grad=True, **ranked)
        ntxent = NTXentLoss(temperature=0.3, gather_distributed=True)
        ntxent_ring = NTXentLoss(temperature=0.3, gather_distributed=True, exchange="ring")
        bank = NTXentLoss(temperature=0.3, memory_bank_size=(32, d), gather_distributed=True).to(device)
        dcl = DCLLoss(temperature=0.2, gather_distributed=True)
        supcon = SupConLoss(temperature=0.1, gather_distributed=True)
        return [
            *[(f"ClipLoss({mode})", step(lambda f=f: f(image, text, scale))) for mode, f in clip_modes.items()],
            *[(f"SigLipLoss({impl})", step(lambda f=f: f(image, text, scale, bias))) for impl, f in siglips.items()],
            ("DistillClipLoss(local, gather_with_grad)",
             step(lambda: distill(image, text, scale, teacher_image, teacher_text, teacher_scale))),
            ("NTXentLoss(gather_distributed)", step(lambda: ntxent(image, text))),
            ("NTXentLoss(ring)", step(lambda: ntxent_ring(image, text))),
            ("NTXentLoss(memory bank, gather_distributed)", step(lambda: bank(image, text))),
            ("DCLLoss(gather_distributed)", step(lambda: dcl(image, text))),
            ("SupConLoss(gather_distributed)", step(lambda: supcon(image, labels))),
        ]

    clip_global, clip_local = ClipLoss(), ClipLoss(local_loss=True)
    clip_accuracy = ClipLoss(return_accuracy=True)
    siglip = SigLipLoss()
    distill = DistillClipLoss()
    coca, coca_no_clip = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0), CoCaLoss(2.0, 0.0)
    ntxent = NTXentLoss(temperature=0.3)
    clip_margin, ntxent_margin = ClipLoss(false_negative_margin=0.1), NTXentLoss(false_negative_margin=0.1)
    bank = NTXentLoss(temperature=0.3, memory_bank_size=(32, d)).to(device)
    dcl, dclw = DCLLoss(temperature=0.2), DCLWLoss(temperature=0.2, sigma=0.5)
    supcon = SupConLoss(temperature=0.1)
    # sentence-transformers' columns [anchor, positive, hard negative]; the guide embeds them at its own width.
    hard_negative = _unit(n, d, dtype, device, g)
    columns = [image, text, hard_negative]
    guide_columns = [_unit(n, d_teacher, dtype, device, g).detach() for _ in range(3)]
    mnrl = MultipleNegativesRankingLoss(None)
    mnrl_all = MultipleNegativesRankingLoss(None, directions=("query_to_doc", "query_to_query", "doc_to_query",
                                                              "doc_to_doc"), hardness_mode="all_negatives",
                                            hardness_strength=2.0)
    mnrl_margin = MultipleNegativesRankingLoss(None, false_negative_margin=0.1)
    mnrl_symmetric = MultipleNegativesSymmetricRankingLoss(None)
    gist = GISTEmbedLoss(None, None)
    steps = []
    try:  # PML's similarity classes, for the raw dot-product form; PML is optional
        from pytorch_metric_learning.distances import DotProductSimilarity
    except ImportError:
        pass
    else:
        supcon_dot = SupConLoss(temperature=0.1, distance=DotProductSimilarity(normalize_embeddings=False))
        steps.append(("SupConLoss(DotProductSimilarity)", step(lambda: supcon_dot(image, labels))))

    return [
        ("ClipLoss", step(lambda: clip_global(image, text, scale))),
        ("ClipLoss(local_loss)", step(lambda: clip_local(image, text, scale, output_dict=True))),
        ("ClipLoss(return_accuracy)", step(lambda: clip_accuracy(image, text, scale, output_dict=True))),
        ("ClipLoss(float scale, bias)", step(lambda: clip_global(image, text, 10.0, -1.0))),
        ("SigLipLoss", step(lambda: siglip(image, text, scale, bias))),
        ("SigLipLoss(float scale, bias)", step(lambda: siglip(image, text, 10.0, -10.0))),
        ("DistillClipLoss", step(lambda: distill(image, text, scale, teacher_image, teacher_text, teacher_scale))),
        ("CoCaLoss", step(lambda: coca(image, text, caption_logits, caption_labels, scale))),
        ("CoCaLoss(clip_loss_weight=0)", step(lambda: coca_no_clip(image, text, caption_logits, caption_labels,
                                                                   scale))),
        ("NTXentLoss", step(lambda: ntxent(image, text))),
        ("ClipLoss(false_negative_margin)", step(lambda: clip_margin(image, text, scale))),
        ("NTXentLoss(false_negative_margin)", step(lambda: ntxent_margin(image, text))),
        ("NTXentLoss(memory bank)", step(lambda: bank(image, text))),
        ("DCLLoss", step(lambda: dcl(image, text))),
        ("DCLWLoss", step(lambda: dclw(image, text))),
        ("dcl_loss(float weight)", step(lambda: functional.dcl_loss(image, text, 0.2, weight_fn=lambda a, b: 2.0))),
        ("SupConLoss", step(lambda: supcon(image, labels))),
        ("SupConLoss(ref_emb)", step(lambda: supcon(image, labels, ref_emb=ref, ref_labels=ref_labels))),
        ("SupConLoss(pairs)", step(lambda: supcon(image, indices_tuple=pairs))),
        ("SupConLoss(triplets)", step(lambda: supcon(image, labels, indices_tuple=triplets))),
        ("MultipleNegativesRankingLoss", step(lambda: mnrl.compute_loss_from_embeddings(columns, None))),
        ("MultipleNegativesRankingLoss(4 directions, hardness)",
         step(lambda: mnrl_all.compute_loss_from_embeddings(columns, None))),
        ("MultipleNegativesRankingLoss(false_negative_margin)",
         step(lambda: mnrl_margin.compute_loss_from_embeddings(columns, None))),
        ("MultipleNegativesSymmetricRankingLoss",
         step(lambda: mnrl_symmetric.compute_loss_from_embeddings(columns[:2], None))),
        ("GISTEmbedLoss", step(lambda: gist.compute_loss_from_embeddings(columns, guide_columns))),
        *steps,
    ]


def run_one_step_of_every_loss(
    device: torch.device | str, dtype: torch.dtype, *, distributed: bool = False
) -> dict[str, torch.Tensor]:
    """One forward + backward of every loss on ``device`` in ``dtype`` (see :func:`loss_steps`; with
    ``distributed=True``, every rank of the initialised default group must call it).

    On CUDA the inputs and loss modules are built, and each step runs once as a warm-up (kernel compilation
    and loading may synchronise), with the sync debug mode off whatever the caller set; then each step runs
    again under ``torch.cuda.set_sync_debug_mode("error")``, so a host sync in a loss step raises a
    RuntimeError naming the synchronising call. The caller's mode is restored on return. Elsewhere each step
    runs once, unguarded (:class:`HostSyncRecorder` sees syncs on the CPU).

    Returns:
        ``{loss name: the loss, detached}``; nothing is read back to the host.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {name: run() for name, run in loss_steps(device, dtype, distributed=distributed)}
    # Building the memory bank copies its initial random vectors (drawn on the host, as lightly draws them)
    # to the device: setup, not the step.
    with cuda_sync_debug_mode(0):
        steps = loss_steps(device, dtype, distributed=distributed)
        for _, run in steps:
            run()
    results = {}
    for name, run in steps:
        with cuda_sync_debug_mode("error"):
            results[name] = run()
    return results
