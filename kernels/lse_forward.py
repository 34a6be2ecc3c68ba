"""Forward log-sum-exp kernel: row LSE of S = s·X·Yᵀ, the positive logits, optionally column partials.

Every LSE leaves the kernels as an exact pair, hi = fl(max + log-sum) and lo = its rounding error
(:func:`exact_sum`; fastcontrast/lse_split.py): what makes lse − positive the originals' log-sum −
(positive − max) to the bit, where one fp32 LSE would round at the max's magnitude.

One pass over S gives both directions of CLIP when the column scratch (2 · n / BLOCK_M · m fp32) is small:
each program also writes, for every column, the LSE pair over its own BLOCK_M rows, and
:func:`merge_partials_kernel` merges those partials over the row blocks. When the scratch would be large, the
column LSE is the same kernel run on Y·Xᵀ instead (a second pass, no scratch).

A single-tower problem (S = s·Z·Zᵀ, symmetric) takes about half a pass: SYMMETRIC programs reduce the upper
block triangle only, each tile for its rows and, transposed, for its columns' rows (TritonEngine's
``_symmetric_lse_forward``).
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import LOG2E, allowed_entries, load_rows, positive_entries, row_tile_similarity


@triton.jit(do_not_specialize=["n_x", "n_y", "exclude_offset", "private_columns", "cols_per_split", "block_offset"])
def lse_forward_kernel(
    X,
    Y,
    SCALE,
    POSITIVE_INDEX,
    LSE_X,
    LOW_X,
    POSITIVES,
    COL_PARTIAL,
    ARGMAX_X,
    MAX_X,
    COL_ARGMAX,
    COL_MAX,
    COL_LOW,
    n_x,
    n_y,
    d,
    stride_x,
    stride_y,
    exclude_offset,
    private_columns,
    cols_per_split,
    block_offset,
    HAS_EXCLUDE: tl.constexpr,
    HAS_POSITIVES: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    HAS_PRIVATE: tl.constexpr,
    X_IS_A: tl.constexpr,
    WRITE_COL_PARTIAL: tl.constexpr,
    WRITE_ARGMAX: tl.constexpr,
    X_RESIDENT: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: rows [i_m·BLOCK_M, (i_m+1)·BLOCK_M) of X against the columns of split i_s of Y (with
    X_RESIDENT, d ≤ BLOCK_D: the row tile loaded once and kept on chip for the whole column loop).

    Writes LSE_X[i_s, rows] = log Σⱼ exp(s·Xᵢ·Yⱼ) over the entries the masks allow (``allowed_entries``) and
    LOW_X its low part (:func:`exact_sum`; −inf and 0 where the masks allow nothing).
    With positives on A's rows (HAS_POSITIVES and X_IS_A), POSITIVES[i_s, rows] = the logit at each row's
    positive column (0 in splits that do not hold it, so the host's sum over splits is exact). With
    WRITE_COL_PARTIAL, COL_PARTIAL[i_m, j] = log Σ_{i in block} exp(Sᵢⱼ) and COL_LOW[i_m, j] its low part.
    Online softmax in natural units with exp2 (see tiles.py), fp32 throughout. With more than one split (few
    rows, many columns: a local loss, a memory bank) :func:`merge_partials_kernel` merges the splits' pairs, in
    a fixed order.

    If WRITE_ARGMAX, also each row's argmax over the split (ARGMAX_X, with its max in MAX_X) and, with
    the column partials, each column's argmax over the block's rows (COL_ARGMAX, COL_MAX): retrieval accuracy
    from the same pass. Ties go to the lowest index: within a tile by the reduction, across tiles because
    only a strictly larger max replaces the running one, across splits / row blocks by the host's argmax.

    SYMMETRIC (X is Y, masks symmetric, one split, no argmax): S = s·X·Xᵀ is symmetric, so program i_m
    (= block_offset + its id, i_l) reduces only the columns from its own diagonal block on, and each tile
    serves its rows and, read transposed, the rows of its columns. It writes one row of the scratch
    COL_PARTIAL / COL_LOW [programs, n]: at its own rows the rows' pairs, at the columns past its diagonal block
    the column partials over its rows; nothing before its diagonal block. :func:`merge_partials_kernel`
    with ``block_rows`` = BLOCK_M merges every row's pairs from the rows that hold them. A row's positive lies
    in its own program's columns or, when it lies before them, the partner row's program meets the entry
    as its own positive (the index is an involution) and writes it for both.
    """
    i_l = tl.program_id(0)
    i_m = block_offset + i_l
    i_s = tl.program_id(1)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    scale = tl.load(SCALE).to(tl.float32)
    b_pos_x = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_POSITIVES:
        if X_IS_A:
            b_pos_x = tl.load(POSITIVE_INDEX + o_x, mask=m_x, other=-1)
    b_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=X.dtype.element_ty)
    if X_RESIDENT:
        b_x = load_rows(X, o_x, m_x, d, stride_x, BLOCK_D, DOT_FP32)

    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    b_positive = tl.zeros([BLOCK_M], dtype=tl.float32)
    start_split = i_s * cols_per_split
    stop_split = tl.minimum(n_y, start_split + cols_per_split)
    # Past this column the tile's columns are rows of later blocks (SYMMETRIC): their partials are written.
    first_later = (i_m + 1) * BLOCK_M
    if SYMMETRIC:
        start_split = i_m * BLOCK_M
        stop_split = n_y
    for start_n in range(start_split, stop_split, BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        b_pos_y = tl.zeros([BLOCK_N], dtype=tl.int64)
        if HAS_POSITIVES:
            if not X_IS_A:
                b_pos_y = tl.load(POSITIVE_INDEX + o_y, mask=m_y, other=-1)
        b_logits = row_tile_similarity(
            X, Y, b_x, o_x, o_y, m_x, m_y, d, stride_x, stride_y,
            X_RESIDENT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        ) * scale
        if HAS_POSITIVES and X_IS_A:
            b_is_positive = positive_entries(o_x, o_y, b_pos_x, b_pos_y, X_IS_A)
            b_positive += tl.sum(tl.where(b_is_positive, b_logits, 0.0), 1)
        m_valid = allowed_entries(
            o_x, o_y, m_x, m_y, exclude_offset, b_pos_x, b_pos_y, private_columns,
            HAS_EXCLUDE, EXCLUDE_POSITIVE, HAS_PRIVATE, X_IS_A,
        )
        b_logits = tl.where(m_valid, b_logits, float("-inf"))

        if WRITE_ARGMAX:
            b_tile_max, b_tile_arg = tl.max(b_logits, 1, return_indices=True)
            b_arg = tl.where(b_tile_max > b_max, start_n + b_tile_arg, b_arg)
        else:
            b_tile_max = tl.max(b_logits, 1)
        b_new_max = tl.maximum(b_max, b_tile_max)
        # A row with nothing allowed yet has max −inf; shift by 0 instead so exp2 sees −inf, not NaN.
        b_shift = tl.where(b_new_max == float("-inf"), 0.0, b_new_max)
        b_sum = b_sum * tl.exp2((b_max - b_shift) * LOG2E) + tl.sum(
            tl.exp2((b_logits - b_shift[:, None]) * LOG2E), 1
        )
        b_max = b_new_max

        if WRITE_COL_PARTIAL:
            # int32: the launcher keeps the column scratch (n / BLOCK_M · m entries) under 2³¹ (256 MiB bound).
            p_col = i_l * n_y + o_y
            m_col = m_y
            if SYMMETRIC:
                m_col = m_y & (o_y >= first_later)  # the diagonal block's columns are its own rows
            if WRITE_ARGMAX:
                b_col_max, b_col_arg = tl.max(b_logits, 0, return_indices=True)
                tl.store(COL_MAX + p_col, b_col_max, mask=m_y)
                tl.store(COL_ARGMAX + p_col, (i_m * BLOCK_M + b_col_arg).to(tl.int64), mask=m_y)
            else:
                b_col_max = tl.max(b_logits, 0)
            b_col_shift = tl.where(b_col_max == float("-inf"), 0.0, b_col_max)
            b_col_sum = tl.sum(tl.exp2((b_logits - b_col_shift[None, :]) * LOG2E), 0)
            b_col_hi, b_col_lo = exact_sum(b_col_shift, tl.log(b_col_sum))
            tl.store(COL_PARTIAL + p_col, b_col_hi, mask=m_col)
            tl.store(COL_LOW + p_col, b_col_lo, mask=m_col)

    p_row = i_s.to(tl.int64) * n_x + o_x
    if SYMMETRIC:
        p_row = i_l.to(tl.int64) * n_y + o_x  # the scratch row of this program (LSE_X is COL_PARTIAL)
    b_hi, b_lo = exact_sum(tl.where(b_max == float("-inf"), 0.0, b_max), tl.log(b_sum))
    tl.store(LSE_X + p_row, b_hi, mask=m_x)
    tl.store(LOW_X + p_row, b_lo, mask=m_x)
    if HAS_POSITIVES and X_IS_A:
        if SYMMETRIC:
            # The columns this program reduced hold a row's positive, or none of them does.
            m_found = m_x & (b_pos_x >= i_m * BLOCK_M) & (b_pos_x < n_y)
            tl.store(POSITIVES + o_x, b_positive, mask=m_found)
            # A positive in a later block's row is that row's positive too (an involution), and its own
            # program does not reach this entry: stored for it here.
            tl.store(POSITIVES + b_pos_x, b_positive, mask=m_found & (b_pos_x >= first_later))
        else:
            tl.store(POSITIVES + p_row, b_positive, mask=m_x)
    if WRITE_ARGMAX:
        tl.store(ARGMAX_X + p_row, b_arg.to(tl.int64), mask=m_x)
        tl.store(MAX_X + p_row, b_max, mask=m_x)


@triton.jit(do_not_specialize=["n_parts", "n", "pitch", "block_rows", "first"])
def merge_partials_kernel(PART_LSE, PART_LOW, LSE, LOW, n_parts, n, pitch, block_rows, first, BLOCK: tl.constexpr):
    """The LSE of each of n entries from n_parts partial LSEs given as exact pairs (rows ``pitch`` entries apart:
    the row splits, the row blocks' column partials), as the exact pair LSE = fl(max + log-sum), LOW = (max +
    log-sum) − LSE (:func:`exact_sum`; fastcontrast/lse_split.py says why). One program per BLOCK entries, the
    partials in a fixed order. Partial k holds entry o only where k·block_rows ≤ o + first (block_rows 0: every
    partial holds every entry; the symmetric forward's triangle otherwise): what lies elsewhere is never read,
    so its scratch needs no fill. LSE / LOW may be PART_LSE / PART_LOW's own rows: each program reads its
    entries' partials before it writes them. int32 offsets: the launchers keep n_parts · pitch under the
    single-pass scratch bound.
    """
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for k in range(0, n_parts):
        m_k = m & (k * block_rows <= o + first)
        b_top = tl.maximum(b_top, tl.load(PART_LSE + k * pitch + o, mask=m_k, other=float("-inf")))
    # −inf everywhere (nothing allowed): shift 0, every weight exp(−inf) = 0, the LSE −inf.
    b_shift = tl.where(b_top == float("-inf"), 0.0, b_top)
    b_total = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n_parts):
        m_k = m & (k * block_rows <= o + first)
        b_part = tl.load(PART_LSE + k * pitch + o, mask=m_k, other=float("-inf"))
        # (LSEₖ − max) is exact near the max (Sterbenz); its low part adds back the digits LSEₖ lost.
        b_total += tl.exp2(((b_part - b_shift) + tl.load(PART_LOW + k * pitch + o, mask=m_k, other=0.0)) * LOG2E)
    b_hi, b_lo = exact_sum(b_shift, tl.log(b_total))
    tl.store(LSE + o, b_hi, mask=m)
    tl.store(LOW + o, b_lo, mask=m)


@triton.jit
def exact_sum(b_shift, b_log_sum):
    """(hi, lo) = (fl(shift + log_sum), its rounding error), exactly (TwoSum); lo = 0 where hi is ±inf.

    Callers pass a log-sum from tl.log (natural log, no product): no multiply feeds these additions, so no fused
    multiply-add can change their rounding."""
    b_hi = b_shift + b_log_sum
    b_from_log_sum = b_hi - b_shift
    b_lo = (b_shift - (b_hi - b_from_log_sum)) + (b_log_sum - b_from_log_sum)
    return b_hi, tl.where((b_hi == float("-inf")) | (b_hi == float("inf")), 0.0, b_lo)
