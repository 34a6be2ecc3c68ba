"""Naive full-matrix losses: the ground truth for tests and benchmarks, one module per loss family.

Each function reproduces the original library's math line for line, in the input dtype, materialising the
full logits matrix exactly as the original does (that is the point: it is what fastcontrast replaces).

- :func:`clip_loss_reference`: open_clip 3.x ``ClipLoss.forward`` for one process.
- :func:`siglip_loss_reference`: open_clip 3.x ``SigLipLoss._loss`` for one process.
- :func:`nt_xent_loss_reference`: lightly 1.6 ``NTXentLoss.forward`` without a memory bank.
- :func:`dcl_loss_reference`: lightly 1.6 ``DCLLoss`` / ``DCLWLoss`` for one process.
- :func:`nt_xent_memory_bank_loss_reference`: lightly 1.6 ``NTXentLoss.forward`` with a memory bank
  (the bank tensor is passed in; reading and enqueueing it is :class:`fastcontrast.memory_bank.MemoryBank`).
- :func:`mnrl_loss_reference`: sentence-transformers 6.2.0 ``MultipleNegativesRankingLoss`` (any similarity).
- :func:`gist_loss_reference`: sentence-transformers 6.2.0 ``GISTEmbedLoss`` from embeddings.
"""

from fastcontrast.reference.clip import (
    caption_loss_reference,
    clip_logits_reference,
    clip_loss_local_reference,
    clip_loss_reference,
    distill_clip_loss_from_logits_reference,
    distill_clip_loss_reference,
    distill_logits_reference,
)
from fastcontrast.reference.mnrl import (
    gist_loss_reference,
    mnrl_loss_reference,
)
from fastcontrast.reference.ntxent import (
    dcl_loss_gathered_reference,
    dcl_loss_reference,
    lightly_normalize,
    nt_xent_loss_gathered_reference,
    nt_xent_loss_reference,
    nt_xent_memory_bank_loss_reference,
)
from fastcontrast.reference.siglip import (
    siglip_loss_reference,
)
from fastcontrast.reference.supcon import (
    cosine_similarity_reference,
    supcon_anchor_losses_reference,
    supcon_loss_reference,
    supcon_pairs_reference,
)

__all__ = [
    "caption_loss_reference",
    "clip_logits_reference",
    "clip_loss_local_reference",
    "clip_loss_reference",
    "cosine_similarity_reference",
    "dcl_loss_gathered_reference",
    "dcl_loss_reference",
    "distill_clip_loss_from_logits_reference",
    "distill_clip_loss_reference",
    "distill_logits_reference",
    "gist_loss_reference",
    "lightly_normalize",
    "mnrl_loss_reference",
    "nt_xent_loss_gathered_reference",
    "nt_xent_loss_reference",
    "nt_xent_memory_bank_loss_reference",
    "siglip_loss_reference",
    "supcon_anchor_losses_reference",
    "supcon_loss_reference",
    "supcon_pairs_reference",
]
