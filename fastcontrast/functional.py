"""The losses as functions: validation, then the differentiable core plus O(n·d) torch ops (DESIGN §2).

Every function here computes its loss in fp32 (fp64 for fp64 inputs) whatever the feature dtype, and
returns gradients in each input's own dtype. None of them allocates an n×m tensor unless
``backend="reference"`` is asked for.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastcontrast import reference
from fastcontrast._dispatch import check_backend, resolve_engine
from fastcontrast._validation import as_scalar_tensor, check_features, check_pair
from fastcontrast.autograd import blockwise_lse, blockwise_siglip_sum, keep_in_graph
from fastcontrast.blockwise import compute_dtype

Scalar = Union[torch.Tensor, float]

TEMPERATURE_EPS = 1e-8


def _single_process_only(world_size: int, process_group: object, feature: str) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}.")
    if world_size > 1 or process_group is not None:
        raise NotImplementedError(
            f"{feature} across processes (world_size={world_size}) is not implemented yet; "
            "use world_size=1 (distributed gathers are tracked in the distributed-training issue)."
        )


def positive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s·⟨aᵢ, bᵢ⟩ for each row, in the compute dtype (fp32, or fp64 for fp64): [n]."""
    cdt = compute_dtype(a.dtype)
    return (a.to(cdt) * b.to(cdt)).sum(dim=1) * scale.to(cdt)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """open_clip's CLIP loss, blockwise: ½[mean(r − p) + mean(c − p)].

    r and c are the row and column log-sum-exps of S = s·I·Tᵀ, p the positive logits s·Iᵢ·Tᵢ.

    Args:
        image_features: [n, d] (fp16, bf16, fp32 or fp64), used as given (open_clip does not normalise).
        text_features: [n, d], same dtype and device.
        logit_scale: the exponentiated scale: a 0-dim or one-element tensor (any float dtype, may require
            grad) or a Python number. A number or CPU tensor must be finite and positive; a CUDA tensor's
            value is not checked, because reading it would cost a host sync every step.
        logit_bias: optional scalar added to every logit. It changes nothing in a softmax, but like in
            open_clip it stays in the graph and gets an exact zero gradient.
        local_loss, gather_with_grad, rank, world_size, process_group: open_clip's distributed options.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        chunk_bytes: logits budget per chunk for the torch engine (bytes).
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
    bias = as_scalar_tensor("logit_bias", logit_bias, like=image_features, must_be_positive=False)
    _single_process_only(world_size, process_group, "ClipLoss")
    engine = resolve_engine(backend, image_features.device, chunk_bytes)
    if engine is None:
        return reference.clip_loss_reference(image_features, text_features, scale, bias)
    lse_row, lse_col = blockwise_lse(image_features, text_features, scale, engine, rows=True, cols=True)
    pos = positive_logits(image_features, text_features, scale)
    loss = ((lse_row - pos).mean() + (lse_col - pos).mean()) / 2
    return keep_in_graph(loss, bias)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Optional[Scalar] = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    dist_impl: Optional[str] = None,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """open_clip's SigLIP loss, blockwise: −Σᵢⱼ log σ(zᵢⱼ·(s·Iᵢ·Tⱼ + b)) / n.

    zᵢⱼ = +1 on the diagonal, −1 elsewhere; the division is by n (open_clip's), not n².

    Args:
        image_features: [n, d]; text_features: [n, d], same dtype and device.
        logit_scale: exponentiated scale (see :func:`clip_loss`); logit_bias: scalar or None.
        rank, world_size, dist_impl, process_group: open_clip's distributed options.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    scale = as_scalar_tensor("logit_scale", logit_scale, like=image_features, must_be_positive=True)
    bias = as_scalar_tensor("logit_bias", logit_bias, like=image_features, must_be_positive=False)
    _single_process_only(world_size, process_group, "SigLipLoss")
    engine = resolve_engine(backend, image_features.device, chunk_bytes)
    if engine is None:
        return reference.siglip_loss_reference(image_features, text_features, scale, bias)
    total = blockwise_siglip_sum(image_features, text_features, scale, bias, engine, positive_offset=0)
    return total / image_features.shape[0]


def check_temperature(temperature: object) -> float:
    """lightly's rule: |τ| < 1e-8 is an error; a negative τ is accepted, as lightly accepts it."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a float, got {type(temperature).__name__}.")
    if not abs(temperature) >= TEMPERATURE_EPS:  # also catches NaN
        raise ValueError(f"`temperature` must satisfy abs(temperature) >= 1e-8, got {temperature}.")
    return float(temperature)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows like lightly's ``F.normalize(x, dim=1)`` (eps 1e-12), robust in half precision.

    lightly computes the norm in the input dtype; in fp16 the squares of small entries underflow, the norm
    becomes 0 and the row is divided by eps (lightly issue #1259). Normalising in fp32 (fp64 for fp64) and
    casting back avoids that and leaves fp32 results bit-identical.
    """
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=1, eps=1e-12).to(x.dtype)


