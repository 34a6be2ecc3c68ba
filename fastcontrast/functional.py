"""The losses as functions: input checks, then the differentiable core plus O(n·d) torch ops (DESIGN §2).

Every function here computes its loss in fp32 (fp64 for fp64 inputs) whatever the feature dtype, and
returns gradients in each input's own dtype. None of them allocates an n×m tensor unless
``backend="reference"`` is asked for. Each calls its autograd Function directly (module ``forward`` →
function → Function → custom op → engine), so a loss reaches its kernels in four package frames.

Across processes (``rank``/``world_size``, ``process_group`` or ``gather_distributed``) every rank first runs
its input checks and exchanges its batch layout (:func:`fastcontrast.distributed.exchange_layout`), so that a
bad input on one rank raises on all of them, then gathers the features as the original library does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastcontrast import distributed, reference
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import (
    cast_like_autocast,
    check_backend,
    check_exchange,
    check_features,
    check_indices_tuple,
    check_labels,
    check_pair,
    check_positive_temperature,
    check_siglip_dist_impl,
    check_temperature,
    check_two_towers,
)
from fastcontrast.autograd import BlockwiseDistill, BlockwiseLogSumExp, BlockwiseSigLipSum, keep_in_graph, pair_dots
from fastcontrast.engine import compute_dtype
from fastcontrast.ring import Direction, Ring, RingDistill, RingLogSumExp, RingSigLipSum

Scalar = Union[torch.Tensor, float]

__all__ = [
    "clip_loss",
    "dcl_loss",
    "distill_clip_loss",
    "negative_mises_fisher_weights",
    "normalize_rows",
    "nt_xent_loss",
    "nt_xent_memory_bank_loss",
    "siglip_loss",
    "supcon_anchor_losses",
    "supcon_anchor_losses_with_distance",
    "supcon_loss",
]


def _rank_mean(per_row: torch.Tensor, layout: Optional[distributed.BatchLayout]) -> torch.Tensor:
    """This rank's share of a global-batch mean: the mean over its rows, times W·n_k/N when sizes differ.

    With one process, or equal sizes, this is the plain mean (the originals' value, bit for bit); with
    unequal sizes the average over ranks of these values, and of their gradients under DDP, is the mean over
    all N rows.
    """
    if layout is None or layout.equal:
        return per_row.mean()
    return per_row.sum() * (layout.world_size / layout.total)


def _top1(i2t_argmax: torch.Tensor, t2i_argmax: torch.Tensor, target: torch.Tensor) -> dict:
    """Retrieval top-1: the fraction of images whose best text is their own, and of texts likewise."""
    return {
        "i2t_top1": (i2t_argmax == target).float().mean().detach(),
        "t2i_top1": (t2i_argmax == target).float().mean().detach(),
    }


def _two_towers_checked(image_features, text_features, logit_scale, logit_bias, backend, chunk_bytes, group,
                        what: str):
    """(scale, bias, engine, layout) of a two-tower loss; the checks run on every rank of ``group`` (if any), so
    that a bad input on one rank raises on all of them, with the batch layout exchanged in the same step."""

    def check():
        scale, bias = check_two_towers("image_features", image_features, "text_features", text_features,
                                       logit_scale, logit_bias)
        return scale, bias, resolve_engine(backend, image_features.device, image_features.dtype, chunk_bytes)

    if group is None:
        return (*check(), None)
    (scale, bias, engine), layout = distributed.exchange_layout(group, image_features, check, what=what,
                                                                name="image_features")
    return scale, bias, engine, layout


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    return_accuracy: bool = False,
    exchange: str = "gather",
):
    """open_clip's CLIP loss, blockwise: ½[mean(r − p) + mean(c − p)].

    r and c are the row and column log-sum-exps of S = s·I·Tᵀ, p the positive logits s·Iᵢ·Tᵢ.

    Args:
        image_features: [n, d] (fp16, bf16, fp32 or fp64), used as given (open_clip does not normalise).
        text_features: [n, d], same dtype and device.
        logit_scale: the exponentiated scale: a 0-dim or one-element tensor (any float dtype, may require
            grad) or a Python number. A number or CPU tensor must be finite and positive; a CUDA tensor's
            value is not checked, because reading it would cost a host sync every step.
        logit_bias: optional scalar added to every logit. It changes nothing in a softmax, but like in
            open_clip it stays in the graph and gets an exact zero gradient.
        local_loss, gather_with_grad, rank, world_size: open_clip's distributed options, with open_clip's
            meaning in all four flag combinations (docs/distributed.md says which give exact gradients).
        process_group: the torch.distributed group to gather over (None: the default group). When given,
            the rank and world size come from it; explicit ``rank``/``world_size`` must then agree with it.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        chunk_bytes: logits budget per chunk for the torch engine (bytes).
        return_accuracy: also return retrieval top-1 accuracy from the same forward pass (the kernels keep
            each row's and column's argmax, lowest index on ties): image→text and text→image.
        exchange: across processes, ``"gather"`` (all-gather the features, open_clip's way) or ``"ring"``
            (:mod:`fastcontrast.ring`: the other tower's blocks travel, O(n·d) memory per rank; needs
            ``local_loss=True, gather_with_grad=True``, and gives the same loss and gradients).
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). Across processes, ranks may hold different batch sizes;
        the local loss is then weighted by W·n_k/N so that the average over ranks is the global-batch loss.
        With ``return_accuracy``: ``(loss, {"i2t_top1": ..., "t2i_top1": ...})``, the accuracies detached
        fp32 scalars over the rows this rank scores (all N for the global loss, its own rows for the local
        loss).
    """
    check_backend(backend)
    check_exchange(exchange, what="ClipLoss", needs={"local_loss": local_loss, "gather_with_grad": gather_with_grad},
                   refuses={"return_accuracy": return_accuracy, "backend='reference'": backend == "reference"})
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features = cast_like_autocast(image_features, text_features)
    group = distributed.resolve_group(rank, world_size, process_group, what="ClipLoss")
    scale, bias, engine, layout = _two_towers_checked(image_features, text_features, logit_scale, logit_bias, backend,
                                                      chunk_bytes, group, "ClipLoss")
    if layout is None:
        all_image, all_text = image_features, text_features
    else:
        if exchange == "ring":
            home = torch.arange(image_features.shape[0], device=image_features.device)
            lse_image, pos_image, lse_text, pos_text = RingLogSumExp.apply(
                Ring(group, layout), engine, (Direction(0, 1, home), Direction(1, 0, home)), scale,
                image_features, text_features,
            )
            loss = (_rank_mean(lse_image - pos_image, layout) + _rank_mean(lse_text - pos_text, layout)) / 2
            return keep_in_graph(loss, bias)
        gather = distributed.gather_for(local_loss=local_loss, with_grad=gather_with_grad)
        all_image, all_text = gather(image_features, group, layout), gather(text_features, group, layout)
    # The local loss scores this rank's rows against every rank's (positives at its offset); otherwise the
    # (gathered) square matrix, on every rank.
    local = layout is not None and local_loss
    start = layout.offset if local else 0
    positive_index = torch.arange(start, start + image_features.shape[0] if local else all_image.shape[0],
                                  device=image_features.device)
    if engine is None:
        if local:
            loss = reference.clip_loss_local_reference(image_features, text_features, all_image, all_text, scale,
                                                       bias, offset=start)
            loss = loss if layout.equal else loss * layout.loss_weight()
            i2t, t2i = (image_features @ all_text.T).argmax(dim=1), (text_features @ all_image.T).argmax(dim=1)
        else:
            loss = reference.clip_loss_reference(all_image, all_text, scale, bias)
            logits_per_image, logits_per_text = reference.clip_logits_reference(all_image, all_text, scale)
            i2t, t2i = logits_per_image.argmax(dim=1), logits_per_text.argmax(dim=1)
        return (loss, _top1(i2t, t2i, positive_index)) if return_accuracy else loss
    if local:
        # The positives are read from the gathered tensors (open_clip's labels i + offset), so their gradients
        # take open_clip's routes: back through the gather with grad, nowhere when the copies are constants.
        lse_image, _, pos_image, i2t, _ = BlockwiseLogSumExp.apply(
            image_features, all_text, scale, engine, True, False, positive_index, None, False, 0, return_accuracy
        )
        lse_text, _, pos_text, t2i, _ = BlockwiseLogSumExp.apply(
            text_features, all_image, scale, engine, True, False, positive_index, None, False, 0, return_accuracy
        )
        loss = (_rank_mean(lse_image - pos_image, layout) + _rank_mean(lse_text - pos_text, layout)) / 2
    else:
        lse_row, lse_col, pos, i2t, t2i = BlockwiseLogSumExp.apply(
            all_image, all_text, scale, engine, True, True, positive_index, None, False, 0, return_accuracy
        )
        loss = ((lse_row - pos).mean() + (lse_col - pos).mean()) / 2
    loss = keep_in_graph(loss, bias)
    return (loss, _top1(i2t, t2i, positive_index)) if return_accuracy else loss


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dist_impl: Optional[str] = None,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    exchange: str = "gather",
) -> torch.Tensor:
    """open_clip's SigLIP loss, blockwise: −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n.

    zᵢⱼ = +1 on the diagonal, −1 elsewhere; the division is by n (open_clip's), not n².

    Args:
        image_features: [n, d]; text_features: [n, d], same dtype and device.
        logit_scale: exponentiated scale (see :func:`clip_loss`); logit_bias: scalar or None.
        rank, world_size, process_group: see :func:`clip_loss`.
        dist_impl: ``None``, ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"``. In open_clip these are
            four communication schedules for the same function (text features travel with their gradient to
            every rank); here all four are that same function, computed by one gather of the text features
            with gradient and one rectangular blockwise call with the positives at this rank's offset.
        backend, chunk_bytes: see :func:`clip_loss`.
        exchange: ``"gather"`` or ``"ring"`` (the text blocks travel round the ranks, as open_clip's
            ``'bidir'`` / ``'shift'`` schedules do, with O(n·d) memory per rank); see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). With unequal batch sizes across ranks the loss is
        weighted by W·n_k/N, as in :func:`clip_loss`.
    """
    check_backend(backend)
    check_siglip_dist_impl(dist_impl)
    check_exchange(exchange, what="SigLipLoss", refuses={"backend='reference'": backend == "reference"})
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features = cast_like_autocast(image_features, text_features)
    group = distributed.resolve_group(rank, world_size, process_group, what="SigLipLoss")
    scale, bias, engine, layout = _two_towers_checked(image_features, text_features, logit_scale, logit_bias, backend,
                                                      chunk_bytes, group, "SigLipLoss")
    if layout is None:
        all_text = text_features
    else:
        all_text = None if exchange == "ring" else distributed.gather_with_grad(text_features, group, layout)
    offset = 0 if layout is None else layout.offset
    if engine is None:
        loss = reference.siglip_loss_reference(image_features, all_text, scale, bias, positive_offset=offset)
        return loss if layout is None or layout.equal else loss * layout.loss_weight()
    if all_text is None:
        total = RingSigLipSum.apply(Ring(group, layout), engine, scale, bias, image_features, text_features)
    else:
        total = BlockwiseSigLipSum.apply(image_features, all_text, scale, bias, engine, offset)
    if layout is None or layout.equal:
        return total / image_features.shape[0]
    return total * (layout.world_size / layout.total)


def _check_distill_inputs(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                          dist_logit_scale):
    """The student's and the teacher's (features, scale) checks: returns (scale, teacher scale)."""
    scale, _ = check_two_towers("image_features", image_features, "text_features", text_features, logit_scale, None)
    scale_t, _ = check_two_towers("dist_image_features", dist_image_features, "dist_text_features",
                                  dist_text_features, dist_logit_scale, None, scale_name="dist_logit_scale")
    if dist_image_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            "`dist_image_features` must have the student's batch size (row i is the teacher's view of "
            f"sample i), got {dist_image_features.shape[0]} and {image_features.shape[0]}."
        )
    if dist_image_features.device != image_features.device:
        raise ValueError(
            f"`dist_image_features` must be on the student's device {image_features.device}, "
            f"got {dist_image_features.device}."
        )
    if dist_image_features.dtype != image_features.dtype:
        raise TypeError(
            f"`dist_image_features` must have the student's dtype {image_features.dtype}, got "
            f"{dist_image_features.dtype} (cast the teacher's features, or run both under torch.autocast)."
        )
    return scale, scale_t


def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: Scalar,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    exchange: str = "gather",
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's DistillClipLoss, blockwise: (contrastive loss, distillation loss).

    With S = s·I·Tᵀ (student) and T' = s_t·I_t·T_tᵀ (teacher), r / c the row / column LSEs of S, p the
    positive logits and x_r / x_c the rows' / columns' Σ softmax(T')·S:
    contrastive = ½[mean(r − p) + mean(c − p)], distill = ½[mean(r − x_r) + mean(c − x_c)], which is
    open_clip's ½ Σ over both directions of −(softmax(teacher) · log_softmax(student)).sum(1).mean().

    Args:
        image_features, text_features: [n, d] student features (fp16, bf16, fp32 or fp64).
        logit_scale: the student's exponentiated scale (see :func:`clip_loss`).
        dist_image_features, dist_text_features: [n, d_t] teacher features, same dtype and device as the
            student's; d_t may differ from d. They get gradients only if they require grad (open_clip's
            behaviour: its teacher features normally carry none).
        dist_logit_scale: the teacher's exponentiated scale.
        local_loss, gather_with_grad, rank, world_size, process_group: as :func:`clip_loss`; the teacher's
            features are gathered the same way as the student's (open_clip calls ``get_logits`` on both).
        backend, chunk_bytes, exchange: see :func:`clip_loss` (the ring carries the teacher's blocks too).
    Returns:
        ``(contrastive_loss, distill_loss)``, 0-dim fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    check_exchange(exchange, what="DistillClipLoss",
                   needs={"local_loss": local_loss, "gather_with_grad": gather_with_grad},
                   refuses={"backend='reference'": backend == "reference"})
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features, dist_image_features, dist_text_features = cast_like_autocast(
            image_features, text_features, dist_image_features, dist_text_features
        )
    group = distributed.resolve_group(rank, world_size, process_group, what="DistillClipLoss")

    def check():
        scales = _check_distill_inputs(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale
        )
        return scales, resolve_engine(backend, image_features.device, image_features.dtype, chunk_bytes)

    towers = (image_features, text_features, dist_image_features, dist_text_features)
    layout = None
    if group is None:
        (scale, scale_t), engine = check()
        gathered = towers
    else:
        ((scale, scale_t), engine), layout = distributed.exchange_layout(
            group, image_features, check, what="DistillClipLoss", name="image_features"
        )
        # The teacher's dim must agree across ranks too, or its gathers would not match: one more tiny exchange.
        distributed.exchange_layout(
            group, dist_image_features, lambda: None, what="DistillClipLoss", name="dist_image_features"
        )
        if exchange == "ring":
            lse_image, cross_image, pos_image, lse_text, cross_text, pos_text = RingDistill.apply(
                Ring(group, layout), engine, scale, scale_t, *towers
            )
            contrastive = (_rank_mean(lse_image - pos_image, layout) + _rank_mean(lse_text - pos_text, layout)) / 2
            distill = (_rank_mean(lse_image - cross_image, layout) + _rank_mean(lse_text - cross_text, layout)) / 2
            return contrastive, distill
        gather = distributed.gather_for(local_loss=local_loss, with_grad=gather_with_grad)
        gathered = tuple(gather(x, group, layout) for x in towers)
    all_image, all_text, all_image_t, all_text_t = gathered
    local = layout is not None and local_loss
    if engine is None:
        if not local:
            return reference.distill_clip_loss_reference(all_image, all_text, scale, all_image_t, all_text_t,
                                                         scale_t)
        student = reference.distill_logits_reference(image_features, text_features, scale, all_image, all_text)
        teacher = reference.distill_logits_reference(dist_image_features, dist_text_features, scale_t,
                                                     all_image_t, all_text_t)
        losses = reference.distill_clip_loss_from_logits_reference(*student, *teacher, offset=layout.offset)
        return losses if layout.equal else tuple(loss * layout.loss_weight() for loss in losses)
    if not local:
        diagonal = torch.arange(all_image.shape[0], device=image_features.device)
        lse_row, lse_col, cross_row, cross_col, pos = BlockwiseDistill.apply(
            all_image, all_text, scale, all_image_t, all_text_t, scale_t, engine, True, True, diagonal
        )
        contrastive = ((lse_row - pos).mean() + (lse_col - pos).mean()) / 2
        distill = ((lse_row - cross_row).mean() + (lse_col - cross_col).mean()) / 2
        return contrastive, distill
    positive_index = torch.arange(layout.offset, layout.offset + layout.local_rows, device=image_features.device)
    lse_image, _, cross_image, _, pos_image = BlockwiseDistill.apply(
        image_features, all_text, scale, dist_image_features, all_text_t, scale_t, engine, True, False,
        positive_index,
    )
    lse_text, _, cross_text, _, pos_text = BlockwiseDistill.apply(
        text_features, all_image, scale, dist_text_features, all_image_t, scale_t, engine, True, False,
        positive_index,
    )
    contrastive = (_rank_mean(lse_image - pos_image, layout) + _rank_mean(lse_text - pos_text, layout)) / 2
    distill = (_rank_mean(lse_image - cross_image, layout) + _rank_mean(lse_text - cross_text, layout)) / 2
    return contrastive, distill


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows like lightly's ``F.normalize(x, dim=1)`` (eps 1e-12), robust in half precision.

    lightly computes the norm in the input dtype; in fp16 the squares of small entries underflow, the norm
    becomes 0 and the row is divided by eps (lightly issue #1259). Normalising in fp32 (fp64 for fp64) and
    casting back avoids that and leaves fp32 results bit-identical.
    """
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=1, eps=1e-12).to(x.dtype)


