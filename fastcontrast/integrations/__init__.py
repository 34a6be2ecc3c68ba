"""One line to use fastcontrast inside the trainers people already run.

    from fastcontrast.integrations import patch_open_clip
    patch_open_clip()                     # open_clip's create_loss now builds fastcontrast losses
    patch_sentence_transformers()         # losses.MultipleNegativesRankingLoss(model) is now fastcontrast's

    with patch_lightly(backend="torch"):  # or scoped, undone on exit
        ...

Each ``patch_*`` function rebinds the library's loss classes to fastcontrast's wherever the library looks
them up, and returns a :class:`Patch` handle (``handle.undo()``, idempotent; also a context manager).
``backend=`` and ``chunk_bytes=`` become the defaults of every loss the library constructs while patched.
The replacements take the originals' constructor and ``forward`` arguments and give their values and
gradients (README.md#swapping-each-loss); inputs are the same shapes as the originals'.

Importing this module imports none of the libraries; each function imports its own when called, and
raises an ImportError naming the pip package when it is missing. For open_clip's command line, see
``python -m fastcontrast.open_clip_train``.
"""

from __future__ import annotations

from typing import Optional

import fastcontrast
from fastcontrast.integrations._patching import Patch, check_options, import_library, patch_names, with_options

__all__ = ["Patch", "patch_lightly", "patch_open_clip", "patch_pytorch_metric_learning", "patch_sentence_transformers"]

OPEN_CLIP_LOSSES = ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")
LIGHTLY_LOSSES = {"NTXentLoss": "lightly.loss.ntx_ent_loss", "DCLLoss": "lightly.loss.dcl_loss",
                  "DCLWLoss": "lightly.loss.dcl_loss"}


def patch_open_clip(*, backend: str = "auto", chunk_bytes: Optional[int] = None) -> Patch:
    """Make open_clip (3.x) build fastcontrast's ``ClipLoss``, ``SigLipLoss``, ``CoCaLoss`` and ``DistillClipLoss``.

    Rebinds those names in ``open_clip.loss`` (where they are defined), in ``open_clip.factory`` (which
    ``create_loss`` — and so ``open_clip_train`` — reads; it imported them at import time), in the top-level
    ``open_clip`` package, and in any other imported ``open_clip`` / ``open_clip_train`` module that holds
    them. Classes open_clip already derived from the originals are not affected.

    The losses take the same inputs as open_clip's: image/text features ``[n, d]`` (``[n, L, V]`` caption
    logits and ``[n, L]`` labels for CoCa; teacher features ``[n, d_t]`` for distillation), the exponentiated
    ``logit_scale``, SigLIP's ``logit_bias``, ``output_dict=``; distributed flags behave as in open_clip.

    Args:
        backend: default ``backend=`` of the losses: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        chunk_bytes: default ``chunk_bytes=`` (logits bytes per chunk for the torch engine); None = its default.

    Returns:
        A :class:`Patch`; ``undo()`` (or leaving its ``with`` block) restores open_clip's classes.

    Raises:
        ImportError: open_clip is not installed (``pip install open_clip_torch``) or does not import.
        ValueError: an unknown ``backend`` or a ``chunk_bytes`` that is not a positive int.
    """
    check_options(backend, chunk_bytes)
    import_library("open_clip", "open_clip_torch", "patch_open_clip")
    names = [
        ("open_clip.loss", name, with_options(getattr(fastcontrast, name), backend, chunk_bytes))
        for name in OPEN_CLIP_LOSSES
    ]
    return patch_names("open_clip", names, ("open_clip.factory", "open_clip"), ("open_clip", "open_clip_train"))


def patch_lightly(*, backend: str = "auto", chunk_bytes: Optional[int] = None) -> Patch:
    """Make lightly (1.6) use fastcontrast's ``NTXentLoss``, ``DCLLoss`` and ``DCLWLoss``.

    Rebinds ``lightly.loss.NTXentLoss`` and its defining module ``lightly.loss.ntx_ent_loss`` (likewise
    ``lightly.loss.dcl_loss`` for the DCL losses), plus any other imported ``lightly`` module holding them.
    Classes lightly already derived from the originals (``DirectCLRLoss``) keep their original base.

    Inputs are lightly's: ``forward(out0, out1)`` with two views ``[n, d]``; memory bank and
    ``gather_distributed`` behave as in lightly.

    Args:
        backend, chunk_bytes: defaults for the losses constructed while patched (see :func:`patch_open_clip`).

    Returns:
        A :class:`Patch` that restores lightly's classes.

    Raises:
        ImportError: lightly is not installed (``pip install lightly``) or does not import.
        ValueError: an unknown ``backend`` or a bad ``chunk_bytes``.
    """
    check_options(backend, chunk_bytes)
    import_library("lightly.loss", "lightly", "patch_lightly")
    names = [
        (defining, name, with_options(getattr(fastcontrast, name), backend, chunk_bytes))
        for name, defining in LIGHTLY_LOSSES.items()
    ]
    return patch_names("lightly", names, ("lightly.loss",), ("lightly",))


