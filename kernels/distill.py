"""Distillation kernels (open_clip's DistillClipLoss): student S = s·X·Yᵀ against teacher T = s_t·X_t·Y_tᵀ.

Per row of X the loss needs three numbers: the student LSE r, the teacher LSE t and the cross term
x = Σⱼ softmax(T)ᵢⱼ·Sᵢⱼ (then −Σⱼ softmax(T)ᵢⱼ·log_softmax(S)ᵢⱼ = r − x). Each tile costs two ``tl.dot``
passes (student and teacher, each with its own d); neither matrix is written to memory.

- :func:`distill_forward_kernel`: one pass gives the row statistics, and optionally, per row block, the
  three column partials (student LSE, teacher LSE and the cross term normalised by the block's teacher
  sum), merged on the host in a fixed order.
- :func:`distill_gradient_kernel` (output dim ≤ 64): OUT = W·Y_out for the rows of X, with W = dS (student
  gradient, Y_out = Y) or W = dT (teacher gradient, Y_out = Y_t), both tiles recomputed, the accumulator in
  registers. Run with X and Y swapped (and the statistics swapped) for the other side. Each program owns its
  rows: no atomics, bitwise deterministic.
- :func:`distill_panel_kernel` (larger dims): W (and dT) of one panel written once, multiplied out by
  :func:`fastcontrast.kernels.panel.panel_matmul_kernel`, as for the other losses (kernels/panel.py).
"""

import triton
import triton.language as tl
from fastcontrast.kernels.tiles import LN2, LOG2E, as_dot_operand, round_to_bfloat16, similarity_tile


