"""Panel gradient path for large d: dS written once per panel, then multiplied out by two GEMM kernels.

At real CLIP widths (d = 512–1280) the fused gradient's fp32 accumulator [BLOCK_M, d] cannot stay on chip,
and read-modify-writing it per column block moved 8·n·m·d/BLOCK_N bytes (about 32 FLOP/byte, memory-bound
several times over on an H100). Here, for one panel of R rows × C columns of S:

1. :func:`ds_panel_kernel` recomputes the S tiles, forms dS exactly as the fused kernel would
   (:func:`fastcontrast.kernels.tiles.gradient_tile`: LSE terms, positives, masks; or SigLIP) and stores it
   once, in the input dtype (fp16 scaled by a power of two, see tiles.as_dot_operand): 2·R·C bytes.
2. :func:`panel_matmul_kernel` twice: dA[rows] (+)= dS·B[cols] and dB[cols] (+)= dSᵀ·A[rows], each an ordinary
   tiled GEMM that reads the panel once more.

Per panel that is 3 passes of 2·R·C·d FLOPs (the fused path needs 4: S is recomputed for dA and for dB) for
about 6·R·C bytes: d FLOPs per byte, above an H100's ridge (~295) from d = 512. The host walks the panels in
a fixed order and every output tile has one owner, so results are deterministic without atomics.

Single-tower losses (S = s·Z·Zᵀ, symmetric) take the SYMMETRIC dS kernel: panels on and above the diagonal
only, each holding G = dS + dSᵀ from one S tile, so the backward is about ½ + 1 pass instead of 3
(gradient_launch.symmetric_gradients).
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import (
    gradient_tile,
    load_row_statistics,
    round_to_bfloat16,
    similarity_tile,
)


@triton.jit(do_not_specialize=["row_start", "row_stop", "col_start", "col_stop", "offset", "private_columns"])
def ds_panel_kernel(
    A,
    B,
    SCALE,
    BIAS,
    DS_SCALE,
    POSITIVE_INDEX,
    GRAD_POSITIVES,
    LSE_ROW,
    GRAD_ROW,
    LSE_COL,
    GRAD_COL,
    GRAD_TOTAL,
    DS,
    BIAS_PARTIAL,
    LOSS_PARTIAL,
    row_start,
    row_stop,
    col_start,
    col_stop,
    d,
    stride_a,
    stride_b,
    stride_ds,
    offset,
    private_columns,
    MODE: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr,
    HAS_COL_TERM: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    HAS_POSITIVES: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    HAS_PRIVATE: tl.constexpr,
    SCALE_DS: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: DS[tile (i_m, i_n) of the panel] = dS of rows [row_start + i_m·BM, …) of A against columns
    [col_start + i_n·BN, …) of B, in DS's dtype; for SigLIP (MODE 1) also the tile's Σ dS and, with
    WRITE_LOSS, the tile's sum of SigLIP's terms (a forward under grad is then this sweep alone).

    SYMMETRIC (B is A, S = s·A·Aᵀ, the LSE of the rows only, masks symmetric, the positive index an
    involution; the launcher passes the row statistics as the column ones too): the panel holds G = dS + dSᵀ,
    each entry formed from the one S tile, the row's term and the column's (Gᵢⱼ = gᵢ·pᵢⱼ + gⱼ·pⱼᵢ plus both
    positives' gradients). The launcher walks panels on or above the diagonal only. Entries below the
    diagonal are not computed: in a panel on the diagonal each entry above it is also stored transposed (the
    panel's GEMM then reads all of G), and a tile wholly below it does no work.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    if SYMMETRIC:
        # A tile wholly below the diagonal does no work: the mirror images of the entries above store it.
        if col_start + i_n * BLOCK_N + BLOCK_N - 1 >= row_start + i_m * BLOCK_M:
            _ds_tile(
                A, B, SCALE, BIAS, DS_SCALE, POSITIVE_INDEX, GRAD_POSITIVES, LSE_ROW, GRAD_ROW, LSE_COL, GRAD_COL,
                GRAD_TOTAL, DS, BIAS_PARTIAL, LOSS_PARTIAL, row_start, row_stop, col_start, col_stop, d, stride_a,
                stride_b, stride_ds, offset, private_columns, i_m, i_n, MODE, HAS_ROW_TERM, HAS_COL_TERM, HAS_EXCLUDE,
                HAS_POSITIVES, EXCLUDE_POSITIVE, HAS_PRIVATE, SCALE_DS, WRITE_LOSS, SYMMETRIC, BLOCK_M, BLOCK_N,
                BLOCK_D, DOT_FP32, INPUT_PRECISION,
            )
    else:
        _ds_tile(
            A, B, SCALE, BIAS, DS_SCALE, POSITIVE_INDEX, GRAD_POSITIVES, LSE_ROW, GRAD_ROW, LSE_COL, GRAD_COL,
            GRAD_TOTAL, DS, BIAS_PARTIAL, LOSS_PARTIAL, row_start, row_stop, col_start, col_stop, d, stride_a,
            stride_b, stride_ds, offset, private_columns, i_m, i_n, MODE, HAS_ROW_TERM, HAS_COL_TERM, HAS_EXCLUDE,
            HAS_POSITIVES, EXCLUDE_POSITIVE, HAS_PRIVATE, SCALE_DS, WRITE_LOSS, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_D,
            DOT_FP32, INPUT_PRECISION,
        )


@triton.jit
def _ds_tile(
    A, B, SCALE, BIAS, DS_SCALE, POSITIVE_INDEX, GRAD_POSITIVES, LSE_ROW, GRAD_ROW, LSE_COL, GRAD_COL, GRAD_TOTAL,
    DS, BIAS_PARTIAL, LOSS_PARTIAL, row_start, row_stop, col_start, col_stop, d, stride_a, stride_b, stride_ds,
    offset, private_columns, i_m, i_n,
    MODE: tl.constexpr, HAS_ROW_TERM: tl.constexpr, HAS_COL_TERM: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    HAS_POSITIVES: tl.constexpr, EXCLUDE_POSITIVE: tl.constexpr, HAS_PRIVATE: tl.constexpr, SCALE_DS: tl.constexpr,
    WRITE_LOSS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The body of :func:`ds_panel_kernel` for its tile (i_m, i_n)."""
    o_x = row_start + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_y = col_start + i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_x = o_x < row_stop
    m_y = o_y < col_stop
    scale = tl.load(SCALE).to(tl.float32)
    bias = 0.0
    grad_total = 0.0
    if MODE == 1:
        bias = tl.load(BIAS).to(tl.float32)
        grad_total = tl.load(GRAD_TOTAL).to(tl.float32)
    b_lse_x, b_grad_x, b_pos_x, b_grad_pos_x = load_row_statistics(
        LSE_ROW, GRAD_ROW, POSITIVE_INDEX, GRAD_POSITIVES, o_x, m_x, MODE, HAS_ROW_TERM, HAS_POSITIVES, True, BLOCK_M,
    )
    b_s = similarity_tile(
        A, B, o_x, o_y, m_x, m_y, d, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    )
    b_ds, b_loss_rows = gradient_tile(
        b_s, o_x, o_y, m_x, m_y, scale, bias, offset, private_columns, grad_total,
        b_lse_x, b_grad_x, b_pos_x, b_grad_pos_x, LSE_COL, GRAD_COL, POSITIVE_INDEX, GRAD_POSITIVES,
        MODE, HAS_ROW_TERM, HAS_COL_TERM, HAS_EXCLUDE, HAS_POSITIVES, EXCLUDE_POSITIVE, HAS_PRIVATE, True, BLOCK_N,
        WRITE_LOSS,
    )
    if SYMMETRIC and HAS_POSITIVES:
        # dSᵀ's positive: row j's positive is i exactly where i's is j (an involution), at j's gradient.
        b_grad_pos_y = tl.load(GRAD_POSITIVES + o_y, mask=m_y, other=0.0)
        b_ds += tl.where(o_y[None, :] == b_pos_x[:, None], b_grad_pos_y[None, :], 0.0)
    if MODE == 1:
        tl.store(BIAS_PARTIAL + i_m * tl.num_programs(1) + i_n, tl.sum(tl.sum(b_ds, 1), 0))
        if WRITE_LOSS:
            tl.store(LOSS_PARTIAL + i_m * tl.num_programs(1) + i_n, tl.sum(b_loss_rows, 0))
    if SCALE_DS:
        b_ds = b_ds * tl.load(DS_SCALE)
    if DOT_FP32:
        # Interpreter only: its fp32 → bf16 cast truncates; round to nearest even as the GPU does.
        b_ds = round_to_bfloat16(b_ds)
    b_ds = b_ds.to(DS.dtype.element_ty)
    m_ds = m_x[:, None] & m_y[None, :]
    if SYMMETRIC:
        # int32 offsets (the launcher keeps a symmetric panel's side ≤ 32768): the second pointer tile stays small.
        m_upper = o_y[None, :] >= o_x[:, None]
        tl.store(DS + ((o_x - row_start) * stride_ds)[:, None] + (o_y - col_start)[None, :], b_ds, mask=m_ds & m_upper)
        # Entries above the diagonal whose mirror lies in this panel (one on the diagonal) go there too.
        m_mirror = m_ds & (o_y[None, :] > o_x[:, None]) & (o_y < row_stop)[None, :] & (o_x >= col_start)[:, None]
        tl.store(DS + ((o_y - row_start) * stride_ds)[None, :] + (o_x - col_start)[:, None], b_ds, mask=m_mirror)
    else:
        p_ds = DS + (o_x - row_start).to(tl.int64)[:, None] * stride_ds + (o_y - col_start)[None, :]
        tl.store(p_ds, b_ds, mask=m_ds)


