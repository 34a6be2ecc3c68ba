"""The gradient-cached step inside open_clip's own training loop (``--fastcontrast-grad-cache CHUNK``).

open_clip_train's ``train_one_epoch`` (accum_freq 1) does, per batch::

    with autocast():
        model_out = model(images, texts)
        [dist_model_out = dist_model(images, texts) under no_grad, for --distill-*]
        losses = loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
    backward(total_loss, scaler)          # open_clip_train.train.backward
    [scaler.]step(optimizer) ...

:func:`grad_cache_train_one_epoch` runs that same function, unchanged, with two stand-ins (three for CoCa,
below):

- the model is a :class:`CachedStepModel`: its call embeds the batch in chunks of CHUNK samples without grad
  (phase 1 of :mod:`fastcontrast.cached`, RNG state saved per chunk) and returns the features as leaf
  tensors, and ``logit_scale`` / ``logit_bias`` as leaves standing in for the model's own;
- ``open_clip_train.train.backward`` is replaced for the epoch: it takes the gradient of the (scaled) loss
  w.r.t. those leaves (phase 2: the loss was computed once, by open_clip's own call) and re-forwards chunk by
  chunk, backpropagating the cached gradients (phase 3), under DDP's ``no_sync()`` except for the last chunk,
  whose backward also carries ``logit_scale`` / ``logit_bias``'s gradients through the model's parameters.

The teacher of ``--distill-*`` runs in chunks of CHUNK samples too (under no_grad, as open_clip runs it).

CoCa: the caption loss is a mean over the batch's non-pad tokens, ``Σ_tokens CE / T``, so it is a sum over
samples: the stand-in keeps, per sample, the sum of its tokens' cross-entropies (a leaf ``[N]``, like the
features; the ``[N, L, V]`` caption logits are never kept) and its non-pad token count, and the loss is
replaced for the epoch by :class:`CachedCaptionCoCaLoss`, which computes the contrastive part with the
CoCaLoss module's own settings and the caption part as ``Σ sums / T``. Its gradient w.r.t. each sample's sum
is ``caption_loss_weight / T`` (times the GradScaler's scale), which phase 3 backpropagates through the
chunk's re-forward caption logits, with the features' cached gradients.

Everything else (the scheduler, the scaler, gradient clipping, the logit-scale clamp, logging, evaluation) is
open_clip's code. Combinations that would give a different step are refused: ``--accum-freq > 1`` (the two
are alternative ways to the same gradient), Horovod, and models whose output holds more than the two towers'
features, the logit scale/bias and (with a CoCaLoss) CoCa's caption logits and labels.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastcontrast.cached import ChunkedForward, loss_gradients, split_extra_arguments
from fastcontrast.losses.clip import ClipLoss, CoCaLoss

FEATURE_KEYS = ("image_features", "text_features")
EXTRA_KEYS = ("logit_scale", "logit_bias")
CAPTION_KEYS = ("logits", "labels")
# What the stand-in model returns in place of CoCa's [N, L, V] logits and [N, L] labels (per sample).
CAPTION_SUM_KEYS = ("caption_token_loss_sums", "caption_token_counts")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def check_args(args: Any, chunk_size: int) -> None:
    """Refuse open_clip_train options the cached step would silently change."""
    if getattr(args, "accum_freq", 1) != 1:
        raise ValueError(
            f"--fastcontrast-grad-cache {chunk_size} cannot be combined with --accum-freq {args.accum_freq}: both "
            "compute the gradient of a batch larger than memory would allow, in different ways. Use one: "
            "--batch-size B*k --fastcontrast-grad-cache CHUNK gives --accum-freq k's gradient with one loss "
            "computation instead of k, and the dropout masks replayed."
        )
    if getattr(args, "horovod", False):
        raise ValueError("--fastcontrast-grad-cache does not support --horovod (it needs torch.distributed's DDP).")


def caption_token_sums(logits: torch.Tensor, labels: torch.Tensor, pad_id: int):
    """Per sample, the sum of its caption tokens' cross-entropies and the number of its non-pad tokens.

    Args: ``logits`` [rows, L, V] (any float dtype), ``labels`` [rows, L] int64 token ids, ``pad_id`` the id
    CoCaLoss ignores. Returns two tensors [rows]: the sums in fp32 (fp64 for fp64 logits) and the counts in
    fp32. Summed over the batch and divided, they give CoCaLoss's ``CrossEntropyLoss(ignore_index=pad_id)``
    mean over the batch's non-pad tokens (the same cross-entropy op, so under autocast the same fp32 one).
    """
    token_losses = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=pad_id, reduction="none")
    sums = token_losses.to(torch.promote_types(token_losses.dtype, torch.float32)).sum(dim=1)
    return sums, (labels != pad_id).sum(dim=1).to(torch.float32)


class CachedCaptionCoCaLoss(nn.Module):
    """Stands in for a CoCaLoss in a cached step, where the model stand-in returns per-sample caption sums.

    ``forward(image_features, text_features, caption_token_loss_sums, caption_token_counts, logit_scale,
    output_dict=False)``: features [N, d], the two [N] fp32 outputs of :func:`caption_token_sums`, the
    exponentiated scale. Returns what the CoCaLoss returns for the whole batch:
    ``clip_loss_weight · contrastive`` (computed by the CoCaLoss's own ClipLoss part, with its local-loss /
    gather / backend settings; ``tensor(0)`` when the weight is 0, as CoCaLoss) and
    ``caption_loss_weight · Σ sums / Σ counts``, the token mean over the batch's non-pad tokens (NaN when
    there are none, as ``CrossEntropyLoss``).
    """

    def __init__(self, loss: CoCaLoss):
        super().__init__()
        self.loss = loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                caption_token_loss_sums: torch.Tensor, caption_token_counts: torch.Tensor,
                logit_scale: torch.Tensor, output_dict: bool = False):
        loss = self.loss
        if loss.clip_loss_weight:
            # The contrastive part exactly as CoCaLoss.forward computes it (its own ClipLoss settings).
            clip_loss = loss.clip_loss_weight * ClipLoss.forward(loss, image_features, text_features, logit_scale)
        else:
            clip_loss = torch.zeros((), dtype=torch.int64, device=caption_token_loss_sums.device)
        # The token count is data, not a function of the parameters: no gradient goes to it.
        tokens = caption_token_counts.detach().sum()
        caption_loss = caption_token_loss_sums.sum() / tokens * loss.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class CachedStepModel:
    """Stands in for open_clip_train's model inside ``train_one_epoch`` and runs phase 1 of the cached step.

    A call with grad enabled embeds ``(images, texts)`` in chunks of ``chunk_size`` samples under ``no_grad``
    through the real model (the DDP module when distributed, so its hooks and buffer broadcasts run as usual)
    and returns open_clip's output dict with the features and the logit scale/bias as leaf tensors; the next
    :meth:`backward` finishes the step. Everything else (``train()``, ``parameters()``, ``.module``,
    attributes) is the real model's.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int, autocast: Optional[Callable] = None,
                 caption_pad_id: Optional[int] = None):
        self._model = model
        self._chunk_size = chunk_size
        self._autocast = autocast
        # Not None for CoCa (with a CoCaLoss): the model's logits/labels become per-sample caption sums.
        self._caption_pad_id = caption_pad_id
        self._pending = None

    @property
    def module(self):  # open_clip's unwrap_model(model) reads .module when it exists
        return _unwrap(self._model)

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def train(self, mode: bool = True):
        self._model.train(mode)
        return self

    def parameters(self, *args, **kwargs):
        return self._model.parameters(*args, **kwargs)

    def _towers(self, images: torch.Tensor, texts: torch.Tensor):
        out = self._model(images, texts)
        if not isinstance(out, dict):
            raise TypeError(f"--fastcontrast-grad-cache needs the model's output dict (open_clip_train builds models "
                            f"with output_dict=True), got {type(out).__name__}.")
        known = FEATURE_KEYS + EXTRA_KEYS + (CAPTION_KEYS if self._caption_pad_id is not None else ())
        unknown = sorted(set(out) - set(known))
        if unknown:
            raise ValueError(f"--fastcontrast-grad-cache handles models that output {known}; this one also outputs "
                             f"{unknown}, which it cannot chunk (CoCa's caption logits are handled only with "
                             "open_clip's CoCa loss).")
        features = tuple(out[key] for key in FEATURE_KEYS)
        if self._caption_pad_id is None:
            return features
        missing = [key for key in CAPTION_KEYS if key not in out]
        if missing:
            raise ValueError(f"--fastcontrast-grad-cache: the loss is a CoCaLoss but the model's output has no "
                             f"{missing} (open_clip's CoCa returns them with output_labels=True).")
        return (*features, *caption_token_sums(out["logits"], out["labels"], self._caption_pad_id))

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not torch.is_grad_enabled():
            return self._model(images, texts)
        if self._pending is not None:
            raise RuntimeError("--fastcontrast-grad-cache: the model was called twice before backward(); "
                               "open_clip_train's loop calls it once per step.")
        ddp = [self._model] if isinstance(self._model, DistributedDataParallel) else []
        forward = ChunkedForward(self._towers, [(images, texts)], self._chunk_size, autocast=self._autocast,
                                 ddp_modules=ddp)
        # What the model's forward returns next to the features, with grad: logit_scale.exp() and logit_bias.
        inner = _unwrap(self._model)
        extras = {"logit_scale": inner.logit_scale.exp()}
        if getattr(inner, "logit_bias", None) is not None:
            extras["logit_bias"] = inner.logit_bias
        _, extras_for_loss, originals, leaves = split_extra_arguments((), extras)
        self._pending = (forward, originals, leaves)
        keys = FEATURE_KEYS + (CAPTION_SUM_KEYS if self._caption_pad_id is not None else ())
        return {**dict(zip(keys, forward.embeddings)), **extras_for_loss}

    def backward(self, total_loss: torch.Tensor, scaler) -> None:
        """Phases 2 and 3: cache the (scaled) loss's gradients, re-forward each chunk and backpropagate them."""
        if self._pending is None:
            raise RuntimeError("--fastcontrast-grad-cache: backward() without a cached forward in this step.")
        forward, originals, leaves = self._pending
        self._pending = None
        scaled = scaler.scale(total_loss) if scaler is not None else total_loss
        embedding_grads, extra_grads = loss_gradients(scaled, forward.embeddings, leaves)
        del scaled, total_loss
        forward.release_embeddings()
        forward.backward(embedding_grads, originals, extra_grads)