@triton.jit(do_not_specialize=["n_x", "n_y"])
def distill_forward_kernel(
    X,
    Y,
    XT,
    YT,
    SCALE,
    SCALE_T,
    LSE_X,
    TEACHER_LSE_X,
    CROSS_X,
    COL_PARTIAL,
    n_x,
    n_y,
    d,
    d_t,
    stride_x,
    stride_y,
    stride_xt,
    stride_yt,
    WRITE_COL_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: rows [i_m·BLOCK_M, (i_m+1)·BLOCK_M) of X (and X_t) against every column.

    Writes LSE_X (student), TEACHER_LSE_X and CROSS_X for its rows; if WRITE_COL_PARTIAL, COL_PARTIAL[k, i_m, j]
    for k = 0 (student column LSE over the block's rows), 1 (teacher column LSE) and 2 (the block's
    Σᵢ softmax_block(T)ᵢⱼ·Sᵢⱼ). Online softmax in base 2 with the scales folded in; the cross sum is rescaled
    with the teacher's running max, so it needs no second pass.
    """
    i_m = tl.program_id(0)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    scale = tl.load(SCALE).to(tl.float32)
    scale_t = tl.load(SCALE_T).to(tl.float32)

    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_t_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_t_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_cross = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, n_y, BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        m_valid = m_x[:, None] & m_y[None, :]
        # Natural-unit logits of both matrices (tiles.py); padding loads as 0 and is masked to −inf below.
        b_s = similarity_tile(
            X, Y, o_x, o_y, m_x, m_y, d, stride_x, stride_y,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        ) * scale
        b_t = similarity_tile(
            XT, YT, o_x, o_y, m_x, m_y, d_t, stride_xt, stride_yt,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        ) * scale_t
        b_s_masked = tl.where(m_valid, b_s, float("-inf"))
        b_t = tl.where(m_valid, b_t, float("-inf"))

        b_new_max = tl.maximum(b_max, tl.max(b_s_masked, 1))
        # A padded row has max −inf; shift by 0 instead so exp2 sees −inf, not NaN.
        b_shift = tl.where(b_new_max == float("-inf"), 0.0, b_new_max)
        b_sum = b_sum * tl.exp2((b_max - b_shift) * LOG2E) + tl.sum(
            tl.exp2((b_s_masked - b_shift[:, None]) * LOG2E), 1
        )
        b_max = b_new_max

        b_new_t_max = tl.maximum(b_t_max, tl.max(b_t, 1))
        b_t_shift = tl.where(b_new_t_max == float("-inf"), 0.0, b_new_t_max)
        b_alpha = tl.exp2((b_t_max - b_t_shift) * LOG2E)
        b_p = tl.exp2((b_t - b_t_shift[:, None]) * LOG2E)
        b_t_sum = b_t_sum * b_alpha + tl.sum(b_p, 1)
        b_cross = b_cross * b_alpha + tl.sum(b_p * b_s, 1)
        b_t_max = b_new_t_max

        if WRITE_COL_PARTIAL:
            p_partial = COL_PARTIAL + i_m.to(tl.int64) * n_y + o_y
            plane = tl.num_programs(0).to(tl.int64) * n_y
            b_col_max = tl.max(b_s_masked, 0)
            b_col_shift = tl.where(b_col_max == float("-inf"), 0.0, b_col_max)
            b_col_sum = tl.sum(tl.exp2((b_s_masked - b_col_shift[None, :]) * LOG2E), 0)
            tl.store(p_partial, b_col_shift + tl.log2(b_col_sum) * LN2, mask=m_y)
            b_col_t_max = tl.max(b_t, 0)
            b_col_t_shift = tl.where(b_col_t_max == float("-inf"), 0.0, b_col_t_max)
            b_col_p = tl.exp2((b_t - b_col_t_shift[None, :]) * LOG2E)
            b_col_t_sum = tl.sum(b_col_p, 0)
            tl.store(p_partial + plane, b_col_t_shift + tl.log2(b_col_t_sum) * LN2, mask=m_y)
            tl.store(p_partial + 2 * plane, tl.sum(b_col_p * b_s, 0) / b_col_t_sum, mask=m_y)

    b_shift = tl.where(b_max == float("-inf"), 0.0, b_max)
    tl.store(LSE_X + o_x, b_shift + tl.log2(b_sum) * LN2, mask=m_x)
    b_t_shift = tl.where(b_t_max == float("-inf"), 0.0, b_t_max)
    tl.store(TEACHER_LSE_X + o_x, b_t_shift + tl.log2(b_t_sum) * LN2, mask=m_x)
    tl.store(CROSS_X + o_x, b_cross / b_t_sum, mask=m_x)


@triton.jit
def _load_stats(LSE, GRAD_LSE, TEACHER_LSE, CROSS, GRAD_CROSS, o, m):
    """One side's statistics for the gradient: (student LSE, its grad, teacher LSE, cross, its grad)."""
    b_lse = tl.load(LSE + o, mask=m, other=0.0)
    b_grad_lse = tl.load(GRAD_LSE + o, mask=m, other=0.0)
    b_t_lse = tl.load(TEACHER_LSE + o, mask=m, other=0.0)
    b_cross = tl.load(CROSS + o, mask=m, other=0.0)
    b_grad_cross = tl.load(GRAD_CROSS + o, mask=m, other=0.0)
    return b_lse, b_grad_lse, b_t_lse, b_cross, b_grad_cross


@triton.jit
def distill_weights(
    X, Y, XT, YT, scale, scale_t, o_x, o_y, m_x, m_y, d, d_t, stride_x, stride_y, stride_xt, stride_yt,
    LSE_X, GRAD_LSE_X, TEACHER_LSE_X, CROSS_X, GRAD_CROSS_X,
    LSE_Y, GRAD_LSE_Y, TEACHER_LSE_Y, CROSS_Y, GRAD_CROSS_Y,
    HAS_X_TERM: tl.constexpr, HAS_Y_TERM: tl.constexpr, STUDENT: tl.constexpr, TEACHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """(W, dT) of one tile, fp32, 0 outside the matrix; each [BLOCK_M, BLOCK_N] (zeros where not asked for).

    With Pˢ = softmax(S) and Pᵗ = softmax(T), by row for the X-side term and by column for the Y-side term:
    W = g_lse·Pˢ + g_cross·Pᵗ (the student's dS) and dT = g_cross·Pᵗ·(S − cross) (the teacher's).
    """
    b_s = similarity_tile(
        X, Y, o_x, o_y, m_x, m_y, d, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    ) * scale
    b_t = similarity_tile(
        XT, YT, o_x, o_y, m_x, m_y, d_t, stride_xt, stride_yt, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    ) * scale_t
    b_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_dt = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_X_TERM:
        b_lse_x, b_grad_lse_x, b_t_lse_x, b_cross_x, b_grad_cross_x = _load_stats(
            LSE_X, GRAD_LSE_X, TEACHER_LSE_X, CROSS_X, GRAD_CROSS_X, o_x, m_x
        )
        b_p_t = tl.exp2((b_t - b_t_lse_x[:, None]) * LOG2E)
        if STUDENT:
            b_w += tl.exp2((b_s - b_lse_x[:, None]) * LOG2E) * b_grad_lse_x[:, None]
            b_w += b_p_t * b_grad_cross_x[:, None]
        if TEACHER:
            b_dt += b_p_t * (b_s - b_cross_x[:, None]) * b_grad_cross_x[:, None]
    if HAS_Y_TERM:
        b_lse_y, b_grad_lse_y, b_t_lse_y, b_cross_y, b_grad_cross_y = _load_stats(
            LSE_Y, GRAD_LSE_Y, TEACHER_LSE_Y, CROSS_Y, GRAD_CROSS_Y, o_y, m_y
        )
        b_p_t = tl.exp2((b_t - b_t_lse_y[None, :]) * LOG2E)
        if STUDENT:
            b_w += tl.exp2((b_s - b_lse_y[None, :]) * LOG2E) * b_grad_lse_y[None, :]
            b_w += b_p_t * b_grad_cross_y[None, :]
        if TEACHER:
            b_dt += b_p_t * (b_s - b_cross_y[None, :]) * b_grad_cross_y[None, :]
    m_tile = m_x[:, None] & m_y[None, :]
    return tl.where(m_tile, b_w, 0.0), tl.where(m_tile, b_dt, 0.0)


@triton.jit(do_not_specialize=["n_x", "n_y"])
def distill_gradient_kernel(
    X,
    Y,
    XT,
    YT,
    SCALE,
    SCALE_T,
    DS_SCALE,
    LSE_X,
    GRAD_LSE_X,
    TEACHER_LSE_X,
    CROSS_X,
    GRAD_CROSS_X,
    LSE_Y,
    GRAD_LSE_Y,
    TEACHER_LSE_Y,
    CROSS_Y,
    GRAD_CROSS_Y,
    OUT,
    n_x,
    n_y,
    d,
    d_t,
    stride_x,
    stride_y,
    stride_xt,
    stride_yt,
    stride_out,
    TEACHER_GRAD: tl.constexpr,
    HAS_X_TERM: tl.constexpr,
    HAS_Y_TERM: tl.constexpr,
    SCALE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: OUT[rows of block i_m] = Σ over column blocks of W·Y (student) or dT·Y_t (TEACHER_GRAD),
    fp32 and unscaled, the [BLOCK_M, BLOCK_D] accumulator in registers (output dim ≤ BLOCK_D)."""
    i_m = tl.program_id(0)
    o_x = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_x = o_x < n_x
    scale = tl.load(SCALE).to(tl.float32)
    scale_t = tl.load(SCALE_T).to(tl.float32)
    ds_scale = 1.0
    if SCALE_DS:
        ds_scale = tl.load(DS_SCALE)
    if TEACHER_GRAD:
        Y_OUT = YT
        d_out = d_t
        stride_y_out = stride_yt
    else:
        Y_OUT = Y
        d_out = d
        stride_y_out = stride_y
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_out

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_y, BLOCK_N):
        o_y = start_n + tl.arange(0, BLOCK_N)
        m_y = o_y < n_y
        b_w, b_dt = distill_weights(
            X, Y, XT, YT, scale, scale_t, o_x, o_y, m_x, m_y, d, d_t, stride_x, stride_y, stride_xt, stride_yt,
            LSE_X, GRAD_LSE_X, TEACHER_LSE_X, CROSS_X, GRAD_CROSS_X,
            LSE_Y, GRAD_LSE_Y, TEACHER_LSE_Y, CROSS_Y, GRAD_CROSS_Y,
            HAS_X_TERM, HAS_Y_TERM, not TEACHER_GRAD, TEACHER_GRAD,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        )
        if TEACHER_GRAD:
            b_w = b_dt
        b_y = tl.load(Y_OUT + o_y.to(tl.int64)[:, None] * stride_y_out + o_d[None, :],
                      mask=m_y[:, None] & m_d[None, :], other=0.0)
        if DOT_FP32:
            b_y = b_y.to(tl.float32)  # interpreter only, see tiles.similarity_tile
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_acc = tl.dot(as_dot_operand(b_w, b_y, ds_scale, DOT_FP32, SCALE_DS), b_y, b_acc,
                       input_precision=INPUT_PRECISION)

    if SCALE_DS:
        b_acc = b_acc / ds_scale
    tl.store(OUT + o_x.to(tl.int64)[:, None] * stride_out + o_d[None, :], b_acc, mask=m_x[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=["row_start", "row_stop", "col_start", "col_stop"])
def distill_panel_kernel(
    A,
    B,
    AT,
    BT,
    SCALE,
    SCALE_T,
    DS_SCALE,
    LSE_ROW,
    GRAD_LSE_ROW,
    TEACHER_LSE_ROW,
    CROSS_ROW,
    GRAD_CROSS_ROW,
    LSE_COL,
    GRAD_LSE_COL,
    TEACHER_LSE_COL,
    CROSS_COL,
    GRAD_CROSS_COL,
    W,
    DT,
    row_start,
    row_stop,
    col_start,
    col_stop,
    d,
    d_t,
    stride_a,
    stride_b,
    stride_at,
    stride_bt,
    stride_panel,
    HAS_ROW_TERM: tl.constexpr,
    HAS_COL_TERM: tl.constexpr,
    STUDENT: tl.constexpr,
    TEACHER: tl.constexpr,
    SCALE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program: tile (i_m, i_n) of the panel's W (STUDENT) and dT (TEACHER), stored in the panels' dtype
    (fp16 multiplied by DS_SCALE, as in kernels/panel.py)."""
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_x = row_start + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_y = col_start + i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_x = o_x < row_stop
    m_y = o_y < col_stop
    b_w, b_dt = distill_weights(
        A, B, AT, BT, tl.load(SCALE).to(tl.float32), tl.load(SCALE_T).to(tl.float32), o_x, o_y, m_x, m_y, d, d_t,
        stride_a, stride_b, stride_at, stride_bt,
        LSE_ROW, GRAD_LSE_ROW, TEACHER_LSE_ROW, CROSS_ROW, GRAD_CROSS_ROW,
        LSE_COL, GRAD_LSE_COL, TEACHER_LSE_COL, CROSS_COL, GRAD_CROSS_COL,
        HAS_ROW_TERM, HAS_COL_TERM, STUDENT, TEACHER, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    )
    p_tile = (o_x - row_start).to(tl.int64)[:, None] * stride_panel + (o_y - col_start)[None, :]
    m_tile = m_x[:, None] & m_y[None, :]
    if SCALE_DS:
        ds_scale = tl.load(DS_SCALE)
        b_w = b_w * ds_scale
        b_dt = b_dt * ds_scale
    if DOT_FP32:
        # Interpreter only: its fp32 → bf16 cast truncates; round to nearest even as the GPU does.
        b_w = round_to_bfloat16(b_w)
        b_dt = round_to_bfloat16(b_dt)
    if STUDENT:
        tl.store(W + p_tile, b_w.to(W.dtype.element_ty), mask=m_tile)
    if TEACHER:
        tl.store(DT + p_tile, b_dt.to(DT.dtype.element_ty), mask=m_tile)
