"""The log-sum-exp as an unevaluated sum hi + lo, so that ``lse − positive`` is the originals' value to the bit.

The originals' cross-entropy (``F.cross_entropy`` in open_clip and lightly) computes a row's loss as
``log Σⱼ exp(xⱼ − max) − (positive − max)``: the row max never meets the log-sum in one fp32. An engine that
returns the LSE as one fp32, ``fl(max + log_sum)``, rounds at the magnitude of the max (at logits near 100,
2⁻¹⁷ ≈ 7.6e−6 apart) and ``lse − positive`` keeps that rounding: lightly's one-entry memory bank at τ = 0.1
gives 0.6931467 where lightly gives 0.6931472.

So the engines return each LSE twice: ``hi = fl(max + log_sum)``, the value every gradient uses, and its
rounding error ``lo = (max + log_sum) − hi``, exact (Knuth's TwoSum), which takes no gradient. A loss then
forms ``(hi − positive) + lo`` (:func:`lse_gap`): near convergence the positive is the max, ``hi − positive``
is exact (Sterbenz) and the one rounding left is the final one, as in the originals. Merging LSEs of column
blocks keeps the pair too: :func:`merge_split_lse` here (ring steps), ``merge_partials_kernel`` and
``exact_sum`` in ``kernels/lse_forward.py`` (the Triton engine's column splits and row blocks).

Only where the original takes a cross-entropy (open_clip, lightly's NT-Xent): lightly's DCL and
sentence-transformers' MNRL add a ``torch.logsumexp``, itself one fp32, and keep the plain LSE.
"""

from __future__ import annotations

from typing import Sequence

import torch


def finite_or_zero(top: torch.Tensor) -> torch.Tensor:
    """The max used as a shift: 0 where it is ±inf (a row with nothing allowed), so no −inf − (−inf) appears."""
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)


def split_lse(top: torch.Tensor, log_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` with hi = fl(top + log_sum) and lo = (top + log_sum) − hi exactly (TwoSum, no |·| ordering
    needed); lo is 0 where hi is not finite. top: the (finite) shift, log_sum = log Σ exp(x − top), same shape."""
    hi = top + log_sum
    from_log_sum = hi - top
    from_top = hi - from_log_sum
    lo = (top - from_top) + (log_sum - from_log_sum)
    return hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))


def lse_from_sums(top: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` of the LSE whose raw max is ``top`` (−inf allowed) and total = Σ exp(x − finite_or_zero(top))."""
    return split_lse(finite_or_zero(top), total.log())


def merge_split_lse(his: Sequence[torch.Tensor], los: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE pair over several blocks of columns from each block's pair, in the given order (the same on
    every rank). One block comes back unchanged."""
    if len(his) == 1:
        return his[0], los[0]
    hi = torch.stack(list(his))
    top = finite_or_zero(hi.amax(dim=0))
    # (hiₖ − top) is exact near the max (Sterbenz); loₖ then adds the digits hiₖ lost.
    total = (hi - top).add_(torch.stack(list(los))).exp_().sum(dim=0)
    return split_lse(top, total.log())


def lse_gap(lse: torch.Tensor, low: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``lse − positive`` to the last bit: ``(hi − positive) + lo``; differentiable in lse and positive as
    ``lse − positive`` is (lo is a constant). An empty ``low`` (an engine result not computed) adds nothing."""
    gap = lse - positive
    return gap + low.detach() if low.numel() else gap
