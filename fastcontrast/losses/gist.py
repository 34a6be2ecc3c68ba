"""GISTEmbed: sentence-transformers 6.2.0 ``GISTEmbedLoss``, with the guide's mask computed in the tile.

For anchors a [n, d], positives p [n, d] and optional negatives q [n, d] (and the guide model's embeddings
of the same texts, a_g, p_g, q_g), with cosine similarities and s = 1/temperature, row i's logits are the
blocks s·cos(aᵢ, p), s·cos(aᵢ, a) (``contrast_anchors``), s·cos(pᵢ, p) (``contrast_positives``) and
s·cos(aᵢ, q), each over every rank's rows where 6.2.0 gathers them (p and q; the anchors stay local). An entry
is left out when the guide rates it above the positive: guide cos > tᵢ with tᵢ = gᵢ − margin ("absolute") or
gᵢ − |gᵢ|·margin ("relative"), gᵢ = cos(a_gᵢ, p_g[off + i]); the true positive itself is never left out.
The loss is the mean over local rows of (LSE over all blocks − s·cos(aᵢ, p[off + i])).

6.2.0 builds each block and its guide twin as [n, m] matrices, through a [n, m, d] broadcast in
``nn.CosineSimilarity``. Here each block is one :func:`~fastcontrast.losses._masked_lse.guide_masked_lse`
call: the model's and the guide's tiles side by side, O(chunk·m) memory on the blockwise torch engine, one
pass of the Triton engine's masked kernels (kernels/masked.py) on CUDA. The threshold's gᵢ comes from
:func:`~fastcontrast.losses._masked_lse.rule_similarity`, in the arithmetic the engine's mask compares with, so
a candidate the guide rates exactly as the positive ties with it (a duplicate positive stays, as in 6.2.0).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcontrast import distributed, reference
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import check_backend, check_chunk_bytes, check_features, check_flags, check_pair
from fastcontrast.distributed import rank_mean
from fastcontrast.engine import compute_dtype
from fastcontrast.losses._masked_lse import guide_masked_lse, rule_similarity

MARGIN_STRATEGIES = ("absolute", "relative")


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.to(compute_dtype(x.dtype)), p=2, dim=-1).to(x.dtype)


def _check_gist_inputs(embeddings: object, guide_embeddings: object) -> tuple[list, list]:
    for name, value in (("embeddings", embeddings), ("guide_embeddings", guide_embeddings)):
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"`{name}` must be a list of [batch, dim] tensors (anchor, positive[, negative]), "
                            f"got {type(value).__name__}.")
        if len(value) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(value)} in `{name}`")
    if len(embeddings) != len(guide_embeddings):  # type: ignore[arg-type]
        raise ValueError(f"`embeddings` and `guide_embeddings` must have the same columns, got {len(embeddings)} "
                         f"and {len(guide_embeddings)}.")  # type: ignore[arg-type]
    for prefix, columns in (("embeddings", embeddings), ("guide_embeddings", guide_embeddings)):
        for j, x in enumerate(columns):  # type: ignore[arg-type]
            check_features(f"{prefix}[{j}]", x)
            if j:
                check_pair(f"{prefix}[0]", columns[0], f"{prefix}[{j}]", x, same_batch=True)  # type: ignore[index]
    if guide_embeddings[0].device != embeddings[0].device:  # type: ignore[index]
        # 6.2.0 applies the guide's mask to the model's logits, which needs one device too; a kernel would read
        # another device's memory.
        raise ValueError(f"`guide_embeddings` must be on the device of `embeddings`, got "
                         f"{guide_embeddings[0].device} and {embeddings[0].device}.")  # type: ignore[index]
    if guide_embeddings[0].shape[0] != embeddings[0].shape[0]:  # type: ignore[index]
        raise ValueError(f"`guide_embeddings` must have the batch size of `embeddings`, got "
                         f"{guide_embeddings[0].shape[0]} and {embeddings[0].shape[0]}.")  # type: ignore[index]
    return list(embeddings), list(guide_embeddings)  # type: ignore[arg-type]


def check_gist_options(temperature: object, margin_strategy: object, margin: object) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"`margin` must be a float, got {type(margin).__name__}.")


def gist_embed_loss(
    embeddings: Sequence[torch.Tensor],
    guide_embeddings: Sequence[torch.Tensor],
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    *,
    gather_across_devices: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """sentence-transformers 6.2.0 ``GISTEmbedLoss`` from embeddings (see the module doc).

    Args:
        embeddings: the model's ``[anchor, positive]`` or ``[anchor, positive, negative]``, each [n, d].
        guide_embeddings: the guide's embeddings of the same columns, each [n, d_g] (no gradient).
        temperature, margin_strategy, margin, contrast_anchors, contrast_positives: 6.2.0's.
        gather_across_devices: positives and negatives (and their guide rows) of every rank, gathered with
            gradient; anchors stay local; the label of row i is rank·n + i. No group: a single process.
        process_group: the group to gather over (None: the default group).
        backend: ``"auto"`` (Triton on CUDA, else the blockwise torch engine), ``"triton"``, ``"torch"`` or
            ``"reference"`` (6.2.0's full-matrix math). Triton takes fp16 / bf16 / fp32 embeddings and guides.
        chunk_bytes: bytes of one chunk of logits (None: the torch engine's default).
    Returns:
        0-dim loss, the mean over this rank's anchors; fp32 (fp64 for fp64 embeddings).
    """
    check_gist_options(temperature, margin_strategy, margin)
    check_backend(backend)
    check_chunk_bytes(chunk_bytes)
    check_flags(gather_across_devices=gather_across_devices, contrast_anchors=contrast_anchors,
                contrast_positives=contrast_positives)
    columns, guides = _check_gist_inputs(embeddings, guide_embeddings)
    group = distributed.resolve_gather_group(gather_across_devices, process_group, what="GISTEmbedLoss")
    # One engine for the model's and the guide's tiles: fp64 on either side goes to the torch engine.
    dtype = torch.promote_types(columns[0].dtype, guides[0].dtype)

    def check():
        return resolve_engine(backend, columns[0].device, dtype, chunk_bytes)

    layout = None
    if group is None:
        engine = check()
    else:
        engine, layout = distributed.exchange_layout(group, columns[0], check, what="GISTEmbedLoss",
                                                     name="embeddings[0]")
    offset = 0 if layout is None else layout.offset

    def gathered(x):
        return x if layout is None else distributed.gather_with_grad(x, group, layout)

    if engine is None:  # "reference"
        gathered_columns = [columns[0]] + [gathered(x) for x in columns[1:]]
        gathered_guides = [guides[0]] + [gathered(x) for x in guides[1:]]
        return reference.gist_loss_reference(gathered_columns, gathered_guides, columns[1], guides[1], temperature,
                                             margin_strategy, margin, contrast_anchors, contrast_positives,
                                             offset=offset)
    anchor, positive = _unit_rows(columns[0]), _unit_rows(columns[1])
    anchor_guide, positive_guide = _unit_rows(guides[0].detach()), _unit_rows(guides[1].detach())
    positive_all, positive_guide_all = gathered(positive), gathered(positive_guide)
    n = anchor.shape[0]
    cdt = compute_dtype(anchor.dtype)
    guide_positive = rule_similarity(anchor_guide, positive_guide_all, offset, backend=engine.name, guide=True,
                                     dtype=cdt, model_dtype=anchor.dtype)
    threshold = guide_positive - margin if margin_strategy == "absolute" else \
        guide_positive - guide_positive.abs() * margin
    scale = 1.0 / temperature

    def block(rows, cols, rows_guide, cols_guide, protect_offset=None):
        return guide_masked_lse(rows, cols, rows_guide, cols_guide, threshold, scale, protect_offset=protect_offset,
                                chunk_bytes=chunk_bytes, backend=engine.name)

    blocks = [block(anchor, positive_all, anchor_guide, positive_guide_all, protect_offset=offset)]
    if contrast_anchors:
        blocks.append(block(anchor, anchor, anchor_guide, anchor_guide))
    if contrast_positives:
        blocks.append(block(positive, positive_all, positive_guide, positive_guide_all))
    if len(columns) == 3:
        negative, negative_guide = _unit_rows(columns[2]), _unit_rows(guides[2].detach())
        blocks.append(block(anchor, gathered(negative), anchor_guide, gathered(negative_guide)))
    positive_logit = (anchor.to(cdt) * positive_all.narrow(0, offset, n).to(cdt)).sum(dim=1) * scale
    log_z = blocks[0] if len(blocks) == 1 else torch.logsumexp(torch.stack(blocks), dim=0)
    return rank_mean(log_z - positive_logit, layout)


def set_gist_options(loss: nn.Module, model, guide, temperature, margin_strategy, margin, contrast_anchors,
                     contrast_positives, gather_across_devices, backend, chunk_bytes, process_group) -> None:
    """Check 6.2.0's GISTEmbedLoss options and fastcontrast's and set them on ``loss`` (a GISTEmbedLoss or a
    CachedGISTEmbedLoss: the same attributes, which trainers and model cards read)."""
    name = type(loss).__name__
    loss.model = model
    loss.guide = guide
    loss.temperature = temperature
    loss.must_retokenize = False
    if model is not None or guide is not None:
        loss.must_retokenize = _check_models(model, guide)
        if loss.must_retokenize:
            loss.tokenizer = model.tokenizer  # type: ignore[union-attr]
    check_gist_options(temperature, margin_strategy, margin)
    check_flags(gather_across_devices=gather_across_devices, contrast_anchors=contrast_anchors,
                contrast_positives=contrast_positives)
    loss.margin_strategy = margin_strategy
    loss.margin = margin
    loss.contrast_anchors = contrast_anchors
    loss.contrast_positives = contrast_positives
    loss.gather_across_devices = gather_across_devices
    loss.backend = check_backend(backend)
    loss.chunk_bytes = check_chunk_bytes(chunk_bytes)
    if process_group is not None:
        distributed.resolve_gather_group(gather_across_devices, process_group, what=name)
    loss.process_group = process_group


class GISTEmbedLoss(nn.Module):
    """Drop-in for sentence-transformers 6.2.0 ``GISTEmbedLoss``, O(N·d) memory (see the module doc).

    Same constructor (``model``, ``guide``, ``temperature``, ``margin_strategy``, ``margin``,
    ``contrast_anchors``, ``contrast_positives``, ``gather_across_devices``) and checks, ``forward(
    sentence_features, labels)`` (the guide embeds the same texts, retokenised when its tokenizer differs, as in
    6.2.0), ``get_config_dict()`` and ``citation``; plus keyword-only ``backend=`` (``"auto"``/``"triton"``/
    ``"torch"``/``"reference"``), ``chunk_bytes=`` and ``process_group=``. :meth:`compute_loss_from_embeddings` takes
    the model's and the guide's embeddings directly.
    """

    def __init__(
        self,
        model: Optional[nn.Module],
        guide: Optional[nn.Module],
        temperature: float = 0.01,
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
        set_gist_options(self, model, guide, temperature, margin_strategy, margin, contrast_anchors,
                         contrast_positives, gather_across_devices, backend, chunk_bytes, process_group)

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """Embed every column with the model (with gradient) and the guide (without), then the loss."""
        from sentence_transformers.base.losses.merged_forward import embed_columns
        from sentence_transformers.util import batch_to_device

        sentence_features = list(sentence_features)
        # The guide writes its outputs into the dicts it gets: give it shallow copies, so that wrappers that
        # reuse the model's dicts (MatryoshkaLoss) do not see the guide's embeddings.
        guide_features = [dict(features) for features in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [
                    batch_to_device(self.guide.preprocess(self.tokenizer.batch_decode(
                        _token_rows(features), skip_special_tokens=True)), self.guide.device)
                    for features in sentence_features
                ]
            guide_embeddings = embed_columns(self.guide, guide_features)
        return self.compute_loss_from_embeddings(embeddings, guide_embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], guide_embeddings: list[torch.Tensor],
                                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of the model's ``[anchor, positive(, negative)]`` and the guide's embeddings of them."""
        return gist_embed_loss(
            embeddings, guide_embeddings, self.temperature, self.margin_strategy, self.margin,
            self.contrast_anchors, self.contrast_positives, gather_across_devices=self.gather_across_devices,
            process_group=self.process_group, backend=self.backend, chunk_bytes=self.chunk_bytes,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "guide": self.guide,
            "temperature": self.temperature,
            "margin_strategy": self.margin_strategy,
            "margin": self.margin,
            "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives,
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return _CITATION


def _check_models(model, guide) -> bool:
    """6.2.0's constructor checks on the two models; returns whether the guide needs the texts retokenised."""
    if not hasattr(model, "tokenizer") or not hasattr(guide, "tokenizer"):
        raise ValueError("Both the training model and the guiding model must have a tokenizer attribute.")
    from transformers import PreTrainedTokenizerBase

    if not isinstance(model.tokenizer, PreTrainedTokenizerBase) or not isinstance(guide.tokenizer,
                                                                                   PreTrainedTokenizerBase):
        raise ValueError(
            "Both the training model and the guiding model must use a PreTrainedTokenizer from transformers."
        )
    must_retokenize = (model.tokenizer.get_vocab() != guide.tokenizer.get_vocab()
                       or guide.max_seq_length < model.max_seq_length)
    if must_retokenize:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        if isinstance(model[0], StaticEmbedding):
            raise ValueError(
                "If we must retokenize because the guide model has a different tokenizer, "
                "then the Sentence Transformer model must not be based on a StaticEmbedding."
            )
    return must_retokenize


def _token_rows(features: dict) -> Any:
    """The token ids of each text: the padded [n, L] ids, or the pieces of a flattened (unpadded) batch."""
    input_ids = features["input_ids"]
    if "cu_seq_lens_q" not in features:
        return input_ids
    flat = input_ids[0].tolist()
    bounds = features["cu_seq_lens_q"].tolist()
    return [flat[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


_CITATION = """
@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
