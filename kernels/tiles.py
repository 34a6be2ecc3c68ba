"""Tile helpers shared by the kernels: the S tile and the masks of the offset diagonal.

Naming (STYLE.md): ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values.
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
    REGISTER_ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Add the fp32 tile dS [BLOCK_M, BLOCK_N] times Y[o_y] [BLOCK_N, d] to a program's own output rows.

    REGISTER_ACC (d ≤ BLOCK_D): into the register accumulator ``b_acc``, returned. Otherwise into the fp32
    rows at ``p_out`` (owned by this program, so no atomics), read-modify-written per BLOCK_D chunk of d;
    ``b_acc`` is returned unchanged. dS goes to the tensor cores in Y's dtype, as FlashAttention does with P.
    """
    p_y = Y + o_y.to(tl.int64)[:, None] * stride_y
    o_d0 = tl.arange(0, BLOCK_D)
    if REGISTER_ACC:
        b_y = tl.load(p_y + o_d0[None, :], mask=m_y[:, None] & (o_d0[None, :] < d), other=0.0)
        if DOT_FP32:
            b_p = round_to_bfloat16(b_ds)
            b_y = b_y.to(tl.float32)
        else:
            b_p = b_ds.to(b_y.dtype)
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_acc = tl.dot(b_p, b_y, b_acc, input_precision=INPUT_PRECISION)
    else:
        for i_k in range(0, tl.cdiv(d, BLOCK_D)):
            o_d = i_k * BLOCK_D + o_d0
            m_d = o_d < d
            b_y = tl.load(p_y + o_d[None, :], mask=m_y[:, None] & m_d[None, :], other=0.0)
            if DOT_FP32:
                b_p = round_to_bfloat16(b_ds)
                b_y = b_y.to(tl.float32)
            else:
                b_p = b_ds.to(b_y.dtype)
            m_out = m_x[:, None] & m_d[None, :]
            b_out = tl.load(p_out + o_d[None, :], mask=m_out, other=0.0)
            b_out = tl.dot(b_p, b_y, b_out, input_precision=INPUT_PRECISION)
            tl.store(p_out + o_d[None, :], b_out, mask=m_out)
    return b_acc
