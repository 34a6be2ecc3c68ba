"""Kernels of the masked log-sum-exp: candidates left out by a similarity rule decided in the tile.

Row i of S = s·X·Yᵀ leaves out column j when a rule similarity Gᵢⱼ exceeds the row's threshold tᵢ: G is a
second, "guide" tile X_g·Y_gᵀ computed beside S (GISTEmbed's guide model), or S's own unscaled similarity
(the ``false_negative_margin`` rule). Column ``i + protect_offset`` (the positive) is never left out, column
``i + exclude_offset`` (self-similarity) always. The mask has no gradient.

Ties are the whole difficulty: a candidate equal to row i's positive must compare equal to the threshold
built from that positive (a duplicate positive with margin 0 stays in, as in the originals). So every
similarity a rule compares, the tiles' and the thresholds', comes from one arithmetic: :func:`similarity_tile`
with the same tile sizes, warps, K chunk and dot precision (configs.masked_config, one for the three kernels of
a call). A dot's
output element depends only on its two rows, the K chunking and the instruction, never on its place in the
tile, so :func:`pair_similarity_kernel`'s Xᵢ·Y₍ᵢ₊ₒ₎ is bit for bit what the forward's and the backward's tiles
hold for that pair, and forward and backward mask the same entries.

Three kernels: :func:`pair_similarity_kernel` (the thresholds' similarities, O(n·BLOCK·d)),
:func:`masked_lse_kernel` (row LSE, positives, argmax; one pass) and :func:`masked_ds_panel_kernel` (the dS
panel for the panel path's two GEMMs, kernels/panel.py).
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import LOG2E, round_to_bfloat16, similarity_tile


@triton.jit
def kept_entries(b_g, b_threshold, o_x, o_y, m_x, m_y, protect_offset, exclude_offset, HAS_PROTECT: tl.constexpr,
                 HAS_EXCLUDE: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the entries the masked LSE counts: inside the matrix and not rated above the
    row's threshold (Gᵢⱼ > tᵢ leaves out; a NaN similarity compares false and stays, as in torch), or the
    protected column; never the excluded one (it wins over protection, as in the torch engine)."""
    m_in = m_x[:, None] & m_y[None, :]
    m_keep = m_in & (tl.where(b_g > b_threshold[:, None], 1, 0) == 0)
    if HAS_PROTECT:
        m_keep = m_keep | (m_in & (o_y[None, :] == o_x[:, None] + protect_offset))
    if HAS_EXCLUDE:
        m_keep = m_keep & (o_y[None, :] != o_x[:, None] + exclude_offset)
    return m_keep


@triton.jit(do_not_specialize=["n_x", "n_y", "offset"])
def pair_similarity_kernel(
    X,
    Y,
    OUT,
    n_x,
    n_y,
    d,
    stride_x,
    stride_y,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """OUT[i] = Xᵢ·Y₍ᵢ₊offset₎ (fp32; 0 where i + offset is outside Y) for the rows of this program's block,
    read off the tiles X[rows]·Y[rows + offset]ᵀ: the masked kernels' arithmetic for that pair (module doc)."""
    i_m = tl.program_id(0)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    b_out = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, BLOCK_M, BLOCK_N):
        o_y = i_m * BLOCK_M + offset + start + tl.arange(0, BLOCK_N)
        m_y = (o_y >= 0) & (o_y < n_y)
        b_s = similarity_tile(X, Y, o_x, o_y, m_x, m_y, d, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32,
                              INPUT_PRECISION)
        b_out += tl.sum(tl.where((o_y[None, :] == o_x[:, None] + offset) & m_y[None, :], b_s, 0.0), 1)
    tl.store(OUT + o_x, b_out, mask=m_x)


