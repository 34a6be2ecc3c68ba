"""Launchers of the gradient: dS·B and dSᵀ·A (and SigLIP's Σ dS) by the fused kernels while the accumulator
fits on chip (kernels/gradient.py), else by the panel path (kernels/panel.py: dS written once per panel in
the input dtype, then two GEMM kernels). Deterministic: partials are summed in a fixed order, no atomics.
"""

from __future__ import annotations

import torch
import triton
from fastcontrast.kernels.configs import (
    fused_gradient,
    gradient_config,
    panel_budget,
    panel_configs,
    target_for,
)
from fastcontrast.kernels.gradient import gradient_kernel
from fastcontrast.kernels.launch import ALIGNMENT, MODE_LSE, MODE_SIGLIP, column_splits, launch_flags, target_programs
from fastcontrast.kernels.panel import ds_panel_kernel, panel_matmul_kernel


def gradients(problem: dict, *, need_a: bool, need_b: bool, need_bias: bool, need_loss: bool = False):
    """dS·B, dSᵀ·A (fp32, padded width), Σ dS and SigLIP's sum of terms (each None where not asked) of an
    LSE / SigLIP problem: the fused kernels while the accumulator fits on chip, else the panel path.
    ``need_loss`` (SigLIP only): the panel path's dS kernel also sums the loss, so a forward under grad is
    that sweep alone; the fused path returns None for it (the caller runs the forward kernel)."""
    a = problem["a"]
    target = target_for(a.device)
    needs = dict(need_a=need_a, need_b=need_b, need_bias=need_bias, need_loss=need_loss)
    if fused_gradient(target, a.shape[1], a.dtype):
        return _fused_gradients(problem, target, **needs)
    return _panel_gradients(problem, target, **needs)


def _fused_gradients(problem, target, *, need_a, need_b, need_bias, need_loss):
    # Σ dS (the bias gradient) comes with the SigLIP passes (each sees every (i, j) once): the dA pass's when
    # it runs, else the dB pass's; when neither gradient is needed, the dA pass runs for it alone. The loss
    # is not summed here (None: the caller runs the forward kernel): its softplus terms beside the fused
    # accumulator spill on sm_80. The panel path, every real CLIP width, sums it in its dS kernel.
    grad_a = grad_b = bias_partial = None
    if need_a or not need_b:
        grad_a, bias_partial = _launch_gradient(problem, target, transposed=False)
    if need_b:
        grad_b, b_partial = _launch_gradient(problem, target, transposed=True)
        bias_partial = b_partial if bias_partial is None else bias_partial
    grad_bias = bias_partial.sum() if need_bias else None
    return (grad_a if need_a else None), grad_b, grad_bias, None


def _launch_gradient(problem, target, *, transposed):
    """dS·Y for the rows of X (X = A, or X = B with ``transposed``): ``(fp32 [n_x, d_pad], Σ dS partials
    [splits, row blocks] for SigLIP, else None)``."""
    x, y = (problem["b"], problem["a"]) if transposed else (problem["a"], problem["b"])
    x_stats, y_stats = (problem["col_stats"], problem["row_stats"]) if transposed else (problem["row_stats"],
                                                                                        problem["col_stats"])
    offset = problem["offset"]
    if offset is not None and transposed:
        offset = -offset
    n_x, n_y, d = x.shape[0], y.shape[0], x.shape[1]
    config = gradient_config(target, d, x.dtype)
    splits, cols_per_split = column_splits(n_x, n_y, config.block_m, config.block_n, x.device)
    grid = (triton.cdiv(n_x, config.block_m), splits)
    out = torch.empty((splits, n_x, d), dtype=torch.float32, device=x.device)
    mode = problem["mode"]
    bias_partial = torch.empty(grid[::-1], dtype=torch.float32, device=x.device) if mode == MODE_SIGLIP else None
    lse_x, grad_x = x_stats if x_stats is not None else (None, None)
    lse_y, grad_y = y_stats if y_stats is not None else (None, None)
    has_positives = problem["positive_index"] is not None
    gradient_kernel[grid](
        X=x, Y=y, SCALE=problem["scale"], BIAS=problem["bias"], DS_SCALE=problem["ds_scale"],
        POSITIVE_INDEX=problem["positive_index"], GRAD_POSITIVES=problem["grad_positives"], LSE_X=lse_x,
        GRAD_X=grad_x, LSE_Y=lse_y, GRAD_Y=grad_y, GRAD_TOTAL=problem["grad_total"], OUT=out,
        BIAS_PARTIAL=bias_partial, n_x=n_x, n_y=n_y, d=d, stride_x=x.stride(0),
        stride_y=y.stride(0), stride_out=out.stride(1), offset=0 if offset is None else offset,
        private_columns=problem["private_columns"],
        cols_per_split=cols_per_split, MODE=mode, HAS_X_TERM=x_stats is not None, HAS_Y_TERM=y_stats is not None,
        HAS_EXCLUDE=offset is not None and mode == MODE_LSE, HAS_POSITIVES=has_positives,
        EXCLUDE_POSITIVE=problem["exclude_positive"], HAS_PRIVATE=problem["private_columns"] > 0,
        X_IS_A=not (transposed and has_positives), SCALE_DS=problem["ds_scale"] is not None,
        **launch_flags(config, x),
    )
    # Sum the column splits' slabs in a fixed order: deterministic, no atomics.
    return (out[0] if splits == 1 else out.sum(dim=0)), bias_partial


def panels(n: int, m: int, rows: int, cols: int):
    """The panels (row range, column range) of an n×m matrix, column panels outermost: a fixed order."""
    for c0 in range(0, m, cols):
        for r0 in range(0, n, rows):
            yield (r0, min(n, r0 + rows)), (c0, min(m, c0 + cols))


def panel_sweep(a, b, ds_scale, write_ds, *, need_a: bool, need_b: bool):
    """The panel path's sweep for an n×m problem: for each panel (a fixed order, :func:`panels`),
    ``write_ds(ds, r0, r1, c0, c1)`` launches the dS kernel that fills the panel ``ds`` (rows r0:r1, columns
    c0:c1 of S, input dtype; fp16 scaled by ``ds_scale``), then dA[rows] (+)= dS·B[cols] and dB[cols] (+)= dSᵀ·A
    [rows] (:func:`multiply_panel`). Returns ``(dA [n, d_pad], dB [m, d_pad])`` in fp32, each None where not
    needed."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    panel, _, matmul_config = panel_configs(target_for(a.device), a.dtype, n=n, m=m,
                                            budget_bytes=panel_budget(n, m, d))
    rows, cols = min(n, panel.rows), min(m, panel.cols)
    ds = panel_scratch(rows, cols, a)
    grad_a = PanelOutput(n, d, rows, cols, matmul_config, a.device) if need_a else None
    grad_b = PanelOutput(m, d, cols, rows, matmul_config, a.device) if need_b else None
    for (r0, r1), (c0, c1) in panels(n, m, rows, cols):
        write_ds(ds, r0, r1, c0, c1)
        multiply_panel(ds, r0, r1, c0, c1, ds_scale, matmul_config, out_a=grad_a, out_b=grad_b, a=a, b=b)
    del ds  # the panel goes before the outputs' sums allocate: it is the largest scratch at a big batch
    return (None if grad_a is None else grad_a.result()), (None if grad_b is None else grad_b.result())


def _panel_gradients(problem, target, *, need_a, need_b, need_bias, need_loss):
    """The panel path (kernels/panel.py): per panel one dS kernel and up to two GEMM kernels."""
    a, b = problem["a"], problem["b"]
    _, ds_config, _ = panel_configs(target, a.dtype)
    row_stats, col_stats = problem["row_stats"], problem["col_stats"]
    offset, mode = problem["offset"], problem["mode"]
    bias_partials, loss_partials = [], []

    def write_ds(ds, r0, r1, c0, c1):
        grid = (triton.cdiv(r1 - r0, ds_config.block_m), triton.cdiv(c1 - c0, ds_config.block_n))
        bias_partial = torch.empty(grid, dtype=torch.float32, device=a.device) if mode == MODE_SIGLIP else None
        loss_partial = torch.empty(grid, dtype=torch.float32, device=a.device) if need_loss else None
        ds_panel_kernel[grid](
            A=a, B=b, SCALE=problem["scale"], BIAS=problem["bias"], DS_SCALE=problem["ds_scale"],
            POSITIVE_INDEX=problem["positive_index"], GRAD_POSITIVES=problem["grad_positives"],
            LSE_ROW=None if row_stats is None else row_stats[0], GRAD_ROW=None if row_stats is None else row_stats[1],
            LSE_COL=None if col_stats is None else col_stats[0], GRAD_COL=None if col_stats is None else col_stats[1],
            GRAD_TOTAL=problem["grad_total"], DS=ds, BIAS_PARTIAL=bias_partial, LOSS_PARTIAL=loss_partial,
            row_start=r0, row_stop=r1, col_start=c0, col_stop=c1, d=a.shape[1], stride_a=a.stride(0),
            stride_b=b.stride(0), stride_ds=ds.stride(0), offset=0 if offset is None else offset,
            private_columns=problem["private_columns"], MODE=mode, HAS_ROW_TERM=row_stats is not None,
            HAS_COL_TERM=col_stats is not None, HAS_EXCLUDE=offset is not None and mode == MODE_LSE,
            HAS_POSITIVES=problem["positive_index"] is not None, EXCLUDE_POSITIVE=problem["exclude_positive"],
            HAS_PRIVATE=problem["private_columns"] > 0, SCALE_DS=problem["ds_scale"] is not None,
            WRITE_LOSS=need_loss, SYMMETRIC=False, **launch_flags(ds_config, a),
        )
        if need_bias:
            bias_partials.append(bias_partial.reshape(-1))
        if need_loss:
            loss_partials.append(loss_partial.reshape(-1))

    grad_a, grad_b = panel_sweep(a, b, problem["ds_scale"], write_ds, need_a=need_a, need_b=need_b)
    grad_bias = torch.cat(bias_partials).sum() if need_bias else None
    loss = torch.cat(loss_partials).sum() if need_loss else None
    return grad_a, grad_b, grad_bias, loss


# The symmetric dS kernel stores with int32 offsets (fewer registers for its second, mirrored pointer tile):
# a panel side of 32768 keeps every offset under 2³⁰.
SYMMETRIC_MAX_SIDE = 32768


def symmetric_gradients(problem: dict) -> torch.Tensor:
    """(dS + dSᵀ)·Z (fp32, padded width) of a single-tower LSE problem (``a`` is ``b`` = Z, row statistics
    only, masks symmetric, the positive index an involution): the fused kernels' dS·Z and dSᵀ·Z added while
    the accumulator fits on chip, else the symmetric panel path: square panels on and above the diagonal, each
    holding G = dS + dSᵀ from one S tile (ds_panel_kernel's SYMMETRIC). A panel off the diagonal gives
    dZ[rows] += G·Z[cols] and dZ[cols] += Gᵀ·Z[rows]; one on it holds all of its G (the entries below its
    diagonal stored as mirror images) and gives dZ[rows] += G·Z[rows]. GEMM work in passes of 2·n²·d: about
    ½ for S, 1 for the products, where the two-tower panel path takes 3."""
    a = problem["a"]
    target = target_for(a.device)
    if fused_gradient(target, a.shape[1], a.dtype):
        grad_a, grad_b, _, _ = _fused_gradients(problem, target, need_a=True, need_b=True, need_bias=False,
                                                need_loss=False)
        return grad_a.add_(grad_b)
    n, d = a.shape
    panel, ds_config, matmul_config = panel_configs(target, a.dtype, n=n, m=n, budget_bytes=panel_budget(n, n, d),
                                                    symmetric=True)
    side = min(n, panel.rows, panel.cols, SYMMETRIC_MAX_SIDE)
    ds = panel_scratch(side, side, a)
    # One output for both products. Column panels outermost: each row range is first written by a full-depth
    # product that does not accumulate (panel (0, 0)'s G·Z, or panel (0, k)'s Gᵀ·Z), the later ones add.
    grad = PanelOutput(n, d, side, side, matmul_config, a.device)
    row_stats, offset = problem["row_stats"], problem["offset"]
    for (r0, r1), (c0, c1) in panels(n, n, side, side):
        if c0 < r0:
            continue  # below the diagonal: the mirror of a panel above it
        grid = (triton.cdiv(r1 - r0, ds_config.block_m), triton.cdiv(c1 - c0, ds_config.block_n))
        ds_panel_kernel[grid](
            A=a, B=a, SCALE=problem["scale"], BIAS=None, DS_SCALE=problem["ds_scale"],
            POSITIVE_INDEX=problem["positive_index"], GRAD_POSITIVES=problem["grad_positives"],
            LSE_ROW=None if row_stats is None else row_stats[0], GRAD_ROW=None if row_stats is None else row_stats[1],
            LSE_COL=None if row_stats is None else row_stats[0], GRAD_COL=None if row_stats is None else row_stats[1],
            GRAD_TOTAL=None, DS=ds, BIAS_PARTIAL=None, LOSS_PARTIAL=None, row_start=r0, row_stop=r1, col_start=c0,
            col_stop=c1, d=d, stride_a=a.stride(0), stride_b=a.stride(0), stride_ds=ds.stride(0),
            offset=0 if offset is None else offset, private_columns=0, MODE=MODE_LSE,
            HAS_ROW_TERM=row_stats is not None, HAS_COL_TERM=row_stats is not None, HAS_EXCLUDE=offset is not None,
            HAS_POSITIVES=problem["positive_index"] is not None, EXCLUDE_POSITIVE=problem["exclude_positive"],
            HAS_PRIVATE=False, SCALE_DS=problem["ds_scale"] is not None, WRITE_LOSS=False, SYMMETRIC=True,
            **launch_flags(ds_config, a),
        )
        multiply_panel(ds, r0, r1, c0, c1, problem["ds_scale"], matmul_config, out_a=grad,
                       out_b=grad if c0 != r0 else None, a=a, b=a)
    del ds
    return grad.result()


# Elements after the dS panel's last row: panel_matmul_kernel reads dSᵀ without a row mask, up to one
# row tile past the panel's columns (at most the largest BLOCK_M).
PANEL_SLACK = 256


def panel_scratch(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """The [rows, cols] dS panel in the input dtype, its row stride padded to 16 elements (aligned binaries),
    viewed in a buffer with :data:`PANEL_SLACK` elements more (zeroed: what is read there stays finite)."""
    stride = triton.cdiv(cols, ALIGNMENT) * ALIGNMENT
    buffer = torch.empty(rows * stride + PANEL_SLACK, dtype=like.dtype, device=like.device)
    buffer[rows * stride:].zero_()
    return buffer[: rows * stride].view(rows, stride)


# A split reduction's slab may always take this much (a local loss's few rows split as far as the GPU needs).
SPLIT_SCRATCH_BYTES = 64 * 2**20


class PanelOutput:
    """An fp32 output [rows, d] of the panel GEMMs (dA or dB), and where its split reduction adds up.

    Where one panel's output tiles would leave the GPU idle (few rows, or a narrow d), each GEMM splits its
    reduction over ``splits`` programs. The splits' partial sums go to a slab [splits, rows, d] that spans
    the whole output and lives for the whole sweep: every panel adds into it, in the kernel, and
    :meth:`result` sums the splits once, in a fixed order (deterministic, no atomics). So the torch ops of
    the reduction are one per output, not one or two per panel. Scratch: ``splits`` × rows × d × 4 bytes,
    with ``splits`` ≤ (programs that fill the GPU) ÷ (output tiles of one panel), and bounded so that the slab
    holds at most two copies of the output or :data:`SPLIT_SCRATCH_BYTES`, whichever is more: a global batch
    (many rows) then splits in two at most, a local loss (few rows) as far as filling the GPU asks.
    ``panel_rows`` / ``depth``: the output rows and reduction depth of the sweep's first (largest) panel, which
    fix ``splits`` and ``k_per_split`` for every panel (the first panel writes every split; a smaller last
    panel may use fewer, adding to what is there)."""

    def __init__(self, rows: int, d: int, panel_rows: int, depth: int, config, device: torch.device):
        tiles = triton.cdiv(panel_rows, config.block_m) * triton.cdiv(d, config.block_n)
        by_memory = max(2, SPLIT_SCRATCH_BYTES // (rows * d * 4))
        splits = max(1, min(target_programs(device) // tiles, triton.cdiv(depth, 4 * config.block_d), by_memory))
        self.k_per_split = triton.cdiv(triton.cdiv(depth, splits), config.block_d) * config.block_d
        self.splits = triton.cdiv(depth, self.k_per_split)
        self.slab = torch.empty((self.splits, rows, d), dtype=torch.float32, device=device)

    def result(self) -> torch.Tensor:
        """The output, once every panel has added to it; the slab is let go (the next output's sum then runs
        without this one's slab alive)."""
        slab, self.slab = self.slab, None
        return slab[0] if self.splits == 1 else slab.sum(dim=0)


def multiply_panel(panel, r0, r1, c0, c1, ds_scale, config, *, out_a, out_b, a, b):
    """out_a[r0:r1] (+)= P·B[c0:c1] and out_b[c0:c1] (+)= Pᵀ·A[r0:r1] for the panel P of rows r0:r1 and
    columns c0:c1 (:class:`PanelOutput`; the first panel of each output row range writes, the later ones
    add)."""
    if out_a is not None:
        _launch_panel_matmul(out=out_a, start=r0, stop=r1, p=panel, p_strides=(panel.stride(0), 1), depth=c1 - c0,
                             y=b[c0:c1], accumulate=c0 > 0, ds_scale=ds_scale, config=config, transposed=False)
    if out_b is not None:
        _launch_panel_matmul(out=out_b, start=c0, stop=c1, p=panel, p_strides=(1, panel.stride(0)), depth=r1 - r0,
                             y=a[r0:r1], accumulate=r0 > 0, ds_scale=ds_scale, config=config, transposed=True)


def _launch_panel_matmul(*, out: PanelOutput, start, stop, p, p_strides, depth, y, accumulate, ds_scale, config,
                         transposed):
    """out[start:stop] (+)= P[:rows, :depth] @ y (fp32), each split of the reduction into its slab."""
    target = out.slab[:, start:stop]
    rows, cols = target.shape[1], target.shape[2]
    tiles = triton.cdiv(rows, config.block_m) * triton.cdiv(cols, config.block_n)
    splits = triton.cdiv(depth, out.k_per_split)  # the last, smaller panel may need fewer than the first
    panel_matmul_kernel[(tiles, splits)](
        P=p, Y=y, OUT=target, DS_SCALE=ds_scale, rows=rows, cols=cols, depth=depth, k_per_split=out.k_per_split,
        stride_p_row=p_strides[0], stride_p_k=p_strides[1], stride_y=y.stride(0), stride_out=target.stride(1),
        stride_split=target.stride(0), ACCUMULATE=accumulate, SCALE_DS=ds_scale is not None,
        P_TRANSPOSED=transposed, **launch_flags(config, y),
    )
