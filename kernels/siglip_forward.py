"""Forward SigLIP kernel: per-row-block partial sums of softplus(−zᵢⱼ·(s·Xᵢ·Yⱼ + b)).

Each program writes one fp32 partial; the host sums the partials in a fixed order (no atomics), so the
same inputs always give the same bits.
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import LN2, LOG2E, load_rows, row_tile_similarity


@triton.jit
def softplus(b_x):
    """log(1 + eˣ) for fp32 tiles: max(x, 0) + log1p(e^−|x|), accurate to a few ulp for every x.

    SigLIP sums n·m terms and most are negatives with x ≈ bias ≈ −10, where softplus ≈ 4.5e−5: a plain
    log(1 + u) would round 1 + u and lose ~1e−3 relative on every such term, a bias that does not average
    out. log1p(u) = log(w)·u / (w − 1) with w = 1 + u (Goldberg) cancels that rounding.
    """
    b_u = tl.exp2(-tl.abs(b_x) * LOG2E)
    b_w = 1.0 + b_u
    b_den = tl.where(b_w == 1.0, 1.0, b_w - 1.0)
    # Approximate division (2 ulp): the IEEE one is a subroutine call whose frame spills on sm_80.
    b_log1p = tl.where(b_w == 1.0, b_u, LN2 * tl.log2(b_w) * tl.fdiv(b_u, b_den, ieee_rounding=False))
    return tl.maximum(b_x, 0.0) + b_log1p


@triton.jit(do_not_specialize=["n_x", "n_y", "positive_offset", "cols_per_split"])
def siglip_forward_kernel(
    X,
    Y,
    SCALE,
    BIAS,
    PARTIAL,
    n_x,
    n_y,
    d,
    stride_x,
    stride_y,
    positive_offset,
    cols_per_split,
    X_RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: PARTIAL[i_s, i_m] = Σ over rows of block i_m and the columns of split i_s of
    softplus(−z·(s·S + b)), with z = +1 where j = i + positive_offset, else −1."""
    i_m = tl.program_id(0)
    i_s = tl.program_id(1)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)  # 0 when the loss has none: one binary for both
    b_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=X.dtype.element_ty)
    if X_RESIDENT:
        b_x = load_rows(X, o_x, m_x, d, stride_x, BLOCK_D, DOT_FP32)

    b_total = tl.zeros([BLOCK_M], dtype=tl.float32)
    start_split = i_s * cols_per_split
    for start_n in range(start_split, tl.minimum(n_y, start_split + cols_per_split), BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        b_logits = row_tile_similarity(
            X, Y, b_x, o_x, o_y, m_x, m_y, d, stride_x, stride_y,
            X_RESIDENT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        ) * scale + bias
        m_positive = o_y[None, :] == o_x[:, None] + positive_offset
        # −z·x: +x for negatives, −x for the positive pair.
        b_signed = tl.where(m_positive, -b_logits, b_logits)
        b_terms = tl.where(m_x[:, None] & m_y[None, :], softplus(b_signed), 0.0)
        b_total += tl.sum(b_terms, 1)
    tl.store(PARTIAL + i_s * tl.num_programs(0) + i_m, tl.sum(b_total, 0))
