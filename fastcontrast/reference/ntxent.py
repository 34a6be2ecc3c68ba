"""lightly 1.6's ``NTXentLoss`` (with and without a memory bank, gathered across ranks), ``DCLLoss`` and ``DCLWLoss``.

Naive, full-matrix, in the input dtype: the original's math line for line (see :mod:`fastcontrast.reference`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastcontrast.reference._false_negatives import drop_false_negatives


def lightly_normalize(x: torch.Tensor) -> torch.Tensor:
    """lightly's ``nn.functional.normalize(x, dim=1)`` (eps 1e-12), in the input dtype."""
    return F.normalize(x, dim=1)


def nt_xent_loss_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.5, *,
                           false_negative_margin: Optional[float] = None) -> torch.Tensor:
    """lightly 1.6 ``NTXentLoss`` without memory bank, one process.

    Both views are normalised; each of the 2n rows is scored against the other 2n−1 rows, and the loss is
    the mean cross-entropy over the 2n rows.

    Args:
        out0, out1: [n, d] projections of two views of the same n images.
        false_negative_margin: fastcontrast's option (lightly has none): row r leaves out candidate c ≠ its
            positive when cos(z_r, z_c) > cos(z_r, z_positive) + margin.
    Returns:
        0-dim loss.
    """
    out0 = lightly_normalize(out0)
    out1 = lightly_normalize(out1)
    return nt_xent_loss_gathered_reference(out0, out1, out0, out1, temperature, offset=0,
                                           false_negative_margin=false_negative_margin)


def nt_xent_memory_bank_loss_reference(
    out0: torch.Tensor, out1: torch.Tensor, bank: torch.Tensor, temperature: float = 0.5, *,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """lightly 1.6 ``NTXentLoss`` with a memory bank (MoCo-style), one process.

    One direction only: logits ``[q·k⁺ | q·bankᵀ] / τ`` with label 0; no in-batch negatives.

    Args:
        out0: [n, d] queries; out1: [n, d] keys (positives).
        bank: [K, d] negatives, read *before* this batch is enqueued; never receives a gradient.
        false_negative_margin: fastcontrast's option (lightly has none): bank entry j is left out of query
            i's row when q_i·bank_j > q_i·k_i + margin.
    Returns:
        0-dim loss.
    """
    out0 = lightly_normalize(out0)
    out1 = lightly_normalize(out1)
    negatives = bank.detach().to(out0.device).T
    sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    # lightly's einsum would reject a half-precision query against the fp32 bank; compare in the
    # common dtype instead, which is what any working run of the original does (fp32).
    dtype = torch.promote_types(out0.dtype, negatives.dtype)
    sim_neg = torch.einsum("nc,ck->nk", out0.to(dtype), negatives.to(dtype))
    similarities = torch.cat([sim_pos.to(dtype), sim_neg], dim=1)
    logits = similarities / temperature
    labels = torch.zeros(logits.shape[0], device=out0.device, dtype=torch.long)
    logits = drop_false_negatives(logits, similarities, labels, false_negative_margin)
    return F.cross_entropy(logits, labels)


def nt_xent_loss_gathered_reference(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z0_all: torch.Tensor,
    z1_all: torch.Tensor,
    temperature: float,
    *,
    offset: int,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """lightly 1.6 ``NTXentLoss(gather_distributed=True)`` on one rank, given the gathered normalised views
    (with the local views as the gathered ones and ``offset=0``: the one-process loss, lightly's same lines).

    Each local row is scored against both gathered views except itself (lightly's ``eye_rank`` mask, at
    column ``offset + i``); the positive of row i is at column ``offset + i`` of the other view.

    Args:
        z0, z1: [n, d] this rank's views, already normalised (lightly normalises before gathering).
        z0_all, z1_all: [N, d] every rank's views in rank order (lightly's ``out0_large``, ``out1_large``).
        offset: this rank's first row in the gathered views (lightly's ``rank·n``).
        false_negative_margin: as :func:`nt_xent_loss_reference`, over the gathered candidates.
    Returns:
        0-dim loss: the mean over this rank's 2n rows.
    """
    batch_size = z0.shape[0]
    rows = torch.arange(batch_size, device=z0.device)
    diag_mask = torch.zeros((batch_size, z0_all.shape[0]), dtype=torch.bool, device=z0.device)
    diag_mask[rows, rows + offset] = True

    def lightly_layout(x00, x01, x10, x11):
        x00 = x00[~diag_mask].view(batch_size, -1)
        x11 = x11[~diag_mask].view(batch_size, -1)
        return torch.cat([torch.cat([x01, x00], dim=1), torch.cat([x10, x11], dim=1)], dim=0)

    similarities = (torch.einsum("nc,mc->nm", z0, z0_all), torch.einsum("nc,mc->nm", z0, z1_all),
                    torch.einsum("nc,mc->nm", z1, z0_all), torch.einsum("nc,mc->nm", z1, z1_all))
    logits = lightly_layout(*(x / temperature for x in similarities))
    labels = (rows + offset).repeat(2)
    if false_negative_margin is not None:
        logits = drop_false_negatives(logits, lightly_layout(*similarities), labels, false_negative_margin)
    return F.cross_entropy(logits, labels)


def dcl_loss_gathered_reference(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z0_all: torch.Tensor,
    z1_all: torch.Tensor,
    temperature: float,
    weight_fn=None,
    *,
    offset: int = 0,
) -> torch.Tensor:
    """lightly 1.6 ``DCLLoss`` (``DCLWLoss`` with its weight_fn) on one rank, given the normalised views.

    For each view: −w·(positive logit) + LSE over the logits against both gathered views without the own
    column ``offset + i`` of either (self and positive both leave the denominator); mean over rows; the two
    views averaged.

    Args:
        z0, z1: [n, d] this rank's views, already normalised.
        z0_all, z1_all: [N, d] every rank's views in rank order (z0, z1 for one process).
        weight_fn: ``weight_fn(z0, z1)`` → weights of the positive terms, or None.
        offset: this rank's first row in the gathered views (lightly's ``eye_rank``).
    Returns:
        0-dim loss.
    """
    batch_size = z0.shape[0]
    rows = torch.arange(batch_size, device=z0.device)
    diag_mask = torch.zeros((batch_size, z0_all.shape[0]), dtype=torch.bool, device=z0.device)
    diag_mask[rows, rows + offset] = True

    def one_view(a, b, a_all, b_all):
        sim_aa = torch.einsum("nc,mc->nm", a, a_all) / temperature
        sim_ab = torch.einsum("nc,mc->nm", a, b_all) / temperature
        positive_loss = -sim_ab[diag_mask]
        if weight_fn:
            positive_loss = positive_loss * weight_fn(a, b)
        sim_aa = sim_aa[~diag_mask].view(batch_size, -1)
        sim_ab = sim_ab[~diag_mask].view(batch_size, -1)
        negative_loss = torch.logsumexp(torch.cat([sim_aa, sim_ab], dim=1), dim=1)
        return (positive_loss + negative_loss).mean()

    return 0.5 * (one_view(z0, z1, z0_all, z1_all) + one_view(z1, z0, z1_all, z0_all))


def dcl_loss_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.1, weight_fn=None):
    """lightly 1.6 ``DCLLoss`` / ``DCLWLoss`` for one process: both views normalised, then
    :func:`dcl_loss_gathered_reference` with the local views as the gathered ones.

    Args:
        out0, out1: [n, d] projections of two views of the same n images.
    Returns:
        0-dim loss.
    """
    z0, z1 = lightly_normalize(out0), lightly_normalize(out1)
    return dcl_loss_gathered_reference(z0, z1, z0, z1, temperature, weight_fn)
