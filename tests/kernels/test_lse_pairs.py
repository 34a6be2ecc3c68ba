"""The Triton engine's LSEs as exact pairs (kernels/lse_forward.py: ``exact_sum``, ``merge_partials_kernel``), in
triton's interpreter, on every route an LSE leaves the kernels by: one split, several column splits merged, the
row blocks' column partials merged (single pass), and the column pass on Bᵀ.

The logits are built exact (dyadic unit rows, a power-of-two scale), so the reference is the fp64 value of
max + log Σ exp(x − max) from the very logits the kernels see, and hi + lo must match it to the log-sum's own
rounding (a few ulps of the log-sum, not of the max), where one fp32 LSE is off by up to ½ ulp of the max.
"""

from __future__ import annotations

import os

import pytest
import torch
from fastcontrast.kernels import launch as triton_launch
from fastcontrast.kernels.engine import TritonEngine
from fastcontrast.kernels.launches import recorded_launches

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests run on CPU-only machines with TRITON_INTERPRET=1 (set in conftest.py)",
    ),
]

SCALE = 64.0  # logits up to 64: ½ ulp of the max is 3.8e-6, the log-sum's own rounding ~1e-7


def _dyadic_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Unit rows with ±0.5 on 4 coordinates: every dot product is a multiple of 1/4, exact in any order."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, d)
    for i in range(n):
        cols = torch.randperm(d, generator=g)[:4]
        rows[i, cols] = torch.where(torch.rand(4, generator=g) < 0.5, -0.5, 0.5)
    return rows


def _reference(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """fp64 max + log Σ exp(x − max) along ``dim``."""
    top = logits.double().amax(dim=dim, keepdim=True)
    return (top + (logits.double() - top).exp().sum(dim=dim, keepdim=True).log()).squeeze(dim)


def _assert_pair(hi, lo, expected, what):
    pair = hi.double() + lo.double()
    # Log-sums here lie in [0, log 700]: a few fp32 ulps of 8 at most.
    assert (pair - expected).abs().max() <= 4e-6 / 8, (what, (pair - expected).abs().max().item())
    assert torch.equal(hi, (hi.double() + lo.double()).float()), f"{what}: lo is not below hi's rounding"
    one_fp32 = (hi.double() - expected).abs().max()
    return one_fp32


@pytest.mark.parametrize("n, m, many_splits", [(3, 700, True), (200, 150, False), (1, 1, False)],
                         ids=["few-rows-many-columns", "square-ish", "one-entry"])
def test_every_route_returns_the_exact_pair(n, m, many_splits, monkeypatch):
    a, b = _dyadic_rows(n, 48, seed=n), _dyadic_rows(m, 48, seed=m + 1)
    logits = SCALE * (a @ b.T)  # exact: the kernels' tiles hold these values
    if many_splits:
        monkeypatch.setattr(triton_launch, "target_programs", lambda device: 64)

    def forward():
        return TritonEngine().lse_forward(a, b, torch.tensor(SCALE), None, need_row=True, need_col=True,
                                          exclude_offset=None, exclude_positive=False, private_columns=0,
                                          need_argmax=False)

    with recorded_launches() as launches:  # recorded, not run: which merges the call makes
        forward()
    lse_row, lse_col, _, _, _, low_row, low_col = forward()
    worst = max(_assert_pair(lse_row, low_row, _reference(logits, 1), "rows"),
                _assert_pair(lse_col, low_col, _reference(logits, 0), "columns"))
    merges = [launch.kwargs["n_parts"] for launch in launches if launch.name == "merge_partials_kernel"]
    if many_splits:
        assert max(merges) > 1, merges  # the rows' column splits went through the merge kernel
    if n > 1:
        assert worst > 4e-6 / 8, "the case does not tell a one-fp32 LSE from the pair"


def test_the_column_pass_on_b_transposed_returns_the_pair_too(monkeypatch):
    """Past the single-pass scratch bound the column LSE is the row kernel on B·Aᵀ."""
    from fastcontrast.kernels import engine

    monkeypatch.setattr(engine, "SINGLE_PASS_SCRATCH_BYTES", 0)
    a, b = _dyadic_rows(40, 48, seed=5), _dyadic_rows(90, 48, seed=6)
    logits = SCALE * (a @ b.T)
    out = TritonEngine().lse_forward(a, b, torch.tensor(SCALE), None, need_row=False, need_col=True,
                                     exclude_offset=None, exclude_positive=False, private_columns=0,
                                     need_argmax=False)
    assert out[0].numel() == 0 and out[5].numel() == 0
    _assert_pair(out[1], out[6], _reference(logits, 0), "columns, second pass")


def test_masked_out_rows_give_minus_inf_and_a_zero_low_part():
    a, b = _dyadic_rows(4, 48, seed=7), _dyadic_rows(4, 48, seed=8)
    # Memory-bank layout with every column private: row i keeps only column i; with its positive excluded too,
    # nothing is left.
    out = TritonEngine().lse_forward(a, b, torch.tensor(SCALE), torch.arange(4), need_row=True, need_col=False,
                                     exclude_offset=None, exclude_positive=True, private_columns=4,
                                     need_argmax=False)
    assert torch.isneginf(out[0]).all() and torch.equal(out[5], torch.zeros(4))
