"""The ring exchange (``exchange="ring"``): every rank's rows meet every other rank's features with O(B·d)
memory per rank, however many ranks (docs/distributed.md#the-ring-exchange-exchangering).

With ``exchange="gather"`` each rank all-gathers the other tower (N·d per rank, plus its gradient). In a
ring each rank keeps its own B rows; the blocks of the travelling features (the other tower, or both views
for NT-Xent) pass from rank to rank, W − 1 hops, and each rank reduces its rows against each block as it
passes: partial row statistics, merged at the end in rank order. Backward sends the blocks round again;
each block's gradient accumulates as it passes and arrives home one hop after its last visit (a ring
reduce-scatter), summed in ring order, so results are deterministic.

Communication is point-to-point (``torch.distributed.batch_isend_irecv``: NCCL on GPUs, gloo on CPU). The
next block is in flight while this one is reduced; with NCCL the transfers run on NCCL's own stream, so they
overlap the engine's kernels on the compute stream, and the compute stream waits for a transfer only when
it reads the block. Communication hides when one block's compute takes longer than its transfer
(docs/distributed.md gives the condition with NVLink and InfiniBand figures).

Only this rank's rows are ever scored, so the losses are the local forms: open_clip's ``ClipLoss`` and
``DistillClipLoss`` with ``local_loss=True, gather_with_grad=True``, ``SigLipLoss`` (every ``dist_impl``),
lightly's ``NTXentLoss`` / ``DCLLoss`` with ``gather_distributed=True``. Each equals its gather form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from fastcontrast import ops
from fastcontrast.autograd import _autocast_off, _positive_logits, siglip_gradients_at
from fastcontrast.distributed import BatchLayout, DistGroup
from fastcontrast.engine import DistillStats, Engine, compute_dtype, present
from fastcontrast.lse_split import merge_split_lse

EXCHANGES = ("gather", "ring")
# p2p tags: blocks and gradient accumulators may be in flight to the same peer at once (gloo matches by tag).
_BLOCK_TAG, _GRAD_TAG = 1, 2


class Ring:
    """This process's place in a ring over ``group``: rank r receives from r − 1 and sends to r + 1.

    ``layout`` gives every rank's rows of the travelling tensors (receive buffers are sized from it).
    """

    def __init__(self, group: DistGroup, layout: BatchLayout):
        self.group, self.layout = group, layout
        world, rank = group.world_size, group.rank
        self.next_peer = self._global_rank((rank + 1) % world)
        self.prev_peer = self._global_rank((rank - 1) % world)

    def _global_rank(self, group_rank: int) -> int:
        if self.group.group is None:
            return group_rank
        return dist.get_global_rank(self.group.group, group_rank)

    @property
    def rank(self) -> int:
        return self.group.rank

    def source(self, step: int) -> int:
        """The rank whose block this rank holds at ``step`` (its own at step 0)."""
        return (self.group.rank - step) % self.group.world_size

    def _start(self, send: Sequence[torch.Tensor], receive: Sequence[torch.Tensor], tag: int) -> list:
        p2p = [dist.P2POp(dist.isend, t, self.next_peer, self.group.group, tag) for t in send]
        p2p += [dist.P2POp(dist.irecv, t, self.prev_peer, self.group.group, tag) for t in receive]
        return dist.batch_isend_irecv(p2p)

    def _empty_block(self, like: Sequence[torch.Tensor], source: int) -> tuple:
        rows = self.layout.sizes[source]
        return tuple(t.new_empty((rows,) + tuple(t.shape[1:])) for t in like)

    def blocks(self, local: Sequence[torch.Tensor]) -> Iterator[tuple[int, tuple]]:
        """Every rank's block of the travelling tensors ``local`` (this rank's rows of each), as
        ``(source rank, block)``: its own first, then one hop further round each step. The next block is
        received while the caller works on this one. The caller must drop its reference to a block
        (``del block``) before asking for the next, or three blocks would be alive at once instead of two."""
        current, world = tuple(t.contiguous() for t in local), self.group.world_size
        for step in range(world):
            works, incoming = [], None
            if step + 1 < world:
                incoming = self._empty_block(current, self.source(step + 1))
                works = self._start(current, incoming, _BLOCK_TAG)
            yield self.source(step), current
            for work in works:
                work.wait()
            if incoming is not None:
                current = incoming

    def gradients_home(
        self, local: Sequence[torch.Tensor], visit: Callable[[int, tuple], tuple]
    ) -> tuple:
        """Send the blocks round again; ``visit(source, block)`` returns this rank's gradient contributions
        for the block (contiguous, block-shaped). Each block's contributions are summed along the ring, in
        ring order (the block's own rank first), and the total arrives at its rank: returned for ``local``.
        """
        received = pending = None  # the sums for the block being visited; the transfers of the last step
        for source, block in self.blocks(local):
            if pending is not None:
                # The sums sent last step are delivered (the next rank posted its receive then): free them
                # before this visit allocates, and hold the sums that arrived for this block.
                for work in pending[1]:
                    work.wait()
                received, pending = pending[0], None
            contribution = tuple(c.contiguous() for c in visit(source, block))
            del block
            if received is not None:
                contribution = tuple(r.add_(c) for r, c in zip(received, contribution))
                received = None
            # After this rank's visit the sums go on to the next rank, which holds the next block's sums
            # for us; after the last visit that is this rank's own block, complete.
            receive = self._empty_block(contribution, (source - 1) % self.group.world_size)
            pending = (receive, self._start(contribution, receive, _GRAD_TAG), contribution)
            del contribution, receive
        for work in pending[1]:
            work.wait()
        return pending[0]


def _merge_lse(parts: list[torch.Tensor]) -> torch.Tensor:
    """LSE over blocks, in rank order (the same order on every rank)."""
    return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), dim=0)


def _merge_split_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (hi, lo) LSE pair over blocks (:mod:`fastcontrast.lse_split`), in rank order."""
    return merge_split_lse([p[0] for p in parts], [p[1] for p in parts])


@dataclass(frozen=True)
class Direction:
    """One row reduction of a ring LSE: ``rows`` (index of the local features scored) against the blocks of
    ``travel`` (index of the features that travel). In the home block only (this rank's own rows),
    ``positive_index`` gives each row's positive column and the masks apply (see :mod:`fastcontrast.engine`)."""

    rows: int
    travel: int
    positive_index: Optional[torch.Tensor] = None
    exclude_offset: Optional[int] = None
    exclude_positive: bool = False

    def home_args(self, home: bool) -> tuple:
        """(positive_index, exclude_offset, exclude_positive) for a block, home or not."""
        if home:
            return self.positive_index, self.exclude_offset, self.exclude_positive
        return None, None, False


def _travelling(directions: Sequence[Direction]) -> list[int]:
    return sorted({d.travel for d in directions})


class RingLogSumExp(torch.autograd.Function):
    """Row LSEs of local rows against every rank's travelling features, and the home block's positives.

    ``apply(ring, engine, directions, scale, *features)``: ``features`` are this rank's tensors ([n_f, d]
    each, one d), ``directions`` a tuple of :class:`Direction`. Returns ``(lse_0, positives_0, low_0, lse_1,
    ...)`` per direction: the LSE over all N columns [n_rows], the positives [n_rows] (empty without
    ``positive_index``) and the LSE's low part [n_rows] (not differentiable, :mod:`fastcontrast.lse_split`),
    in the compute dtype. Equal to :class:`~fastcontrast.autograd.BlockwiseLogSumExp`
    with ``need_row`` on the gathered features.
    """

    @staticmethod
    def forward(ctx, ring: Ring, engine: Engine, directions: tuple, scale, *features):
        travel = _travelling(directions)
        parts: list[dict] = [{} for _ in directions]
        positives = [features[d.rows].new_empty(0, dtype=compute_dtype(features[d.rows].dtype)) for d in directions]
        with _autocast_off(scale.device.type):
            for source, block in ring.blocks([features[t] for t in travel]):
                home = source == ring.rank
                for k, d in enumerate(directions):
                    positive_index, exclude_offset, exclude_positive = d.home_args(home)
                    lse, _, pos, _, _, low, _ = ops.lse_forward(
                        features[d.rows], block[travel.index(d.travel)], scale, positive_index, True, False,
                        exclude_offset, exclude_positive, 0, False, False, engine.name, engine.chunk_bytes,
                    )
                    parts[k][source] = (lse, low)
                    if positive_index is not None:
                        positives[k] = pos
                del block
        lses, lows = zip(*(_merge_split_lse([p[r] for r in range(ring.group.world_size)]) for p in parts))
        ctx.set_materialize_grads(False)
        ctx.ring, ctx.engine, ctx.directions = ring, engine, directions
        ctx.save_for_backward(scale, *features, *lses)
        ctx.mark_non_differentiable(*lows)
        return tuple(x for triple in zip(lses, positives, lows) for x in triple)

    @staticmethod
    def backward(ctx, *grads):
        ring, engine, directions = ctx.ring, ctx.engine, ctx.directions
        scale, *saved = ctx.saved_tensors
        features, lses = saved[: len(saved) - len(directions)], saved[len(saved) - len(directions):]
        grad_lse, grad_pos = grads[0::3], grads[1::3]
        need_scale, need_features = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        travel = _travelling(directions)
        carried = [t for t in travel if need_features[t]]  # travelling features that take a gradient home
        cdt = compute_dtype(features[0].dtype)
        local = [torch.zeros(f.shape, dtype=cdt, device=f.device) for f in features]

        def visit(source: int, block: tuple) -> tuple:
            home = source == ring.rank
            contribution: dict = {}
            for k, d in enumerate(directions):
                positive_index, exclude_offset, exclude_positive = d.home_args(home)
                g_pos = grad_pos[k] if positive_index is not None else None
                if grad_lse[k] is None and g_pos is None:
                    continue
                need_a = need_features[d.rows] or need_scale
                grad_a, grad_b = ops.lse_backward(
                    features[d.rows], block[travel.index(d.travel)], scale, positive_index, lses[k],
                    lses[k].new_empty(0), grad_lse[k], None, g_pos, exclude_offset, exclude_positive, 0,
                    need_a, d.travel in carried, False, engine.name, engine.chunk_bytes,
                )
                if need_a:
                    local[d.rows].add_(grad_a)
                if d.travel in carried:
                    _accumulate(contribution, d.travel, grad_b)
            return tuple(_or_zeros(contribution, t, block[travel.index(t)], cdt) for t in carried)

        with _autocast_off(scale.device.type):
            arrived = ring.gradients_home([features[t] for t in travel], visit)
            # ds = ⟨A, dS·B⟩ over this rank's rows: from the row products alone, before the columns' sums.
            grad_scale = _inner(features, local, scale) if need_scale else None
            for t, grad in zip(carried, arrived):
                local[t].add_(grad)
            grad_features = [_scale_in_place(g, scale, f) if need else None
                             for f, g, need in zip(features, local, need_features)]
        return (None, None, None, grad_scale, *grad_features)


class RingSigLipSum(torch.autograd.Function):
    """Σᵢⱼ softplus(−zᵢⱼ·(s·Iᵢ·Tⱼ + b)) of this rank's images against every rank's texts; zᵢⱼ = +1 only for
    the rank's own pairs (i, i).

    ``apply(ring, engine, scale, bias, image, text, needs)`` → 0-dim sum (compute dtype), with needs: which
    of (image, text, scale, bias) take a gradient; equal to :class:`~fastcontrast.autograd.BlockwiseSigLipSum`
    on the gathered texts with the positives at the offset. As there, with a gradient needed the forward
    computes it in the same sweep (:meth:`~fastcontrast.engine.Engine.siglip_forward_backward`): the text
    blocks go round once, each carrying its gradient home behind it (:meth:`Ring.gradients_home`), and the
    backward only multiplies by its upstream gradient: no second trip round the ring.
    """

    @staticmethod
    def forward(ctx, ring: Ring, engine: Engine, scale, bias, image, text, needs=(False, False, False, False)):
        need_image, need_text, need_scale, need_bias = needs
        ctx.set_materialize_grads(False)
        world = ring.group.world_size
        sums, bias_parts = {}, {}
        with _autocast_off(image.device.type):
            if not any(needs):
                for source, (block,) in ring.blocks([text]):
                    sums[source] = ops.siglip_forward(image, block, scale, bias, _siglip_offset(source, ring, block),
                                                      engine.name, engine.chunk_bytes)
                    del block
                return torch.stack([sums[r] for r in range(world)]).sum()
            grad_image = torch.zeros(image.shape, dtype=compute_dtype(image.dtype), device=image.device)

            def visit(source: int, block: tuple) -> tuple:
                sums[source], grad_a, grad_b, bias_parts[source] = ops.siglip_forward_backward(
                    image, block[0], scale, bias, _siglip_offset(source, ring, block[0]), need_image or need_scale,
                    need_text, engine.name, engine.chunk_bytes,
                )
                if need_image or need_scale:
                    grad_image.add_(grad_a)
                return (grad_b,) if need_text else ()

            arrived = ring.gradients_home([text], visit)
            total = torch.stack([sums[r] for r in range(world)]).sum()
            inner = torch.dot(image.to(grad_image.dtype).reshape(-1), grad_image.reshape(-1)) if need_scale else None
            grad_bias = torch.stack([bias_parts[r] for r in range(world)]).sum() if need_bias else None
        ctx.save_for_backward(scale, bias, grad_image if need_image else None, arrived[0] if need_text else None,
                              inner, grad_bias)
        ctx.dtypes = (image.dtype, text.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scale, bias, grad_image, grad_text, inner, grad_bias = ctx.saved_tensors
        if grad_total is None:
            return (None,) * 7
        grad_image, grad_text, grad_scale, grad_bias = siglip_gradients_at(
            grad_total, scale, bias, ctx.dtypes, grad_image, grad_text, inner, grad_bias)
        return None, None, grad_scale, grad_bias, grad_image, grad_text, None


def _siglip_offset(source: int, ring: Ring, block: torch.Tensor) -> int:
    # The own block holds the positives on its diagonal; an offset of the block's length puts j = i + offset
    # past its last column, so another rank's block has none.
    return 0 if source == ring.rank else block.shape[0]


class RingDistill(torch.autograd.Function):
    """Student row LSEs, distillation cross terms and positives of this rank's rows against every rank's
    travelling student and teacher features, in two directions (image rows × text blocks, text rows × image
    blocks).

    ``apply(ring, engine, scale, scale_t, image, text, image_t, text_t)`` → ``(lse_image, cross_image,
    pos_image, lse_text, cross_text, pos_text)`` [n] each, in the compute dtype; equal to
    :class:`~fastcontrast.autograd.BlockwiseDistill` with ``need_row`` on the gathered features, positives at
    the rank's own pairs. The block statistics merge exactly: LSEs by log-sum-exp, the cross terms weighted
    by each block's share of the teacher's row softmax.
    """

    # (student rows, teacher rows, student block, teacher block) indices into (image, text, image_t, text_t).
    DIRECTIONS = ((0, 2, 1, 3), (1, 3, 0, 2))

    @staticmethod
    def forward(ctx, ring: Ring, engine: Engine, scale, scale_t, image, text, image_t, text_t):
        features = (image, text, image_t, text_t)
        parts = [{} for _ in RingDistill.DIRECTIONS]
        with _autocast_off(image.device.type):
            for source, block in ring.blocks(features):
                for k, (a, a_t, b, b_t) in enumerate(RingDistill.DIRECTIONS):
                    stats = DistillStats(*ops.distill_forward(
                        features[a], block[b], scale, features[a_t], block[b_t], scale_t, True, False,
                        engine.name, engine.chunk_bytes,
                    ))
                    parts[k][source] = (stats.lse_row, stats.teacher_lse_row, stats.cross_row)
                del block
            outputs, saved = [], []
            positive_index = torch.arange(image.shape[0], device=image.device)
            for k, (a, _, b, _) in enumerate(RingDistill.DIRECTIONS):
                ordered = [parts[k][r] for r in range(ring.group.world_size)]
                lse = _merge_lse([p[0] for p in ordered])
                teacher_lse = _merge_lse([p[1] for p in ordered])
                cross = sum(torch.exp(p[1] - teacher_lse) * p[2] for p in ordered)
                outputs += [lse, cross, _positive_logits(features[a], features[b], scale, positive_index)]
                saved += [lse, teacher_lse, cross]
        ctx.set_materialize_grads(False)
        ctx.ring, ctx.engine = ring, engine
        ctx.save_for_backward(scale, scale_t, *features, *saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        ring, engine = ctx.ring, ctx.engine
        scale, scale_t, *rest = ctx.saved_tensors
        features, saved = rest[:4], rest[4:]
        need_scale, need_scale_t = ctx.needs_input_grad[2:4]
        need = ctx.needs_input_grad[4:8]
        cdt = compute_dtype(features[0].dtype)
        empty = saved[0].new_empty(0)
        local = [torch.zeros(f.shape, dtype=cdt, device=f.device) for f in features]
        # The student's scale gradient needs dS·B for the student rows; the teacher's dT·B_t for its rows.
        need_product = (need[0] or need_scale, need[1] or need_scale, need[2] or need_scale_t,
                        need[3] or need_scale_t)
        carried = [i for i in range(4) if need[i]]

        def visit(source: int, block: tuple) -> tuple:
            contribution: dict = {}
            for k, (a, a_t, b, b_t) in enumerate(RingDistill.DIRECTIONS):
                grad_lse, grad_cross = grads[3 * k], grads[3 * k + 1]
                if grad_lse is None and grad_cross is None:
                    continue
                lse, teacher_lse, cross = saved[3 * k: 3 * k + 3]
                stats = [lse, empty, teacher_lse, empty, cross, empty]
                upstream = [grad_lse if grad_lse is not None else torch.zeros_like(lse), None, None, None,
                            grad_cross if grad_cross is not None else torch.zeros_like(cross), None]
                products = ops.distill_backward(
                    features[a], block[b], scale, features[a_t], block[b_t], scale_t, stats, upstream,
                    need_product[a], b in carried, need_product[a_t], b_t in carried,
                    engine.name, engine.chunk_bytes,
                )
                for index, product in zip((a, b, a_t, b_t), products):
                    if not present(product):
                        continue
                    if index in (a, a_t):
                        local[index].add_(product)
                    elif index in carried:
                        _accumulate(contribution, index, product)
            return tuple(_or_zeros(contribution, i, block[i], cdt) for i in carried)

        with _autocast_off(scale.device.type):
            arrived = ring.gradients_home(features, visit)
            # The positives s·⟨aᵢ, bᵢ⟩ of the home pairs (O(n·d), as in BlockwiseDistill): their row part joins
            # the row products that make ds, their column part the columns' sums.
            columns = [torch.zeros_like(g) for g in local]
            for k, (a, _, b, _) in enumerate(RingDistill.DIRECTIONS):
                grad_pos = grads[3 * k + 2]
                if grad_pos is not None:
                    weight = grad_pos.to(cdt).unsqueeze(1)
                    local[a].add_(weight * features[b].to(cdt))
                    columns[b].add_(weight * features[a].to(cdt))
            grad_scale = _inner(features[:2], local[:2], scale) if need_scale else None
            grad_scale_t = _inner(features[2:], local[2:], scale_t) if need_scale_t else None
            for i, grad in zip(carried, arrived):
                local[i].add_(grad)
            outs = [_scale_in_place(local[i].add_(columns[i]), scale if i < 2 else scale_t, features[i])
                    if need[i] else None for i in range(4)]
        return (None, None, grad_scale, grad_scale_t, *outs)


def _accumulate(sums: dict, key: int, product: torch.Tensor) -> None:
    """sums[key] += product, the first product kept as it is (the engine's fresh tensor: no copy)."""
    if key in sums:
        sums[key].add_(product)
    else:
        sums[key] = product


def _or_zeros(sums: dict, key: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return sums[key] if key in sums else torch.zeros(like.shape, dtype=dtype, device=like.device)


def _scale_in_place(product: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """s·product in ``like``'s dtype, multiplying the ring's own accumulator in place (one copy less than
    :func:`fastcontrast.autograd._scaled_grad`, which may not touch its input)."""
    return product.mul_(scale.detach().to(product.dtype)).to(like.dtype)


def _inner(features: Sequence[torch.Tensor], products: Sequence[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """Σ ⟨feature, its row product⟩ in the compute dtype, as the scale's gradient (its dtype and shape)."""
    total = sum(torch.dot(f.to(p.dtype).reshape(-1), p.reshape(-1)) for f, p in zip(features, products))
    return total.to(scale.dtype).reshape(scale.shape)
