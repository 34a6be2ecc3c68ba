"""Gathers across processes for the losses (docs/distributed.md): groups, batch layouts, gathers with or without grad.

Every distributed call of a loss starts with :func:`exchange_layout`: one all-gather of four int64 numbers per
rank (rows, feature dim, dtype, and whether this rank's input checks failed). From it every rank knows the
batch size of every rank, so that

- unequal per-rank batch sizes work: gathers pad to the largest rank's batch and strip the padding again,
  and the rank offsets are sums of the sizes of the lower ranks (``n·rank`` when the sizes are equal);
- a bad input on one rank, or feature dims or dtypes that differ across ranks, raise a clear error on
  *every* rank instead of leaving the others waiting in a collective.

The sizes are needed on the host (to allocate the gathered tensors), so this exchange runs on the host
alone: CPU tensors over a gloo group (the loss's own group when it is gloo, else a gloo twin created once per
process group). An exchange over NCCL would put the numbers on the GPU, and reading them back would wait
for every kernel queued before it: the CPU could no longer run ahead of the GPU, and CUDA-graph capture
would break.

Gathers with gradient use :class:`AllGatherRows`, a small autograd Function over the public collectives:
all-gather forward, reduce-scatter (sum) backward, which is what ``torch.distributed.nn.all_gather`` and
lightly's ``GatherLayer`` compute. The deprecated ``torch.distributed.nn.functional`` is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class DistGroup:
    """A resolved process group: ``group`` (None means the default group), this process's rank in it and its
    size (always > 1: a group of one is handled as a single process)."""

    group: Any
    rank: int
    world_size: int


@dataclass(frozen=True)
class BatchLayout:
    """Rows held by every rank of a group, in rank order, and which rank this process is."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def local_rows(self) -> int:
        return self.sizes[self.rank]

    @property
    def offset(self) -> int:
        """First row of this rank in the gathered tensor: the sum of the lower ranks' sizes."""
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def max_rows(self) -> int:
        return max(self.sizes)

    @property
    def equal(self) -> bool:
        return len(set(self.sizes)) == 1

    def scaled(self, factor: int) -> BatchLayout:
        """The layout of a tensor holding ``factor`` rows per row of this one (NT-Xent's [z0; z1])."""
        return BatchLayout(tuple(factor * n for n in self.sizes), self.rank)

    def loss_weight(self) -> float:
        """W·n_k/N: the factor that makes the DDP average of per-rank mean losses the global-batch mean.

        It is exactly 1 when the sizes are equal, so the equal-size losses are the originals' unchanged.
        """
        return self.world_size * self.local_rows / self.total


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"`{name}` must be a {kind} int, got {value!r}.")
    return value


def _require_initialized(what: str) -> None:
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build does not include.")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs an initialised torch.distributed process group, and none is. Call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment), or use "
            "world_size=1 for a single process."
        )


def _check_group_object(process_group: object, what: str) -> None:
    _require_initialized(f"{what} with process_group=")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{what}: this process (global rank {dist.get_rank()}) is not a member of `process_group` "
            "(torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER here); call the loss only on "
            "the ranks of the group it gathers over."
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "`process_group` must be a torch.distributed.ProcessGroup (e.g. from "
            f"torch.distributed.new_group), got {type(process_group).__name__}."
        )


def _group_rank_and_size(process_group: object, what: str) -> tuple[int, int]:
    _check_group_object(process_group, what)
    group_rank = dist.get_rank(process_group)
    if group_rank < 0:
        raise ValueError(
            f"{what}: this process (global rank {dist.get_rank()}) is not a member of `process_group`; "
            "call the loss only on the ranks of the group it gathers over."
        )
    return group_rank, dist.get_world_size(process_group)


