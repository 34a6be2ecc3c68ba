"""NT-Xent: lightly 1.6 ``NTXentLoss`` (with its memory bank), ``DCLLoss`` and ``DCLWLoss``.

One 2n-row single-tower problem z = [z0; z1] of unit rows: each row's candidates are every other row (DCL
also leaves out its positive), or, with a memory bank, the positive key and the bank
(docs/kernels.md#the-math-two-log-sum-exps).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastcontrast import distributed, reference
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import (
    cast_like_autocast,
    check_backend,
    check_chunk_bytes,
    check_exchange,
    check_false_negative_margin,
    check_features,
    check_flags,
    check_pair,
    check_positive_finite_number,
    check_temperature,
)
from fastcontrast.autograd import BlockwiseLogSumExp
from fastcontrast.distributed import rank_mean
from fastcontrast.engine import compute_dtype
from fastcontrast.losses._common import normalize_rows
from fastcontrast.losses._masked_lse import false_negative_lse, threshold_masked_lse
from fastcontrast.lse_split import lse_gap
from fastcontrast.memory_bank import MemoryBank
from fastcontrast.ring import Direction, Ring, RingLogSumExp


def _two_view_setup(out0, out1, temperature, gather_distributed, process_group, backend, chunk_bytes, what,
                    exchange, masked=False):
    """NT-Xent's and DCL's common start: checks, the engine, and across processes the exchanged layout.

    Returns ``(out0, out1, temperature, engine, layout, group)``: the features as autocast would cast them,
    τ checked, and ``layout``/``group`` None for a single process. ``masked``: a false-negative margin is set
    (the ring exchange refuses it).
    """
    check_backend(backend)
    check_exchange(exchange, what=what, needs={"gather_distributed": gather_distributed},
                   refuses={"backend='reference'": backend == "reference", "false_negative_margin": masked})
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
    the other view of its sample). Returns ``(lse [2n], positives [2n], lse_low [2n], views)``, ``views`` the
    layout of the gathered [z0; z1] stacks (None for one process), lse_low as in :mod:`fastcontrast.lse_split`.
    """
    n = z.shape[0] // 2
    views = None if layout is None else layout.scaled(2)
    # A fill on the device: torch.tensor(number, device=cuda) would block on a host-to-device copy each step.
    inv_temperature = torch.full((), 1.0 / temperature, dtype=compute_dtype(z.dtype), device=z.device)
    if views is not None and exchange == "ring":
        # The [z0; z1] blocks travel; in this rank's own block, row i leaves out column i and its positive
        # is the other view, i ± n.
        home = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
        direction = Direction(0, 0, home, exclude_offset=0, exclude_positive=exclude_positive)
        lse, positives, low = RingLogSumExp.apply(Ring(group, views), engine, (direction,), inv_temperature, z)
        return lse, positives, low, views
    # Each rank contributes its [z0; z1]: the gathered tensor is rank by rank, so this rank's own rows start
    # at 2·offset, and row i's self-similarity is column 2·offset + i.
    z_all = None if layout is None else distributed.gather_with_grad(z, group, views)
    offset = 0 if views is None else views.offset
    # Row i's positive is the other view of its sample: i + n for the first view, i − n for the second.
    partner = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n).add_(offset)
    # One process: S = z·zᵀ/τ is symmetric, the self-mask and the partner (an involution) too, so an engine may
    # reduce one block triangle only (fastcontrast.blockwise_symmetric; the Triton kernels' SYMMETRIC).
    lse, _, positives, _, _, low, _ = BlockwiseLogSumExp.apply(
        z, z_all, inv_temperature, engine, True, False, partner, offset, exclude_positive, 0, False, z_all is None
    )
    return lse, positives, low, views


