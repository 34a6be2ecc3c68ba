"""Gradient kernel: OUT = dS·Y for the rows of X, S = s·X·Yᵀ recomputed tile by tile.

The same kernel gives both halves of the backward pass with no atomics (FlashAttention's two loops):
dA = dS·B runs it with (X, Y) = (A, B); dB = dSᵀ·A runs it with (X, Y) = (B, A) and the row/column roles
of the statistics swapped (``X_IS_A`` false). Each program owns BLOCK_M rows of OUT, so results are bitwise
deterministic.

MODE_LSE:    dSᵢⱼ = gxᵢ·exp(Sᵢⱼ − lse_xᵢ) + gyⱼ·exp(Sᵢⱼ − lse_yⱼ) over the allowed entries (tiles.allowed_entries),
             plus the positives' gradient at each row's positive entry, folded in fp32 before any rounding.
MODE_SIGLIP: dSᵢⱼ = −zᵢⱼ·σ(−zᵢⱼ·(Sᵢⱼ + b))·g, z = +1 where j = i + offset; each program also writes the
             partial Σ dS of its rows (the bias gradient), summed on the host in a fixed order.

OUT is fp32 and unscaled (the autograd layer multiplies by s). When d fits one BLOCK_D chunk, the
[BLOCK_M, BLOCK_D] accumulator lives in registers; otherwise the program read-modify-writes its own rows
of OUT (zero-initialised by the launcher) once per column block. With more than one column split (few
rows, many columns) each split writes its own [n_x, d] slab and the host sums the slabs in a fixed order.
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import (
    LOG2E,
    accumulate_product,
    allowed_entries,
    lse_gradient_tile,
    positive_entries,
    similarity_tile,
)

MODE_LSE = tl.constexpr(0)
MODE_SIGLIP = tl.constexpr(1)


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
    GRAD_POSITIVE_TERM: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    HAS_PRIVATE: tl.constexpr,
    X_IS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_BIAS_PARTIAL: tl.constexpr,
    SCALE_DS: tl.constexpr,
    REGISTER_ACC: tl.constexpr,
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
    scale = tl.load(SCALE).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(BIAS).to(tl.float32)
    ds_scale = 1.0
    if SCALE_DS:
        ds_scale = tl.load(DS_SCALE)
    b_lse_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_grad_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_pos_x = tl.zeros([BLOCK_M], dtype=tl.int64)
    b_grad_pos_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MODE == MODE_LSE:
        if HAS_X_TERM:
            b_lse_x = tl.load(LSE_X + o_x, mask=m_x, other=0.0)
            b_grad_x = tl.load(GRAD_X + o_x, mask=m_x, other=0.0)
        if HAS_POSITIVES:
            if X_IS_A:
                b_pos_x = tl.load(POSITIVE_INDEX + o_x, mask=m_x, other=-1)
                if GRAD_POSITIVE_TERM:
                    b_grad_pos_x = tl.load(GRAD_POSITIVES + o_x, mask=m_x, other=0.0)
    else:
        grad_total = tl.load(GRAD_TOTAL).to(tl.float32)

    o_d0 = tl.arange(0, BLOCK_D)
    p_out = OUT + i_s.to(tl.int64) * n_x * stride_out + o_x.to(tl.int64)[:, None] * stride_out
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_bias_grad = tl.zeros([BLOCK_M], dtype=tl.float32)
    start_split = i_s * cols_per_split
    for start_n in range(start_split, tl.minimum(n_y, start_split + cols_per_split), BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        b_s = similarity_tile(
            X, Y, o_x, o_y, m_x, m_y, d, stride_x, stride_y,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        )
        if MODE == MODE_LSE:
            b_lse_y = tl.zeros([BLOCK_N], dtype=tl.float32)
            b_grad_y = tl.zeros([BLOCK_N], dtype=tl.float32)
            if HAS_Y_TERM:
                b_lse_y = tl.load(LSE_Y + o_y, mask=m_y, other=0.0)
                b_grad_y = tl.load(GRAD_Y + o_y, mask=m_y, other=0.0)
            b_pos_y = tl.zeros([BLOCK_N], dtype=tl.int64)
            b_grad_pos_y = tl.zeros([BLOCK_N], dtype=tl.float32)
            if HAS_POSITIVES:
                if not X_IS_A:
                    b_pos_y = tl.load(POSITIVE_INDEX + o_y, mask=m_y, other=-1)
                    if GRAD_POSITIVE_TERM:
                        b_grad_pos_y = tl.load(GRAD_POSITIVES + o_y, mask=m_y, other=0.0)
            m_valid = allowed_entries(
                o_x, o_y, m_x, m_y, offset, b_pos_x, b_pos_y, private_columns,
                HAS_EXCLUDE, EXCLUDE_POSITIVE, HAS_PRIVATE, X_IS_A,
            )
            b_ds = lse_gradient_tile(b_s * scale, m_valid, b_lse_x, b_grad_x, b_lse_y, b_grad_y,
                                     HAS_X_TERM, HAS_Y_TERM)
            if GRAD_POSITIVE_TERM:
                # The positives' gradient meets the softmax terms in fp32, before dS is rounded (tiles.py).
                b_is_positive = positive_entries(o_x, o_y, b_pos_x, b_pos_y, X_IS_A)
                if X_IS_A:
                    b_ds += tl.where(b_is_positive, b_grad_pos_x[:, None], 0.0)
                else:
                    b_ds += tl.where(b_is_positive, b_grad_pos_y[None, :], 0.0)
        else:
            b_logits = b_s * scale + bias
            m_positive = o_y[None, :] == o_x[:, None] + offset
            # t = −z·x; d softplus(t)/dx = −z·σ(t). σ(t) from e^−|t| so neither branch overflows.
            b_t = tl.where(m_positive, -b_logits, b_logits)
            b_e = tl.exp2(-tl.abs(b_t) * LOG2E)
            b_sigmoid = tl.where(b_t >= 0, 1.0 / (1.0 + b_e), b_e / (1.0 + b_e))
            b_ds = tl.where(m_positive, -b_sigmoid, b_sigmoid) * grad_total
            b_ds = tl.where(m_x[:, None] & m_y[None, :], b_ds, 0.0)
        if WRITE_BIAS_PARTIAL:
            b_bias_grad += tl.sum(b_ds, 1)

        b_acc = accumulate_product(
            b_acc, b_ds, Y, o_y, m_y, p_out, m_x, d, stride_y, ds_scale,
            REGISTER_ACC, BLOCK_D, DOT_FP32, SCALE_DS, INPUT_PRECISION,
        )

    if REGISTER_ACC:
        if SCALE_DS:
            b_acc = b_acc / ds_scale
        tl.store(p_out + o_d0[None, :], b_acc, mask=m_x[:, None] & (o_d0[None, :] < d))
    if WRITE_BIAS_PARTIAL:
        tl.store(BIAS_PARTIAL + i_s * tl.num_programs(0) + i_m, tl.sum(b_bias_grad, 0))
