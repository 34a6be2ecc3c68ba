"""sentence-transformers 6.2.0 ``CachedGISTEmbedLoss``, with the loss computed once, blockwise, over the whole
batch.

The step is GradCache's, as in :mod:`fastcontrast.losses.cached_mnrl`: every column is embedded in 6.2.0's
mini-batches without grad, the guide model embedding each mini-batch right after the model (so a guide that
draws random numbers leaves the RNG stream where 6.2.0's does); the loss is one call of
:func:`~fastcontrast.losses.gist.gist_embed_loss` over all embeddings (the guide's similarities only form the
mask, computed in the tile beside the model's); its ``backward()`` re-forwards the model's mini-batches, not the
guide's, with their RNG state replayed. 6.2.0 builds, per mini-batch of anchors, each block and its guide twin
as [mini, N] matrices through a [mini, N, d] broadcast, with a backward per mini-batch.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from fastcontrast.losses._cached_st import check_mini_batches, check_not_static_embedding, forward_cached
from fastcontrast.losses.gist import _token_rows, gist_embed_loss, set_gist_options


class GuidedEmbedding:
    """The encoder of every column: the model's embedding of one mini-batch; in the embedding pass the guide
    embeds the same mini-batch right after (no grad), into ``guide_embeddings``, as 6.2.0 does: the guide gets
    the mini-batch the model ran on, or, when the tokenizers differ, its texts decoded and retokenised. Set
    ``with_guide = False`` before the re-forward, which needs the model's embeddings only."""

    def __init__(self, model: nn.Module, guide: nn.Module, tokenizer: Optional[Any]):
        self.model, self.guide, self.tokenizer = model, guide, tokenizer
        self.with_guide = True
        self.guide_embeddings: list[torch.Tensor] = []

    def __call__(self, features: dict) -> torch.Tensor:
        features = dict(features)  # the model writes its outputs into it; the kept mini-batch must not hold them
        embedding = self.model(features)["sentence_embedding"]
        if self.with_guide:
            from sentence_transformers.util import batch_to_device

            with torch.no_grad():
                if self.tokenizer is not None:
                    texts = self.tokenizer.batch_decode(_token_rows(features), skip_special_tokens=True)
                    features = batch_to_device(self.guide.preprocess(texts), self.guide.device)
                self.guide_embeddings.append(self.guide(features)["sentence_embedding"].detach())
        return embedding


class CachedGISTEmbedLoss(nn.Module):
    """Drop-in for sentence-transformers 6.2.0 ``CachedGISTEmbedLoss``: GradCache with the loss computed once over
    the whole batch (see the module doc).

    Same constructor and checks, ``forward(sentence_features, labels)``, ``calculate_loss``, ``get_config_dict()``
    and trainer contract (the returned loss's ``backward()`` runs the re-forward); same value and parameter
    gradients. Plus keyword-only ``backend=`` (``"auto"``/``"triton"``/``"torch"``/``"reference"``), ``chunk_bytes=``
    and ``process_group=``, as :class:`~fastcontrast.GISTEmbedLoss`.

    Args:
        model, guide: the SentenceTransformer being trained and the guide (None, None: only
            :meth:`calculate_loss` works).
        temperature, margin_strategy, margin, contrast_anchors, contrast_positives, gather_across_devices:
            6.2.0's, same defaults; see :class:`~fastcontrast.GISTEmbedLoss`.
        mini_batch_size: rows per mini-batch of the two embedding passes (>= 1); the loss has no mini-batches.
        mini_batch_num_tokens: if set, mini-batches are packed by non-padding token count instead (6.2.0's).
        show_progress_bar: a tqdm bar over the mini-batches of each embedding pass.
    """

    uses_gradient_cache = True

    def __init__(
        self,
        model: Optional[nn.Module],
        guide: Optional[nn.Module],
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        show_progress_bar: bool = False,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__()
        check_not_static_embedding(model, type(self).__name__, "GISTEmbedLoss")
        check_mini_batches(mini_batch_size, mini_batch_num_tokens, show_progress_bar)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        set_gist_options(self, model, guide, temperature, margin_strategy, margin, contrast_anchors,
                         contrast_positives, gather_across_devices, backend, chunk_bytes, process_group)

    def calculate_loss(self, reps: list[list[torch.Tensor]], reps_guided: list[list[torch.Tensor]], *,
                       with_backward: bool = False) -> torch.Tensor:
        """The loss of the model's embeddings ``reps`` and the guide's ``reps_guided`` (column j as consecutive row
        blocks, each [rows, d]), once over the whole batch. With ``with_backward``, backpropagate into ``reps``
        (their ``.grad``) and return the loss detached."""
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        embeddings, guide_embeddings = ([column[0] if len(column) == 1 else torch.cat(column) for column in columns]
                                        for columns in (reps, reps_guided))
        loss = gist_embed_loss(
            embeddings, guide_embeddings, self.temperature, self.margin_strategy, self.margin, self.contrast_anchors,
            self.contrast_positives, gather_across_devices=self.gather_across_devices,
            process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
        )
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """The loss of the batch; under grad mode, its ``backward()`` re-forwards the model's mini-batches."""
        sentence_features = list(sentence_features)
        if len(sentence_features) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 inputs (anchor, positive[, negative]), got {len(sentence_features)}")
        if self.model is None or self.guide is None:
            raise ValueError(f"{type(self).__name__}.forward needs the `model` and `guide` given at construction.")
        embedder = GuidedEmbedding(self.model, self.guide, self.tokenizer if self.must_retokenize else None)

        def calculate(forward, reps, with_backward):
            embedder.with_guide = False
            reps_guided: list[list[torch.Tensor]] = [[] for _ in reps]
            for chunk, guide_embedding in zip(forward.chunks, embedder.guide_embeddings):
                reps_guided[chunk.input_index].append(guide_embedding)
            return self.calculate_loss(reps, reps_guided, with_backward=with_backward)

        return forward_cached(self, sentence_features, embedder, calculate)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "guide": self.guide,
            "temperature": self.temperature,
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "margin_strategy": self.margin_strategy,
            "margin": self.margin,
            "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives,
            "gather_across_devices": self.gather_across_devices,
        }