@triton.jit
def rule_tile(b_s, XG, YG, o_x, o_y, m_x, m_y, d_g, stride_xg, stride_yg, HAS_GUIDE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GUIDE_DOT_FP32: tl.constexpr,
              GUIDE_PRECISION: tl.constexpr):
    """The similarity the rule compares: the guide's tile X_g[o_x]·Y_g[o_y]ᵀ, or the model's own ``b_s``."""
    if HAS_GUIDE:
        return similarity_tile(XG, YG, o_x, o_y, m_x, m_y, d_g, stride_xg, stride_yg, BLOCK_M, BLOCK_N, BLOCK_D,
                               GUIDE_DOT_FP32, GUIDE_PRECISION)
    return b_s


@triton.jit(do_not_specialize=["n_x", "n_y", "protect_offset", "exclude_offset"])
def masked_lse_kernel(
    X,
    Y,
    XG,
    YG,
    THRESHOLD,
    SCALE,
    LSE,
    POSITIVES,
    ARGMAX,
    n_x,
    n_y,
    d,
    d_g,
    stride_x,
    stride_y,
    stride_xg,
    stride_yg,
    protect_offset,
    exclude_offset,
    HAS_GUIDE: tl.constexpr,
    HAS_PROTECT: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GUIDE_DOT_FP32: tl.constexpr,
    GUIDE_PRECISION: tl.constexpr,
):
    """One program: rows [i_m·BLOCK_M, …) of X against every column of Y.

    LSE[i] = log Σⱼ exp(s·Xᵢ·Yⱼ) over the kept entries (:func:`kept_entries`; −inf where none is kept);
    with HAS_PROTECT, POSITIVES[i] = s·Xᵢ·Y₍ᵢ₊protect_offset₎ from the same tiles; with WRITE_ARGMAX,
    ARGMAX[i] = the argmax of row i's unmasked similarity (lowest index on ties: within a tile by the
    reduction, across tiles because only a strictly larger max replaces the running one). Online softmax in
    natural units with exp2, fp32 throughout (tiles.py).
    """
    i_m = tl.program_id(0)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    scale = tl.load(SCALE).to(tl.float32)
    b_threshold = tl.load(THRESHOLD + o_x, mask=m_x, other=0.0)
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_positive = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start_n in range(0, n_y, BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        b_s = similarity_tile(X, Y, o_x, o_y, m_x, m_y, d, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32,
                              INPUT_PRECISION)
        b_g = rule_tile(b_s, XG, YG, o_x, o_y, m_x, m_y, d_g, stride_xg, stride_yg, HAS_GUIDE, BLOCK_M, BLOCK_N,
                        BLOCK_D, GUIDE_DOT_FP32, GUIDE_PRECISION)
        m_keep = kept_entries(b_g, b_threshold, o_x, o_y, m_x, m_y, protect_offset, exclude_offset, HAS_PROTECT,
                              HAS_EXCLUDE)
        if WRITE_ARGMAX:
            b_tile_best, b_tile_arg = tl.max(tl.where(m_x[:, None] & m_y[None, :], b_s, float("-inf")), 1,
                                             return_indices=True)
            b_arg = tl.where(b_tile_best > b_best, start_n + b_tile_arg, b_arg)
            b_best = tl.maximum(b_best, b_tile_best)
        b_logits = b_s * scale
        if HAS_PROTECT:
            m_positive = (o_y[None, :] == o_x[:, None] + protect_offset) & m_y[None, :]
            b_positive += tl.sum(tl.where(m_positive, b_logits, 0.0), 1)
        b_logits = tl.where(m_keep, b_logits, float("-inf"))
        b_new_max = tl.maximum(b_max, tl.max(b_logits, 1))
        # A row with nothing kept yet has max −inf; shift by 0 instead so exp2 sees −inf, not NaN.
        b_shift = tl.where(b_new_max == float("-inf"), 0.0, b_new_max)
        b_sum = b_sum * tl.exp2((b_max - b_shift) * LOG2E) + tl.sum(tl.exp2((b_logits - b_shift[:, None]) * LOG2E), 1)
        b_max = b_new_max
    b_lse = tl.where(b_max == float("-inf"), 0.0, b_max) + tl.log(b_sum)
    tl.store(LSE + o_x, b_lse, mask=m_x)
    if HAS_PROTECT:
        tl.store(POSITIVES + o_x, b_positive, mask=m_x)
    if WRITE_ARGMAX:
        tl.store(ARGMAX + o_x, b_arg.to(tl.int64), mask=m_x)


@triton.jit(do_not_specialize=["row_start", "row_stop", "col_start", "col_stop", "protect_offset", "exclude_offset"])
def masked_ds_panel_kernel(
    A,
    B,
    AG,
    BG,
    THRESHOLD,
    SCALE,
    DS_SCALE,
    LSE,
    GRAD_LSE,
    GRAD_POSITIVES,
    DS,
    row_start,
    row_stop,
    col_start,
    col_stop,
    d,
    d_g,
    stride_a,
    stride_b,
    stride_ag,
    stride_bg,
    stride_ds,
    protect_offset,
    exclude_offset,
    HAS_GUIDE: tl.constexpr,
    HAS_PROTECT: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    HAS_LSE_TERM: tl.constexpr,
    HAS_POSITIVE_TERM: tl.constexpr,
    SCALE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GUIDE_DOT_FP32: tl.constexpr,
    GUIDE_PRECISION: tl.constexpr,
):
    """One program: DS[tile (i_m, i_n) of the panel] = dS of rows [row_start + i_m·BM, …) of A against columns
    [col_start + i_n·BN, …) of B, unscaled, in DS's dtype: gᵢ·exp(s·Sᵢⱼ − lseᵢ) over the entries the forward
    kept (the same tiles, the same thresholds: the same mask), plus g_pᵢ at the protected column, added in fp32
    before any rounding (near one-hot the two nearly cancel). fp16: multiplied by DS_SCALE before the cast."""
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_x = row_start + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_y = col_start + i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_x = o_x < row_stop
    m_y = o_y < col_stop
    scale = tl.load(SCALE).to(tl.float32)
    b_s = similarity_tile(A, B, o_x, o_y, m_x, m_y, d, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32,
                          INPUT_PRECISION)
    b_ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_LSE_TERM:
        b_threshold = tl.load(THRESHOLD + o_x, mask=m_x, other=0.0)
        b_g = rule_tile(b_s, AG, BG, o_x, o_y, m_x, m_y, d_g, stride_ag, stride_bg, HAS_GUIDE, BLOCK_M, BLOCK_N,
                        BLOCK_D, GUIDE_DOT_FP32, GUIDE_PRECISION)
        m_keep = kept_entries(b_g, b_threshold, o_x, o_y, m_x, m_y, protect_offset, exclude_offset, HAS_PROTECT,
                              HAS_EXCLUDE)
        b_lse = tl.load(LSE + o_x, mask=m_x, other=0.0)
        b_grad = tl.load(GRAD_LSE + o_x, mask=m_x, other=0.0)
        # Also where the LSE is −inf (a row with nothing kept), whose exp2(−inf + inf) would be NaN.
        b_ds = tl.where(m_keep, tl.exp2((b_s * scale - b_lse[:, None]) * LOG2E) * b_grad[:, None], 0.0)
    if HAS_POSITIVE_TERM:
        b_grad_positive = tl.load(GRAD_POSITIVES + o_x, mask=m_x, other=0.0)
        m_positive = (o_y[None, :] == o_x[:, None] + protect_offset) & m_y[None, :]
        b_ds += tl.where(m_positive, b_grad_positive[:, None], 0.0)
    if SCALE_DS:
        b_ds = b_ds * tl.load(DS_SCALE)
    if DOT_FP32:
        # Interpreter only: its fp32 → bf16 cast truncates; round to nearest even as the GPU does.
        b_ds = round_to_bfloat16(b_ds)
    p_ds = DS + (o_x - row_start).to(tl.int64)[:, None] * stride_ds + (o_y - col_start)[None, :]
    tl.store(p_ds, b_ds.to(DS.dtype.element_ty), mask=m_x[:, None] & m_y[None, :])
