"""Tile helpers shared by the kernels: the S tile, the masks of left-out entries, the gradient tile.

Naming (STYLE.md): ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values.
X / Y are the kernel's row and column operands: (X, Y) = (A, B) for the row direction and (B, A) for the
column direction; ``X_IS_A`` says which, because a positive index and the private columns belong to A's rows.

Logits are kept in natural units (x = s·Xᵢ·Yⱼ) and exponentiated as exp2((x − m)·log₂e): the forward's max
and LSE and the backward's recomputed probabilities then subtract in one base, so a row whose softmax is
one-hot gives p = exp2(0) = 1 exactly, in the forward and the backward alike (a ln ↔ log₂ round trip of the
LSE would cost |x|·ε there).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def similarity_tile(
    X,
    Y,
    o_x,
    o_y,
    m_x,
    m_y,
    d,
    stride_x,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """X[o_x] · Y[o_y]ᵀ as an fp32 [BLOCK_M, BLOCK_N] tile, looping over d in chunks of BLOCK_D.

    Rows and columns outside ``m_x`` / ``m_y`` and the ragged end of d load as 0.
    """
    b_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # int64 offsets: n·d passes 2³¹ at N = 4M, d = 512.
    p_x = X + o_x.to(tl.int64)[:, None] * stride_x
    p_y = Y + o_y.to(tl.int64)[:, None] * stride_y
    for i_k in range(0, tl.cdiv(d, BLOCK_D)):
        o_d = i_k * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < d
        b_x = tl.load(p_x + o_d[None, :], mask=m_x[:, None] & m_d[None, :], other=0.0)
        b_y = tl.load(p_y + o_d[None, :], mask=m_y[:, None] & m_d[None, :], other=0.0)
        if DOT_FP32:
            # Interpreter only: it stores bf16 as raw uint16 and its tl.dot multiplies those integers
            # (DESIGN §6). A bf16×bf16 product is exact in fp32, so this keeps the GPU's numerics.
            b_x = b_x.to(tl.float32)
            b_y = b_y.to(tl.float32)
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        b_s = tl.dot(b_x, tl.trans(b_y), b_s, input_precision=INPUT_PRECISION)
    return b_s


@triton.jit
def allowed_entries(
    o_x,
    o_y,
    m_x,
    m_y,
    exclude_offset,
    b_pos_x,
    b_pos_y,
    private_columns,
    HAS_EXCLUDE: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    HAS_PRIVATE: tl.constexpr,
    X_IS_A: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] mask of the entries an LSE counts (DESIGN §2; the masks of fastcontrast.engine).

    ``exclude_offset`` is already in this orientation (the launcher negates it for X = B). ``b_pos_x`` holds
    the positive column of each X row (X = A), ``b_pos_y`` that of each Y row (X = B).
    """
    m_valid = m_x[:, None] & m_y[None, :]
    if HAS_EXCLUDE:
        m_valid = m_valid & (o_y[None, :] != o_x[:, None] + exclude_offset)
    if X_IS_A:
        if EXCLUDE_POSITIVE:
            m_valid = m_valid & (o_y[None, :] != b_pos_x[:, None])
        if HAS_PRIVATE:
            m_valid = m_valid & ((o_y[None, :] >= private_columns) | (o_y[None, :] == o_x[:, None]))
    else:
        if EXCLUDE_POSITIVE:
            m_valid = m_valid & (o_x[:, None] != b_pos_y[None, :])
        if HAS_PRIVATE:
            m_valid = m_valid & ((o_x[:, None] >= private_columns) | (o_x[:, None] == o_y[None, :]))
    return m_valid