def _two_view_setup(out0, out1, temperature, gather_distributed, process_group, backend, chunk_bytes, what,
                    exchange):
    """NT-Xent's and DCL's common start: checks, the engine, and across processes the exchanged layout.

    Returns ``(out0, out1, temperature, engine, layout, group)``: the features as autocast would cast them,
    τ checked, and ``layout``/``group`` None for a single process.
    """
    check_backend(backend)
    check_exchange(exchange, what=what, needs={"gather_distributed": gather_distributed},
                   refuses={"backend='reference'": backend == "reference"})
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        out0, out1 = cast_like_autocast(out0, out1)
    temperature = check_temperature(temperature)
    group = distributed.resolve_gather_group(gather_distributed, process_group, what=what)

    def check():
        check_features("out0", out0)
        check_features("out1", out1)
        check_pair("out0", out0, "out1", out1, same_batch=True)
        return resolve_engine(backend, out0.device, out0.dtype, chunk_bytes)

    if group is None:
        return out0, out1, temperature, check(), None, None
    engine, layout = distributed.exchange_layout(group, out0, check, what=what, name="out0")
    return out0, out1, temperature, engine, layout, group


def _two_view_rows(z, group, layout, engine, temperature, *, exclude_positive, exchange):
    """Row LSEs and positive logits of the 2n rows z = [z0; z1] (unit rows) against every rank's rows.

    Row i's candidates are all gathered rows but itself (and, with ``exclude_positive``, but its positive,
    the other view of its sample). Returns ``(lse [2n], positives [2n], views)``, ``views`` the layout of
    the gathered [z0; z1] stacks (None for one process).
    """
    n = z.shape[0] // 2
    views = None if layout is None else layout.scaled(2)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=compute_dtype(z.dtype), device=z.device)
    if views is not None and exchange == "ring":
        # The [z0; z1] blocks travel; in this rank's own block, row i leaves out column i and its positive
        # is the other view, i ± n.
        home = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
        direction = Direction(0, 0, home, exclude_offset=0, exclude_positive=exclude_positive)
        lse, positives = RingLogSumExp.apply(Ring(group, views), engine, (direction,), inv_temperature, z)
        return lse, positives, views
    # Each rank contributes its [z0; z1]: the gathered tensor is rank by rank, so this rank's own rows start
    # at 2·offset, and row i's self-similarity is column 2·offset + i.
    z_all = None if layout is None else distributed.gather_with_grad(z, group, views)
    offset = 0 if views is None else views.offset
    # Row i's positive is the other view of its sample: i + n for the first view, i − n for the second.
    partner = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n).add_(offset)
    lse, _, positives, _, _ = BlockwiseLogSumExp.apply(
        z, z_all, inv_temperature, engine, True, False, partner, offset, exclude_positive
    )
    return lse, positives, views


