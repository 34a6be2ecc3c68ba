"""The losses as functions, one import away: ``fastcontrast.functional.clip_loss`` and the rest.

Each function lives with its family in :mod:`fastcontrast.losses` (checks, then the differentiable core plus
O(n·d) torch ops: docs/kernels.md#the-math-two-log-sum-exps); this module gathers them under their import names.
"""

from fastcontrast.losses._common import normalize_rows
from fastcontrast.losses.clip import clip_loss
from fastcontrast.losses.distill import distill_clip_loss
from fastcontrast.losses.gist import gist_embed_loss
from fastcontrast.losses.mnrl import multiple_negatives_ranking_loss
from fastcontrast.losses.ntxent import dcl_loss, negative_mises_fisher_weights, nt_xent_loss, nt_xent_memory_bank_loss
from fastcontrast.losses.siglip import siglip_loss
from fastcontrast.losses.supcon import supcon_anchor_losses, supcon_anchor_losses_with_distance, supcon_loss

__all__ = [
    "clip_loss",
    "dcl_loss",
    "distill_clip_loss",
    "gist_embed_loss",
    "multiple_negatives_ranking_loss",
    "negative_mises_fisher_weights",
    "normalize_rows",
    "nt_xent_loss",
    "nt_xent_memory_bank_loss",
    "siglip_loss",
    "supcon_anchor_losses",
    "supcon_anchor_losses_with_distance",
    "supcon_loss",
]