def patch_pytorch_metric_learning(*, backend: str = "auto", chunk_bytes: Optional[int] = None) -> Patch:
    """Make pytorch-metric-learning (2.x) use fastcontrast's ``SupConLoss``.

    Rebinds ``pytorch_metric_learning.losses.SupConLoss`` and its defining module
    ``pytorch_metric_learning.losses.supcon_loss``, plus any other imported PML module holding it.

    Inputs are PML's: ``forward(embeddings [n, d], labels [n], indices_tuple=None, ref_emb=None,
    ref_labels=None)``, a miner's ``indices_tuple`` included (``CrossBatchMemory`` passes one), and so are
    PML's constructor keywords (``distance=``, ``reducer=``, ``embedding_regularizer=``; see
    :class:`fastcontrast.SupConLoss` for which run blockwise).

    Args:
        backend, chunk_bytes: defaults for the losses constructed while patched (see :func:`patch_open_clip`).

    Returns:
        A :class:`Patch` that restores PML's class.

    Raises:
        ImportError: PML is not installed (``pip install pytorch-metric-learning``) or does not import.
        ValueError: an unknown ``backend`` or a bad ``chunk_bytes``.
    """
    check_options(backend, chunk_bytes)
    import_library("pytorch_metric_learning.losses", "pytorch-metric-learning", "patch_pytorch_metric_learning")
    names = [("pytorch_metric_learning.losses.supcon_loss", "SupConLoss",
              with_options(fastcontrast.SupConLoss, backend, chunk_bytes))]
    return patch_names("pytorch_metric_learning", names, ("pytorch_metric_learning.losses",),
                       ("pytorch_metric_learning",))


SENTENCE_TRANSFORMERS_LOSSES = {
    "MultipleNegativesRankingLoss": "sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking",
    "MultipleNegativesSymmetricRankingLoss":
        "sentence_transformers.sentence_transformer.losses.multiple_negatives_symmetric_ranking",
    "GISTEmbedLoss": "sentence_transformers.sentence_transformer.losses.gist_embed",
    "CachedMultipleNegativesRankingLoss":
        "sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking",
    "CachedMultipleNegativesSymmetricRankingLoss":
        "sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_symmetric_ranking",
    "CachedGISTEmbedLoss": "sentence_transformers.sentence_transformer.losses.cached_gist_embed",
}


def patch_sentence_transformers(*, backend: str = "auto", chunk_bytes: Optional[int] = None) -> Patch:
    """Make sentence-transformers (6.2) use fastcontrast's ``MultipleNegativesRankingLoss``,
    ``MultipleNegativesSymmetricRankingLoss``, ``GISTEmbedLoss`` and their Cached* versions
    (``CachedMultipleNegativesRankingLoss``, ``CachedMultipleNegativesSymmetricRankingLoss``,
    ``CachedGISTEmbedLoss``).

    Rebinds them in their defining modules, in ``sentence_transformers.sentence_transformer.losses`` (which
    ``sentence_transformers.losses``, the deprecated spelling, is an alias of: the same module object), and in
    any other imported ``sentence_transformers`` module holding them; so ``MultipleNegativesRankingLoss(model)``
    in unchanged user code builds the drop-in, also inside ``MatryoshkaLoss`` (which calls the inner loss's
    ``forward`` with the model's forward decorated, as with the original, or, for a Cached* loss, decorates its
    ``calculate_loss``). Classes sentence-transformers already derived from the originals
    (``SparseMultipleNegativesRankingLoss``) keep their original base. The Cached* losses compute the loss once
    over the whole batch and return it with 6.2.0's trainer contract: ``loss.backward()`` re-embeds each
    mini-batch with its RNG state replayed.

    Inputs are sentence-transformers': ``forward(sentence_features, labels)`` (and MNRL's
    ``compute_loss_from_embeddings(embeddings, labels)``), with the constructors' options as in 6.2.0.

    Args:
        backend, chunk_bytes: defaults for the losses constructed while patched (see :func:`patch_open_clip`).

    Returns:
        A :class:`Patch` that restores sentence-transformers' classes.

    Raises:
        ImportError: sentence-transformers is not installed (``pip install sentence-transformers``) or does
            not import.
        ValueError: an unknown ``backend`` or a bad ``chunk_bytes``.
    """
    check_options(backend, chunk_bytes)
    import_library("sentence_transformers.sentence_transformer.losses", "sentence-transformers",
                   "patch_sentence_transformers")
    names = [
        (defining, name, with_options(getattr(fastcontrast, name), backend, chunk_bytes))
        for name, defining in SENTENCE_TRANSFORMERS_LOSSES.items()
    ]
    return patch_names("sentence_transformers", names, ("sentence_transformers.sentence_transformer.losses",),
                       ("sentence_transformers",))
