"""What sentence-transformers' Cached* drop-ins share: 6.2.0's mini-batches, and its trainer contract on top of
:class:`~fastcontrast.cached.ChunkedForward`.

6.2.0 (``sentence_transformers.base.losses.gradcache``) embeds every column in mini-batches without grad,
saving the RNG state before each; computes the loss per mini-batch of rows with ``backward()`` into the
embeddings; and returns the loss detached, with a hook that re-forwards each mini-batch (RNG replayed) and
backpropagates the cached embedding gradients when the trainer calls ``loss.backward()``. Here phases 1 and 3
are :class:`~fastcontrast.cached.ChunkedForward` over the same mini-batches (6.2.0's own slicing, so that a
model with dropout draws the same masks on tensors of the same shapes), and phase 2 is one blockwise loss over
the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastcontrast._validation import check_flags, check_positive_int
from fastcontrast.cached import ChunkedForward

# calculate(forward, reps, with_backward) -> the loss; reps[j] is column j's embeddings, as a list of tensors
# whose rows follow each other (6.2.0 passes one tensor per mini-batch, the drop-ins one per column).
Calculate = Callable[[ChunkedForward, List[List[torch.Tensor]], bool], torch.Tensor]


def check_mini_batches(mini_batch_size: object, mini_batch_num_tokens: object, show_progress_bar: object) -> None:
    check_positive_int("mini_batch_size", mini_batch_size, what="rows per mini-batch of the embedding passes")
    if mini_batch_num_tokens is not None:
        check_positive_int("mini_batch_num_tokens", mini_batch_num_tokens,
                           what="tokens per mini-batch, or None")
    check_flags(show_progress_bar=show_progress_bar)


def check_not_static_embedding(model: Optional[nn.Module], what: str, instead: str) -> None:
    """6.2.0's refusal of a StaticEmbedding model, whose features have no batch dimension to cut."""
    if model is None:
        return
    from sentence_transformers.base.losses.gradcache import has_static_embedding_input

    if has_static_embedding_input(model):
        raise ValueError(f"{what} is not compatible with a SentenceTransformer model based on a StaticEmbedding, "
                         f"whose inputs cannot be split into mini-batches along a batch dimension. Consider using "
                         f"{instead} instead.")


class ModelEmbedding:
    """The encoder of every column: ``model(features)["sentence_embedding"]`` for one mini-batch.

    The model writes its outputs into the features it gets, so it gets a shallow copy: the mini-batches kept for
    the re-forward must not hold the embedding pass's activations.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, features: dict) -> torch.Tensor:
        return self.model(dict(features))["sentence_embedding"]


def _minibatch_split(mini_batch_num_tokens: Optional[int]):
    from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges

    def split(features: dict, mini_batch_size: int) -> list:
        return [(slice(begin, end), _create_minibatch(features, begin, end))
                for begin, end in _minibatch_ranges(features, mini_batch_size, mini_batch_num_tokens)]

    return split


def _tqdm_progress(chunks, desc: str):
    import tqdm

    return tqdm.tqdm(chunks, desc=desc)


def forward_cached(loss: Any, sentence_features: list, encoder: Callable[[dict], torch.Tensor],
                   calculate: Calculate) -> torch.Tensor:
    """The Cached* ``forward``: phase 1 over every column (mini-batches of ``loss.mini_batch_size`` rows, or of
    ``loss.mini_batch_num_tokens`` tokens), phase 2 by ``calculate``, and the loss returned as a leaf whose
    ``backward()`` runs phase 3 (:meth:`ChunkedForward.defer_backward`). Without grad mode (evaluation), the
    loss alone."""
    model = getattr(loss.model, "_orig_mod", loss.model)
    forward = ChunkedForward(
        encoder, sentence_features, loss.mini_batch_size, split=_minibatch_split(loss.mini_batch_num_tokens),
        progress=_tqdm_progress if loss.show_progress_bar else None,
        ddp_modules=(model,) if isinstance(model, DistributedDataParallel) else (),
    )
    reps = [[embedding] for embedding in forward.embeddings]
    if not torch.is_grad_enabled():
        return calculate(forward, reps, False)
    value = calculate(forward, reps, True)
    grads = [embedding.grad for embedding in forward.embeddings]
    unused = [str(j) for j, grad in enumerate(grads) if grad is None]
    if unused:
        # 6.2.0's message; the re-forward would otherwise have no gradient to backpropagate for these columns.
        raise ValueError(
            f"The loss computation of {type(loss).__name__} did not use input column(s) {', '.join(unused)}: their "
            "embeddings received no gradient. Every input column is embedded (twice, with gradient caching), so "
            "remove the unused column(s) from the dataset instead."
        )
    del reps
    forward.release_embeddings()
    return forward.defer_backward(value, grads)
