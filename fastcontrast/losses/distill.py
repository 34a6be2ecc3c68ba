"""Distillation: open_clip 3.x ``DistillClipLoss``, as a function and as a module.

The student's CLIP loss plus the cross-entropy between the teacher's and the student's softmax rows and
columns, both from one blockwise sweep per direction (the teacher's logits are a second tile beside the
student's).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from fastcontrast import distributed, reference
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import (
    cast_like_autocast,
    check_backend,
    check_exchange,
    check_two_towers,
)
from fastcontrast.autograd import BlockwiseDistill
from fastcontrast.distributed import rank_mean
from fastcontrast.losses._common import Scalar
from fastcontrast.losses.clip import ClipLoss
from fastcontrast.ring import Ring, RingDistill


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
            contrastive = (rank_mean(lse_image - pos_image, layout) + rank_mean(lse_text - pos_text, layout)) / 2
            distill = (rank_mean(lse_image - cross_image, layout) + rank_mean(lse_text - cross_text, layout)) / 2
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
    contrastive = (rank_mean(lse_image - pos_image, layout) + rank_mean(lse_text - pos_text, layout)) / 2
    distill = (rank_mean(lse_image - cross_image, layout) + rank_mean(lse_text - cross_text, layout)) / 2
    return contrastive, distill


class DistillClipLoss(ClipLoss):
    """Drop-in for open_clip's ``DistillClipLoss`` (CLIP loss plus distillation from a teacher), O(N·d) memory.

    contrastive = ``ClipLoss`` of the student; distill = ½ Σ over both directions of
    −(softmax(teacher logits) · log_softmax(student logits)).sum(1).mean(). Neither the student's nor the
    teacher's N×N logits are ever stored: per row and column the kernels keep the student LSE, the teacher
    LSE and the cross term Σ softmax(teacher)·student (two GEMM tiles per block, one reduction more).

    Args: the same as :class:`ClipLoss` (open_clip's constructor is ClipLoss's). The teacher's features are
    gathered across ranks exactly like the student's, as open_clip does; with ``exchange="ring"`` they travel
    with the student's blocks.
    """

    _reports_accuracy = False

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        dist_image_features: torch.Tensor,
        dist_text_features: torch.Tensor,
        dist_logit_scale: Union[torch.Tensor, float],
        output_dict: bool = False,
    ):
        """Args: student image_features / text_features [n, d] and exponentiated logit_scale; teacher
        dist_image_features / dist_text_features [n, d_t] (same dtype) and dist_logit_scale.

        Returns ``(contrastive_loss, distill_loss)`` (0-dim fp32), or the dict
        ``{"contrastive_loss", "distill_loss"}``. The teacher gets gradients only if its tensors require grad.
        """
        contrastive, distill = distill_clip_loss(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, process_group=self.process_group,
            backend=self.backend, chunk_bytes=self.chunk_bytes, exchange=self.exchange,
        )
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill
