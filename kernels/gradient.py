"""Fused gradient kernel for d ≤ configs.fused_max_d: OUT = dS·Y for the rows of X, S = s·X·Yᵀ recomputed tile by tile.

The same kernel gives both halves of the backward pass with no atomics (FlashAttention's two loops):
dA = dS·B runs it with (X, Y) = (A, B); dB = dSᵀ·A runs it with (X, Y) = (B, A) and the row/column roles
of the statistics swapped (``X_IS_A`` false). Each program owns BLOCK_M rows of OUT, so results are bitwise
deterministic. dS is :func:`fastcontrast.kernels.tiles.gradient_tile` (MODE 0: the LSE terms and the
positives; MODE 1: SigLIP, always with its bias (0 if the loss has none) and the per-program Σ dS of the bias
gradient, summed on the host in a fixed order).

The whole feature dim fits one BLOCK_D chunk (the launcher pads d to a multiple of 16): the row tile of X and
the [BLOCK_M, BLOCK_D] fp32 accumulator stay in registers across the column loop, and each Y tile is loaded
once for both of its dots (S = X·Yᵀ and acc += dS·Y). Larger d take the panel path (kernels/panel.py).

OUT is fp32 and unscaled (the autograd layer multiplies by s). With more than one column split (few rows,
many columns) each split writes its own [n_x, d] slab and the host sums the slabs in a fixed order.
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import (
    as_dot_operand,
    gradient_tile,
    load_row_statistics,
    load_rows,
)


@triton.jit(do_not_specialize=["n_x", "n_y", "offset", "private_columns", "cols_per_split"])
def gradient_kernel(
    X,
    Y,
    SCALE,
    BIAS,
    DS_SCALE,
    POSITIVE_INDEX,
    GRAD_POSITIVES,
    LSE_X,
    GRAD_X,
    LSE_Y,
    GRAD_Y,
    GRAD_TOTAL,
    OUT,
    BIAS_PARTIAL,
    n_x,
    n_y,
    d,
    stride_x,
    stride_y,
    stride_out,
    offset,
    private_columns,
    cols_per_split,
    MODE: tl.constexpr,
    HAS_X_TERM: tl.constexpr,
    HAS_Y_TERM: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    HAS_POSITIVES: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    HAS_PRIVATE: tl.constexpr,
    X_IS_A: tl.constexpr,
    SCALE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: OUT[i_s, rows of block i_m] = Σ over the column blocks of split i_s of dS · Y[cols]."""
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d
    scale = tl.load(SCALE).to(tl.float32)
    ds_scale = 1.0
    if SCALE_DS:
        ds_scale = tl.load(DS_SCALE)
    bias = 0.0
    grad_total = 0.0
    if MODE == 1:
        bias = tl.load(BIAS).to(tl.float32)
        grad_total = tl.load(GRAD_TOTAL).to(tl.float32)
    b_lse_x, b_grad_x, b_pos_x, b_grad_pos_x = load_row_statistics(
        LSE_X, GRAD_X, POSITIVE_INDEX, GRAD_POSITIVES, o_x, m_x, MODE, HAS_X_TERM, HAS_POSITIVES, X_IS_A, BLOCK_M,
    )
    # The row tile stays on chip for the whole column loop.
    b_x = load_rows(X, o_x, m_x, d, stride_x, BLOCK_D, DOT_FP32)

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_bias_grad = tl.zeros([BLOCK_M], dtype=tl.float32)
    start_split = i_s * cols_per_split
    for start_n in range(start_split, tl.minimum(n_y, start_split + cols_per_split), BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        # One load of the Y tile serves both dots.
        b_y = tl.load(Y + o_y.to(tl.int64)[:, None] * stride_y + o_d[None, :], mask=m_y[:, None] & m_d[None, :],
                      other=0.0)
        if DOT_FP32:
            b_y = b_y.to(tl.float32)  # interpreter only, see tiles.similarity_tile
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        b_s = tl.dot(b_x, tl.trans(b_y), input_precision=INPUT_PRECISION)
        b_ds, _ = gradient_tile(
            b_s, o_x, o_y, m_x, m_y, scale, bias, offset, private_columns, grad_total,
            b_lse_x, b_grad_x, b_pos_x, b_grad_pos_x, LSE_Y, GRAD_Y, POSITIVE_INDEX, GRAD_POSITIVES,
            MODE, HAS_X_TERM, HAS_Y_TERM, HAS_EXCLUDE, HAS_POSITIVES, EXCLUDE_POSITIVE, HAS_PRIVATE, X_IS_A,
            BLOCK_N,
        )
        if MODE == 1:
            b_bias_grad += tl.sum(b_ds, 1)
        # [BM, BN] @ [BN, BD] -> [BM, BD]; dS goes to the tensor cores in Y's dtype, as FlashAttention does with P.
        b_acc = tl.dot(as_dot_operand(b_ds, b_y, ds_scale, DOT_FP32, SCALE_DS), b_y, b_acc,
                       input_precision=INPUT_PRECISION)

    if SCALE_DS:
        b_acc = b_acc / ds_scale
    p_out = OUT + i_s.to(tl.int64) * n_x * stride_out + o_x.to(tl.int64)[:, None] * stride_out + o_d[None, :]
    tl.store(p_out, b_acc, mask=m_x[:, None] & m_d[None, :])
    if MODE == 1:
        tl.store(BIAS_PARTIAL + i_s * tl.num_programs(0) + i_m, tl.sum(b_bias_grad, 0))