def resolve_group(
    rank: object, world_size: object, process_group: object, *, what: str
) -> Optional[DistGroup]:
    """Resolve open_clip's ``rank``/``world_size`` and our ``process_group=`` into a group, or None.

    - ``process_group`` given: the rank and size come from it; explicit ``rank``/``world_size`` (anything
      but the defaults 0 and 1) must agree with it.
    - ``world_size == 1`` without a group: a single process, whatever torch.distributed holds (as open_clip).
    - ``world_size > 1``: the default group, which must be initialised and match ``rank`` and ``world_size``.

    Returns:
        a :class:`DistGroup` when there is something to gather, None for a single process (or a group of one).
    Raises:
        ValueError: invalid or contradicting rank / world size; RuntimeError: no initialised process group.
    """
    _check_int("rank", rank, 0)
    _check_int("world_size", world_size, 1)
    if rank >= world_size and process_group is None:  # type: ignore[operator]
        raise ValueError(f"`rank` must be smaller than `world_size` ({world_size}), got {rank}.")
    if process_group is not None:
        group_rank, group_size = _group_rank_and_size(process_group, what)
        explicit = (rank, world_size) != (0, 1)
        if explicit and (rank, world_size) != (group_rank, group_size):
            raise ValueError(
                f"{what}: rank={rank}, world_size={world_size} contradict `process_group`, in which this "
                f"process has rank {group_rank} of {group_size}. Pass only process_group= (rank and world "
                "size are then taken from it), or values that match it."
            )
        return DistGroup(process_group, group_rank, group_size) if group_size > 1 else None
    if world_size == 1:
        return None
    _require_initialized(f"{what} with world_size={world_size}")
    group_size = dist.get_world_size()
    group_rank = dist.get_rank()
    if world_size != group_size:
        raise ValueError(
            f"{what}: world_size={world_size} but the default process group has {group_size} ranks. Pass "
            "world_size=torch.distributed.get_world_size(), or process_group= for the group to gather over."
        )
    if rank != group_rank:
        raise ValueError(
            f"{what}: rank={rank} but this process has rank {group_rank} in the default process group. "
            "Pass rank=torch.distributed.get_rank()."
        )
    return DistGroup(None, group_rank, group_size)


def check_gather_available(gather_distributed: bool, *, what: str) -> None:
    """lightly 1.6's constructor rule: ``gather_distributed=True`` on a torch built without distributed
    support is a ValueError (one ``torch.distributed.is_available()`` call, as lightly makes)."""
    if gather_distributed and not dist.is_available():
        raise ValueError(
            f"{what}: gather_distributed is True but torch.distributed is not available. Set "
            "gather_distributed=False or install a torch build with distributed support."
        )


def resolve_gather_group(
    gather_distributed: bool, process_group: object, *, what: str
) -> Optional[DistGroup]:
    """lightly's ``gather_distributed``: the group to gather over, or None for a single process.

    As in lightly, ``gather_distributed=True`` with no initialised process group runs as a single process.
    ``process_group=`` only makes sense with ``gather_distributed=True``; otherwise it is an error.
    """
    if process_group is not None and not gather_distributed:
        raise ValueError(
            f"{what}: `process_group` is only used with gather_distributed=True; pass "
            "gather_distributed=True to gather over it, or drop process_group."
        )
    if not gather_distributed:
        return None
    if process_group is not None:
        group_rank, group_size = _group_rank_and_size(process_group, what)
        return DistGroup(process_group, group_rank, group_size) if group_size > 1 else None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group_size = dist.get_world_size()
    return DistGroup(None, dist.get_rank(), group_size) if group_size > 1 else None


def _collective(new_name: str, old_name: str) -> Callable:
    # torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single and warns (FutureWarning)
    # on every call of the old names; older torch has only the old ones. Use whichever this torch has.
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    _collective("all_gather_single", "all_gather_into_tensor")(output, tensor, group=group)