class ChunkedTeacher:
    """The ``--distill-*`` teacher, run in chunks of ``chunk_size`` samples (open_clip calls it under no_grad):
    per-sample outputs are concatenated, the others (logit scale/bias) taken from the first chunk."""

    def __init__(self, model: torch.nn.Module, chunk_size: int):
        self._model, self._chunk_size = model, chunk_size

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def eval(self):
        self._model.eval()
        return self

    def __call__(self, images: torch.Tensor, texts: torch.Tensor):
        count = images.shape[0]
        outs = [self._model(images[i:i + self._chunk_size], texts[i:i + self._chunk_size])
                for i in range(0, count, self._chunk_size)]
        if len(outs) == 1:
            return outs[0]
        per_sample = [k for k, v in outs[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0
                      and v.shape[0] == min(self._chunk_size, count)]
        return {k: torch.cat([o[k] for o in outs]) if k in per_sample else v for k, v in outs[0].items()}


def grad_cache_train_one_epoch(original: Callable, chunk_size: int) -> Callable:
    """``open_clip_train.train.train_one_epoch`` (``original``), run with the cached step of ``chunk_size``."""
    import open_clip_train.train as train_module
    from open_clip_train.precision import get_autocast

    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        check_args(args, chunk_size)
        autocast = get_autocast(args.precision, device_type=torch.device(args.device).type)
        caption_pad_id = None
        if any(cls.__name__ == "CoCaLoss" for cls in type(loss).__mro__):
            if not isinstance(loss, CoCaLoss):
                raise ValueError("--fastcontrast-grad-cache with a CoCa model needs fastcontrast's CoCaLoss (run "
                                 "through python -m fastcontrast.open_clip_train, which patches open_clip's), got "
                                 f"{type(loss).__module__}.{type(loss).__qualname__}.")
            caption_pad_id = loss.caption_loss.ignore_index
            loss = CachedCaptionCoCaLoss(loss)
        cached_model = CachedStepModel(model, chunk_size, autocast, caption_pad_id)
        teacher = ChunkedTeacher(dist_model, chunk_size) if dist_model is not None else None
        original_backward = train_module.backward
        train_module.backward = cached_model.backward
        try:
            return original(cached_model, data, loss, epoch, optimizer, scaler, scheduler, teacher, args,
                            tb_writer=tb_writer)
        finally:
            train_module.backward = original_backward

    return train_one_epoch


@contextlib.contextmanager
def patch_open_clip_train(chunk_size: int):
    """While active, ``open_clip_train.main`` trains each epoch with the cached step of ``chunk_size``."""
    import open_clip_train.main as main_module
    import open_clip_train.train as train_module

    for module, name in ((main_module, "train_one_epoch"), (train_module, "backward")):
        if not callable(getattr(module, name, None)):
            raise ImportError(f"--fastcontrast-grad-cache needs {module.__name__}.{name} (open_clip_train 3.x); "
                              "this open_clip_train has none.")
    original = main_module.train_one_epoch
    main_module.train_one_epoch = grad_cache_train_one_epoch(original, chunk_size)
    try:
        yield
    finally:
        main_module.train_one_epoch = original