def _gathered_views(z, group, layout):
    """lightly's ``out0_large``, ``out1_large``: every rank's normalised views, in rank order."""
    return distributed.split_views(distributed.gather_with_grad(z, group, layout.scaled(2)), layout, 2)


def nt_xent_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    exchange: str = "gather",
) -> torch.Tensor:
    """lightly's NT-Xent (SimCLR) loss, blockwise, without memory bank.

    With z = [normalize(out0); normalize(out1)] (2n rows) and S = z·zᵀ/τ, each row's candidates are the other
    2n−1 rows: loss = mean over 2n rows of (LSE_{j≠i} Sᵢⱼ − S_{i, i±n}).

    Args:
        out0, out1: [n, d] projections of two views, same dtype and device.
        temperature: τ; |τ| < 1e-8 is an error (lightly's rule).
        gather_distributed: lightly's option: negatives from every rank of the group, gathered with
            gradient, labels offset by the rank. Without an initialised process group it gathers nothing.
        process_group: the group to gather over (None: the default group); needs ``gather_distributed``.
        backend, chunk_bytes: see :func:`clip_loss`.
        exchange: ``"gather"`` or ``"ring"`` (needs ``gather_distributed=True``); see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). With unequal batch sizes across ranks the loss is
        weighted by W·n_k/N, as in :func:`clip_loss`.
    """
    out0, out1, temperature, engine, layout, group = _two_view_setup(
        out0, out1, temperature, gather_distributed, process_group, backend, chunk_bytes, "NTXentLoss", exchange
    )
    if engine is None:
        if layout is None:
            return reference.nt_xent_loss_reference(out0, out1, temperature)
        z0, z1 = reference.lightly_normalize(out0), reference.lightly_normalize(out1)
        z0_all, z1_all = _gathered_views(torch.cat([z0, z1]), group, layout)
        loss = reference.nt_xent_loss_gathered_reference(z0, z1, z0_all, z1_all, temperature, offset=layout.offset)
        return loss if layout.equal else loss * layout.loss_weight()
    z = torch.cat([normalize_rows(out0), normalize_rows(out1)])
    lse, positives, views = _two_view_rows(z, group, layout, engine, temperature, exclude_positive=False,
                                           exchange=exchange)
    return _rank_mean(lse - positives, views)


