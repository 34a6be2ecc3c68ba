"""fastcontrast's ``false_negative_margin`` on full matrices (an option the originals lack): the ground truth
for the blockwise masked LSE of :mod:`fastcontrast.losses._masked_lse`."""

from __future__ import annotations

from typing import Optional

import torch


def drop_false_negatives(logits: torch.Tensor, similarity: torch.Tensor, positive_column: torch.Tensor,
                         margin: Optional[float]) -> torch.Tensor:
    """``logits`` [n, m] with entry (i, j) set to −inf where j ≠ pᵢ and simᵢⱼ > simᵢ,ₚᵢ + margin.

    ``similarity`` [n, m] is the unscaled similarity the logits are built from (same layout), ``positive_column``
    [n] int64 the column pᵢ of each row's positive, which is never dropped. The comparison is detached (a
    selection, no gradient); ``margin`` None returns ``logits`` unchanged.
    """
    if margin is None:
        return logits
    similarity = similarity.detach()
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    threshold = similarity[rows, positive_column].unsqueeze(1) + margin
    dropped = similarity > threshold
    dropped[rows, positive_column] = False
    return logits.masked_fill(dropped, -torch.inf)
