"""CLIP: open_clip 3.x ``ClipLoss`` and ``CoCaLoss`` (its contrastive part), as a function and as modules.

clip_loss = ½[CE(s·I·Tᵀ + b, labels) + CE(s·T·Iᵀ + b, labels)] from the row and column LSEs of the blockwise
core plus the O(n·d) positive logits (docs/kernels.md#the-math-two-log-sum-exps); the N×N logits never exist.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from fastcontrast import distributed, reference
from fastcontrast._validation import (
    cast_like_autocast,
    check_backend,
    check_chunk_bytes,
    check_exchange,
    check_false_negative_margin,
    check_flags,
    check_rank_world,
)
from fastcontrast.autograd import BlockwiseLogSumExp, keep_in_graph
from fastcontrast.distributed import rank_mean
from fastcontrast.losses._common import Scalar, two_towers_checked
from fastcontrast.losses._masked_lse import false_negative_lse
from fastcontrast.lse_split import lse_gap
from fastcontrast.ring import Direction, Ring, RingLogSumExp


def _top1(i2t_argmax: torch.Tensor, t2i_argmax: torch.Tensor, target: torch.Tensor) -> dict:
    """Retrieval top-1: the fraction of images whose best text is their own, and of texts likewise."""
    return {
        "i2t_top1": (i2t_argmax == target).float().mean().detach(),
        "t2i_top1": (t2i_argmax == target).float().mean().detach(),
    }


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
    false_negative_margin: Optional[float] = None,
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
        false_negative_margin: fastcontrast's option (open_clip has none; None, the default, is off): leave out
            likely false negatives, Qwen3-Embedding's rule ``sim > pos + margin``. With sim = I·Tᵀ, the
            features' dot product before the scale (the cosine for open_clip's unit features; neither the
            scale nor the bias moves the rule): image row i leaves out text j ≠ i when sim(i, j) > sim(i, i) +
            margin, and text row j leaves out image i ≠ j when sim(i, j) > sim(j, j) + margin, each direction
            against its own row's positive. The positive is never left out (a negative margin included); the
            mask is a selection, with no gradient. Across processes the rule runs over the candidates the
            row sees (every rank's, gathered), against the row's own positive. Computed in the tile on either
            engine (``exchange="ring"`` refuses it).
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). Across processes, ranks may hold different batch sizes;
        the local loss is then weighted by W·n_k/N so that the average over ranks is the global-batch loss.
        With ``return_accuracy``: ``(loss, {"i2t_top1": ..., "t2i_top1": ...})``, the accuracies detached
        fp32 scalars over the rows this rank scores (all N for the global loss, its own rows for the local
        loss).
    """
    margin = check_false_negative_margin(false_negative_margin)
    check_backend(backend)
    check_exchange(exchange, what="ClipLoss", needs={"local_loss": local_loss, "gather_with_grad": gather_with_grad},
                   refuses={"return_accuracy": return_accuracy, "backend='reference'": backend == "reference",
                            "false_negative_margin": margin is not None})
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features = cast_like_autocast(image_features, text_features)
    group = distributed.resolve_group(rank, world_size, process_group, what="ClipLoss")
    scale, bias, engine, layout = two_towers_checked(image_features, text_features, logit_scale, logit_bias, backend,
                                                      chunk_bytes, group, "ClipLoss")
    if layout is None:
        all_image, all_text = image_features, text_features
    else:
        if exchange == "ring":
            home = torch.arange(image_features.shape[0], device=image_features.device)
            lse_image, pos_image, low_image, lse_text, pos_text, low_text = RingLogSumExp.apply(
                Ring(group, layout), engine, (Direction(0, 1, home), Direction(1, 0, home)), scale,
                image_features, text_features,
            )
            loss = (rank_mean(lse_gap(lse_image, low_image, pos_image), layout)
                    + rank_mean(lse_gap(lse_text, low_text, pos_text), layout)) / 2
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
                                                       bias, offset=start, false_negative_margin=margin)
            loss = loss if layout.equal else loss * layout.loss_weight()
            i2t, t2i = (image_features @ all_text.T).argmax(dim=1), (text_features @ all_image.T).argmax(dim=1)
        else:
            loss = reference.clip_loss_reference(all_image, all_text, scale, bias, false_negative_margin=margin)
            logits_per_image, logits_per_text = reference.clip_logits_reference(all_image, all_text, scale)
            i2t, t2i = logits_per_image.argmax(dim=1), logits_per_text.argmax(dim=1)
        return (loss, _top1(i2t, t2i, positive_index)) if return_accuracy else loss
    if margin is not None:
        # Each direction is one masked call whose row rule reads that row's positive from the same tile; the
        # positives come out of those tiles too, read from the gathered tensors as below.
        rows_image, rows_text = (image_features, text_features) if local else (all_image, all_text)
        options = dict(positive_offset=start, chunk_bytes=engine.chunk_bytes, need_argmax=return_accuracy,
                       backend=engine.name)
        lse_image, pos_image, i2t = false_negative_lse(rows_image, all_text, scale, margin, **options)
        lse_text, pos_text, t2i = false_negative_lse(rows_text, all_image, scale, margin, **options)
        if local:
            loss = (rank_mean(lse_image - pos_image, layout) + rank_mean(lse_text - pos_text, layout)) / 2
        else:
            loss = ((lse_image - pos_image).mean() + (lse_text - pos_text).mean()) / 2
    elif local:
        # The positives are read from the gathered tensors (open_clip's labels i + offset), so their gradients
        # take open_clip's routes: back through the gather with grad, nowhere when the copies are constants.
        lse_image, _, pos_image, i2t, _, low_image, _ = BlockwiseLogSumExp.apply(
            image_features, all_text, scale, engine, True, False, positive_index, None, False, 0, return_accuracy
        )
        lse_text, _, pos_text, t2i, _, low_text, _ = BlockwiseLogSumExp.apply(
            text_features, all_image, scale, engine, True, False, positive_index, None, False, 0, return_accuracy
        )
        loss = (rank_mean(lse_gap(lse_image, low_image, pos_image), layout)
                + rank_mean(lse_gap(lse_text, low_text, pos_text), layout)) / 2
    else:
        lse_row, lse_col, pos, i2t, t2i, low_row, low_col = BlockwiseLogSumExp.apply(
            all_image, all_text, scale, engine, True, True, positive_index, None, False, 0, return_accuracy
        )
        loss = (lse_gap(lse_row, low_row, pos).mean() + lse_gap(lse_col, low_col, pos).mean()) / 2
    loss = keep_in_graph(loss, bias)
    return (loss, _top1(i2t, t2i, positive_index)) if return_accuracy else loss