@triton.jit
def positive_entries(o_x, o_y, b_pos_x, b_pos_y, X_IS_A: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the positive entries (row i's column positive_index[i]) of this tile."""
    if X_IS_A:
        return o_y[None, :] == b_pos_x[:, None]
    else:
        return o_x[:, None] == b_pos_y[None, :]


@triton.jit
def lse_gradient_tile(
    b_x_logits,
    m_valid,
    b_lse_x,
    b_grad_x,
    b_lse_y,
    b_grad_y,
    HAS_X_TERM: tl.constexpr,
    HAS_Y_TERM: tl.constexpr,
):
    """dS of the LSE terms for one tile: gxᵢ·exp(xᵢⱼ − lse_xᵢ) + gyⱼ·exp(xᵢⱼ − lse_yⱼ), 0 where not allowed.

    ``b_x_logits`` are the natural logits of the tile, recomputed exactly as the forward computed them.
    """
    b_ds = tl.zeros(b_x_logits.shape, dtype=tl.float32)
    if HAS_X_TERM:
        b_ds += tl.exp2((b_x_logits - b_lse_x[:, None]) * LOG2E) * b_grad_x[:, None]
    if HAS_Y_TERM:
        b_ds += tl.exp2((b_x_logits - b_lse_y[None, :]) * LOG2E) * b_grad_y[None, :]
    # Also where an LSE is −inf (a row with nothing allowed), whose exp2(−inf + inf) would be NaN.
    return tl.where(m_valid, b_ds, 0.0)


@triton.jit
def round_to_bfloat16(b_x):
    """fp32 tile rounded to the nearest bf16 value (ties to even), kept in fp32. Interpreter only.

    Second interpreter trap (triton 3.9): its fp32 → bf16 cast truncates the mantissa instead of rounding
    to nearest even as the GPU's ``cvt.rn.bf16.f32`` does. Truncation biases every rounded value toward
    zero, which shows as gradient errors of one bf16 ulp where the GPU has none. Rounding on the bits
    reproduces the GPU result exactly for finite values.
    """
    b_bits = b_x.to(tl.uint32, bitcast=True)
    b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
    return b_bits.to(tl.float32, bitcast=True)


@triton.jit
def as_dot_operand(b_ds, b_y, ds_scale, DOT_FP32: tl.constexpr, SCALE_DS: tl.constexpr):
    """The fp32 tile dS as the left operand of a tensor-core dot with ``b_y`` (in Y's dtype).

    SCALE_DS (fp16): dS ≈ P/(2N) lies below fp16's smallest subnormal at realistic N, so it is multiplied
    by ``ds_scale`` (a power of two that brings the largest |dS| near 1) before the cast; the caller divides
    the fp32 product by it, exactly.
    """
    if SCALE_DS:
        b_ds = b_ds * ds_scale
    if DOT_FP32:
        return round_to_bfloat16(b_ds)
    return b_ds.to(b_y.dtype)


@triton.jit
def accumulate_product(
    b_acc,
    b_ds,
    Y,
    o_y,
    m_y,
    p_out,
    m_x,
    d,
    stride_y,
    ds_scale,
    REGISTER_ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SCALE_DS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Add the fp32 tile dS [BLOCK_M, BLOCK_N] times Y[o_y] [BLOCK_N, d] to a program's own output rows.

    REGISTER_ACC (d ≤ BLOCK_D): into the register accumulator ``b_acc``, returned (still multiplied by
    ``ds_scale`` under SCALE_DS: the caller divides once at the end). Otherwise into the fp32 rows at
    ``p_out`` (owned by this program, so no atomics), read-modify-written per BLOCK_D chunk of d, divided by
    ``ds_scale`` on the way; ``b_acc`` is returned unchanged. dS goes to the tensor cores in Y's dtype, as
    FlashAttention does with P.
    """
    p_y = Y + o_y.to(tl.int64)[:, None] * stride_y
    o_d0 = tl.arange(0, BLOCK_D)
    if REGISTER_ACC:
        b_y = tl.load(p_y + o_d0[None, :], mask=m_y[:, None] & (o_d0[None, :] < d), other=0.0)
        b_p = as_dot_operand(b_ds, b_y, ds_scale, DOT_FP32, SCALE_DS)
        if DOT_FP32:
            b_y = b_y.to(tl.float32)
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_acc = tl.dot(b_p, b_y, b_acc, input_precision=INPUT_PRECISION)
    else:
        for i_k in range(0, tl.cdiv(d, BLOCK_D)):
            o_d = i_k * BLOCK_D + o_d0
            m_d = o_d < d
            b_y = tl.load(p_y + o_d[None, :], mask=m_y[:, None] & m_d[None, :], other=0.0)
            b_p = as_dot_operand(b_ds, b_y, ds_scale, DOT_FP32, SCALE_DS)
            if DOT_FP32:
                b_y = b_y.to(tl.float32)
            m_out = m_x[:, None] & m_d[None, :]
            b_out = tl.load(p_out + o_d[None, :], mask=m_out, other=0.0)
            b_product = tl.dot(b_p, b_y, input_precision=INPUT_PRECISION)
            if SCALE_DS:
                b_product = b_product / ds_scale
            tl.store(p_out + o_d[None, :], b_out + b_product, mask=m_out)
    return b_acc