def _reduce_scatter_single(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    _collective("reduce_scatter_single", "reduce_scatter_tensor")(output, tensor, group=group)


def backend_name(group: Any) -> str:
    """The backend of a process group (None: the default group), e.g. ``"nccl"``, ``"gloo"`` or a mixed
    ``"cpu:gloo,cuda:nccl"``."""
    return str(dist.get_backend(group))


# Process group (or the default group's object) → the group to exchange host-side numbers over.
_HOST_GROUPS: dict = {}


def host_group(group: DistGroup) -> Any:
    """A group over the same ranks that takes CPU tensors: the group itself when its backend includes gloo,
    else a gloo twin, created once per process group (only its members take part in creating it)."""
    if "gloo" in backend_name(group.group):
        return group.group
    key = dist.group.WORLD if group.group is None else group.group
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(
            ranks=dist.get_process_group_ranks(key), backend="gloo", use_local_synchronization=True
        )
    return _HOST_GROUPS[key]


def _describe(features: object) -> tuple[int, int, int]:
    if isinstance(features, torch.Tensor) and features.dim() == 2:
        code = _DTYPE_CODES.index(features.dtype) if features.dtype in _DTYPE_CODES else -1
        return features.shape[0], features.shape[1], code
    return -1, -1, -1


def _dtype_name(code: int) -> str:
    return str(_DTYPE_CODES[code]) if 0 <= code < len(_DTYPE_CODES) else "unknown"


def exchange_layout(
    group: DistGroup, features: object, check: Callable[[], T], *, what: str, name: str
) -> tuple[T, BatchLayout]:
    """Run this rank's input checks, then agree with every rank on the batch layout.

    Args:
        group: the resolved group.
        features: this rank's [n, d] feature tensor whose rows are gathered (described to the other ranks).
        check: this rank's input checks; its return value is passed through.
        what: the loss's name, for messages; name: the argument name of ``features``, for messages.
    Returns:
        ``(check(), layout)``.
    Raises:
        on every rank, after the one small collective: this rank's own error if its checks failed; a
        RuntimeError naming the failed ranks on the others; ValueError if the feature dims differ across
        ranks; TypeError if the dtypes do.
    """
    error: Optional[BaseException] = None
    result: Optional[T] = None
    try:
        result = check()
    except Exception as exc:  # any failure must still reach the exchange, or the other ranks would hang
        error = exc
    rows, dim, dtype_code = _describe(features) if error is None else (-1, -1, -1)
    # CPU numbers over a host group: reading them back waits for no GPU work (module docstring).
    info = torch.tensor([rows, dim, dtype_code, int(error is not None)], dtype=torch.int64)
    table_flat = info.new_empty(group.world_size * 4)
    _all_gather_single(table_flat, info, host_group(group))
    table = table_flat.view(group.world_size, 4).tolist()
    failed = [r for r, row in enumerate(table) if row[3]]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"{what}: the input checks failed on rank(s) {failed} of {group.world_size} (see the error "
            f"raised there); rank {group.rank} stops too instead of waiting for them in a collective."
        )
    dims = [row[1] for row in table]
    if len(set(dims)) > 1:
        listing = ", ".join(f"rank {r}: {d}" for r, d in enumerate(dims))
        raise ValueError(f"{what}: `{name}` must have the same feature dim on every rank, got {listing}.")
    dtypes = [row[2] for row in table]
    if len(set(dtypes)) > 1:
        listing = ", ".join(f"rank {r}: {_dtype_name(c)}" for r, c in enumerate(dtypes))
        raise TypeError(f"{what}: `{name}` must have the same dtype on every rank, got {listing}.")
    return result, BatchLayout(tuple(row[0] for row in table), group.rank)  # type: ignore[return-value]


def all_reduce_sum(x: torch.Tensor, group: DistGroup) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group``, in place, without gradient (counts, not features)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group.group)
    return x


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    x = x.contiguous()
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def _all_gather_rows(x: torch.Tensor, group: DistGroup, layout: BatchLayout) -> torch.Tensor:
    """[n_k, d] on each rank → [N, d] in rank order (padded to the largest rank for the collective)."""
    max_rows = layout.max_rows
    out = x.new_empty((layout.world_size * max_rows,) + tuple(x.shape[1:]))
    _all_gather_single(out, _pad_rows(x, max_rows), group.group)
    if layout.equal:
        return out
    return torch.cat([out[r * max_rows : r * max_rows + n] for r, n in enumerate(layout.sizes)])


def _reduce_scatter_rows(grad: torch.Tensor, group: DistGroup, layout: BatchLayout) -> torch.Tensor:
    """[N, d] gradient of the gathered tensor on each rank → Σ over ranks of this rank's rows: [n_k, d]."""
    max_rows = layout.max_rows
    if layout.equal:
        padded = grad.contiguous()
    else:
        padded = grad.new_zeros((layout.world_size * max_rows,) + tuple(grad.shape[1:]))
        start = 0
        for r, n in enumerate(layout.sizes):
            padded[r * max_rows : r * max_rows + n] = grad[start : start + n]
            start += n
    out = grad.new_empty((max_rows,) + tuple(grad.shape[1:]))
    _reduce_scatter_single(out, padded, group.group)
    return out[: layout.local_rows]


