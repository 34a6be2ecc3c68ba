"""The losses, one module per family: each holds the family's functional form(s), then its ``nn.Module``(s).

========================  ============================================================  ==================
module                    what it holds                                                  replaces
========================  ============================================================  ==================
:mod:`.clip`              ``clip_loss``, ``ClipLoss``, ``CoCaLoss``                      open_clip 3.x
:mod:`.distill`           ``distill_clip_loss``, ``DistillClipLoss``                     open_clip 3.x
:mod:`.siglip`            ``siglip_loss``, ``SigLipLoss``                                open_clip 3.x
:mod:`.ntxent`            ``nt_xent_loss`` (+ memory bank), ``dcl_loss``, ``NTXentLoss``,  lightly 1.6
                          ``DCLLoss``, ``DCLWLoss``
:mod:`.supcon`            ``supcon_loss`` and its per-anchor forms, ``SupConLoss``       PML 2.x
:mod:`.mnrl`              ``multiple_negatives_ranking_loss``,                           sentence-transformers
                          ``MultipleNegativesRankingLoss``,                              6.2.0
                          ``MultipleNegativesSymmetricRankingLoss``
:mod:`.gist`              ``gist_embed_loss``, ``GISTEmbedLoss`` (guide mask in the      sentence-transformers
                          tile: :mod:`._masked_lse`, torch engine)                       6.2.0
:mod:`.cached_mnrl`       ``CachedMultipleNegativesRankingLoss``,                        sentence-transformers
                          ``CachedMultipleNegativesSymmetricRankingLoss`` (GradCache     6.2.0
                          over :mod:`.mnrl`, the loss once per batch; what the Cached*
                          losses share is in :mod:`._cached_st`)
:mod:`.cached_gist`       ``CachedGISTEmbedLoss`` (GradCache over :mod:`.gist`)          sentence-transformers
                                                                                         6.2.0
========================  ============================================================  ==================

What several families share lives where it is shared: input checks in :mod:`fastcontrast._validation`,
gathers and layouts in :mod:`fastcontrast.distributed`, the differentiable core in :mod:`fastcontrast.autograd`,
the ring in :mod:`fastcontrast.ring`, and the few helpers only losses use in :mod:`._common`.
docs/adding_a_loss.md says what a new family touches.
"""

from fastcontrast.losses.cached_gist import CachedGISTEmbedLoss
from fastcontrast.losses.cached_mnrl import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
)
from fastcontrast.losses.clip import ClipLoss, CoCaLoss
from fastcontrast.losses.distill import DistillClipLoss
from fastcontrast.losses.gist import GISTEmbedLoss
from fastcontrast.losses.mnrl import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss
from fastcontrast.losses.ntxent import DCLLoss, DCLWLoss, NTXentLoss
from fastcontrast.losses.siglip import SigLipLoss
from fastcontrast.losses.supcon import SupConLoss

__all__ = ["CachedGISTEmbedLoss", "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
           "ClipLoss", "CoCaLoss", "DCLLoss", "DCLWLoss", "DistillClipLoss", "GISTEmbedLoss",
           "MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss", "NTXentLoss", "SigLipLoss",
           "SupConLoss"]

# The classes keep the public module they had before the split as their ``__module__``: a checkpoint that
# pickled a loss module (the memory bank's state, say) names ``fastcontrast.losses.NTXentLoss`` and keeps
# loading, whichever file the class lives in.
for _cls in (CachedGISTEmbedLoss, CachedMultipleNegativesRankingLoss, CachedMultipleNegativesSymmetricRankingLoss,
             ClipLoss, CoCaLoss, DCLLoss, DCLWLoss, DistillClipLoss, GISTEmbedLoss, MultipleNegativesRankingLoss,
             MultipleNegativesSymmetricRankingLoss, NTXentLoss, SigLipLoss, SupConLoss):
    _cls.__module__ = __name__
del _cls
