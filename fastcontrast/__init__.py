"""fastcontrast: blockwise contrastive losses with O(N·d) memory, drop-ins for open_clip, lightly and
pytorch-metric-learning and sentence-transformers.

    from fastcontrast import ClipLoss, SigLipLoss, NTXentLoss

Importing this package never touches CUDA and never imports triton.
"""

from fastcontrast.autograd import (
    BlockwiseDistill,
    BlockwiseLogSumExp,
    BlockwiseSigLipSum,
    blockwise_distill,
    blockwise_lse,
    blockwise_lse_and_positives,
    blockwise_siglip_sum,
)
from fastcontrast.cached import GradCache, PartialGradientError
from fastcontrast.functional import (
    clip_loss,
    dcl_loss,
    distill_clip_loss,
    gist_embed_loss,
    multiple_negatives_ranking_loss,
    negative_mises_fisher_weights,
    nt_xent_loss,
    nt_xent_memory_bank_loss,
    siglip_loss,
    supcon_loss,
)
from fastcontrast.losses import (
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
    ClipLoss,
    CoCaLoss,
    DCLLoss,
    DCLWLoss,
    DistillClipLoss,
    GISTEmbedLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
)

__version__ = "0.1.0"

__all__ = [
    "BlockwiseDistill",
    "BlockwiseLogSumExp",
    "BlockwiseSigLipSum",
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "ClipLoss",
    "CoCaLoss",
    "DCLLoss",
    "DCLWLoss",
    "DistillClipLoss",
    "GISTEmbedLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "GradCache",
    "NTXentLoss",
    "PartialGradientError",
    "SigLipLoss",
    "SupConLoss",
    "__version__",
    "blockwise_distill",
    "blockwise_lse",
    "blockwise_lse_and_positives",
    "blockwise_siglip_sum",
    "clip_loss",
    "dcl_loss",
    "distill_clip_loss",
    "gist_embed_loss",
    "multiple_negatives_ranking_loss",
    "negative_mises_fisher_weights",
    "nt_xent_loss",
    "nt_xent_memory_bank_loss",
    "siglip_loss",
    "supcon_loss",
]
