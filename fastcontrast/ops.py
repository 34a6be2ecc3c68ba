"""The engine calls as torch custom ops (``torch.library.custom_op``), each with a fake implementation.

Under ``torch.compile`` each engine call is one opaque node whose output shapes come from its fake
implementation: the compiler never traces the chunk loops or the Triton launches, a new batch size costs no
retrace of the engine, and the Triton engine needs nothing of the compiler's Triton support. The autograd
Functions of :mod:`fastcontrast.autograd` call these ops directly; they carry the gradient formulas.

Each op takes the engine's inputs (:class:`fastcontrast.engine.Engine`) plus the engine by name and its
chunk budget, and returns the engine's fixed-shape outputs unchanged. torch < 2.4 has no ``custom_op``:
the same functions are then called directly.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastcontrast.engine import DistillStats, Engine, compute_dtype

HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


@functools.cache
def engine_for(name: str, chunk_bytes: int) -> Engine:
    """The engine object behind an op call (engines are stateless; one per name and budget)."""
    if name == "torch":
        from fastcontrast.blockwise import TorchEngine

        return TorchEngine(chunk_bytes)
    from fastcontrast.kernels.engine import TritonEngine

    return TritonEngine()


def _vector(like: torch.Tensor, length: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return like.new_empty(length, dtype=dtype or compute_dtype(like.dtype))


def _matrix_or_empty(like: torch.Tensor, shape: torch.Size, wanted: bool) -> torch.Tensor:
    return like.new_empty(shape if wanted else (0,), dtype=compute_dtype(like.dtype))


def lse_forward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, positive_index: Optional[torch.Tensor],
    need_row: bool, need_col: bool, exclude_offset: Optional[int], exclude_positive: bool, private_columns: int,
    need_argmax: bool, symmetric: bool, engine: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`Engine.lse_forward` of engine ``engine``: (lse_row, lse_col, positives, argmax_row, argmax_col,
    lse_row_low, lse_col_low)."""
    return engine_for(engine, chunk_bytes).lse_forward(
        a, b, scale, positive_index, need_row=need_row, need_col=need_col, exclude_offset=exclude_offset,
        exclude_positive=exclude_positive, private_columns=private_columns, need_argmax=need_argmax,
        symmetric=symmetric,
    )


def _lse_forward_fake(a, b, scale, positive_index, need_row, need_col, exclude_offset, exclude_positive,
                      private_columns, need_argmax, symmetric, engine, chunk_bytes):
    n, m = a.shape[0], b.shape[0]
    return (_vector(a, n if need_row else 0), _vector(a, m if need_col else 0),
            _vector(a, n if positive_index is not None else 0),
            _vector(a, n if need_row and need_argmax else 0, torch.long),
            _vector(a, m if need_col and need_argmax else 0, torch.long),
            _vector(a, n if need_row else 0), _vector(a, m if need_col else 0))


def lse_backward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, positive_index: Optional[torch.Tensor],
    lse_row: torch.Tensor, lse_col: torch.Tensor, grad_row: Optional[torch.Tensor],
    grad_col: Optional[torch.Tensor], grad_positives: Optional[torch.Tensor], exclude_offset: Optional[int],
    exclude_positive: bool, private_columns: int, need_a: bool, need_b: bool, symmetric: bool, engine: str,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`Engine.lse_backward` of engine ``engine``: unscaled (dS·B, dSᵀ·A); symmetric: ((dS + dSᵀ)·A, empty)."""
    return engine_for(engine, chunk_bytes).lse_backward(
        a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives,
        exclude_offset=exclude_offset, exclude_positive=exclude_positive, private_columns=private_columns,
        need_a=need_a, need_b=need_b, symmetric=symmetric,
    )


def _lse_backward_fake(a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col, grad_positives,
                       exclude_offset, exclude_positive, private_columns, need_a, need_b, symmetric, engine,
                       chunk_bytes):
    return _matrix_or_empty(a, a.shape, need_a), _matrix_or_empty(a, b.shape, need_b and not symmetric)


def siglip_forward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], positive_offset: int,
    engine: str, chunk_bytes: int,
) -> torch.Tensor:
    """:meth:`Engine.siglip_forward` of engine ``engine``: the 0-dim sum."""
    return engine_for(engine, chunk_bytes).siglip_forward(a, b, scale, bias, positive_offset=positive_offset)


def _siglip_forward_fake(a, b, scale, bias, positive_offset, engine, chunk_bytes):
    return a.new_empty((), dtype=compute_dtype(a.dtype))


def siglip_forward_backward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], positive_offset: int,
    need_a: bool, need_b: bool, engine: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`Engine.siglip_forward_backward` of engine ``engine``: (sum, dS·B, dSᵀ·A, Σ dS), unscaled, at
    upstream gradient 1."""
    return engine_for(engine, chunk_bytes).siglip_forward_backward(
        a, b, scale, bias, positive_offset=positive_offset, need_a=need_a, need_b=need_b
    )


