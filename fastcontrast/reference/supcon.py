"""pytorch-metric-learning 2.x's ``SupConLoss``: its pairs, per-anchor losses and reducer.

Naive, full-matrix, in the input dtype: the original's math line for line (see :mod:`fastcontrast.reference`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def supcon_pairs_reference(labels, ref_labels, indices_tuple=None) -> tuple:
    """PML's ``convert_to_pairs``: (a1, p, a2, n) from a miner's pairs or triplets, else all label pairs.

    Without a tuple: positives are equal labels, negatives different ones; (i, i) leaves the positives when
    the reference labels are the labels tensor itself (PML's identity check).
    """
    if indices_tuple is not None:
        if len(indices_tuple) == 4:
            return tuple(indices_tuple)
        a, p, n = indices_tuple
        return a, p, a, n
    if ref_labels is None:
        ref_labels = labels
    matches = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).byte()
    diffs = matches ^ 1
    if ref_labels is labels:
        matches.fill_diagonal_(0)
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def supcon_anchor_losses_reference(mat: torch.Tensor, pairs: tuple, temperature: float, *, inverted: bool = True):
    """PML's ``GenericPairLoss.mat_based_loss`` + ``SupConLoss._compute_loss`` on a full [n, m] matrix.

    Args:
        mat: similarities (``inverted``) or distances, [n, m]. pairs: (a1, p, a2, n) as from
            :func:`supcon_pairs_reference`.
    Returns:
        The per-anchor losses [n] (PML's "element" losses), or None where PML returns its zero losses (at
        most one positive and one negative pair, or no positive or no negative pair at all).
    """
    a1, p, a2, n = pairs
    if all(len(x) <= 1 for x in pairs):
        return None
    pos_mask, neg_mask = torch.zeros_like(mat), torch.zeros_like(mat)
    pos_mask[a1, p] = 1
    neg_mask[a2, n] = 1
    if torch.any((pos_mask != 0) & (neg_mask != 0)):
        raise ValueError("Each pair should be either be positive or negative")
    if not (pos_mask.bool().any() and neg_mask.bool().any()):
        return None
    if not inverted:
        mat = -mat
    mat = mat / temperature
    mat_max, _ = mat.max(dim=1, keepdim=True)
    mat = mat - mat_max.detach()
    keep = (pos_mask + neg_mask).bool()
    denominator = torch.logsumexp(mat.masked_fill(~keep, -torch.finfo(mat.dtype).max), dim=1, keepdim=True)
    denominator = denominator.masked_fill(~torch.any(keep, dim=1, keepdim=True), 0)
    log_prob = mat - denominator
    mean_log_prob_pos = (pos_mask * log_prob).sum(dim=1) / (pos_mask.sum(dim=1) + torch.finfo(mat.dtype).tiny)
    return -mean_log_prob_pos


def cosine_similarity_reference(embeddings: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
    """PML's default ``CosineSimilarity()(embeddings, ref_emb)``: [n, m]."""
    return F.normalize(embeddings, p=2, dim=1) @ F.normalize(ref_emb, p=2, dim=1).T


def supcon_loss_reference(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float = 0.1,
    ref_emb: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    *,
    indices_tuple: Optional[tuple] = None,
    distance=None,
) -> torch.Tensor:
    """pytorch-metric-learning 2.x ``SupConLoss(temperature, distance=...)(embeddings, labels, indices_tuple,
    ref_emb, ref_labels)`` with its default reducer.

    Similarities (PML's default: cosine) over τ. Positives of anchor i: same label, itself excluded when
    there is no separate reference set (or ``ref_labels is labels``), or the mined positive pairs; the
    softmax runs over positives and negatives. Per anchor: −mean over positives of log-softmax; the loss
    averages the anchors whose loss is > 0 (PML's AvgNonZeroReducer), and is 0 (``sum(embeddings·0)``)
    where PML returns its zero losses.

    Args:
        embeddings: [n, d]; labels: [n] int (may be None with ``indices_tuple``); ref_emb: [m, d] or None;
            ref_labels: [m] or None; indices_tuple: a miner's (a1, p, a2, n) pairs or (a, p, n) triplets;
            distance: a PML distance (anything called as ``distance(embeddings, ref_emb)`` with an
            ``is_inverted`` attribute), None for cosine similarity.
    Returns:
        0-dim loss in the embeddings' dtype.
    """
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    pairs = supcon_pairs_reference(labels, ref_labels, indices_tuple)
    if all(len(x) <= 1 for x in pairs):
        return torch.sum(embeddings * 0)
    if distance is None:
        mat, inverted = cosine_similarity_reference(embeddings, ref_emb), True
    else:
        mat, inverted = distance(embeddings, ref_emb), distance.is_inverted
    losses = supcon_anchor_losses_reference(mat, pairs, temperature, inverted=inverted)
    if losses is None:
        return torch.sum(embeddings * 0)
    nonzero = losses > 0
    if nonzero.sum() >= 1:
        return losses[nonzero].mean()
    return torch.sum(embeddings * 0)
