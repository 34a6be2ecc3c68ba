"""The engines as torch custom ops (``torch.library.custom_op``), each with a fake-tensor implementation.

Under ``torch.compile`` every engine call is then one opaque node whose output shapes come from the fake
implementation: the compiler never traces the chunk loops or the Triton launches, so a new batch size
costs no retrace of the engine, and the Triton engine needs nothing of the compiler's Triton support. The
autograd Functions of :mod:`fastcontrast.autograd` call the engine through :class:`OpEngine` and provide
the gradients (forward and backward ops alike), in eager mode and compiled.

Custom ops cannot return None: a result that was not asked for comes back as an empty tensor and is turned
into None again by :class:`OpEngine`. torch < 2.4 has no ``custom_op``; the engines are then called directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastcontrast.blockwise import DistillStats, TorchEngine, compute_dtype

HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


def _engine(name: str, chunk_bytes: int):
    if name == "torch":
        return TorchEngine(chunk_bytes)
    from fastcontrast.kernels.engine import TritonEngine

    return TritonEngine()


def _float_out(like: torch.Tensor, *shape: int) -> torch.Tensor:
    # The engines' results: fp64 for fp64 inputs, else fp32 (the Triton engine has no fp64 path).
    return like.new_empty(shape, dtype=compute_dtype(like.dtype))


def _or_empty(x: Optional[torch.Tensor], like: torch.Tensor, dtype=None) -> torch.Tensor:
    return x if x is not None else like.new_empty(0, dtype=dtype or compute_dtype(like.dtype))


def _or_none(x: torch.Tensor, wanted: bool) -> Optional[torch.Tensor]:
    return x if wanted else None


if HAS_CUSTOM_OP:

    @torch.library.custom_op("fastcontrast::lse_forward", mutates_args=())
    def _lse_forward(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, need_row: bool, need_col: bool,
        exclude_offset: Optional[int], need_argmax: bool, engine: str, chunk_bytes: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lse_row, lse_col, argmax_row, argmax_col = _engine(engine, chunk_bytes).lse_forward(
            a, b, scale, need_row=need_row, need_col=need_col, exclude_offset=exclude_offset,
            need_argmax=need_argmax,
        )
        return (_or_empty(lse_row, a), _or_empty(lse_col, a), _or_empty(argmax_row, a, torch.long),
                _or_empty(argmax_col, a, torch.long))

    @_lse_forward.register_fake
    def _(a, b, scale, need_row, need_col, exclude_offset, need_argmax, engine, chunk_bytes):
        n, m = a.shape[0], b.shape[0]
        return (_float_out(a, n if need_row else 0), _float_out(a, m if need_col else 0),
                a.new_empty(n if need_row and need_argmax else 0, dtype=torch.long),
                a.new_empty(m if need_col and need_argmax else 0, dtype=torch.long))

    @torch.library.custom_op("fastcontrast::lse_backward", mutates_args=())
    def _lse_backward(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, lse_row: Optional[torch.Tensor],
        lse_col: Optional[torch.Tensor], grad_row: Optional[torch.Tensor], grad_col: Optional[torch.Tensor],
        exclude_offset: Optional[int], need_a: bool, need_b: bool, engine: str, chunk_bytes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grad_a, grad_b = _engine(engine, chunk_bytes).lse_backward(
            a, b, scale, lse_row, lse_col, grad_row, grad_col, exclude_offset=exclude_offset,
            need_a=need_a, need_b=need_b,
        )
        return _or_empty(grad_a, a), _or_empty(grad_b, a)

    @_lse_backward.register_fake
    def _(a, b, scale, lse_row, lse_col, grad_row, grad_col, exclude_offset, need_a, need_b, engine, chunk_bytes):
        return (_float_out(a, *(a.shape if need_a else (0,))), _float_out(a, *(b.shape if need_b else (0,))))

    @torch.library.custom_op("fastcontrast::siglip_forward", mutates_args=())
    def _siglip_forward(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
        positive_offset: int, engine: str, chunk_bytes: int,
    ) -> torch.Tensor:
        return _engine(engine, chunk_bytes).siglip_forward(a, b, scale, bias, positive_offset=positive_offset)

    @_siglip_forward.register_fake
    def _(a, b, scale, bias, positive_offset, engine, chunk_bytes):
        return _float_out(a)

    @torch.library.custom_op("fastcontrast::siglip_backward", mutates_args=())
    def _siglip_backward(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], grad: torch.Tensor,
        positive_offset: int, need_a: bool, need_b: bool, engine: str, chunk_bytes: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_a, grad_b, grad_bias = _engine(engine, chunk_bytes).siglip_backward(
            a, b, scale, bias, grad, positive_offset=positive_offset, need_a=need_a, need_b=need_b
        )
        return _or_empty(grad_a, a), _or_empty(grad_b, a), grad_bias

    @_siglip_backward.register_fake
    def _(a, b, scale, bias, grad, positive_offset, need_a, need_b, engine, chunk_bytes):
        return (_float_out(a, *(a.shape if need_a else (0,))), _float_out(a, *(b.shape if need_b else (0,))),
                _float_out(a))

    @torch.library.custom_op("fastcontrast::distill_forward", mutates_args=())
    def _distill_forward(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
        scale_t: torch.Tensor, need_row: bool, need_col: bool, engine: str, chunk_bytes: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stats = _engine(engine, chunk_bytes).distill_forward(
            a, b, scale, a_t, b_t, scale_t, need_row=need_row, need_col=need_col
        )
        return tuple(_or_empty(x, a) for x in vars(stats).values())

    @_distill_forward.register_fake
    def _(a, b, scale, a_t, b_t, scale_t, need_row, need_col, engine, chunk_bytes):
        n, m = (a.shape[0] if need_row else 0), (b.shape[0] if need_col else 0)
        # DistillStats field order: lse_row, lse_col, teacher_lse_row, teacher_lse_col, cross_row, cross_col.
        return tuple(_float_out(a, k) for k in (n, m, n, m, n, m))

    @torch.library.custom_op("fastcontrast::distill_backward", mutates_args=())
    def _distill_backward(
        a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
        scale_t: torch.Tensor, stats: list[Optional[torch.Tensor]], grads: list[Optional[torch.Tensor]],
        need_a: bool, need_b: bool, need_a_t: bool, need_b_t: bool, engine: str, chunk_bytes: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = _engine(engine, chunk_bytes).distill_backward(
            a, b, scale, a_t, b_t, scale_t, DistillStats(*stats), DistillStats(*grads),
            need_a=need_a, need_b=need_b, need_a_t=need_a_t, need_b_t=need_b_t,
        )
        return tuple(_or_empty(x, a) for x in outs)

    @_distill_backward.register_fake
    def _(a, b, scale, a_t, b_t, scale_t, stats, grads, need_a, need_b, need_a_t, need_b_t, engine, chunk_bytes):
        shapes = ((a.shape, need_a), (b.shape, need_b), (a_t.shape, need_a_t), (b_t.shape, need_b_t))
        return tuple(_float_out(a, *(shape if wanted else (0,))) for shape, wanted in shapes)


class OpEngine:
    """The engine interface of :class:`fastcontrast.blockwise.TorchEngine`, dispatched through the custom ops.

    Args:
        engine: the engine to run, ``"torch"`` or ``"triton"``.
        chunk_bytes: the torch engine's logits budget per chunk (ignored by Triton).
    """

    def __init__(self, engine: str, chunk_bytes: int):
        self.name = engine
        self.chunk_bytes = chunk_bytes

    def lse_forward(self, a, b, scale, *, need_row, need_col, exclude_offset, need_argmax=False):
        lse_row, lse_col, argmax_row, argmax_col = torch.ops.fastcontrast.lse_forward(
            a, b, scale, need_row, need_col, exclude_offset, need_argmax, self.name, self.chunk_bytes
        )
        return (_or_none(lse_row, need_row), _or_none(lse_col, need_col),
                _or_none(argmax_row, need_row and need_argmax), _or_none(argmax_col, need_col and need_argmax))

    def lse_backward(self, a, b, scale, lse_row, lse_col, grad_row, grad_col, *, exclude_offset, need_a, need_b):
        grad_a, grad_b = torch.ops.fastcontrast.lse_backward(
            a, b, scale, lse_row, lse_col, grad_row, grad_col, exclude_offset, need_a, need_b, self.name,
            self.chunk_bytes,
        )
        return _or_none(grad_a, need_a), _or_none(grad_b, need_b)

    def siglip_forward(self, a, b, scale, bias, *, positive_offset):
        return torch.ops.fastcontrast.siglip_forward(a, b, scale, bias, positive_offset, self.name, self.chunk_bytes)

    def siglip_backward(self, a, b, scale, bias, grad, *, positive_offset, need_a, need_b):
        grad_a, grad_b, grad_bias = torch.ops.fastcontrast.siglip_backward(
            a, b, scale, bias, grad, positive_offset, need_a, need_b, self.name, self.chunk_bytes
        )
        return _or_none(grad_a, need_a), _or_none(grad_b, need_b), grad_bias

    def distill_forward(self, a, b, scale, a_t, b_t, scale_t, *, need_row, need_col):
        outs = torch.ops.fastcontrast.distill_forward(
            a, b, scale, a_t, b_t, scale_t, need_row, need_col, self.name, self.chunk_bytes
        )
        wanted = (need_row, need_col) * 3
        return DistillStats(*(_or_none(x, w) for x, w in zip(outs, wanted)))

    def distill_backward(self, a, b, scale, a_t, b_t, scale_t, stats, grads, *, need_a, need_b, need_a_t,
                         need_b_t):
        outs = torch.ops.fastcontrast.distill_backward(
            a, b, scale, a_t, b_t, scale_t, list(vars(stats).values()), list(vars(grads).values()),
            need_a, need_b, need_a_t, need_b_t, self.name, self.chunk_bytes,
        )
        return tuple(_or_none(x, w) for x, w in zip(outs, (need_a, need_b, need_a_t, need_b_t)))
