"""No host sync in any loss's step (issue 19 item 5), checked on the CPU.

On the CPU nothing blocks, so :class:`fastcontrast.tools.sync_check.HostSyncRecorder` records what would on an
accelerator: scalar reads (``.item()``, ``bool()``, ``int()``), tensors made from Python data
(``torch.tensor(number)``), ``.tolist()``, host-to-device copies and data-dependent sizes. The first tests
prove that it catches each kind; the last runs one forward + backward of every loss under it.

Excluded, host-only by design: ``distributed.exchange_layout`` (CPU numbers over the gloo host group; it
runs only with a process group: tests/distributed/test_no_host_sync_distributed.py runs the distributed
modes and checks that its events are seen and exempted), and the embedding passes of sentence-transformers'
Cached* losses (its mini-batch slicing reads the padding on the host; their loss phase is checked, see
``CACHED``). The CPU-only input checks (a CPU ``logit_scale``'s sign, a miner's index range) read values only
where ``_validation.values_readable`` says the tensor is on the host; the step test patches it to False, so the
CPU run takes the accelerator's branch.
"""

from __future__ import annotations

import types

import pytest
import torch

from fastcontrast import distributed
from fastcontrast.tools import sync_check
from fastcontrast.tools.sync_check import HOST_ONLY_BY_DESIGN, HostSyncRecorder, loss_steps, run_one_step_of_every_loss

x = torch.ones(4)

INJECTED = {
    "item": lambda: x.sum().item(),
    "bool": lambda: bool(x.sum() > 0),
    "if-tensor": lambda: 1 if x.sum() > 0 else 0,
    "int": lambda: int(x.sum()),
    "index": lambda: [0, 1, 2, 3, 4][x.sum().long()],
    "tolist": lambda: x.tolist(),
    "torch.tensor": lambda: torch.tensor(2.0, device=x.device),
    "torch.as_tensor": lambda: torch.as_tensor(2.0, device=x.device),
    "boolean-mask": lambda: x[x > 0],
    "nonzero": lambda: torch.nonzero(x),
    "unique": lambda: torch.unique(x),
    # The meta device stands in for an accelerator: a copy from host memory to any other device.
    "to-device": lambda: x.to("meta"),
    "copy_-to-device": lambda: torch.empty(4, device="meta").copy_(x),
}
EXPECTED_KIND = {
    "item": "scalar read", "bool": "scalar read", "if-tensor": "scalar read", "int": "scalar read",
    "index": "scalar read", "tolist": "tolist", "torch.tensor": "tensor from Python data",
    "torch.as_tensor": "tensor from Python data", "boolean-mask": "data-dependent size",
    "nonzero": "data-dependent size", "unique": "data-dependent size", "to-device": "host-to-device copy",
    "copy_-to-device": "host-to-device copy",
}


@pytest.mark.parametrize("kind", list(INJECTED))
def test_recorder_catches_each_kind_of_host_sync(kind):
    with HostSyncRecorder() as recorder:
        INJECTED[kind]()
    kinds = [event.kind for event in recorder.events]
    assert EXPECTED_KIND[kind] in kinds, f"{kind}: recorded {kinds}, expected a {EXPECTED_KIND[kind]!r} event"
    where = recorder.events[0].where
    assert "test_no_host_sync.py" in where, f"{kind}: the event points at {where}, not at the injected line"


def test_recorder_records_nothing_for_device_side_code():
    with HostSyncRecorder() as recorder:
        scale = torch.full((), 2.0)
        y = torch.where(x.sum() > 0, x * scale, torch.zeros_like(x))
        torch._assert_async(y.min() >= 0, "negative")
        torch.sort(y).values.cumsum(0)
        torch.full((), 1.0, device="meta") + torch.zeros(2, device="meta")  # made on the device, no copy
    assert recorder.events == [], f"device-side code recorded {[str(e) for e in recorder.events]}"


def test_exemptions_name_functions_that_exist():
    from fastcontrast.losses import _masked_lse

    modules = {"distributed.py": distributed, "_masked_lse.py": _masked_lse}
    for (file_name, function), reason in HOST_ONLY_BY_DESIGN.items():
        assert file_name in modules and hasattr(modules[file_name], function), (file_name, function)
        assert reason


