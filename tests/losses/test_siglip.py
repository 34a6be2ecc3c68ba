"""SigLIP (open_clip 3.x ``SigLipLoss``, ``siglip_loss``) against open_clip's math on the blockwise torch
engine: values and every gradient (logit_bias included) over the covering design of shapes; every ``dist_impl``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    TOLERANCES,
    assert_close,
)
from _reference_cases import (
    CASES,
    DTYPES,
    check_open_clip_case,
    check_open_clip_exponentiated_scale,
    check_open_clip_gradient_flow,
)

from fastcontrast import SigLipLoss, reference


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("kind", ('siglip_loss', 'SigLipLoss'))
def test_siglip_loss_matches_reference_value_and_gradients(kind, case, dtype, atol, rtol):
    check_open_clip_case(kind, case, dtype, atol, rtol)


@pytest.mark.parametrize("kind", ('siglip_loss', 'SigLipLoss'))
def test_siglip_loss_matches_reference_for_exponentiated_non_leaf_scale(kind):
    check_open_clip_exponentiated_scale(kind)


def test_siglip_loss_gradient_flows_only_to_inputs_that_require_it():
    check_open_clip_gradient_flow("siglip_loss")


def unit(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)


@pytest.mark.parametrize("dist_impl", [None, "bidir", "shift", "reduce", "gather"])
def test_siglip_every_dist_impl_gives_the_same_single_process_loss(dist_impl):
    image, text = unit(9, 4, seed=7), unit(9, 4, seed=8)
    expected = reference.siglip_loss_reference(image, text, 10.0, -5.0)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("loss", SigLipLoss(dist_impl=dist_impl)(image, text, 10.0, -5.0), expected, atol, rtol)