def _reject_horovod(use_horovod: bool) -> None:
    if use_horovod:
        raise ValueError(
            "`use_horovod=True` is not supported: fastcontrast gathers with torch.distributed (NCCL, gloo, ...), "
            "not Horovod. Launch with torchrun and pass rank/world_size (or process_group=) instead."
        )


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss`` with O(N·d) memory.

    ½[CE(s·I·Tᵀ + b, labels) + CE(s·T·Iᵀ + b, labels)], computed blockwise: the N×N logits never exist.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size: as in open_clip. ``cache_labels``
            is accepted and has no effect: no label tensor is ever built.
        use_horovod: must be False (Horovod is not supported; torch.distributed is).
        backend: ``"auto"`` (Triton on CUDA, else the blockwise torch engine), ``"triton"``, ``"torch"``
            or ``"reference"`` (open_clip's naive math).
        process_group: torch.distributed group to gather over (default: the default group). When given, the
            rank and world size are taken from it; explicit ``rank``/``world_size`` that contradict it are an
            error. Across processes, gradients are exact under DDP averaging with ``gather_with_grad=True``
            (``local_loss=True`` is the cheap way); see docs/distributed.md.
        chunk_bytes: logits budget per chunk for the torch engine.
        return_accuracy: also report image→text and text→image top-1 retrieval accuracy, taken from the
            forward pass's argmax (no second materialisation of the logits; lowest index on ties). The
            default output is open_clip's.
        exchange: ``"gather"`` (open_clip's all-gather) or ``"ring"``: the other tower's blocks pass from
            rank to rank, so per-rank memory stays O(n·d) at any world size (docs/distributed.md); needs
            ``local_loss=True, gather_with_grad=True``; same loss and gradients.
        false_negative_margin: an option open_clip lacks, off by default (None): in each direction, leave out
            candidates whose unscaled similarity exceeds the row's positive's by more than this margin
            (Qwen3-Embedding's ``sim > pos + 0.1``); the positive never. See :func:`clip_loss` for the exact
            rule. Either engine.
    """

    # Subclasses whose forward returns more than the contrastive loss (distill, CoCa) take no accuracy.
    _reports_accuracy = True

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
        return_accuracy: bool = False,
        exchange: str = "gather",
        false_negative_margin: Optional[float] = None,
    ):
        super().__init__()
        check_flags(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                    return_accuracy=return_accuracy)
        self.false_negative_margin = check_false_negative_margin(false_negative_margin)
        self.exchange = check_exchange(
            exchange, what=type(self).__name__, needs={"local_loss": local_loss, "gather_with_grad": gather_with_grad},
            refuses={"return_accuracy": return_accuracy, "backend='reference'": backend == "reference",
                     "false_negative_margin": false_negative_margin is not None},
        )
        if return_accuracy and not self._reports_accuracy:
            raise ValueError(f"`return_accuracy` is a ClipLoss option; {type(self).__name__} does not take it.")
        check_rank_world(rank, world_size)
        _reject_horovod(use_horovod)
        rank, world_size = distributed.rank_world_from_group(rank, world_size, process_group, "ClipLoss")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.return_accuracy = return_accuracy

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        logit_bias: Optional[Union[torch.Tensor, float]] = None,
        output_dict: bool = False,
    ):
        """Args: image_features [n, d], text_features [n, d], logit_scale (exponentiated) scalar,
        logit_bias optional scalar. Returns a 0-dim fp32 loss, or ``{"contrastive_loss": loss}``.

        With ``return_accuracy=True`` the dict also holds ``"i2t_top1"`` and ``"t2i_top1"`` (detached fp32
        scalars from the same forward pass), and without ``output_dict`` the result is
        ``(loss, i2t_top1, t2i_top1)``.
        """
        result = clip_loss(
            image_features, text_features, logit_scale, logit_bias,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, process_group=self.process_group,
            backend=self.backend, chunk_bytes=self.chunk_bytes, return_accuracy=self.return_accuracy,
            exchange=self.exchange, false_negative_margin=self.false_negative_margin,
        )
        if not self.return_accuracy:
            return {"contrastive_loss": result} if output_dict else result
        loss, accuracy = result
        if output_dict:
            return {"contrastive_loss": loss, **accuracy}
        return loss, accuracy["i2t_top1"], accuracy["t2i_top1"]


class CoCaLoss(ClipLoss):
    """Drop-in for open_clip's ``CoCaLoss``: weighted blockwise ``ClipLoss`` plus the captioning cross-entropy.

    Args:
        caption_loss_weight, clip_loss_weight: the weights of the two parts (open_clip's).
        pad_id: token id ignored by the caption cross-entropy (open_clip's default 0).
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend, process_group,
        chunk_bytes: as :class:`ClipLoss`; they apply to the contrastive part.
    """

    _reports_accuracy = False

    def __init__(
        self,
        caption_loss_weight: float,
        clip_loss_weight: float,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
    ):
        super().__init__(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels, rank=rank,
            world_size=world_size, use_horovod=use_horovod, backend=backend, process_group=process_group,
            chunk_bytes=chunk_bytes,
        )
        for name, weight in (("caption_loss_weight", caption_loss_weight), ("clip_loss_weight", clip_loss_weight)):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {type(weight).__name__} ({weight!r}).")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise TypeError(f"`pad_id` must be an int token id, got {type(pad_id).__name__} ({pad_id!r}).")
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        # The caption part is open_clip's own: a plain token cross-entropy, nothing N×N about it.
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        output_dict: bool = False,
    ):
        """Args: image_features / text_features [n, d], caption ``logits`` [n, L, V], token ``labels`` [n, L]
        (int64), exponentiated logit_scale.

        Returns ``(clip_loss_weight·contrastive, caption_loss_weight·caption)`` or the dict
        ``{"contrastive_loss", "caption_loss"}``. With ``clip_loss_weight == 0`` the contrastive part is
        ``tensor(0)`` and is not computed at all, as in open_clip.
        """
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise ValueError(
                f"`logits` must be a [batch, seq_len, vocab] tensor, got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}."
            )
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"`labels` must be a [batch, seq_len] = {tuple(logits.shape[:2])} tensor of token ids, got "
                f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}."
            )
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            # open_clip's tensor(0) (int64), built on the device without a host-to-device copy.
            clip_loss = torch.zeros((), dtype=torch.int64, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss
