"""Launchers of the masked log-sum-exp (kernels/masked.py): thresholds' pair similarities, the forward, and the
gradient by the panel path (the masked dS kernel, then panel.py's two GEMMs).

Every launch of the three kernels for one masked call takes the same
:func:`fastcontrast.kernels.configs.masked_config` (by the model's dtype and whether a guide is compared):
that is what makes a threshold from :func:`pair_similarity` tie exactly with an equal candidate in the
forward's and the backward's tiles. The guide's tiles are always IEEE fp32 dots (never TF32, whatever the
user's matmul setting): the original compares per-pair fp32 sums, and TF32's 10-bit inputs would move the
guide's similarities by ~1e-3, enough to flip candidates near the threshold. Guides enter as fp32 (an exact
up-cast): one guide binary per model dtype. A half-precision guide is thus compared in fp32, where 6.2.0
rounds its cosines to the guide's dtype (the torch engine reproduces that; docs/numerics.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from fastcontrast.kernels import gradient_launch
from fastcontrast.kernels.configs import masked_config, target_for
from fastcontrast.kernels.launch import aligned_features, gradient_scale, launch_flags
from fastcontrast.kernels.masked import masked_ds_panel_kernel, masked_lse_kernel, pair_similarity_kernel


def guide_features(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Guide features as the kernels take them: fp32 (an exact up-cast from fp16 / bf16; one binary per model
    dtype, whatever the guide's), aligned. None stays None."""
    return None if x is None else aligned_features(x.float())


# The guide's dot: fp32 operands (guide_features), IEEE (module doc).
GUIDE_FLAGS = dict(GUIDE_DOT_FP32=False, GUIDE_PRECISION="ieee")


def _flags(config, operand: torch.Tensor, *, guide: bool) -> dict:
    """Launch flags for a dot on ``operand``: the model's settings, or with ``guide`` IEEE (module doc)."""
    flags = launch_flags(config, operand)
    if guide:
        flags["INPUT_PRECISION"] = "ieee"
    return flags


def pair_similarity(x: torch.Tensor, y: torch.Tensor, offset: int, *, guide: bool,
                    model_dtype: torch.dtype) -> torch.Tensor:
    """xᵢ·y₍ᵢ₊offset₎ [n] fp32 in the masked kernels' arithmetic (``guide``: as their guide tile computes it,
    else as their model tile). x: [n, d], y: [m, d], aligned (:func:`aligned_features`; guides fp32,
    :func:`guide_features`); ``model_dtype``: the dtype of the model features the masked call will take, which
    picks the kernels' config."""
    config = masked_config(target_for(x.device), model_dtype, guide)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    pair_similarity_kernel[(triton.cdiv(x.shape[0], config.block_m),)](
        X=x, Y=y, OUT=out, n_x=x.shape[0], n_y=y.shape[0], d=x.shape[1], stride_x=x.stride(0), stride_y=y.stride(0),
        offset=offset, **_flags(config, x, guide=guide),
    )
    return out


def _guide_arguments(a_guide, b_guide) -> dict:
    if a_guide is None:
        return dict(d_g=0, stride_xg=0, stride_yg=0)
    return dict(d_g=a_guide.shape[1], stride_xg=a_guide.stride(0), stride_yg=b_guide.stride(0))


def masked_lse_forward(a, b, scale, a_guide, b_guide, threshold, *, protect_offset: Optional[int],
                       exclude_offset: Optional[int], need_argmax: bool):
    """``(lse [n], positives [n] or None, argmax [n] or None)`` of the masked LSE; inputs aligned, scale and
    threshold fp32 device tensors (0-dim, [n])."""
    n = a.shape[0]
    config = masked_config(target_for(a.device), a.dtype, a_guide is not None)
    lse = torch.empty(n, dtype=torch.float32, device=a.device)
    positives = torch.empty(n, dtype=torch.float32, device=a.device) if protect_offset is not None else None
    argmax = torch.empty(n, dtype=torch.int64, device=a.device) if need_argmax else None
    guide = _guide_arguments(a_guide, b_guide)
    masked_lse_kernel[(triton.cdiv(n, config.block_m),)](
        X=a, Y=b, XG=a_guide, YG=b_guide, THRESHOLD=threshold, SCALE=scale, LSE=lse, POSITIVES=positives,
        ARGMAX=argmax, n_x=n, n_y=b.shape[0], d=a.shape[1], d_g=guide["d_g"], stride_x=a.stride(0),
        stride_y=b.stride(0), stride_xg=guide["stride_xg"], stride_yg=guide["stride_yg"],
        protect_offset=0 if protect_offset is None else protect_offset,
        exclude_offset=0 if exclude_offset is None else exclude_offset, HAS_GUIDE=a_guide is not None,
        HAS_PROTECT=protect_offset is not None, HAS_EXCLUDE=exclude_offset is not None, WRITE_ARGMAX=need_argmax,
        **launch_flags(config, a), **GUIDE_FLAGS,
    )
    return lse, positives, argmax


def masked_gradients(a, b, scale, a_guide, b_guide, threshold, lse, grad_lse, grad_positives, *,
                     protect_offset: Optional[int], exclude_offset: Optional[int], need_a: bool, need_b: bool):
    """Unscaled ``(dS·B [n, d_pad] or None, dSᵀ·A [m, d_pad] or None)`` (fp32) of the masked LSE, by the panel
    path's sweep (gradient_launch.panel_sweep): per panel one masked dS kernel and up to two GEMMs, panels in
    a fixed order, so deterministic. ``grad_lse`` / ``grad_positives``: fp32 [n] or None (no such term)."""
    config = masked_config(target_for(a.device), a.dtype, a_guide is not None)
    ds_scale = gradient_scale(a.dtype, grad_lse, grad_positives)
    guide = _guide_arguments(a_guide, b_guide)

    def write_ds(ds, r0, r1, c0, c1):
        grid = (triton.cdiv(r1 - r0, config.block_m), triton.cdiv(c1 - c0, config.block_n))
        masked_ds_panel_kernel[grid](
            A=a, B=b, AG=a_guide, BG=b_guide, THRESHOLD=threshold, SCALE=scale, DS_SCALE=ds_scale, LSE=lse,
            GRAD_LSE=grad_lse, GRAD_POSITIVES=grad_positives, DS=ds, row_start=r0, row_stop=r1, col_start=c0,
            col_stop=c1, d=a.shape[1], d_g=guide["d_g"], stride_a=a.stride(0), stride_b=b.stride(0),
            stride_ag=guide["stride_xg"], stride_bg=guide["stride_yg"], stride_ds=ds.stride(0),
            protect_offset=0 if protect_offset is None else protect_offset,
            exclude_offset=0 if exclude_offset is None else exclude_offset, HAS_GUIDE=a_guide is not None,
            HAS_PROTECT=protect_offset is not None, HAS_EXCLUDE=exclude_offset is not None,
            HAS_LSE_TERM=grad_lse is not None, HAS_POSITIVE_TERM=grad_positives is not None,
            SCALE_DS=ds_scale is not None, **launch_flags(config, a), **GUIDE_FLAGS,
        )

    return gradient_launch.panel_sweep(a, b, ds_scale, write_ds, need_a=need_a, need_b=need_b)
