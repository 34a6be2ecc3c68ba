"""Forward SigLIP kernel: per-row-block partial sums of softplus(−zᵢⱼ·(s·Xᵢ·Yⱼ + b)).

Each program writes one fp32 partial; the host sums the partials in a fixed order (no atomics), so the
same inputs always give the same bits.
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import load_rows, row_tile_similarity, siglip_loss_tile


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
        b_s = row_tile_similarity(
            X, Y, b_x, o_x, o_y, m_x, m_y, d, stride_x, stride_y,
            X_RESIDENT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        )
        b_terms = siglip_loss_tile(b_s, o_x, o_y, m_x, m_y, scale, bias, positive_offset)
        b_total += tl.sum(b_terms, 1)
    tl.store(PARTIAL + i_s * tl.num_programs(0) + i_m, tl.sum(b_total, 0))