def _siglip_forward_backward_fake(a, b, scale, bias, positive_offset, need_a, need_b, engine, chunk_bytes):
    return (a.new_empty((), dtype=compute_dtype(a.dtype)), _matrix_or_empty(a, a.shape, need_a),
            _matrix_or_empty(a, b.shape, need_b), a.new_empty((), dtype=compute_dtype(a.dtype)))


def distill_forward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
    scale_t: torch.Tensor, need_row: bool, need_col: bool, engine: str, chunk_bytes: int,
) -> list[torch.Tensor]:
    """:meth:`Engine.distill_forward` of engine ``engine``, as the list of :class:`DistillStats` fields."""
    return engine_for(engine, chunk_bytes).distill_forward(
        a, b, scale, a_t, b_t, scale_t, need_row=need_row, need_col=need_col
    ).as_list()


def _distill_forward_fake(a, b, scale, a_t, b_t, scale_t, need_row, need_col, engine, chunk_bytes):
    n, m = (a.shape[0] if need_row else 0), (b.shape[0] if need_col else 0)
    # DistillStats field order: lse_row, lse_col, teacher_lse_row, teacher_lse_col, cross_row, cross_col.
    return [_vector(a, k) for k in (n, m, n, m, n, m)]


def distill_backward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
    scale_t: torch.Tensor, stats: list[torch.Tensor], grads: list[Optional[torch.Tensor]], need_a: bool,
    need_b: bool, need_a_t: bool, need_b_t: bool, engine: str, chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`Engine.distill_backward` of engine ``engine``: unscaled (dS·B, dSᵀ·A, dT·B_t, dTᵀ·A_t)."""
    return engine_for(engine, chunk_bytes).distill_backward(
        a, b, scale, a_t, b_t, scale_t, DistillStats(*stats), DistillStats(*grads),
        need_a=need_a, need_b=need_b, need_a_t=need_a_t, need_b_t=need_b_t,
    )


def _distill_backward_fake(a, b, scale, a_t, b_t, scale_t, stats, grads, need_a, need_b, need_a_t, need_b_t,
                           engine, chunk_bytes):
    return (_matrix_or_empty(a, a.shape, need_a), _matrix_or_empty(a, b.shape, need_b),
            _matrix_or_empty(a, a_t.shape, need_a_t), _matrix_or_empty(a, b_t.shape, need_b_t))


# The ops' Python bodies by qualified name. A TorchDispatchMode sees a custom op as one call; a tool that
# counts what the engines issue (the work model) runs the body under its mode to see each torch op inside.
IMPLEMENTATIONS = {f"fastcontrast::{body.__name__}": body for body in (
    lse_forward, lse_backward, siglip_forward, siglip_forward_backward, distill_forward, distill_backward)}

if HAS_CUSTOM_OP:
    # Registered under fastcontrast::<name>; the module-level names then dispatch through torch.
    lse_forward = torch.library.custom_op("fastcontrast::lse_forward", lse_forward, mutates_args=())
    lse_forward.register_fake(_lse_forward_fake)
    lse_backward = torch.library.custom_op("fastcontrast::lse_backward", lse_backward, mutates_args=())
    lse_backward.register_fake(_lse_backward_fake)
    siglip_forward = torch.library.custom_op("fastcontrast::siglip_forward", siglip_forward, mutates_args=())
    siglip_forward.register_fake(_siglip_forward_fake)
    siglip_forward_backward = torch.library.custom_op("fastcontrast::siglip_forward_backward",
                                                      siglip_forward_backward, mutates_args=())
    siglip_forward_backward.register_fake(_siglip_forward_backward_fake)
    distill_forward = torch.library.custom_op("fastcontrast::distill_forward", distill_forward, mutates_args=())
    distill_forward.register_fake(_distill_forward_fake)
    distill_backward = torch.library.custom_op("fastcontrast::distill_backward", distill_backward, mutates_args=())
    distill_backward.register_fake(_distill_backward_fake)
