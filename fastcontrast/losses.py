"""``nn.Module`` drop-ins for open_clip 3.x ``ClipLoss`` / ``DistillClipLoss`` / ``CoCaLoss`` / ``SigLipLoss``
lightly 1.6 ``NTXentLoss`` / ``DCLLoss`` / ``DCLWLoss`` and pytorch-metric-learning 2.x ``SupConLoss``.

Argument handling only: the math is in :mod:`fastcontrast.functional`. Constructor and ``forward``
signatures match the originals (keyword names included); extra options are keyword-only and come last.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastcontrast import distributed, functional
from fastcontrast._validation import (
    SIGLIP_DIST_IMPLS,
    check_backend,
    check_choice,
    check_chunk_bytes,
    check_exchange,
    check_features,
    check_flags,
    check_positive_finite_number,
    check_positive_temperature,
    check_rank_world,
    check_temperature,
)
from fastcontrast.memory_bank import MemoryBank


def _rank_world_from_group(rank: int, world_size: int, process_group, what: str) -> tuple[int, int]:
    """With ``process_group=``, the rank and world size come from the group (explicit ones must agree)."""
    if process_group is None:
        return rank, world_size
    group = distributed.resolve_group(rank, world_size, process_group, what=what)
    return (0, 1) if group is None else (group.rank, group.world_size)


def _reject_horovod(use_horovod: bool) -> None:
    if use_horovod:
        raise ValueError(
            "`use_horovod=True` is not supported: fastcontrast gathers with torch.distributed (NCCL, gloo, ...), "
            "not Horovod. Launch with torchrun and pass rank/world_size (or process_group=) instead."
        )


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss`` with O(N·d) memory.

    ½[CE(s·I·Tᵀ + b, labels) + CE(s·T·Iᵀ + b, labels)], computed blockwise: the N×N logits never exist.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size: as in open_clip. ``cache_labels``
            is accepted and has no effect: no label tensor is ever built.
        use_horovod: must be False (Horovod is not supported; torch.distributed is).
        backend: ``"auto"`` (Triton on CUDA, else the blockwise torch engine), ``"triton"``, ``"torch"``
            or ``"reference"`` (open_clip's naive math).
        process_group: torch.distributed group to gather over (default: the default group). When given, the
            rank and world size are taken from it; explicit ``rank``/``world_size`` that contradict it are an
            error. Across processes, gradients are exact under DDP averaging with ``gather_with_grad=True``
            (``local_loss=True`` is the cheap way); see the README's "Distributed training".
        chunk_bytes: logits budget per chunk for the torch engine.
        return_accuracy: also report image→text and text→image top-1 retrieval accuracy, taken from the
            forward pass's argmax (no second materialisation of the logits; lowest index on ties). The
            default output is open_clip's.
        exchange: ``"gather"`` (open_clip's all-gather) or ``"ring"``: the other tower's blocks pass from
            rank to rank, so per-rank memory stays O(n·d) at any world size (docs/distributed.md); needs
            ``local_loss=True, gather_with_grad=True``; same loss and gradients.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
        return_accuracy: bool = False,
        exchange: str = "gather",
    ):
        super().__init__()
        check_flags(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                    return_accuracy=return_accuracy)
        self.exchange = check_exchange(
            exchange, what=type(self).__name__, needs={"local_loss": local_loss, "gather_with_grad": gather_with_grad},
            refuses={"return_accuracy": return_accuracy, "backend='reference'": backend == "reference"},
        )
        if return_accuracy and isinstance(self, (DistillClipLoss, CoCaLoss)):
            raise ValueError(f"`return_accuracy` is a ClipLoss option; {type(self).__name__} does not take it.")
        check_rank_world(rank, world_size)
        _reject_horovod(use_horovod)
        rank, world_size = _rank_world_from_group(rank, world_size, process_group, "ClipLoss")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.return_accuracy = return_accuracy

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        logit_bias: Optional[Union[torch.Tensor, float]] = None,
        output_dict: bool = False,
    ):
        """Args: image_features [n, d], text_features [n, d], logit_scale (exponentiated) scalar,
        logit_bias optional scalar. Returns a 0-dim fp32 loss, or ``{"contrastive_loss": loss}``.

        With ``return_accuracy=True`` the dict also holds ``"i2t_top1"`` and ``"t2i_top1"`` (detached fp32
        scalars from the same forward pass), and without ``output_dict`` the result is
        ``(loss, i2t_top1, t2i_top1)``.
        """
        result = functional.clip_loss(
            image_features, text_features, logit_scale, logit_bias,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, process_group=self.process_group,
            backend=self.backend, chunk_bytes=self.chunk_bytes, return_accuracy=self.return_accuracy,
            exchange=self.exchange,
        )
        if not self.return_accuracy:
            return {"contrastive_loss": result} if output_dict else result
        loss, accuracy = result
        if output_dict:
            return {"contrastive_loss": loss, **accuracy}
        return loss, accuracy["i2t_top1"], accuracy["t2i_top1"]


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
        contrastive, distill = functional.distill_clip_loss(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            rank=self.rank, world_size=self.world_size, process_group=self.process_group,
            backend=self.backend, chunk_bytes=self.chunk_bytes, exchange=self.exchange,
        )
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class CoCaLoss(ClipLoss):
    """Drop-in for open_clip's ``CoCaLoss``: weighted blockwise ``ClipLoss`` plus the captioning cross-entropy.

    Args:
        caption_loss_weight, clip_loss_weight: the weights of the two parts (open_clip's).
        pad_id: token id ignored by the caption cross-entropy (open_clip's default 0).
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, backend, process_group,
        chunk_bytes: as :class:`ClipLoss`; they apply to the contrastive part.
    """

    def __init__(
        self,
        caption_loss_weight: float,
        clip_loss_weight: float,
        pad_id: int = 0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
    ):
        super().__init__(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels, rank=rank,
            world_size=world_size, use_horovod=use_horovod, backend=backend, process_group=process_group,
            chunk_bytes=chunk_bytes,
        )
        for name, weight in (("caption_loss_weight", caption_loss_weight), ("clip_loss_weight", clip_loss_weight)):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"`{name}` must be a number, got {type(weight).__name__} ({weight!r}).")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise TypeError(f"`pad_id` must be an int token id, got {type(pad_id).__name__} ({pad_id!r}).")
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        # The caption part is open_clip's own: a plain token cross-entropy, nothing N×N about it.
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        output_dict: bool = False,
    ):
        """Args: image_features / text_features [n, d], caption ``logits`` [n, L, V], token ``labels`` [n, L]
        (int64), exponentiated logit_scale.

        Returns ``(clip_loss_weight·contrastive, caption_loss_weight·caption)`` or the dict
        ``{"contrastive_loss", "caption_loss"}``. With ``clip_loss_weight == 0`` the contrastive part is
        ``tensor(0)`` and is not computed at all, as in open_clip.
        """
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise ValueError(
                f"`logits` must be a [batch, seq_len, vocab] tensor, got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}."
            )
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"`labels` must be a [batch, seq_len] = {tuple(logits.shape[:2])} tensor of token ids, got "
                f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}."
            )
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss`` with O(N·d) memory.

    −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n, z = +1 on the diagonal and −1 elsewhere.

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
        rank, world_size = _rank_world_from_group(rank, world_size, process_group, "SigLipLoss")
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
        loss = functional.siglip_loss(
            image_features, text_features, logit_scale, logit_bias,
            rank=self.rank, world_size=self.world_size, dist_impl=self.dist_impl,
            process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
            exchange=self.exchange,
        )
        return {"contrastive_loss": loss} if output_dict else loss


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
    ):
        super().__init__()
        # lightly's order of checks: the bank's size, τ, then distributed availability.
        self.memory_bank = MemoryBank(memory_bank_size)
        self.exchange = check_exchange(
            exchange, what="NTXentLoss", needs={"gather_distributed": gather_distributed},
            refuses={"a memory bank": self.memory_bank.enabled, "backend='reference'": backend == "reference"},
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
            return functional.nt_xent_loss(
                out0, out1, self.temperature,
                gather_distributed=self.gather_distributed, process_group=self.process_group,
                backend=self.backend, chunk_bytes=self.chunk_bytes, exchange=self.exchange,
            )
        check_features("out1", out1)
        bank = self.memory_bank.read()
        loss = functional.nt_xent_memory_bank_loss(
            out0, out1, bank, self.temperature, backend=self.backend, chunk_bytes=self.chunk_bytes
        )
        # lightly enqueues only when a backward pass will follow, so evaluation leaves the bank as it is.
        if out0.requires_grad:
            keys = functional.normalize_rows(out1.detach())
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
        return functional.dcl_loss(
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
            weight_fn=functools.partial(functional.negative_mises_fisher_weights, sigma=sigma),
            gather_distributed=gather_distributed, backend=backend, process_group=process_group,
            chunk_bytes=chunk_bytes, exchange=exchange,
        )
        self.sigma = sigma


def _similarity_of(distance) -> Optional[bool]:
    """For a PML distance the blockwise path computes exactly, its ``normalize`` flag (True: cosine
    similarity, False: raw dot products); None for any other distance. None (PML's default) is cosine."""
    if distance is None:
        return True
    try:
        from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
    except ImportError:  # not a PML distance then, since PML is what defines them
        return None
    # Exact types only: a subclass may override compute_mat.
    if type(distance) not in (CosineSimilarity, DotProductSimilarity) or distance.power != 1:
        return None
    if distance.normalize_embeddings and distance.p != 2:
        return None
    return bool(distance.normalize_embeddings)


class SupConLoss(nn.Module):
    """Drop-in for pytorch-metric-learning 2.x ``SupConLoss(temperature=0.1, **kwargs)``, O(N·d) memory.

    Multi-positive contrastive loss by class label on cosine similarities: for each anchor, −mean over its
    positives (same label, itself excluded) of the log-softmax over every other item, averaged over the
    anchors whose loss is > 0; 0 when the batch has no positive pair or no negative pair (PML's rules).

    Args:
        temperature: τ > 0.
        distance: PML's ``distance=``. ``CosineSimilarity()`` (the default) and ``DotProductSimilarity()``
            run blockwise; any other distance is computed exactly through the distance itself, which builds
            the N×M matrix (a warning says so at construction).
        reducer: PML's ``reducer=``: it receives the per-anchor losses, as in PML. None: PML's default
            ``AvgNonZeroReducer``, computed without host syncs.
        embedding_regularizer, embedding_reg_weight: PML's: the regulariser's loss is added through PML's
            ``MultipleReducers``, as in PML.
        collect_stats: accepted for PML compatibility (fastcontrast keeps no statistics).
        gather_distributed: anchors of this rank against the embeddings of every rank (gathered with gradient),
            exact under DDP averaging; a single process when no group is initialised. Not with a custom
            distance, reducer or regulariser.
        backend, process_group, chunk_bytes: see :class:`ClipLoss` (``process_group`` needs
            ``gather_distributed=True``).

    Any other keyword is a TypeError, as in PML.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        distance=None,
        reducer=None,
        embedding_regularizer=None,
        embedding_reg_weight: float = 1,
        collect_stats: Optional[bool] = None,
        gather_distributed: bool = False,
        backend: str = "auto",
        process_group=None,
        chunk_bytes: Optional[int] = None,
    ):
        super().__init__()
        self.temperature = check_positive_temperature(temperature)
        check_flags(gather_distributed=gather_distributed)
        if process_group is not None:
            distributed.resolve_gather_group(gather_distributed, process_group, what="SupConLoss")
        self.gather_distributed = gather_distributed
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.collect_stats = collect_stats
        self.distance = distance
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self._normalize = _similarity_of(distance)
        if distance is not None and not callable(distance):
            raise TypeError(f"SupConLoss: `distance` must be a PML distance, got {type(distance).__name__}.")
        if self._normalize is None and not hasattr(distance, "is_inverted"):
            raise TypeError(
                f"SupConLoss: `distance` must be a PML distance (with `is_inverted`), got {type(distance).__name__}."
            )
        if embedding_regularizer is not None and not callable(embedding_regularizer):
            raise TypeError(
                f"SupConLoss: `embedding_regularizer` must be callable, got {type(embedding_regularizer).__name__}."
            )
        custom = reducer is not None or embedding_regularizer is not None or self._normalize is None
        if custom and gather_distributed:
            raise ValueError(
                "SupConLoss: gather_distributed=True takes the default distance, reducer and no regulariser: "
                "their per-rank shares are only exact for PML's defaults."
            )
        if self._normalize is None:
            warnings.warn(
                f"SupConLoss: distance {type(distance).__name__} has no blockwise form; the loss is computed "
                "exactly through the distance, which builds the full N×M matrix (O(N·M) memory).",
                stacklevel=2,
            )
        self.reducer = self._pml_reducer(reducer) if reducer is not None or embedding_regularizer is not None else None

    def _pml_reducer(self, reducer):
        """PML's ``set_reducer``: the reducer as given (copied), or per sub-loss under ``MultipleReducers``."""
        from pytorch_metric_learning.reducers import AvgNonZeroReducer, DoNothingReducer, MultipleReducers

        if isinstance(reducer, (MultipleReducers, DoNothingReducer)):
            return reducer
        if self.embedding_regularizer is None:
            return copy.deepcopy(reducer)
        names = ("loss", "embedding_reg_loss")
        return MultipleReducers(
            {k: AvgNonZeroReducer() if reducer is None else copy.deepcopy(reducer) for k in names}
        )

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Args: embeddings [n, d]; labels [n] integer (optional with ``indices_tuple``); ``indices_tuple``
        a miner's pairs (a1, p, a2, n) or triplets (a, p, n); optional reference set ref_emb [m, d],
        ref_labels [m] (anchors against it, no self-exclusion). Returns a 0-dim fp32 loss."""
        if self.reducer is None and self._normalize is not None:
            return functional.supcon_loss(
                embeddings, labels, ref_emb, ref_labels, self.temperature, indices_tuple=indices_tuple,
                normalize=self._normalize, gather_distributed=self.gather_distributed,
                process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
            )
        loss_dict = {"loss": self._anchor_losses(embeddings, labels, indices_tuple, ref_emb, ref_labels)}
        if self.embedding_regularizer is not None:
            loss_dict["embedding_reg_loss"] = {
                "losses": self.embedding_regularizer(embeddings) * self.embedding_reg_weight,
                "indices": None, "reduction_type": "already_reduced",
            }
        if self.reducer is None:  # a non-blockwise distance with PML's default reducer
            info = loss_dict["loss"]
            if info["reduction_type"] == "already_reduced":
                return torch.sum(embeddings * 0)
            nonzero = info["losses"] > 0
            return info["losses"][nonzero].mean() if bool(nonzero.any()) else torch.sum(embeddings * 0)
        return self.reducer(loss_dict, embeddings, labels)

    def _anchor_losses(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        """PML's loss dict entry: per-anchor "element" losses, or its zero loss."""
        if self._normalize is not None:
            losses, valid = functional.supcon_anchor_losses(
                embeddings, labels, ref_emb, ref_labels, self.temperature, indices_tuple=indices_tuple,
                normalize=self._normalize, backend=self.backend, chunk_bytes=self.chunk_bytes,
            )
            valid = bool(valid)  # the reducer branches on it, as PML does
        else:
            losses = functional.supcon_anchor_losses_with_distance(
                self.distance, embeddings, labels, ref_emb, ref_labels, self.temperature,
                indices_tuple=indices_tuple,
            )
            valid = losses is not None
        if not valid:
            return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
        return {"losses": losses, "indices": torch.arange(losses.shape[0], device=losses.device),
                "reduction_type": "element"}