class AllGatherRows(torch.autograd.Function):
    """All-gather rows with gradient: forward concatenates every rank's [n_r, d] in rank order; backward sums
    the gradients of all ranks for this rank's rows (a reduce-scatter), as ``torch.distributed.nn.all_gather``
    and lightly's ``GatherLayer`` do.

    ``apply(x, group, layout)`` with x: [n_k, d] → [N, d]. Every rank must run the backward pass.
    """

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group = group
        ctx.layout = layout
        return _all_gather_rows(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.group, ctx.layout), None, None


def gather_with_grad(x: torch.Tensor, group: DistGroup, layout: BatchLayout) -> torch.Tensor:
    """[n_k, d] → [N, d]: every rank's rows, with gradients flowing back to the rank that owns them."""
    return AllGatherRows.apply(x, group, layout)


def gather_without_grad(x: torch.Tensor, group: DistGroup, layout: BatchLayout) -> torch.Tensor:
    """[n_k, d] → [N, d] with no gradient at all (open_clip's ``local_loss=True, gather_with_grad=False``)."""
    with torch.no_grad():
        return _all_gather_rows(x.detach(), group, layout)


def gather_with_local_slot(x: torch.Tensor, group: DistGroup, layout: BatchLayout) -> torch.Tensor:
    """[n_k, d] → [N, d] without gradient except through this rank's own rows, which are the live ``x``.

    open_clip's ``gather_with_grad=False`` for the global loss: the gathered copies are constants and the
    local tensor is put back in its slot, so only this rank's own logits reach its features.
    """
    gathered = gather_without_grad(x, group, layout)
    start, stop = layout.offset, layout.offset + layout.local_rows
    return torch.cat([gathered[:start], x, gathered[stop:]])


def gather_keys_for_memory_bank(keys: torch.Tensor, group: DistGroup, *, what: str) -> torch.Tensor:
    """lightly's memory bank with ``gather_distributed``: the keys of all ranks, in rank order, no gradient.

    Args:
        keys: [n_k, D] this rank's (normalised) keys. Ranks may hold different numbers of keys.
    Returns:
        [N, D] the keys of every rank.
    """
    _, layout = exchange_layout(group, keys, lambda: None, what=what, name="out1")
    return gather_without_grad(keys, group, layout)


def split_views(gathered: torch.Tensor, layout: BatchLayout, views: int) -> list[torch.Tensor]:
    """Undo the gather of per-rank ``[v_0; v_1; ...]`` stacks (each view n_r rows on rank r).

    ``gathered`` is [views·N, d] ordered rank by rank; returns ``views`` tensors of [N, d], each ordered by
    rank (lightly's ``out0_large`` and ``out1_large`` for views=2).
    """
    parts: list[list[torch.Tensor]] = [[] for _ in range(views)]
    start = 0
    for n in layout.sizes:
        for v in range(views):
            parts[v].append(gathered[start + v * n : start + (v + 1) * n])
        start += views * n
    return [torch.cat(p) for p in parts]


def gather_for(*, local_loss: bool, with_grad: bool) -> Callable[[torch.Tensor, DistGroup, BatchLayout], torch.Tensor]:
    """open_clip's gather for its flags (``gather_with_grad``, ``local_loss``): with grad; else without grad
    for the local loss (the gathered copies are constants); else without grad but with the live local
    tensor in its slot (the global loss)."""
    if with_grad:
        return gather_with_grad
    return gather_without_grad if local_loss else gather_with_local_slot


def rank_mean(per_row: torch.Tensor, layout: Optional[BatchLayout]) -> torch.Tensor:
    """This rank's share of a global-batch mean: the mean over its rows, times W·n_k/N when sizes differ.

    With one process, or equal sizes, this is the plain mean (the originals' value, bit for bit); with
    unequal sizes the average over ranks of these values, and of their gradients under DDP, is the mean over
    all N rows.
    """
    if layout is None or layout.equal:
        return per_row.mean()
    return per_row.sum() * (layout.world_size / layout.total)


def rank_world_from_group(rank: int, world_size: int, process_group, what: str) -> tuple[int, int]:
    """With ``process_group=``, the rank and world size come from the group (explicit ones must agree)."""
    if process_group is None:
        return rank, world_size
    group = resolve_group(rank, world_size, process_group, what=what)
    return (0, 1) if group is None else (group.rank, group.world_size)
