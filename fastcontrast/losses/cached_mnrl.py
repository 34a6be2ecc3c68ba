"""sentence-transformers 6.2.0 ``CachedMultipleNegativesRankingLoss`` and its deprecated symmetric alias, with
the loss computed once, blockwise, over the whole batch.

The step is GradCache's (docs/cached_step.md): every column is embedded in mini-batches without grad, the RNG
state saved before each; the loss and its gradient w.r.t. every embedding are computed; the loss is returned
as a leaf whose ``backward()`` re-forwards each mini-batch with its RNG state replayed and backpropagates the
cached gradients. 6.2.0 computes the loss per mini-batch of rows against all candidates, with a backward per
mini-batch (and, with ``gather_across_devices``, a reduce-scatter per mini-batch); here it is one call of
:class:`~fastcontrast.losses.mnrl.MultipleNegativesRankingLoss` over all embeddings, O(N·(1 + k)·d) memory, its
collectives once per step. The mini-batches are 6.2.0's own (its slicing, padding trimmed per mini-batch, or
packed by ``mini_batch_num_tokens``), so a model with dropout draws the same masks and the parameters' gradients
are 6.2.0's to rounding.

As in 6.2.0, the hyperparameters live on the wrapped (non-cached) loss, ``self.loss``, and the attributes of
the same names read and write them there; ``calculate_loss(reps, labels, with_backward=...)`` is the seam
``MatryoshkaLoss`` decorates (``uses_gradient_cache = True``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from fastcontrast.losses._cached_st import (
    ModelEmbedding,
    check_mini_batches,
    check_not_static_embedding,
    forward_cached,
)
from fastcontrast.losses.mnrl import MultipleNegativesRankingLoss, _similarity_name, cos_sim

_DELEGATED = ("scale", "similarity_fct", "gather_across_devices", "directions", "partition_mode", "hardness_mode",
              "hardness_strength", "backend", "chunk_bytes", "process_group", "false_negative_margin")


def _delegated(name: str) -> property:
    return property(lambda self: getattr(self.loss, name), doc=f"The wrapped loss's ``{name}``.")


class CachedMultipleNegativesRankingLoss(nn.Module):
    """Drop-in for sentence-transformers 6.2.0 ``CachedMultipleNegativesRankingLoss``: GradCache with the loss
    computed once over the whole batch (see the module doc).

    Same constructor, ``forward(sentence_features, labels)``, ``calculate_loss``, ``get_config_dict()``,
    ``temperature``, ``citation`` and trainer contract (the returned loss's ``backward()`` runs the re-forward);
    same value and parameter gradients.

    Args:
        model: the SentenceTransformer (None: only :meth:`calculate_loss` works).
        scale, similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
            hardness_strength: 6.2.0's, same defaults; see :class:`~fastcontrast.MultipleNegativesRankingLoss`.
        mini_batch_size: rows per mini-batch of the two embedding passes (>= 1); the loss has no mini-batches.
        mini_batch_num_tokens: if set, mini-batches are packed by non-padding token count instead (6.2.0's).
        show_progress_bar: a tqdm bar over the mini-batches of each embedding pass.
        backend, chunk_bytes, process_group, false_negative_margin: fastcontrast's options of
            :class:`~fastcontrast.MultipleNegativesRankingLoss`, keyword-only.
    """

    uses_gradient_cache = True

    def __init__(
        self,
        model: Optional[nn.Module],
        scale: float = 20.0,
        similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        process_group=None,
        false_negative_margin: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_not_static_embedding(model, type(self).__name__, "MultipleNegativesRankingLoss")
        check_mini_batches(mini_batch_size, mini_batch_num_tokens, show_progress_bar)
        self.model = model
        self.loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, backend=backend, chunk_bytes=chunk_bytes,
            process_group=process_group, false_negative_margin=false_negative_margin,
        )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    scale = _delegated("scale")
    similarity_fct = _delegated("similarity_fct")
    gather_across_devices = _delegated("gather_across_devices")
    directions = _delegated("directions")
    partition_mode = _delegated("partition_mode")
    hardness_mode = _delegated("hardness_mode")
    hardness_strength = _delegated("hardness_strength")
    backend = _delegated("backend")
    chunk_bytes = _delegated("chunk_bytes")
    process_group = _delegated("process_group")
    false_negative_margin = _delegated("false_negative_margin")

    def __setattr__(self, name: str, value: Any) -> None:
        # As 6.2.0: `loss.scale = 5.0` sets the wrapped loss's scale (the property has no setter).
        if name in _DELEGATED and isinstance(getattr(self, "loss", None), nn.Module):
            setattr(self.loss, name, value)
        else:
            super().__setattr__(name, value)

    def calculate_loss(self, reps: list[list[torch.Tensor]], labels: Optional[torch.Tensor] = None, *,
                       with_backward: bool = False) -> torch.Tensor:
        """The loss of the embeddings ``reps`` (``reps[j]``: column j as consecutive row blocks, each [rows, d]),
        once over the whole batch. With ``with_backward``, backpropagate into ``reps`` (their ``.grad``) and return
        the loss detached. Labels are unused."""
        embeddings = [column[0] if len(column) == 1 else torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """The loss of the batch; under grad mode, its ``backward()`` re-forwards the mini-batches."""
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        if self.model is None:
            raise ValueError(f"{type(self).__name__}.forward needs the `model` given at construction.")
        return forward_cached(self, sentence_features, ModelEmbedding(self.model),
                              lambda forward, reps, with_backward: self.calculate_loss(
                                  reps, labels, with_backward=with_backward))

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_name(self.similarity_fct),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _CITATION


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """Drop-in for sentence-transformers 6.2.0 ``CachedMultipleNegativesSymmetricRankingLoss``: deprecated there,
    and exactly :class:`CachedMultipleNegativesRankingLoss` with ``directions=("query_to_doc", "doc_to_query")``
    and ``partition_mode="per_direction"``."""

    def __init__(
        self,
        model: Optional[nn.Module],
        scale: float = 20.0,
        similarity_fct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
        *,
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__(
            model=model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens, gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
            show_progress_bar=show_progress_bar, backend=backend, chunk_bytes=chunk_bytes, process_group=process_group,
        )


_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