def test_the_layout_exchange_is_exempt_with_its_reason(monkeypatch):
    # One rank, the collective replaced by a copy: exchange_layout's torch.tensor of Python numbers and its
    # .tolist() are recorded as exempt, not as step syncs.
    monkeypatch.setattr(distributed, "host_group", lambda group: group)
    monkeypatch.setattr(distributed, "_all_gather_single", lambda out, inp, group: out.copy_(inp))
    group = types.SimpleNamespace(world_size=1, rank=0)
    features = torch.randn(5, 3)
    with HostSyncRecorder() as recorder:
        _, layout = distributed.exchange_layout(group, features, lambda: None, what="test", name="features")
    assert layout.offset == 0
    assert recorder.events == [], [str(e) for e in recorder.events]
    kinds = {event.kind for event, _ in recorder.exempt}
    assert {"tensor from Python data", "tolist"} <= kinds, f"exempt events: {kinds}"
    assert all("gloo" in reason for _, reason in recorder.exempt)


@pytest.fixture
def accelerator_branches():
    """Every module's ``values_readable`` answers False, as for a CUDA tensor: the CPU run then takes the
    branches a GPU step takes (device-side asserts instead of host reads)."""
    with sync_check.accelerator_branches():
        yield


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LOSSES = [name for name, _ in loss_steps("cpu", torch.float32)]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_loss_step_has_no_host_sync(dtype, accelerator_branches):
    steps = loss_steps("cpu", DTYPES[dtype])
    assert [name for name, _ in steps] == LOSSES
    for name, step in steps:
        with HostSyncRecorder() as recorder:
            loss = step()
        events = "; ".join(str(e) for e in recorder.events)
        assert recorder.events == [], f"{name} ({dtype}): host syncs in one step: {events}"
        assert torch.isfinite(loss).all(), f"{name} ({dtype}): loss {loss}"


# sentence-transformers' Cached* losses: their loss phase (``calculate_loss``, the MNRL / GIST steps above on
# the cached embeddings) is checked below; a whole cached step is not sync-free by design, because the
# embedding passes cut mini-batches with sentence-transformers' own slicing, which reads each mini-batch's last
# non-padding column on the host (as 6.2.0 does; the mini-batch shapes then equal 6.2.0's).
CACHED = ("CachedGISTEmbedLoss", "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")


def test_the_steps_cover_every_public_loss_module():
    import fastcontrast.losses

    covered = {name.split("(")[0] for name in LOSSES} | set(CACHED)
    missing = set(fastcontrast.losses.__all__) - covered
    assert not missing, f"loss modules without a step in tools/sync_check.loss_steps: {sorted(missing)}"


@pytest.mark.parametrize("name", CACHED)
def test_the_cached_losses_loss_phase_has_no_host_sync(name, accelerator_branches):
    import fastcontrast

    g = torch.Generator().manual_seed(0)
    # Two mini-batches per column, as the embedding pass hands them to calculate_loss.
    reps = [[torch.randn(rows, 8, generator=g).requires_grad_() for rows in (5, 7)] for _ in range(3)]
    loss = getattr(fastcontrast, name)(*([None, None] if name == "CachedGISTEmbedLoss" else [None]))
    extra = ([[torch.randn(rows, 6, generator=g) for rows in (5, 7)] for _ in range(3)],) \
        if name == "CachedGISTEmbedLoss" else (None,)
    with HostSyncRecorder() as recorder:
        value = loss.calculate_loss(reps, *extra, with_backward=True)
    events = "; ".join(str(e) for e in recorder.events)
    assert recorder.events == [], f"{name}.calculate_loss: host syncs: {events}"
    assert not value.requires_grad and torch.isfinite(value)
    assert all(r.grad is not None for column in reps for r in column)


def test_run_one_step_of_every_loss_on_the_cpu_returns_every_loss():
    losses = run_one_step_of_every_loss("cpu", torch.float32)
    assert list(losses) == LOSSES
    for name, loss in losses.items():
        assert loss.dim() == 0 and not loss.requires_grad and torch.isfinite(loss), f"{name}: {loss}"


def test_run_one_step_of_every_loss_on_cuda_guards_each_step_not_the_setup(monkeypatch):
    # No GPU here: the CUDA sync debug mode is replaced by a recorder of the mode each phase ran under.
    from fastcontrast.tools import sync_check

    state = {"mode": "warn"}  # the caller's own mode, restored at the end
    seen = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: state.update(mode=mode))

    def fake_steps(device, dtype, *, distributed=False):
        seen.append(("setup", state["mode"]))
        return [(name, lambda name=name: seen.append((name, state["mode"])) or torch.zeros(()))
                for name in ("a", "b")]

    monkeypatch.setattr(sync_check, "loss_steps", fake_steps)
    results = sync_check.run_one_step_of_every_loss("cuda", torch.float32)
    assert list(results) == ["a", "b"]
    assert seen == [("setup", 0), ("a", 0), ("b", 0), ("a", "error"), ("b", "error")], seen
    assert state["mode"] == "warn", "the caller's sync debug mode was not restored"
