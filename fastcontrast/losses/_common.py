"""What several loss families share inside :mod:`fastcontrast.losses`: the scale type, lightly's row
normalisation, and the two-tower checks-with-layout step."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from fastcontrast import distributed
from fastcontrast._dispatch import resolve_engine
from fastcontrast._validation import check_two_towers
from fastcontrast.engine import compute_dtype

Scalar = Union[torch.Tensor, float]


def two_towers_checked(image_features, text_features, logit_scale, logit_bias, backend, chunk_bytes, group,
                        what: str):
    """(scale, bias, engine, layout) of a two-tower loss; the checks run on every rank of ``group`` (if any), so
    that a bad input on one rank raises on all of them, with the batch layout exchanged in the same step."""

    def check():
        scale, bias = check_two_towers("image_features", image_features, "text_features", text_features,
                                       logit_scale, logit_bias)
        return scale, bias, resolve_engine(backend, image_features.device, image_features.dtype, chunk_bytes)

    if group is None:
        return (*check(), None)
    (scale, bias, engine), layout = distributed.exchange_layout(group, image_features, check, what=what,
                                                                name="image_features")
    return scale, bias, engine, layout


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows like lightly's ``F.normalize(x, dim=1)`` (eps 1e-12), robust in half precision.

    lightly computes the norm in the input dtype; in fp16 the squares of small entries underflow, the norm
    becomes 0 and the row is divided by eps (lightly issue #1259). Normalising in fp32 (fp64 for fp64) and
    casting back avoids that and leaves fp32 results bit-identical.
    """
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=1, eps=1e-12).to(x.dtype)