def negative_mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """lightly's DCLW weighting: wᵢ = 2 − n·softmax_i(⟨out0ᵢ, out1ᵢ⟩/σ), a constant (no gradient).

    Args:
        out0, out1: [n, d] (normalised) views. sigma: the weights' temperature.
    Returns:
        [n] weights in the inputs' dtype, as lightly computes them.
    """
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return (2 - out0.shape[0] * F.softmax(similarity, dim=0)).detach()


def _positive_weights(weight_fn, z0: torch.Tensor, z1: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """[2n] weights of the positive terms: weight_fn(z0, z1) for the first view's rows, weight_fn(z1, z0) for
    the second's (lightly's symmetric ``_loss`` calls), each a scalar or [n]; differentiable if weight_fn is."""
    n = z0.shape[0]
    weights = []
    for first, second in ((z0, z1), (z1, z0)):
        w = weight_fn(first, second)
        if not isinstance(w, torch.Tensor):  # a Python number: exact in the compute dtype, as lightly applies it
            w = torch.as_tensor(w, dtype=cdt, device=z0.device)
        if w.dim() > 1 or (w.dim() == 1 and w.shape[0] not in (1, n)):
            raise ValueError(
                f"DCLLoss: `weight_fn` must return a scalar or one weight per sample (shape ({n},)), "
                f"got shape {tuple(w.shape)}."
            )
        weights.append(w.to(device=z0.device, dtype=cdt).expand(n))
    return torch.cat(weights)


def dcl_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    temperature: float = 0.1,
    weight_fn=None,
    *,
    gather_distributed: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    exchange: str = "gather",
) -> torch.Tensor:
    """lightly's decoupled contrastive loss (DCL; DCLW with ``weight_fn=negative_mises_fisher_weights``).

    NT-Xent with the positive taken out of the denominator: with z = [normalize(out0); normalize(out1)] and
    S = z·zᵀ/τ, loss = mean over the 2n rows of (LSE_{j ∉ {i, i±n}} Sᵢⱼ − wᵢ·S_{i, i±n}), wᵢ = 1 without
    ``weight_fn``. Two masked row LSEs and n positive dot products: O(n·d) memory.

    Args:
        out0, out1: [n, d] projections of two views, same dtype and device.
        temperature: τ; |τ| < 1e-8 is an error (lightly divides by it).
        weight_fn: ``weight_fn(out0, out1)`` → scalar or [n] weights of the positive terms, called on the
            normalised local views (and again with them swapped), as lightly does; None for no weighting.
        gather_distributed, process_group, backend, chunk_bytes, exchange: see :func:`nt_xent_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"DCLLoss: `weight_fn` must be callable or None, got {type(weight_fn).__name__}.")
    out0, out1, temperature, engine, layout, group = _two_view_setup(
        out0, out1, temperature, gather_distributed, process_group, backend, chunk_bytes, "DCLLoss", exchange
    )
    if engine is None:
        if layout is None:
            return reference.dcl_loss_reference(out0, out1, temperature, weight_fn)
        z0, z1 = reference.lightly_normalize(out0), reference.lightly_normalize(out1)
        z0_all, z1_all = _gathered_views(torch.cat([z0, z1]), group, layout)
        loss = reference.dcl_loss_gathered_reference(
            z0, z1, z0_all, z1_all, temperature, weight_fn, offset=layout.offset
        )
        return loss if layout.equal else loss * layout.loss_weight()
    n = out0.shape[0]
    z = torch.cat([normalize_rows(out0), normalize_rows(out1)])
    lse, positives, views = _two_view_rows(z, group, layout, engine, temperature, exclude_positive=True,
                                           exchange=exchange)
    if weight_fn is not None:
        positives = positives * _positive_weights(weight_fn, z[:n], z[n:], positives.dtype)
    return _rank_mean(lse - positives, views)


def nt_xent_memory_bank_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    bank: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """lightly's NT-Xent with a memory bank (MoCo-style), blockwise.

    One direction only: for q = normalize(out0), k = normalize(out1), each query's candidates are its own key
    and the K bank entries (no in-batch negatives): loss = mean over queries of CE([q·k | q·bankᵀ]/τ, 0).

    Args:
        out0: [n, d] queries; out1: [n, d] keys.
        bank: [K, d] negatives as read *before* this batch is enqueued (lightly keeps it in fp32); it never
            receives a gradient.
        temperature, backend, chunk_bytes: see :func:`nt_xent_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        out0, out1 = cast_like_autocast(out0, out1)
    temperature = check_temperature(temperature)
    check_features("out0", out0)
    check_features("out1", out1)
    check_pair("out0", out0, "out1", out1, same_batch=True)
    check_features("bank", bank)
    if bank.shape[1] != out0.shape[1]:
        raise ValueError(
            f"memory bank feature dim must match `out0`'s: bank has shape {tuple(bank.shape)}, "
            f"out0 has dim {out0.shape[1]}."
        )
    engine = resolve_engine(backend, out0.device, out0.dtype, chunk_bytes)
    if engine is None:
        return reference.nt_xent_memory_bank_loss_reference(out0, out1, bank, temperature)
    n = out0.shape[0]
    # Queries and keys stay in their own dtype (normalised in fp32 first), so half inputs run on the tensor
    # cores; lightly's fp32 bank is cast to them, which is what its einsum does under autocast.
    q, k = normalize_rows(out0), normalize_rows(out1)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=compute_dtype(q.dtype), device=q.device)
    # One matrix [own keys; bank] with the keys private to their own query: the positive and the bank logits
    # then come out of the same product, so equal vectors give bit-equal logits, as in lightly's one matmul.
    keys_and_bank = torch.cat([k.detach(), bank.detach().to(device=q.device, dtype=q.dtype)])
    positive_index = torch.arange(n, device=q.device)
    lse, _, pos, _, _ = BlockwiseLogSumExp.apply(
        q, keys_and_bank, inv_temperature, engine, True, False, positive_index, None, False, n
    )
    # The keys take part as constants above. Each enters its own row once, as the positive, so ∂lossᵢ/∂kᵢ =
    # (pᵢ − 1)·s·qᵢ with pᵢ = softmax probability of the positive: that gradient comes from this term, whose
    # value is exactly 0 (no n×K work for the bank, which takes no gradient).
    cdt = compute_dtype(q.dtype)
    pos_for_keys = (q.detach().to(cdt) * k.to(cdt)).sum(dim=1) * inv_temperature
    weight = torch.exp(pos - lse).detach() - 1
    return (lse - pos).mean() + (weight * (pos_for_keys - pos_for_keys.detach())).mean()


def _supcon_anchor_losses(
    z: torch.Tensor,
    labels: torch.Tensor,
    z_ref: torch.Tensor,
    ref_labels: torch.Tensor,
    inv_temperature: torch.Tensor,
    engine,
    *,
    exclude_offset: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-anchor SupCon losses of unit rows z against unit references z_ref, with no n×m tensor.

    With S = z·z_refᵀ/τ, rᵢ the row LSE (entry (i, i + exclude_offset) left out when given) and P(i) the
    references of label yᵢ (that entry left out too): lossᵢ = −(Σ_{p∈P(i)} Sᵢₚ − |P(i)|·rᵢ) / |P(i)|, or 0 when
    P(i) is empty. Σ_{p∈P(i)} Sᵢₚ = zᵢ·(Σ of the reference rows of label yᵢ)/τ: one class sum (``index_add``)
    per label, O((n + m)·d).

    Returns:
        ``(losses [n], positive pairs per anchor [n], negative pairs per anchor [n])``, the counts as floats.
    """
    cdt = compute_dtype(z.dtype)
    n, m = labels.shape[0], ref_labels.shape[0]
    all_labels = torch.cat([labels, ref_labels])
    # A label's id is the position of its first occurrence among the sorted labels: not compact (at most
    # n + m ids), but found without unique(), so shapes stay static (no host sync, no torch.compile break).
    ids = torch.searchsorted(torch.sort(all_labels).values, all_labels)
    anchor_class, ref_class = ids[:n], ids[n:]
    class_count = torch.zeros(n + m, dtype=cdt, device=z.device).index_add_(
        0, ref_class, torch.ones(m, dtype=cdt, device=z.device)
    )
    class_sum = torch.zeros((n + m, z.shape[1]), dtype=cdt, device=z.device).index_add_(0, ref_class, z_ref.to(cdt))
    if engine is None:
        # backend="reference" across ranks (no original to copy): the same terms from the full logits.
        logits = (z.to(cdt) @ z_ref.to(cdt).T) * inv_temperature
        if exclude_offset is not None:
            logits = logits.diagonal_scatter(torch.full_like(logits.diagonal(exclude_offset), float("-inf")),
                                             exclude_offset)
        lse = torch.logsumexp(logits, dim=1)
    else:
        lse, *_ = BlockwiseLogSumExp.apply(
            z, None if z_ref is z else z_ref, inv_temperature, engine, True, False, None, exclude_offset
        )
    positive_count = class_count[anchor_class]
    negative_count = m - positive_count
    z_c, z_ref_c = z.to(cdt), z_ref.to(cdt)
    positive_sum = (z_c * class_sum[anchor_class]).sum(dim=1)
    if exclude_offset is not None:
        # The left-out entry (i, i + offset) is a positive only where the labels agree (PML drops it from the
        # matches; it can never be a negative).
        cols = torch.arange(n, device=z.device) + exclude_offset
        partner = cols.clamp(0, m - 1)
        twin = (cols >= 0) & (cols < m) & (ref_labels[partner] == labels)
        self_term = torch.where(twin, (z_c * z_ref_c[partner]).sum(dim=1), torch.zeros_like(positive_sum))
        positive_sum = positive_sum - self_term
        positive_count = positive_count - twin.to(cdt)
    positive_sum = positive_sum * inv_temperature
    has_positive = positive_count > 0
    # A row without positives has loss 0 (PML: 0 / (0 + tiny)); where() keeps a −inf LSE (a row with nothing
    # left) from turning 0·(−inf) into NaN.
    mean_log_prob = torch.where(
        has_positive, (positive_sum - positive_count * lse) / positive_count.clamp(min=1), torch.zeros_like(lse)
    )
    return -mean_log_prob, positive_count, negative_count


def _supcon_mined_anchor_losses(
    z: torch.Tensor, z_ref: torch.Tensor, pairs: tuple, inv_temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor SupCon losses over a miner's pairs only, O(P·d) for P pairs (no n×m tensor).

    Anchor i's softmax runs over its mined positives and negatives (each pair once, as PML's masks hold it);
    lossᵢ = −mean over its positives of (Sᵢₚ − LSEᵢ), 0 without positives.

    Returns:
        ``(losses [n], valid)``: ``valid`` a 0-dim bool, False where PML returns its zero losses.
    """
    cdt = compute_dtype(z.dtype)
    n, m = z.shape[0], z_ref.shape[0]
    a1, p, a2, neg = pairs
    # PML writes the pairs into masks: duplicates count once, and a pair may not be both.
    pos_keys = torch.unique(a1 * m + p)
    neg_keys = torch.unique(a2 * m + neg)
    if bool(torch.isin(pos_keys, neg_keys).any()):
        raise ValueError("`indices_tuple`: each pair should be either positive or negative, not both.")
    keys = torch.cat([pos_keys, neg_keys])
    rows, cols = keys.div(m, rounding_mode="floor"), keys.remainder(m)
    logits = pair_dots(z, z_ref, rows, cols) * inv_temperature
    # Segment log-sum-exp per anchor, max-subtracted (the max is a constant for the gradient).
    row_max = torch.full((n,), float("-inf"), dtype=cdt, device=z.device).scatter_reduce(
        0, rows, logits.detach(), reduce="amax"
    )
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = torch.zeros(n, dtype=cdt, device=z.device).index_add(0, rows, torch.exp(logits - shift[rows]))
    lse = torch.log(sums.clamp(min=torch.finfo(cdt).tiny)) + shift
    n_pos = pos_keys.shape[0]
    pos_rows = rows[:n_pos]
    positive_count = torch.zeros(n, dtype=cdt, device=z.device).index_add(0, pos_rows, torch.ones_like(logits[:n_pos]))
    positive_sum = torch.zeros(n, dtype=cdt, device=z.device).index_add(0, pos_rows, logits[:n_pos])
    has_positive = positive_count > 0
    losses = torch.where(
        has_positive, -(positive_sum - positive_count * lse) / positive_count.clamp(min=1), torch.zeros_like(lse)
    )
    valid = torch.tensor(n_pos > 0 and neg_keys.shape[0] > 0, device=z.device)
    return losses, valid


def _supcon_label_validity(positive_pairs, negative_pairs) -> torch.Tensor:
    """PML's early exits over all label pairs: a positive and a negative pair, and more than one of either."""
    return (positive_pairs > 0) & (negative_pairs > 0) & ((positive_pairs > 1) | (negative_pairs > 1))


def _supcon_reduce(losses, valid, *, total_nonzero=None, world_scale=1.0):
    """PML's AvgNonZeroReducer: the mean over anchors with a loss > 0, and 0 where PML returns its zero losses
    (``valid`` False) or no anchor has a loss > 0. ``total_nonzero`` (all ranks) and ``world_scale`` (W)
    make the per-rank share exact."""
    nonzero = losses > 0
    count = nonzero.sum() if total_nonzero is None else total_nonzero
    value = torch.where(nonzero, losses, torch.zeros_like(losses)).sum() * world_scale / count.clamp(min=1)
    return torch.where(valid & (count > 0), value, torch.zeros_like(value))


def _check_supcon(embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, backend, chunk_bytes):
    """Single-process SupCon inputs checked: ``(embeddings, ref_emb, temperature, pairs, engine)`` with
    autocast's casts applied and ``pairs`` the miner's (a1, p, a2, n) or None."""
    check_backend(backend)
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        embeddings, ref_emb = cast_like_autocast(embeddings, ref_emb)
    temperature = check_positive_temperature(temperature)
    check_features("embeddings", embeddings)
    if indices_tuple is None and labels is None:
        raise ValueError("SupConLoss: `labels` is required without `indices_tuple` (one integer label per row).")
    if labels is not None:
        check_labels("labels", labels, rows=embeddings.shape[0], like=embeddings)
    if ref_emb is not None:
        check_features("ref_emb", ref_emb)
        check_pair("embeddings", embeddings, "ref_emb", ref_emb, same_batch=False)
        if ref_labels is not None:
            check_labels("ref_labels", ref_labels, rows=ref_emb.shape[0], like=embeddings)
        elif indices_tuple is None:
            raise ValueError("`ref_emb` and `ref_labels` must be given together (a reference set), or neither.")
    elif ref_labels is not None:
        raise ValueError("`ref_emb` and `ref_labels` must be given together (a reference set), or neither.")
    pairs = None
    if indices_tuple is not None:
        ref_rows = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
        pairs = check_indices_tuple(indices_tuple, rows=embeddings.shape[0], ref_rows=ref_rows, like=embeddings)
    engine = resolve_engine(backend, embeddings.device, embeddings.dtype, chunk_bytes)
    return embeddings, ref_emb, temperature, pairs, engine


def supcon_anchor_losses(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
    indices_tuple: Optional[tuple] = None,
    normalize: bool = True,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-metric-learning's SupCon per-anchor losses (the "element" losses its reducer sees), blockwise.

    Args:
        embeddings, labels, ref_emb, ref_labels, temperature: see :func:`supcon_loss`.
        indices_tuple: a miner's pairs (a1, p, a2, n) or triplets (a, p, n): each anchor's softmax then runs
            over its mined pairs only, O(pairs·d); labels are not needed (may be None).
        normalize: True for PML's ``CosineSimilarity`` (unit rows), False for ``DotProductSimilarity(
            normalize_embeddings=False)`` (raw dot products).
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        ``(losses [n], valid)``: losses fp32 (fp64 for fp64 embeddings; the input dtype for
        ``backend="reference"``); ``valid`` a 0-dim bool tensor, False where PML returns its zero losses
        (its reducers then give 0 whatever the losses).
    """
    embeddings, ref_emb, temperature, pairs, engine = _check_supcon(
        embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, backend, chunk_bytes
    )
    # PML leaves an anchor's own entry out when its labels are the reference labels (no reference set, or
    # the same labels tensor passed again).
    exclude = ref_emb is None or (ref_labels is labels and labels is not None)
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    if engine is None:
        mat = reference.cosine_similarity_reference(embeddings, ref_emb) if normalize else embeddings @ ref_emb.T
        pairs = pairs if pairs is not None else reference.supcon_pairs_reference(labels, ref_labels)
        losses = reference.supcon_anchor_losses_reference(mat, pairs, temperature)
        valid = losses is not None
        losses = losses if valid else torch.zeros(embeddings.shape[0], dtype=mat.dtype, device=mat.device)
        return losses, torch.tensor(valid, device=embeddings.device)
    cdt = compute_dtype(embeddings.dtype)
    # Normalised in fp32, then kept in the input dtype: half embeddings run on the tensor cores.
    z = normalize_rows(embeddings) if normalize else embeddings
    z_ref = z if ref_emb is embeddings else (normalize_rows(ref_emb) if normalize else ref_emb)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=cdt, device=z.device)
    if pairs is not None:
        if all(len(x) <= 1 for x in pairs):  # PML's first early exit counts the pairs as given
            # Zeros that stay in the graph, as PML's sum(embeddings·0) does.
            return (z.to(cdt) * 0).sum(dim=1), torch.tensor(False, device=z.device)
        return _supcon_mined_anchor_losses(z, z_ref, pairs, inv_temperature)
    losses, positives, negatives = _supcon_anchor_losses(
        z, labels, z_ref, ref_labels, inv_temperature, engine, exclude_offset=0 if exclude else None
    )
    return losses, _supcon_label_validity(positives.sum(), negatives.sum())


def supcon_anchor_losses_with_distance(
    distance,
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
    indices_tuple: Optional[tuple] = None,
) -> Optional[torch.Tensor]:
    """PML's per-anchor SupCon losses under any PML ``distance``: the full [n, m] matrix from the distance,
    then PML's masked log-softmax (:func:`fastcontrast.reference.supcon_anchor_losses_reference`).

    The exact path for distances with no blockwise form (``LpDistance``, ``SNRDistance``, custom ones):
    O(n·m) memory, like PML. Returns the losses [n] in the matrix's dtype, or None where PML returns its
    zero losses.
    """
    embeddings, ref_emb, temperature, pairs, _ = _check_supcon(
        embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, "reference", None
    )
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    pairs = pairs if pairs is not None else reference.supcon_pairs_reference(labels, ref_labels)
    if all(len(x) <= 1 for x in pairs):
        return None
    mat = distance(embeddings, ref_emb)
    return reference.supcon_anchor_losses_reference(mat, pairs, temperature, inverted=distance.is_inverted)


def supcon_loss(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    temperature: float = 0.1,
    *,
    indices_tuple: Optional[tuple] = None,
    normalize: bool = True,
    gather_distributed: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """pytorch-metric-learning's SupConLoss (multi-positive contrastive loss by label), blockwise.

    Cosine similarity of the normalised embeddings over τ; for each anchor, −mean over its positives (same
    label, itself excluded) of the log-softmax over every other item; averaged over the anchors whose loss is
    > 0; 0 when the batch has no positive pair or no negative pair (PML's rules, see
    :func:`fastcontrast.reference.supcon_loss_reference`). No n×n tensor: the row LSE comes from the core and
    the positive logits from per-class sums of the embeddings.

    Args:
        embeddings: [n, d] (fp16, bf16, fp32 or fp64); labels: [n] integer class labels (None allowed with
            ``indices_tuple``).
        ref_emb, ref_labels: optional [m, d] / [m] reference set: anchors are scored against it, with no
            self-exclusion, as in PML.
        temperature: τ > 0 (PML's default 0.1).
        indices_tuple: a miner's pairs (a1, p, a2, n) or triplets (a, p, n): only those pairs enter each
            anchor's softmax (O(pairs·d)), as in PML's ``indices_tuple``.
        normalize: False for PML's ``DotProductSimilarity(normalize_embeddings=False)``.
        gather_distributed: anchors of this rank against the embeddings of every rank of the group (gathered
            with gradient, labels gathered too), with gradients exact under DDP averaging. Not with a
            reference set or ``indices_tuple``. Without an initialised process group it gathers nothing.
        process_group: the group to gather over (None: the default group); needs ``gather_distributed``.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 embeddings).
    """
    group = distributed.resolve_gather_group(gather_distributed, process_group, what="SupConLoss")
    if group is None:
        if backend == "reference" and normalize:
            _check_supcon(embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple, backend, chunk_bytes)
            return reference.supcon_loss_reference(embeddings, labels, temperature, ref_emb, ref_labels,
                                                   indices_tuple=indices_tuple)
        losses, valid = supcon_anchor_losses(
            embeddings, labels, ref_emb, ref_labels, temperature, indices_tuple=indices_tuple,
            normalize=normalize, backend=backend, chunk_bytes=chunk_bytes,
        )
        return _supcon_reduce(losses, valid)
    check_backend(backend)
    if backend != "reference":
        embeddings, ref_emb = cast_like_autocast(embeddings, ref_emb)
    temperature = check_positive_temperature(temperature)
    if ref_emb is not None or ref_labels is not None or indices_tuple is not None:
        raise ValueError(
            "SupConLoss: `gather_distributed=True` takes labels only, not a reference set (`ref_emb`) or a "
            "miner's `indices_tuple` (its indices would refer to this rank's batch alone)."
        )

    def check():
        check_features("embeddings", embeddings)
        if labels is None:
            raise ValueError("SupConLoss: `labels` is required (one integer class label per embedding).")
        check_labels("labels", labels, rows=embeddings.shape[0], like=embeddings)
        return resolve_engine(backend, embeddings.device, embeddings.dtype, chunk_bytes)

    engine, layout = distributed.exchange_layout(group, embeddings, check, what="SupConLoss", name="embeddings")
    cdt = compute_dtype(embeddings.dtype)
    z = normalize_rows(embeddings) if normalize else embeddings
    z_all = distributed.gather_with_grad(z, group, layout)
    labels_all = distributed.gather_without_grad(labels.reshape(-1, 1), group, layout).reshape(-1)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=cdt, device=z.device)
    losses, positives, negatives = _supcon_anchor_losses(
        z, labels, z_all, labels_all, inv_temperature, engine, exclude_offset=layout.offset
    )
    # Each rank's loss is W·(Σ of its nonzero anchor losses)/(nonzero anchors on all ranks), so that the
    # average over ranks, and its gradient under DDP, is the global-batch loss: one all-reduce of counts.
    counts = torch.stack([(losses > 0).sum().to(cdt), positives.sum(), negatives.sum()]).detach()
    distributed.all_reduce_sum(counts, group)
    return _supcon_reduce(losses, _supcon_label_validity(counts[1], counts[2]), total_nonzero=counts[0],
                          world_scale=float(layout.world_size))
