"""open_clip 3.x's ``SigLipLoss._loss`` for one process.

Naive, full-matrix, in the input dtype: the original's math line for line (see :mod:`fastcontrast.reference`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastcontrast.reference._types import Scale


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scale,
    logit_bias: Optional[Scale] = None,
    *,
    positive_offset: int = 0,
) -> torch.Tensor:
    """open_clip 3.x ``SigLipLoss`` (one process): −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n.

    ``zᵢⱼ = +1`` where ``j == i + positive_offset`` and −1 elsewhere. The division is by the number of
    image rows ``n``, not by n·m (open_clip's choice, reproduced).

    Args:
        image_features: [n, d]; text_features: [m, d].
    Returns:
        0-dim loss in the logits' dtype.
    """
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    n, m = logits.shape
    labels = -torch.ones((n, m), device=logits.device, dtype=logits.dtype)
    rows = torch.arange(n, device=logits.device)
    cols = rows + positive_offset
    in_range = (cols >= 0) & (cols < m)
    labels[rows[in_range], cols[in_range]] = 1
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