def nt_xent_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    temperature: float = 0.5,
    *,
    gather_distributed: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """lightly's NT-Xent (SimCLR) loss, blockwise, without memory bank.

    With z = [normalize(out0); normalize(out1)] (2n rows) and S = z·zᵀ/τ, each row's candidates are the other
    2n−1 rows: loss = mean over 2n rows of (LSE_{j≠i} Sᵢⱼ − S_{i, i±n}).

    Args:
        out0, out1: [n, d] projections of two views, same dtype and device.
        temperature: τ; |τ| < 1e-8 is an error (lightly's rule).
        gather_distributed, process_group: lightly's distributed option.
        backend, chunk_bytes: see :func:`clip_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    temperature = check_temperature(temperature)
    check_features("out0", out0)
    check_features("out1", out1)
    check_pair("out0", out0, "out1", out1, same_batch=True)
    _check_gather_distributed(gather_distributed, process_group)
    engine = resolve_engine(backend, out0.device, chunk_bytes)
    if engine is None:
        return reference.nt_xent_loss_reference(out0, out1, temperature)
    z0 = normalize_rows(out0)
    z1 = normalize_rows(out1)
    z = torch.cat([z0, z1])
    inv_temperature = torch.tensor(1.0 / temperature, dtype=compute_dtype(z.dtype), device=z.device)
    lse, _ = blockwise_lse(z, z, inv_temperature, engine, rows=True, cols=False, exclude_offset=0)
    pos = positive_logits(z0, z1, inv_temperature)
    return (lse - torch.cat([pos, pos])).mean()


def _check_gather_distributed(gather_distributed: bool, process_group) -> None:
    # lightly accepts gather_distributed=True in a single process with no group: it then gathers nothing.
    if not gather_distributed:
        return
    import torch.distributed as dist

    group_size = 1
    if process_group is not None:
        group_size = dist.get_world_size(process_group)
    elif dist.is_available() and dist.is_initialized():
        group_size = dist.get_world_size()
    _single_process_only(group_size, None, "NTXentLoss(gather_distributed=True)")


def nt_xent_memory_bank_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    bank: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str = "auto",
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """lightly's NT-Xent with a memory bank (MoCo-style), blockwise.

    One direction only: for q = normalize(out0), k = normalize(out1), pᵢ = qᵢ·kᵢ/τ and rᵢ the row LSE of
    q·bankᵀ/τ, loss = mean(logaddexp(p, r) − p). No in-batch negatives; the bank gets no gradient.

    Args:
        out0: [n, d] queries; out1: [n, d] keys.
        bank: [K, d] negatives as read *before* this batch is enqueued (lightly keeps it in fp32).
        temperature, backend, chunk_bytes: see :func:`nt_xent_loss`.
    Returns:
        0-dim loss, fp32 (fp64 for fp64 features).
    """
    check_backend(backend)
    temperature = check_temperature(temperature)
    check_features("out0", out0)
    check_features("out1", out1)
    check_pair("out0", out0, "out1", out1, same_batch=True)
    check_features("bank", bank)
    if bank.shape[1] != out0.shape[1]:
        raise ValueError(
            f"memory bank feature dim must match `out0`'s: bank has shape {tuple(bank.shape)}, "
            f"out0 has dim {out0.shape[1]}."
        )
    engine = resolve_engine(backend, out0.device, chunk_bytes)
    if engine is None:
        return reference.nt_xent_memory_bank_loss_reference(out0, out1, bank, temperature)
    q = normalize_rows(out0)
    k = normalize_rows(out1)
    cdt = compute_dtype(q.dtype)
    # The bank is fp32 (lightly's); queries are compared against it in fp32 rather than rounding the bank
    # to half precision. The bank never receives a gradient.
    negatives = bank.detach().to(device=q.device, dtype=cdt)
    inv_temperature = torch.tensor(1.0 / temperature, dtype=cdt, device=q.device)
    lse_bank, _ = blockwise_lse(q.to(cdt), negatives, inv_temperature, engine, rows=True, cols=False)
    pos = positive_logits(q, k, inv_temperature)
    return (torch.logaddexp(pos, lse_bank) - pos).mean()