def _two_view_rows_masked(z, group, layout, engine, temperature, margin):
    """:func:`_two_view_rows` with the false-negative rule: row i leaves out candidate c ≠ its positive when
    cos(zᵢ, z_c) > cos(zᵢ, z_positive) + ``margin``. The positive is not a fixed offset from the row across all
    2n rows (i + n, then i − n), so each view's rows are one masked call, whose positive and self columns are."""
    n = z.shape[0] // 2
    views = None if layout is None else layout.scaled(2)
    z_all = z if layout is None else distributed.gather_with_grad(z, group, views)
    offset = 0 if views is None else views.offset
    options = dict(chunk_bytes=engine.chunk_bytes, backend=engine.name)
    first = false_negative_lse(z[:n], z_all, 1.0 / temperature, margin, positive_offset=offset + n,
                               exclude_offset=offset, **options)
    second = false_negative_lse(z[n:], z_all, 1.0 / temperature, margin, positive_offset=offset,
                                exclude_offset=offset + n, **options)
    # No low part: the masked LSE is one fp32 (fastcontrast's own option, no original to match to the bit).
    return torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]), first[0].new_empty(0), views


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
    false_negative_margin: Optional[float] = None,
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
        false_negative_margin: fastcontrast's option (lightly has none; None, the default, is off): leave out
            likely false negatives, Qwen3-Embedding's rule ``sim > pos + margin`` on the cosine similarity
            (before 1/τ, so τ does not move the rule): row r of the 2n leaves out candidate c (one of its 2n − 1
            others; every rank's under ``gather_distributed``) when cos(z_r, z_c) > cos(z_r, z_positive) +
            margin, its positive z_positive (the other view of its sample) never, a negative margin included.
            The mask is a selection, with no gradient. Computed in the tile on either engine (``exchange="ring"``
            refuses it).
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). With unequal batch sizes across ranks the loss is
        weighted by W·n_k/N, as in :func:`clip_loss`.
    """
    margin = check_false_negative_margin(false_negative_margin)
    out0, out1, temperature, engine, layout, group = _two_view_setup(
        out0, out1, temperature, gather_distributed, process_group, backend, chunk_bytes, "NTXentLoss", exchange,
        masked=margin is not None,
    )
    if engine is None:
        if layout is None:
            return reference.nt_xent_loss_reference(out0, out1, temperature, false_negative_margin=margin)
        z0, z1 = reference.lightly_normalize(out0), reference.lightly_normalize(out1)
        z0_all, z1_all = _gathered_views(torch.cat([z0, z1]), group, layout)
        loss = reference.nt_xent_loss_gathered_reference(z0, z1, z0_all, z1_all, temperature, offset=layout.offset,
                                                         false_negative_margin=margin)
        return loss if layout.equal else loss * layout.loss_weight()
    z = torch.cat([normalize_rows(out0), normalize_rows(out1)])
    if margin is not None:
        lse, positives, low, views = _two_view_rows_masked(z, group, layout, engine, temperature, margin)
    else:
        lse, positives, low, views = _two_view_rows(z, group, layout, engine, temperature, exclude_positive=False,
                                                    exchange=exchange)
    # lightly's cross-entropy: log-sum − (positive − max), to the bit (fastcontrast.lse_split).
    return rank_mean(lse_gap(lse, low, positives), views)


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
        if isinstance(w, (int, float)):  # a Python number: exact in the compute dtype, as lightly applies it
            # A fill on the device: torch.as_tensor(number, device=cuda) would block on a host-to-device copy.
            w = torch.full((), w, dtype=cdt, device=z0.device)
        elif not isinstance(w, torch.Tensor):
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
    # lightly's DCL adds −positive to a logsumexp (one fp32, max + log-sum): the plain LSE is its value.
    lse, positives, _, views = _two_view_rows(z, group, layout, engine, temperature, exclude_positive=True,
                                              exchange=exchange)
    if weight_fn is not None:
        positives = positives * _positive_weights(weight_fn, z[:n], z[n:], positives.dtype)
    return rank_mean(lse - positives, views)


def nt_xent_memory_bank_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    bank: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """lightly's NT-Xent with a memory bank (MoCo-style), blockwise.

    One direction only: for q = normalize(out0), k = normalize(out1), each query's candidates are its own key
    and the K bank entries (no in-batch negatives): loss = mean over queries of CE([q·k | q·bankᵀ]/τ, 0).

    Args:
        out0: [n, d] queries; out1: [n, d] keys.
        bank: [K, d] negatives as read *before* this batch is enqueued (lightly keeps it in fp32); it never
            receives a gradient.
        temperature, backend, chunk_bytes: see :func:`nt_xent_loss`.
        false_negative_margin: fastcontrast's option (lightly has none; None is off): bank entry j is left out
            of query i's row when cos(qᵢ, bankⱼ) > cos(qᵢ, kᵢ) + margin (a stale key of the same image is the
            classic case); the own key never. Torch engine only, as in :func:`nt_xent_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    margin = check_false_negative_margin(false_negative_margin)
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
        return reference.nt_xent_memory_bank_loss_reference(out0, out1, bank, temperature,
                                                            false_negative_margin=margin)
    n = out0.shape[0]
    # Queries and keys stay in their own dtype (normalised in fp32 first), so half inputs run on the tensor
    # cores; lightly's fp32 bank is cast to them, which is what its einsum does under autocast.
    q, k = normalize_rows(out0), normalize_rows(out1)
    if margin is not None:
        # The own key is not a column of the bank: loss = log(e^p + e^r) − p = softplus(r − p), with r the
        # bank's masked LSE (−inf when the mask leaves nothing: loss 0) and p the positive logit, both O(n·d)
        # around one pass over the bank.
        cdt = compute_dtype(q.dtype)
        similarity = (q.to(cdt) * k.to(cdt)).sum(dim=1)
        lse_bank = threshold_masked_lse(q, bank.detach().to(device=q.device, dtype=q.dtype), 1.0 / temperature,
                                        similarity.detach() + margin, chunk_bytes=engine.chunk_bytes,
                                        backend=engine.name)
        return F.softplus(lse_bank - similarity / temperature).mean()
    # A fill on the device: torch.tensor(number, device=cuda) would block on a host-to-device copy each step.
    inv_temperature = torch.full((), 1.0 / temperature, dtype=compute_dtype(q.dtype), device=q.device)
    # One matrix [own keys; bank] with the keys private to their own query: the positive and the bank logits
    # then come out of the same product, so equal vectors give bit-equal logits, as in lightly's one matmul.
    keys_and_bank = torch.cat([k.detach(), bank.detach().to(device=q.device, dtype=q.dtype)])
    positive_index = torch.arange(n, device=q.device)
    lse, _, pos, _, _, low, _ = BlockwiseLogSumExp.apply(
        q, keys_and_bank, inv_temperature, engine, True, False, positive_index, None, False, n
    )
    # The keys take part as constants above. Each enters its own row once, as the positive, so ∂lossᵢ/∂kᵢ =
    # (pᵢ − 1)·s·qᵢ with pᵢ = softmax probability of the positive: that gradient comes from this term, whose
    # value is exactly 0 (no n×K work for the bank, which takes no gradient).
    cdt = compute_dtype(q.dtype)
    pos_for_keys = (q.detach().to(cdt) * k.to(cdt)).sum(dim=1) * inv_temperature
    weight = torch.exp(pos - lse).detach() - 1
    return lse_gap(lse, low, pos).mean() + (weight * (pos_for_keys - pos_for_keys.detach())).mean()


class NTXentLoss(nn.Module):
    """Drop-in for lightly's ``NTXentLoss`` (SimCLR, or MoCo-style with a memory bank), O(N·d) memory.

    Args:
        temperature: τ; ``abs(τ) < 1e-8`` raises ValueError (lightly's rule). Negative τ is accepted.
        memory_bank_size: 0 (no bank) or ``(K, D)``; a bare int K > 0 raises ValueError (lightly 1.6's rule).
        gather_distributed: gather negatives from all ranks, with gradient (lightly's semantics); with a
            memory bank, the keys of all ranks are enqueued instead. Without an initialised process group it
            gathers nothing, as in lightly; on a torch without ``torch.distributed`` it raises ValueError.
        backend, process_group, chunk_bytes: see :class:`ClipLoss`.
        exchange: ``"gather"`` or ``"ring"`` (needs ``gather_distributed=True``, no memory bank); see
            :class:`ClipLoss`.
        false_negative_margin: an option lightly lacks, off by default (None): leave out candidates whose
            cosine similarity to the row exceeds its positive's by more than this margin (Qwen3-Embedding's
            ``sim > pos + 0.1``), the positive never; with a memory bank, bank entries against the own key.
            See :func:`nt_xent_loss` for the exact rule. Either engine.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
        exchange: str = "gather",
        false_negative_margin: Optional[float] = None,
    ):
        super().__init__()
        # lightly's order of checks: the bank's size, τ, then distributed availability.
        self.memory_bank = MemoryBank(memory_bank_size)
        self.false_negative_margin = check_false_negative_margin(false_negative_margin)
        self.exchange = check_exchange(
            exchange, what="NTXentLoss", needs={"gather_distributed": gather_distributed},
            refuses={"a memory bank": self.memory_bank.enabled, "backend='reference'": backend == "reference",
                     "false_negative_margin": false_negative_margin is not None},
        )
        self.temperature = check_temperature(temperature)
        check_flags(gather_distributed=gather_distributed)
        distributed.check_gather_available(gather_distributed, what="NTXentLoss")
        if process_group is not None:
            distributed.resolve_gather_group(gather_distributed, process_group, what="NTXentLoss")
        self.gather_distributed = gather_distributed
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """Args: out0, out1 [n, d], two views of the same n samples. Returns a 0-dim fp32 loss."""
        if not self.memory_bank.enabled:
            return nt_xent_loss(
                out0, out1, self.temperature,
                gather_distributed=self.gather_distributed, process_group=self.process_group,
                backend=self.backend, chunk_bytes=self.chunk_bytes, exchange=self.exchange,
                false_negative_margin=self.false_negative_margin,
            )
        check_features("out1", out1)
        bank = self.memory_bank.read()
        loss = nt_xent_memory_bank_loss(
            out0, out1, bank, self.temperature, backend=self.backend, chunk_bytes=self.chunk_bytes,
            false_negative_margin=self.false_negative_margin,
        )
        # lightly enqueues only when a backward pass will follow, so evaluation leaves the bank as it is.
        if out0.requires_grad:
            keys = normalize_rows(out1.detach())
            if self.gather_distributed:
                self.memory_bank.enqueue_from_all_ranks(keys, self.process_group)
            else:
                self.memory_bank.enqueue(keys)
        return loss


class DCLLoss(nn.Module):
    """Drop-in for lightly's ``DCLLoss`` (decoupled contrastive learning), O(N·d) memory.

    NT-Xent with each row's positive left out of its denominator; see :func:`fastcontrast.functional.dcl_loss`.

    Args:
        temperature: τ; ``abs(τ) < 1e-8`` raises ValueError.
        weight_fn: ``weight_fn(out0, out1)`` → weights of the positive terms ([n] or scalar), or None.
        gather_distributed: negatives from all ranks, gathered with gradient (lightly's semantics); a single
            process when no group is initialised; ValueError on a torch without ``torch.distributed``.
        backend, process_group, chunk_bytes: see :class:`ClipLoss` (``process_group`` needs
            ``gather_distributed=True``).
        exchange: ``"gather"`` or ``"ring"`` (needs ``gather_distributed=True``); see :class:`ClipLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn=None,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
        exchange: str = "gather",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.exchange = check_exchange(exchange, what=type(self).__name__,
                                       needs={"gather_distributed": gather_distributed},
                                       refuses={"backend='reference'": backend == "reference"})
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"`weight_fn` must be callable or None, got {type(weight_fn).__name__}.")
        self.weight_fn = weight_fn
        check_flags(gather_distributed=gather_distributed)
        distributed.check_gather_available(gather_distributed, what=type(self).__name__)
        if process_group is not None:
            distributed.resolve_gather_group(gather_distributed, process_group, what=type(self).__name__)
        self.gather_distributed = gather_distributed
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """Args: out0, out1 [n, d], two views of the same n samples. Returns a 0-dim fp32 loss."""
        return dcl_loss(
            out0, out1, self.temperature, self.weight_fn,
            gather_distributed=self.gather_distributed, process_group=self.process_group,
            backend=self.backend, chunk_bytes=self.chunk_bytes, exchange=self.exchange,
        )


class DCLWLoss(DCLLoss):
    """Drop-in for lightly's ``DCLWLoss``: :class:`DCLLoss` weighted by
    :func:`~fastcontrast.functional.negative_mises_fisher_weights` with ``sigma``.

    Args:
        temperature: τ. sigma: the weights' temperature (σ > 0).
        gather_distributed, backend, process_group, chunk_bytes: see :class:`DCLLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sigma: float = 0.5,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
        exchange: str = "gather",
    ):
        check_positive_finite_number("sigma", sigma)
        super().__init__(
            temperature=temperature,
            weight_fn=functools.partial(negative_mises_fisher_weights, sigma=sigma),
            gather_distributed=gather_distributed, backend=backend, process_group=process_group,
            chunk_bytes=chunk_bytes, exchange=exchange,
        )
        self.sigma = sigma
