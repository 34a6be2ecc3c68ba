"""Loss values to the last bit: where the originals take a cross-entropy, log-sum − (positive − max), fastcontrast's
LSE comes as hi + lo (fastcontrast/lse_split.py) and the loss equals theirs to fp32 rounding, not to the
rounding of max + log-sum (½ ulp at the max's magnitude), on both engines (Triton in the interpreter).

The cases are built so that the difference shows: logits near the cap (τ = 0.1 on unit vectors: 10; a logit
scale of 100), so ½ ulp of the LSE is many ulps of the loss. Exact expectations are the originals' own values.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast.lse_split import lse_gap, merge_split_lse, split_lse

lightly_loss = pytest.importorskip("lightly.loss")

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _skip_without_interpreter(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs here only in its interpreter (TRITON_INTERPRET=1)")


def _ulps(x: torch.Tensor, y: torch.Tensor) -> float:
    """|x − y| in units of fp32's spacing at y (0-dim fp32 tensors)."""
    y = y.float()
    spacing = torch.nextafter(y.abs(), torch.tensor(float("inf"))) - y.abs()
    return abs(float(x) - float(y)) / float(spacing)


def test_split_lse_is_exact_and_merges_keep_the_low_part():
    torch.manual_seed(0)
    top = torch.randn(1000) * 100
    log_sum = torch.rand(1000) * 5
    hi, lo = split_lse(top, log_sum)
    # hi + lo is top + log_sum exactly: compare in fp64, where the fp32 sum of two fp32 numbers is exact.
    assert torch.equal(hi.double() + lo.double(), top.double() + log_sum.double())
    assert torch.equal(hi, top + log_sum)
    # −inf (a row with nothing allowed) keeps lo = 0, never NaN.
    hi, lo = split_lse(torch.zeros(2), torch.tensor([float("-inf"), 0.0]))
    assert hi[0] == float("-inf") and lo[0] == 0 and lo[1] == 0
    # Two blocks whose LSEs are both 100 + log 2 merge to 100 + log 4: the gap to a positive at 100 is log 4 to
    # fp32 rounding, where the one-fp32 LSE would be off by several ulps of it.
    block_hi, block_lo = split_lse(torch.tensor([100.0]), torch.tensor([math.log(2.0)], dtype=torch.float32))
    merged_hi, merged_lo = merge_split_lse([block_hi, block_hi], [block_lo, block_lo])
    log_4 = torch.tensor(math.log(4.0), dtype=torch.float32)
    assert _ulps(lse_gap(merged_hi, merged_lo, torch.tensor([100.0])), log_4) <= 1
    assert _ulps(merged_hi - 100.0, log_4) > 1  # what lo fixes


# The log-sum's own rounding: Σ exp(x − max) ≥ 1 is summed in another order by each engine and by torch, so the
# losses may differ by a few ulps of 1, whatever the max. A one-fp32 LSE adds up to ½ ulp of the max on top.
ATOL = 4 * 2.0**-23


def _close_rows(n: int, d: int) -> torch.Tensor:
    """[n, d] unit rows, all entries dyadic: 0.5 on columns 0–2, 0.25 on 3–5 (shared) and 0.25 on column 6 + i
    (row i's own). Every dot product is exact in any order (1 on the diagonal, 15/16 off it), so the logits are
    the same bits on every engine and in the originals, and all rows have the same loss: the mean is each
    row's value, and any difference is how the LSE is finished."""
    rows = torch.zeros(n, d)
    rows[:, :3], rows[:, 3:6] = 0.5, 0.25
    rows[torch.arange(n), 6 + torch.arange(n)] = 0.25
    return rows


def _one_fp32_lse_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """What an LSE kept as one fp32 gives: fl(max + log-sum) − positive, per row."""
    return torch.logsumexp(logits, dim=1) - positive


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightlys_one_entry_memory_bank_at_tau_0_1(backend):
    """The issue's case: q = k = the bank's one entry, τ = 0.1: both logits are 10 and the loss is log 2, which
    lightly gives as 0.6931472 and a one-fp32 LSE as 0.6931467."""
    _skip_without_interpreter(backend)
    x = torch.tensor([[1.0, 0.0]])
    original = lightly_loss.NTXentLoss(temperature=0.1, memory_bank_size=(1, 2))
    original.memory_bank.bank.copy_(x)
    expected = original(x, x.clone())
    ours = fastcontrast.NTXentLoss(temperature=0.1, memory_bank_size=(1, 2), backend=backend)
    ours.memory_bank.bank.copy_(x)
    value = ours(x, x.clone())
    assert float(expected) == pytest.approx(math.log(2.0), abs=1e-7)
    assert torch.equal(value, expected), (float(value), float(expected))
    plain = torch.logsumexp(torch.tensor([10.0, 10.0]), 0) - 10.0  # what one fp32 LSE gives
    assert _ulps(plain, expected) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_matches_lightly_to_fp32_rounding(backend):
    """τ = 0.02: positives at 50, the 2n − 2 other candidates at 46.875; a one-fp32 LSE is off by up to ½ ulp of
    50 (1.9e−6)."""
    _skip_without_interpreter(backend)
    n, temperature = 24, 0.02
    z = _close_rows(n, 32)
    expected = lightly_loss.NTXentLoss(temperature=temperature)(z, z.clone())
    value = fastcontrast.NTXentLoss(temperature=temperature, backend=backend)(z, z.clone())
    assert abs(float(value) - float(expected)) <= ATOL, (float(value), float(expected))
    both = torch.cat([z, z])
    logits = (both @ both.T / temperature).fill_diagonal_(float("-inf"))
    plain = _one_fp32_lse_loss(logits, torch.full((2 * n,), 1 / temperature)).mean()
    assert abs(float(plain) - float(expected)) > ATOL  # the case tells the two apart


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_matches_the_cross_entropy_to_fp32_rounding(backend, local_loss):
    """open_clip's loss: the cross-entropy of the logits both ways, log-sum − (positive − max) per row (CUDA's and
    torch CPU's log_softmax both keep the two apart). Scale 100: positives at 100, negatives at 93.75."""
    _skip_without_interpreter(backend)
    image = _close_rows(32, 48)
    logits = 100.0 * image @ image.T
    labels = torch.arange(image.shape[0])
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    value = fastcontrast.ClipLoss(local_loss=local_loss, backend=backend)(image, image.clone(), torch.tensor(100.0))
    assert abs(float(value) - float(expected)) <= ATOL, (float(value), float(expected))
    plain = _one_fp32_lse_loss(logits, torch.full((32,), 100.0)).mean()
    assert abs(float(plain) - float(expected)) > ATOL
