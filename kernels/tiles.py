"""Tile helpers shared by the kernels: the S tile, the masks of left-out entries, the dS tile.

Naming: ``i_`` program ids, ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` block values.
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
            # (docs/numerics.md#testing-gpu-code-on-a-cpu). A bf16×bf16 product is exact in fp32, so this
            # keeps the GPU's numerics.
            b_x = b_x.to(tl.float32)
            b_y = b_y.to(tl.float32)
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        b_s = tl.dot(b_x, tl.trans(b_y), b_s, input_precision=INPUT_PRECISION)
    return b_s


@triton.jit
def row_tile_similarity(
    X,
    Y,
    b_x,
    o_x,
    o_y,
    m_x,
    m_y,
    d,
    stride_x,
    stride_y,
    X_RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """X[o_x]·Y[o_y]ᵀ (fp32). X_RESIDENT (d ≤ BLOCK_D): from the row tile ``b_x`` the program loaded once
    (:func:`load_rows`), so only the Y tile is read per column block; else :func:`similarity_tile`."""
    if X_RESIDENT:
        o_d = tl.arange(0, BLOCK_D)
        b_y = tl.load(Y + o_y.to(tl.int64)[:, None] * stride_y + o_d[None, :],
                      mask=m_y[:, None] & (o_d[None, :] < d), other=0.0)
        if DOT_FP32:
            b_y = b_y.to(tl.float32)
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        return tl.dot(b_x, tl.trans(b_y), input_precision=INPUT_PRECISION)
    else:
        return similarity_tile(X, Y, o_x, o_y, m_x, m_y, d, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D,
                               DOT_FP32, INPUT_PRECISION)


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
    """[BLOCK_M, BLOCK_N] mask of the entries an LSE counts (the masks of fastcontrast.engine).

    ``exclude_offset`` is already in this orientation (the launcher negates it for X = B). ``b_pos_x`` holds
    the positive column of each X row (X = A), ``b_pos_y`` that of each Y row (X = B). X_IS_A matters only
    with positives: launchers pass True without them, so no second binary exists for nothing.
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
def load_rows(X, o_x, m_x, d, stride_x, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """X[o_x, :BLOCK_D] as one [BLOCK_M, BLOCK_D] tile (d ≤ BLOCK_D; the ragged end loads as 0), ready for a dot."""
    o_d = tl.arange(0, BLOCK_D)
    b_x = tl.load(X + o_x.to(tl.int64)[:, None] * stride_x + o_d[None, :], mask=m_x[:, None] & (o_d[None, :] < d),
                  other=0.0)
    if DOT_FP32:
        b_x = b_x.to(tl.float32)  # interpreter only, see similarity_tile
    return b_x


@triton.jit
def softplus_from(b_t, b_u, b_w, b_r):
    """softplus(t) = max(t, 0) + log1p(u) for fp32 tiles, given u = e^−|t|, w = 1 + u (as rounded) and r ≈ 1/w.

    SigLIP sums n·m terms and most are negatives with t ≈ bias ≈ −10, where softplus ≈ 4.5e−5: a plain
    log(1 + u) would round 1 + u and lose ~1e−3 relative on every such term, a bias that does not average
    out. log1p(u) = log(w) − ((w − 1) − u)/w undoes that rounding to first order (a few ulp for every
    u ∈ [0, 1]; exactly u where w rounds to 1)."""
    return tl.maximum(b_t, 0.0) + (LN2 * tl.log2(b_w) - ((b_w - 1.0) - b_u) * b_r)


@triton.jit
def reciprocal(b_w):
    """1/w for fp32 tiles w ∈ [1, 2], approximate (2 ulp): the IEEE division is a subroutine call whose frame
    spills on sm_80 and leaves a stack on sm_90 in the SigLIP kernels."""
    return tl.fdiv(b_w * 0.0 + 1.0, b_w, ieee_rounding=False)


@triton.jit
def siglip_loss_tile(b_s, o_x, o_y, m_x, m_y, scale, bias, offset):
    """SigLIP's terms softplus(t), t = −zᵢⱼ·(s·Sᵢⱼ + b), of one tile (0 outside the matrix), z = +1 where
    j = i + offset: the forward's sum, accurate to a few ulp for every t."""
    b_logits = b_s * scale + bias
    # −z·x: +x for negatives, −x for the positive pair.
    b_t = tl.where(o_y[None, :] == o_x[:, None] + offset, -b_logits, b_logits)
    b_u = tl.exp2(-tl.abs(b_t) * LOG2E)
    b_w = 1.0 + b_u
    return tl.where(m_x[:, None] & m_y[None, :], softplus_from(b_t, b_u, b_w, reciprocal(b_w)), 0.0)


@triton.jit
def siglip_tiles(b_s, o_x, o_y, m_x, m_y, scale, bias, offset, grad_total, WITH_LOSS: tl.constexpr):
    """SigLIP's dS tile −zᵢⱼ·σ(tᵢⱼ)·g, 0 outside the matrix, t = −zᵢⱼ·(s·Sᵢⱼ + b); with WITH_LOSS also the
    row sums [BLOCK_M] of the loss's terms softplus(tᵢⱼ) from the same e^−|t| (else zeros). The terms are
    reduced to their row sums at once, so no second full tile stays live beside dS (registers).
    σ(t) = 1/(1 + e^−|t|) for t ≥ 0, e^−|t|/(1 + e^−|t|) below: neither branch overflows."""
    b_logits = b_s * scale + bias
    m_positive = o_y[None, :] == o_x[:, None] + offset
    b_t = tl.where(m_positive, -b_logits, b_logits)
    b_u = tl.exp2(-tl.abs(b_t) * LOG2E)
    b_w = 1.0 + b_u
    b_r = reciprocal(b_w)
    m_in = m_x[:, None] & m_y[None, :]
    b_loss_rows = tl.zeros([b_s.shape[0]], dtype=tl.float32)
    if WITH_LOSS:
        b_loss_rows = tl.sum(tl.where(m_in, softplus_from(b_t, b_u, b_w, b_r), 0.0), 1)
    b_sigmoid = tl.where(b_t >= 0, b_r, b_u * b_r)
    b_ds = tl.where(m_in, tl.where(m_positive, -b_sigmoid, b_sigmoid) * grad_total, 0.0)
    return b_ds, b_loss_rows


@triton.jit
def gradient_tile(
    b_s,
    o_x,
    o_y,
    m_x,
    m_y,
    scale,
    bias,
    offset,
    private_columns,
    grad_total,
    b_lse_x,
    b_grad_x,
    b_pos_x,
    b_grad_pos_x,
    LSE_Y,
    GRAD_Y,
    POSITIVE_INDEX,
    GRAD_POSITIVES,
    MODE: tl.constexpr,
    HAS_X_TERM: tl.constexpr,
    HAS_Y_TERM: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    HAS_POSITIVES: tl.constexpr,
    EXCLUDE_POSITIVE: tl.constexpr,
    HAS_PRIVATE: tl.constexpr,
    X_IS_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WITH_LOSS: tl.constexpr = False,
):
    """The fp32 dS tile of the unscaled similarity tile ``b_s`` = X[o_x]·Y[o_y]ᵀ, 0 outside the allowed entries.

    MODE 0 (LSE): gxᵢ·exp(xᵢⱼ − lse_xᵢ) + gyⱼ·exp(xᵢⱼ − lse_yⱼ) over the entries the LSEs counted, plus (with
    HAS_POSITIVES, whose gradient GRAD_POSITIVES then always holds, zeros when it has none) the positives'
    gradient at each row's positive entry, folded in fp32 before any rounding (a row near one-hot
    has dS = p − 1 there, a small difference that rounding each term first would lose). Row statistics come
    loaded (``b_*_x``), column ones are loaded here. MODE 1 (SigLIP): −zᵢⱼ·σ(−zᵢⱼ·(xᵢⱼ + b))·g with
    zᵢⱼ = +1 where j = i + offset.

    Returns ``(dS, loss row sums)``: for MODE 1 with WITH_LOSS the row sums of the loss's terms
    softplus(−zᵢⱼ·(xᵢⱼ + b)) from the same exponentials (:func:`siglip_tiles`), for a kernel that sums the
    loss in the gradient's sweep; else zeros, unused.
    """
    if MODE == 0:
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
                b_grad_pos_y = tl.load(GRAD_POSITIVES + o_y, mask=m_y, other=0.0)
        m_valid = allowed_entries(
            o_x, o_y, m_x, m_y, offset, b_pos_x, b_pos_y, private_columns,
            HAS_EXCLUDE, EXCLUDE_POSITIVE, HAS_PRIVATE, X_IS_A,
        )
        b_ds = lse_gradient_tile(b_s * scale, m_valid, b_lse_x, b_grad_x, b_lse_y, b_grad_y, HAS_X_TERM, HAS_Y_TERM)
        if HAS_POSITIVES:
            b_is_positive = positive_entries(o_x, o_y, b_pos_x, b_pos_y, X_IS_A)
            if X_IS_A:
                b_ds += tl.where(b_is_positive, b_grad_pos_x[:, None], 0.0)
            else:
                b_ds += tl.where(b_is_positive, b_grad_pos_y[None, :], 0.0)
        b_loss_rows = tl.zeros([BLOCK_N], dtype=tl.float32)  # MODE 0 has no loss terms here; unused
    else:
        b_ds, b_loss_rows = siglip_tiles(b_s, o_x, o_y, m_x, m_y, scale, bias, offset, grad_total, WITH_LOSS)
    return b_ds, b_loss_rows


@triton.jit
def load_row_statistics(LSE_X, GRAD_X, POSITIVE_INDEX, GRAD_POSITIVES, o_x, m_x, MODE: tl.constexpr,
                        HAS_X_TERM: tl.constexpr, HAS_POSITIVES: tl.constexpr, X_IS_A: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """The per-row inputs of :func:`gradient_tile`: (lse_x, grad_x, positive index, positives' gradient)."""
    b_lse_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_grad_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_pos_x = tl.zeros([BLOCK_M], dtype=tl.int64)
    b_grad_pos_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MODE == 0:
        if HAS_X_TERM:
            b_lse_x = tl.load(LSE_X + o_x, mask=m_x, other=0.0)
            b_grad_x = tl.load(GRAD_X + o_x, mask=m_x, other=0.0)
        if HAS_POSITIVES:
            if X_IS_A:
                b_pos_x = tl.load(POSITIVE_INDEX + o_x, mask=m_x, other=-1)
                b_grad_pos_x = tl.load(GRAD_POSITIVES + o_x, mask=m_x, other=0.0)
    return b_lse_x, b_grad_x, b_pos_x, b_grad_pos_x
