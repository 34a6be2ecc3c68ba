"""The panel path's panel size (kernels/configs.py ``grown_panel``): fewer launches within a scratch bound that
grows with N·d, never N². Launch counts and their share of the step are in tests/kernels/test_work_model.py."""

from __future__ import annotations

import pytest
import torch
from fastcontrast.kernels.configs import PanelConfig, assume_target, grown_panel, panel_budget, panel_configs

HALF = PanelConfig(4096, 4096)


@pytest.mark.parametrize("n,m,d", [(65_536, 65_536, 512), (65_536, 65_536, 1280), (262_144, 262_144, 768),
                                   (16_384, 16_384, 512), (4096, 300_000, 256), (300_000, 4096, 1024)])
def test_the_panel_stays_within_the_fp32_gradients_size(n, m, d):
    budget = panel_budget(n, m, d)
    panel = grown_panel(HALF, n, m, budget, 2)
    assert min(panel.rows, n) * min(panel.cols, m) * 2 <= max(budget, HALF.rows * HALF.cols * 2)
    assert panel.rows >= HALF.rows and panel.cols >= HALF.cols
    # Doubled once more in either direction it would break the budget, or the matrix has no more to give.
    for grown in (PanelConfig(panel.rows * 2, panel.cols), PanelConfig(panel.rows, panel.cols * 2)):
        bigger = min(grown.rows, n) * min(grown.cols, m)
        assert bigger == min(panel.rows, n) * min(panel.cols, m) or bigger * 2 > budget or \
            abs(grown.rows - grown.cols) > abs(panel.rows - panel.cols), (panel, grown)


def test_the_panel_at_n_65536_d_512_is_8192_by_16384_and_the_step_makes_97_launches():
    panel = grown_panel(HALF, 65_536, 65_536, panel_budget(65_536, 65_536, 512), 2)
    assert (panel.rows, panel.cols) == (8192, 16_384)
    panels = (65_536 // panel.rows) * (65_536 // panel.cols)
    assert 3 * panels + 1 == 97, "dS + two GEMMs per panel, plus the forward"


def test_a_small_budget_keeps_the_base_panel_and_a_small_matrix_is_one_panel():
    assert grown_panel(HALF, 65_536, 65_536, 0, 2) == HALF
    assert grown_panel(HALF, 1000, 3000, panel_budget(1000, 3000, 512), 2) == HALF  # already covers it
    panel = grown_panel(HALF, 6000, 9000, panel_budget(6000, 9000, 2048), 2)
    assert panel.rows >= 6000 and panel.cols >= 9000


def test_the_launchers_pass_the_shape_and_the_interpreter_keeps_its_small_panels():
    with assume_target(("cuda", 90)):
        grown, _, _ = panel_configs(("cuda", 90), torch.bfloat16, n=65_536, m=65_536,
                                    budget_bytes=panel_budget(65_536, 65_536, 1280))
        base, _, _ = panel_configs(("cuda", 90), torch.bfloat16)
    assert (grown.rows, grown.cols) == (16_384, 16_384) and base == HALF
    small, _, _ = panel_configs("interpreter", torch.float32, n=65_536, m=65_536, budget_bytes=2**40)
    assert small.rows * small.cols < 10_000
