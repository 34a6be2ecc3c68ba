"""open_clip 3.x's CLIP family, as open_clip computes it: ``ClipLoss`` (one process and the local loss),
``DistillClipLoss`` and ``CoCaLoss``'s caption term.

Naive, full-matrix, in the input dtype: the original's math line for line (see :mod:`fastcontrast.reference`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastcontrast.reference._false_negatives import drop_false_negatives
from fastcontrast.reference._types import Scale


def clip_logits_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``ClipLoss.get_logits`` for world_size 1: two [n, m] and [m, n] logits matrices."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    return logits_per_image, logits_per_text


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
    *,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """open_clip 3.x ``ClipLoss`` (one process): ½[CE(s·I·Tᵀ + b, arange) + CE(s·T·Iᵀ + b, arange)].

    Args:
        image_features: [n, d]; text_features: [n, d]; both already normalised by the model.
        logit_scale: the *exponentiated* scale (open_clip passes ``logit_scale.exp()``), not clamped here.
        logit_bias: optional scalar added to every logit; it cannot change the value.
        false_negative_margin: fastcontrast's option (open_clip has none): in each direction, row i leaves out
            candidate j ≠ i when sim(i, j) > sim(i, i) + margin, sim = I·Tᵀ (T·Iᵀ for the text rows) before
            the scale.
    Returns:
        0-dim loss in the logits' dtype.
    """
    logits_per_image, logits_per_text = clip_logits_reference(
        image_features, text_features, logit_scale, logit_bias
    )
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    if false_negative_margin is not None:
        logits_per_image = drop_false_negatives(logits_per_image, image_features @ text_features.T, labels,
                                                false_negative_margin)
        logits_per_text = drop_false_negatives(logits_per_text, text_features @ image_features.T, labels,
                                               false_negative_margin)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss_local_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
    *,
    offset: int,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """open_clip 3.x ``ClipLoss`` with ``local_loss=True`` on one rank, given the gathered features.

    ``logits_per_image = s·I_local·T_allᵀ (+b)``, ``logits_per_text = s·T_local·I_allᵀ (+b)``, labels
    ``arange(n) + offset`` (open_clip's ``n·rank``; the sum of the lower ranks' sizes when they differ).

    Args:
        image_features, text_features: [n, d] this rank's features.
        all_image_features, all_text_features: [N, d] every rank's features in rank order.
        false_negative_margin: as :func:`clip_loss_reference`, over the gathered candidates, each local row
            against its own positive (column offset + i).
    Returns:
        0-dim loss: the mean over this rank's rows, in the logits' dtype.
    """
    logits_per_image = logit_scale * image_features @ all_text_features.T
    logits_per_text = logit_scale * text_features @ all_image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device, dtype=torch.long) + offset
    if false_negative_margin is not None:
        logits_per_image = drop_false_negatives(logits_per_image, image_features @ all_text_features.T, labels,
                                                false_negative_margin)
        logits_per_text = drop_false_negatives(logits_per_text, text_features @ all_image_features.T, labels,
                                               false_negative_margin)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def distill_logits_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    all_image_features: Optional[torch.Tensor] = None,
    all_text_features: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.x ``ClipLoss.get_logits`` without bias: one process, or the local loss of one rank.

    One process: ``s·I·Tᵀ`` and ``s·T·Iᵀ``. Local loss, given every rank's gathered features:
    ``s·I·T_allᵀ`` and ``s·T·I_allᵀ``. (The gathered global loss is the one-process loss of the gathered
    features.)
    """
    if all_image_features is None:
        return logit_scale * image_features @ text_features.T, logit_scale * text_features @ image_features.T
    return logit_scale * image_features @ all_text_features.T, logit_scale * text_features @ all_image_features.T


def distill_clip_loss_from_logits_reference(
    logits_per_image: torch.Tensor,
    logits_per_text: torch.Tensor,
    dist_logits_per_image: torch.Tensor,
    dist_logits_per_text: torch.Tensor,
    *,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.x ``DistillClipLoss.forward`` after ``get_logits``: (contrastive loss, distill loss).

    distill = ½ Σ over both directions of −(softmax(teacher) · log_softmax(student)).sum(1).mean(); labels
    are ``arange(rows) + offset`` (open_clip's ``rows·rank`` for the local loss).
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device, dtype=torch.long) + offset

    def dist_loss(teacher_logits, student_logits):
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    contrastive = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    distill = (dist_loss(dist_logits_per_image, logits_per_image)
               + dist_loss(dist_logits_per_text, logits_per_text)) / 2
    return contrastive, distill


def distill_clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale: Scale,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.x ``DistillClipLoss`` (one process): (contrastive loss, distill loss).

    Args:
        image_features, text_features: [n, d] student features; logit_scale: the student's exponentiated scale.
        dist_image_features, dist_text_features: [n, d_t] teacher features (d_t may differ from d);
            dist_logit_scale: the teacher's exponentiated scale.
    Returns:
        two 0-dim losses in the logits' dtype.
    """
    student = distill_logits_reference(image_features, text_features, logit_scale)
    teacher = distill_logits_reference(dist_image_features, dist_text_features, dist_logit_scale)
    return distill_clip_loss_from_logits_reference(*student, *teacher)


def caption_loss_reference(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """open_clip 3.x ``CoCaLoss``'s caption part: ``CrossEntropyLoss(ignore_index=pad_id)`` over tokens.

    Args:
        logits: [n, L, V] token logits; labels: [n, L] int64 token ids.
    """
    return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=pad_id)
