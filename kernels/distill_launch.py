"""Launchers of the distillation kernels (kernels/distill.py): the forward's student/teacher LSEs and cross
term, and the four gradients by the fused kernel or the panel path.
"""

from __future__ import annotations

import torch
import triton
from fastcontrast.kernels.configs import (
    distill_config,
    panel_budget,
    panel_configs,
    target_for,
)
from fastcontrast.kernels.distill import distill_forward_kernel, distill_gradient_kernel, distill_panel_kernel
from fastcontrast.kernels.gradient_launch import PanelOutput, multiply_panel, panel_scratch, panels
from fastcontrast.kernels.launch import launch_flags


def launch_distill_forward(*, x, y, x_t, y_t, scale, scale_t, col_partial, config):
    """(student LSE, teacher LSE, cross term), each fp32 [n_x], of the rows of X; column partials if given."""
    n_x, n_y = x.shape[0], y.shape[0]
    lse, teacher_lse, cross = (torch.empty(n_x, dtype=torch.float32, device=x.device) for _ in range(3))
    distill_forward_kernel[(triton.cdiv(n_x, config.block_m),)](
        X=x, Y=y, XT=x_t, YT=y_t, SCALE=scale, SCALE_T=scale_t, LSE_X=lse, TEACHER_LSE_X=teacher_lse,
        CROSS_X=cross, COL_PARTIAL=col_partial,
        n_x=n_x, n_y=n_y, d=x.shape[1], d_t=x_t.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        stride_xt=x_t.stride(0), stride_yt=y_t.stride(0), WRITE_COL_PARTIAL=col_partial is not None,
        **launch_flags(config, x),
    )
    return lse, teacher_lse, cross


_STAT_NAMES = ("LSE", "GRAD_LSE", "TEACHER_LSE", "CROSS", "GRAD_CROSS")


def fused_distill_gradients(problem, *, needs):
    """The four distillation gradients (or None) with the fused kernel, accumulator in registers."""
    outs = []
    for wanted, swap, teacher in zip(needs, (False, True, False, True), (False, False, True, True)):
        if not wanted:
            outs.append(None)
            continue
        x, y, x_t, y_t = (problem[k] for k in (("b", "a", "b_t", "a_t") if swap else ("a", "b", "a_t", "b_t")))
        x_stats, y_stats = (problem["cols"], problem["rows"]) if swap else (problem["rows"], problem["cols"])
        config = distill_config(target_for(x.device), "gradient", x.dtype)
        n_x, n_y = x.shape[0], y.shape[0]
        out = torch.empty((n_x, (x_t if teacher else x).shape[1]), dtype=torch.float32, device=x.device)
        ds_scale = problem["teacher_scale" if teacher else "student_scale"]
        distill_gradient_kernel[(triton.cdiv(n_x, config.block_m),)](
            X=x, Y=y, XT=x_t, YT=y_t, SCALE=problem["scale"], SCALE_T=problem["scale_t"], DS_SCALE=ds_scale,
            **{f"{name}_X": value for name, value in zip(_STAT_NAMES, x_stats or (None,) * 5)},
            **{f"{name}_Y": value for name, value in zip(_STAT_NAMES, y_stats or (None,) * 5)},
            OUT=out, n_x=n_x, n_y=n_y, d=x.shape[1], d_t=x_t.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
            stride_xt=x_t.stride(0), stride_yt=y_t.stride(0), stride_out=out.stride(0),
            TEACHER_GRAD=teacher, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
            SCALE_DS=ds_scale is not None, **launch_flags(config, x),
        )
        outs.append(out)
    return outs


def panel_distill_gradients(problem, *, needs):
    """The four distillation gradients (or None) by the panel path: W (and dT) per panel, then GEMMs."""
    a, b, a_t, b_t = (problem[k] for k in ("a", "b", "a_t", "b_t"))
    need_a, need_b, need_a_t, need_b_t = needs
    student, teacher = need_a or need_b, need_a_t or need_b_t
    target = target_for(a.device)
    n, m = a.shape[0], b.shape[0]
    # Two panels (student and teacher) may live at once: they share the budget.
    budget = panel_budget(n, m, max(a.shape[1], a_t.shape[1]), panels=2 if student and teacher else 1)
    panel, _, matmul_config = panel_configs(target, a.dtype, n=n, m=m, budget_bytes=budget)
    config = distill_config(target, "panel", a.dtype)
    rows, cols = min(n, panel.rows), min(m, panel.cols)

    def scratch(wanted):
        return panel_scratch(rows, cols, a) if wanted else None

    def output(x, wanted, panel_rows, depth):
        return PanelOutput(x.shape[0], x.shape[1], panel_rows, depth, matmul_config, a.device) if wanted else None

    w_panel, t_panel = scratch(student), scratch(teacher)
    outs = [output(a, need_a, rows, cols), output(b, need_b, cols, rows), output(a_t, need_a_t, rows, cols),
            output(b_t, need_b_t, cols, rows)]
    row_stats, col_stats = problem["rows"], problem["cols"]
    for (r0, r1), (c0, c1) in panels(n, m, rows, cols):
        grid = (triton.cdiv(r1 - r0, config.block_m), triton.cdiv(c1 - c0, config.block_n))
        distill_panel_kernel[grid](
            A=a, B=b, AT=a_t, BT=b_t, SCALE=problem["scale"], SCALE_T=problem["scale_t"],
            DS_SCALE=problem["teacher_scale"] if teacher else problem["student_scale"],
            **{f"{name}_ROW": value for name, value in zip(_STAT_NAMES, row_stats or (None,) * 5)},
            **{f"{name}_COL": value for name, value in zip(_STAT_NAMES, col_stats or (None,) * 5)},
            W=w_panel, DT=t_panel, row_start=r0, row_stop=r1, col_start=c0, col_stop=c1, d=a.shape[1],
            d_t=a_t.shape[1], stride_a=a.stride(0), stride_b=b.stride(0), stride_at=a_t.stride(0),
            stride_bt=b_t.stride(0), stride_panel=(w_panel if student else t_panel).stride(0),
            HAS_ROW_TERM=row_stats is not None, HAS_COL_TERM=col_stats is not None, STUDENT=student, TEACHER=teacher,
            SCALE_DS=problem["student_scale"] is not None, **launch_flags(config, a),
        )
        # One fp16 scale for both panels (the teacher's bound is the larger): W and dT share DS_SCALE.
        shared_scale = problem["teacher_scale"] if teacher else problem["student_scale"]
        if student:
            multiply_panel(w_panel, r0, r1, c0, c1, shared_scale, matmul_config, out_a=outs[0], out_b=outs[1],
                            a=a, b=b)
        if teacher:
            multiply_panel(t_panel, r0, r1, c0, c1, shared_scale, matmul_config, out_a=outs[2], out_b=outs[3],
                            a=a_t, b=b_t)
    return [None if out is None else out.result() for out in outs]
