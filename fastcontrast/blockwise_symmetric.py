"""The torch engine's single-tower LSE by symmetry: S = s·Z·Zᵀ over its lower block triangle only.

A single-tower loss (NT-Xent, DCL on one process: lightly's four blocks are one 2N×2N problem) scores Z against
itself, so S is symmetric: each entry below the diagonal blocks serves its row and, read transposed, its
column, which is the row of the same index. Chunk R = [start, stop) of rows forms the tile T = S[R, :stop]
once; its rows reduce over the tile and its first ``start`` columns reduce into the earlier rows' running max
and sum. The backward forms, per tile, dS of its rows and, transposed, dS of the earlier rows at the same
entries, and G = dS + dSᵀ gives both gradients: Z's gradient (dS + dSᵀ)·Z from one tile.

GEMM work in units of 2·M²·d (M rows): forward 0.5, backward 1.5 (the tile once, G·Z for the chunk's rows and
Gᵀ·Z for the earlier rows), 2.0 in all, where the two-tower route takes 4 (the forward 1, the backward S once
and dS·B, dSᵀ·A).

What a symmetric call may mask: the diagonal (self-similarity) and each row's positive, when the positive
index is an involution (row i's positive is j exactly when j's is i, as NT-Xent's other view): a masked entry
is then masked for its row and its column alike. The positive logits come from the tiles the LSEs reduce, so
`lse − positive` is still exactly 0 on a one-hot row.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from fastcontrast.lse_split import finite_or_zero, lse_from_sums


def _masked_tile(z_c, s, start, stop, positive_index, exclude_self, exclude_positive):
    """(T, column, in_tile, value): T = s·Z[start:stop]·Z[:stop]ᵀ with the left-out entries at −inf; the
    chunk's positive index clamped into the tile [rows, 1], whether each row's positive lies in it, and the
    tile's entry there, read before any mask (a positive left out of the LSE is still reported); the last three
    None without positives."""
    logits = (z_c[start:stop] * s) @ z_c[:stop].T  # [rows, stop]
    column = in_tile = value = None
    if positive_index is not None:
        partner = positive_index[start:stop]
        in_tile = partner < stop
        column = partner.clamp(max=stop - 1).unsqueeze(1)
        value = logits.gather(1, column)
    rows = torch.arange(stop - start, device=z_c.device)
    if exclude_self:
        logits[rows, rows + start] = float("-inf")
    if exclude_positive:
        # A row whose positive is a later row keeps its clamped column: that entry is not its positive.
        logits.scatter_(1, column, torch.where(in_tile.unsqueeze(1), float("-inf"), logits.gather(1, column)))
    return logits, column, in_tile, None if value is None else value.squeeze(1)


def _fold(top, total, part, dim, consume=False):
    """Merge ``part``'s max and Σ exp over ``dim`` into the running (top, total) of the entries it reduces
    onto, against the merged max. ``consume``: ``part`` is not needed after, so its exp is formed in place
    (no second chunk-sized temporary)."""
    merged = torch.maximum(top, part.amax(dim))
    shift = finite_or_zero(merged).unsqueeze(dim)
    weights = part.sub_(shift) if consume else part - shift
    total.mul_((top - shift.squeeze(dim)).exp_()).add_(weights.exp_().sum(dim))
    top.copy_(merged)


def symmetric_lse_forward(z: torch.Tensor, s: torch.Tensor, positive_index: Optional[torch.Tensor], *,
                          exclude_self: bool, exclude_positive: bool, chunks: Iterable[tuple[int, int]], cdt):
    """Row LSE of S = s·Z·Zᵀ as its exact pair (:mod:`fastcontrast.lse_split`), and the positives.

    z: [n, d]; s: 0-dim in ``cdt``; positive_index: [n] int64 involution or None. Returns ``(lse [n], low [n],
    positives [n] or None)`` in ``cdt``."""
    n = z.shape[0]
    z_c = z.to(cdt)
    top = torch.full((n,), float("-inf"), dtype=cdt, device=z.device)
    total = torch.zeros(n, dtype=cdt, device=z.device)
    # One slot past the end takes the writes of rows whose positive another chunk reads: no boolean
    # indexing, so no host sync and no data-dependent shape.
    positives = None if positive_index is None else torch.zeros(n + 1, dtype=cdt, device=z.device)
    for start, stop in chunks:
        logits, column, in_tile, value = _masked_tile(z_c, s, start, stop, positive_index, exclude_self,
                                                      exclude_positive)
        if positives is not None:
            own = torch.arange(start, stop, device=z.device)
            positives.scatter_(0, torch.where(in_tile, own, n), value)
            # Row p of an earlier chunk has its positive here (its partner is this row): the same entry.
            earlier = positive_index[start:stop] < start
            positives.scatter_(0, torch.where(earlier, positive_index[start:stop], n), value)
        if start:
            _fold(top[:start], total[:start], logits[:, :start], 0)
        _fold(top[start:stop], total[start:stop], logits, 1, consume=True)
        del logits
    lse, low = lse_from_sums(top, total)
    return lse, low, None if positives is None else positives[:n]


def symmetric_lse_backward(z: torch.Tensor, s: torch.Tensor, positive_index: Optional[torch.Tensor],
                           lse: torch.Tensor, grad_row: Optional[torch.Tensor],
                           grad_positives: Optional[torch.Tensor], *, exclude_self: bool, exclude_positive: bool,
                           chunks: Iterable[tuple[int, int]], cdt) -> torch.Tensor:
    """(dS + dSᵀ)·Z [n, d] in ``cdt``, unscaled, for dSᵢⱼ = grad_rowᵢ·exp(Sᵢⱼ − lseᵢ) (0 where left out) +
    grad_positivesᵢ·[j = positive_index[i]]; S recomputed over the lower block triangle only."""
    n = z.shape[0]
    z_c = z.to(cdt)
    grad = torch.zeros((n, z.shape[1]), dtype=cdt, device=z.device)
    masked = exclude_self or exclude_positive
    g = None if grad_row is None else grad_row.to(cdt)
    g_pos = None if grad_positives is None else grad_positives.to(cdt)
    for start, stop in chunks:
        logits, column, in_tile, _ = _masked_tile(z_c, s, start, stop, positive_index, exclude_self,
                                                  exclude_positive)
        left_out = torch.isneginf(logits) if masked else None
        # dS of this chunk's rows over the tile, and (transposed) dS of the earlier rows at the same entries.
        if g is not None:
            rows_term = torch.sub(logits, lse[start:stop, None]).exp_().mul_(g[start:stop, None])
            cols_term = logits[:, :start].sub_(lse[None, :start]).exp_().mul_(g[None, :start])
        else:
            rows_term = torch.zeros_like(logits)
            cols_term = torch.zeros_like(logits[:, :start])
        if left_out is not None:
            # −inf − (−inf) is NaN where a whole row is left out: zero the left-out entries explicitly.
            rows_term.masked_fill_(left_out, 0)
            cols_term.masked_fill_(left_out[:, :start], 0)
        if g_pos is not None:
            # Folded in the compute dtype before any product (near convergence p − 1 keeps its digits only so).
            rows_term.scatter_add_(1, column, torch.where(in_tile, g_pos[start:stop], 0).unsqueeze(1))
            if start:
                partner = positive_index[start:stop]
                earlier_row = partner.clamp(max=start - 1)
                # Earlier row p's positive is this row r: dS[p, r] sits at (r, p) of the transposed tile.
                cols_term.scatter_add_(1, earlier_row.unsqueeze(1),
                                       torch.where(partner < start, g_pos[earlier_row], 0).unsqueeze(1))
        below = rows_term[:, :start].add_(cols_term)  # G over the earlier rows' columns
        grad[start:stop].addmm_(below, z_c[:start])
        grad[:start].addmm_(below.T, z_c[start:stop])
        block = rows_term[:, start:stop]  # the diagonal block: each row formed its own entries
        grad[start:stop].addmm_(block + block.T, z_c[start:stop])
        del logits, rows_term, cols_term, left_out
    return grad