@triton.jit
def _panel_dot(b_p, b_y, b_acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if DOT_FP32:
        b_p = b_p.to(tl.float32)  # interpreter only, see tiles.similarity_tile
        b_y = b_y.to(tl.float32)
    # [BM, BK] @ [BK, BN] -> [BM, BN]
    return tl.dot(b_p, b_y, b_acc, input_precision=INPUT_PRECISION)


@triton.jit
def _load_panel(ptrs, m_m, m_k, P_TRANSPOSED: tl.constexpr, K_MASKED: tl.constexpr):
    """A [BLOCK_M, BLOCK_D] block of P: rows masked unless P is dSᵀ (rows are then its contiguous dimension,
    read unmasked so the load vectorises), K masked only in the last, partial block (``m_k`` is None for the
    others)."""
    if P_TRANSPOSED:
        if K_MASKED:
            b_p = tl.load(ptrs, mask=m_k[None, :], other=0.0)
        else:
            b_p = tl.load(ptrs)
    else:
        if K_MASKED:
            b_p = tl.load(ptrs, mask=m_m[:, None] & m_k[None, :], other=0.0)
        else:
            b_p = tl.load(ptrs, mask=m_m[:, None], other=0.0)
    return b_p


@triton.jit(do_not_specialize=["rows", "depth", "k_per_split"])
def panel_matmul_kernel(
    P,
    Y,
    OUT,
    DS_SCALE,
    rows,
    cols,
    depth,
    k_per_split,
    stride_p_row,
    stride_p_k,
    stride_y,
    stride_out,
    stride_split,
    ACCUMULATE: tl.constexpr,
    SCALE_DS: tl.constexpr,
    P_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: the [BLOCK_M, BLOCK_N] tile (i_t) of OUT[i_s] (+)= P[:, k-range of split i_s] @ Y[k-range].

    P is the dS panel, read as [rows, depth] through its strides (dS itself for dA; dSᵀ for dB, then
    P_TRANSPOSED: contiguous along rows); Y is [depth, cols] row-major (B's or A's rows, cols = padded d, a
    multiple of 16); OUT is fp32 [splits, rows, cols] with strides (stride_split, stride_out, 1): the rows of
    a slab that spans the whole output and outlives the panel, so that its splits add up over every panel and
    are summed once at the end. ACCUMULATE adds to what OUT holds (the earlier panels); SCALE_DS divides by the
    fp16 scale of dS. BLOCK_D is the K chunk; k_per_split is a multiple of it.

    The loads are vectorised, so that they become pipelined ``cp.async`` copies: a mask must then be constant
    along each load's contiguous dimension. So the whole K blocks run without a K mask and only the last,
    partial one is masked; and dSᵀ is read without a row mask (the launcher gives the panel buffer a tail
    of slack, so reads past the last row stay in bounds; those rows only feed output rows that are masked).
    """
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    i_m = i_t // tiles_n
    i_n = i_t % tiles_n
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < rows
    m_n = o_n < cols
    k_start = tl.multiple_of(i_s * k_per_split, BLOCK_D)
    k_stop = tl.minimum(depth, k_start + k_per_split)
    k_full = k_start + (k_stop - k_start) // BLOCK_D * BLOCK_D
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_k in range(k_start, k_full, BLOCK_D):
        o_k = start_k + tl.arange(0, BLOCK_D)
        b_p = _load_panel(P + o_m.to(tl.int64)[:, None] * stride_p_row + o_k.to(tl.int64)[None, :] * stride_p_k,
                          m_m, None, P_TRANSPOSED, False)
        b_y = tl.load(Y + o_k.to(tl.int64)[:, None] * stride_y + o_n[None, :], mask=m_n[None, :], other=0.0)
        b_acc = _panel_dot(b_p, b_y, b_acc, DOT_FP32, INPUT_PRECISION)
    if k_full < k_stop:
        o_k = k_full + tl.arange(0, BLOCK_D)
        m_k = o_k < k_stop
        b_p = _load_panel(P + o_m.to(tl.int64)[:, None] * stride_p_row + o_k.to(tl.int64)[None, :] * stride_p_k,
                          m_m, m_k, P_TRANSPOSED, True)
        b_y = tl.load(Y + o_k.to(tl.int64)[:, None] * stride_y + o_n[None, :], mask=m_k[:, None] & m_n[None, :],
                      other=0.0)
        b_acc = _panel_dot(b_p, b_y, b_acc, DOT_FP32, INPUT_PRECISION)
    if SCALE_DS:
        b_acc = b_acc / tl.load(DS_SCALE)
    p_out = OUT + i_s.to(tl.int64) * stride_split + o_m.to(tl.int64)[:, None] * stride_out + o_n[None, :]
    m_out = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        b_acc += tl.load(p_out, mask=m_out, other=0.0)
    tl.store(p_out, b_acc, mask=m_out)
