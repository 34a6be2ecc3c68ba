"""SigLIP: open_clip 3.x ``SigLipLoss``, as a function and as a module.

L = Σᵢⱼ softplus(−zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n, an elementwise sum over the blockwise S tiles
(docs/kernels.md#the-math-two-log-sum-exps).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from fastcontrast import distributed, reference
from fastcontrast._validation import (
    SIGLIP_DIST_IMPLS,
    cast_like_autocast,
    check_backend,
    check_choice,
    check_chunk_bytes,
    check_exchange,
    check_flags,
    check_rank_world,
    check_siglip_dist_impl,
)
from fastcontrast.autograd import blockwise_siglip_sum, gradients_needed
from fastcontrast.losses._common import Scalar, two_towers_checked
from fastcontrast.ring import Ring, RingSigLipSum


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dist_impl: Optional[str] = None,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
    exchange: str = "gather",
) -> torch.Tensor:
    """open_clip's SigLIP loss, blockwise: −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n.

    zᵢⱼ = +1 on the diagonal, −1 elsewhere; the division is by n (open_clip's), not n².

    Args:
        image_features: [n, d]; text_features: [n, d], same dtype and device.
        logit_scale: exponentiated scale (see :func:`clip_loss`); logit_bias: scalar or None.
        rank, world_size, process_group: see :func:`clip_loss`.
        dist_impl: ``None``, ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"``. In open_clip these are
            four communication schedules for the same function (text features travel with their gradient to
            every rank); here all four are that same function, computed by one gather of the text features
            with gradient and one rectangular blockwise call with the positives at this rank's offset.
        backend, chunk_bytes: see :func:`clip_loss`.
        exchange: ``"gather"`` or ``"ring"`` (the text blocks travel round the ranks, as open_clip's
            ``'bidir'`` / ``'shift'`` schedules do, with O(n·d) memory per rank); see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features). With unequal batch sizes across ranks the loss is
        weighted by W·n_k/N, as in :func:`clip_loss`.
    """
    check_backend(backend)
    check_siglip_dist_impl(dist_impl)
    check_exchange(exchange, what="SigLipLoss", refuses={"backend='reference'": backend == "reference"})
    if backend != "reference":  # the reference is the original math, which autocast changes by itself
        image_features, text_features = cast_like_autocast(image_features, text_features)
    group = distributed.resolve_group(rank, world_size, process_group, what="SigLipLoss")
    scale, bias, engine, layout = two_towers_checked(image_features, text_features, logit_scale, logit_bias, backend,
                                                      chunk_bytes, group, "SigLipLoss")
    if layout is None:
        all_text = text_features
    else:
        all_text = None if exchange == "ring" else distributed.gather_with_grad(text_features, group, layout)
    offset = 0 if layout is None else layout.offset
    if engine is None:
        loss = reference.siglip_loss_reference(image_features, all_text, scale, bias, positive_offset=offset)
        return loss if layout is None or layout.equal else loss * layout.loss_weight()
    if all_text is None:
        total = RingSigLipSum.apply(Ring(group, layout), engine, scale, bias, image_features, text_features,
                                    gradients_needed(image_features, text_features, scale, bias))
    else:
        total = blockwise_siglip_sum(image_features, all_text, scale, bias, engine, positive_offset=offset)
    if layout is None or layout.equal:
        return total / image_features.shape[0]
    return total * (layout.world_size / layout.total)


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss`` with O(N·d) memory.

    −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n, z = +1 on the diagonal and −1 elsewhere.

    When any input requires grad (and grad mode is on), the forward also computes the gradients, in the same
    sweep over the similarity tiles, and the backward only scales them (3 GEMM passes in all instead of 4). A
    forward under grad whose backward never runs has paid for them: evaluate under ``torch.no_grad()``.

    Args:
        cache_labels, rank, world_size: as in open_clip (``cache_labels`` has no effect: no labels are built).
        dist_impl: ``None``, ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"``. In open_clip these are
            four communication schedules for the same function; here all four *are* the same function (one
            gather of the text features with gradient, one rectangular blockwise call), with open_clip's
            value and gradients.
        backend, process_group, chunk_bytes, exchange: see :class:`ClipLoss` (with ``"ring"`` the text blocks
            travel round the ranks, as open_clip's ``'bidir'`` / ``'shift'`` do; every ``dist_impl`` takes it).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
        exchange: str = "gather",
    ):
        super().__init__()
        check_flags(cache_labels=cache_labels)
        self.exchange = check_exchange(exchange, what="SigLipLoss",
                                       refuses={"backend='reference'": backend == "reference"})
        check_rank_world(rank, world_size)
        rank, world_size = distributed.rank_world_from_group(rank, world_size, process_group, "SigLipLoss")
        dist_impl = dist_impl or "bidir"  # open_clip's default schedule
        check_choice("dist_impl", dist_impl, SIGLIP_DIST_IMPLS[1:])
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        logit_bias: Optional[Union[torch.Tensor, float]],
        output_dict: bool = False,
    ):
        """Args: image_features [n, d], text_features [n, d], logit_scale (exponentiated) and logit_bias
        scalars. Returns a 0-dim fp32 loss, or ``{"contrastive_loss": loss}``."""
        loss = siglip_loss(
            image_features, text_features, logit_scale, logit_bias,
            rank=self.rank, world_size=self.world_size, dist_impl=self.dist_impl,
            process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
            exchange=self.exchange,
        )
        return {"contrastive_loss": loss} if output_dict else loss
