"""Every input check of the package, with messages that name the argument, what was expected and what came.

The per-call checks only look at metadata (shape, dtype, device) except where a value check is free: a
Python number, or a tensor that already lives on the CPU. A CUDA scale is never read back, because that
would cost a host sync on every training step. Constructor options are checked once, at construction.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")
# open_clip's SigLipLoss schedules; None is open_clip's default ('bidir'). All compute the same function here.
SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")
# lightly's rule: |τ| below this is an error.
TEMPERATURE_EPS = 1e-8

ScaleLike = Union[torch.Tensor, float, int]


def check_features(name: str, x: object) -> torch.Tensor:
    """Check that ``x`` is a non-empty floating-point matrix ``[n, d]`` and return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [batch, dim], got {type(x).__name__}.")
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D [batch, dim], got a {x.dim()}-D tensor of shape {tuple(x.shape)}.")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float16, bfloat16, float32 or float64, got {x.dtype}.")
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(x.shape)}): the loss needs at least one row.")
    if x.shape[1] == 0:
        raise ValueError(f"`{name}` has feature dim 0 (shape {tuple(x.shape)}): expected at least 1.")
    return x


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, same_batch: bool) -> None:
    """Check that two feature matrices can be compared: same device, dtype, feature dim (and batch)."""
    if a.device != b.device:
        raise ValueError(f"`{name_a}` and `{name_b}` must be on the same device, got {a.device} and {b.device}.")
    if a.dtype != b.dtype:
        raise TypeError(
            f"`{name_a}` and `{name_b}` must have the same dtype, got {a.dtype} and {b.dtype} "
            "(cast one of them, or run the model under torch.autocast so both come out alike)."
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same feature dim, got {a.shape[1]} ({name_a} shape "
            f"{tuple(a.shape)}) and {b.shape[1]} ({name_b} shape {tuple(b.shape)})."
        )
    if same_batch and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same batch size (row i of one is the positive of row i "
            f"of the other), got {a.shape[0]} and {b.shape[0]}."
        )


def check_positive_finite_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite positive number, got {value}.")


def compiling() -> bool:
    # Under torch.compile a tensor's value is not known while tracing; reading it would break the graph.
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether input checks may read ``tensor``'s values on the host: only for a CPU tensor. On an
    accelerator the read is a host sync on every step (no CUDA-graph capture either), so those checks are
    skipped or done on the device. The one place this choice is made: the no-host-sync test patches it to
    take the accelerator's branch on the CPU."""
    return tensor.device.type == "cpu"


def as_scalar_tensor(
    name: str,
    value: Optional[ScaleLike],
    *,
    like: torch.Tensor,
    must_be_positive: bool,
) -> Optional[torch.Tensor]:
    """Turn a scale or bias into a 0-dim tensor on ``like``'s device, keeping it in the autograd graph.

    A Python number becomes a tensor of ``like``'s compute dtype (fp64 for fp64 features, else fp32).
    A tensor must hold exactly one element; it is reshaped (not copied) so its gradient flows back.
    The value of a CPU tensor or a number is checked when ``must_be_positive``; a CUDA tensor's value is
    not, since reading it would synchronise the host with the device on every step.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a float or a one-element tensor, got bool.")
    if isinstance(value, (int, float)):
        if must_be_positive:
            check_positive_finite_number(name, float(value))
        elif not math.isfinite(float(value)):
            raise ValueError(f"`{name}` must be finite, got {value}.")
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        # A fill on the device, not torch.tensor: that copies from the host and blocks on every step.
        return torch.full((), float(value), dtype=dtype, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a float or a one-element tensor, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must be a scalar (0-dim or one-element tensor), got shape {tuple(value.shape)}."
        )
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a floating-point tensor, got {value.dtype}.")
    if value.device != like.device:
        raise ValueError(f"`{name}` must be on the features' device {like.device}, got {value.device}.")
    if must_be_positive and values_readable(value) and not compiling():
        v = float(value.detach().reshape(()))
        check_positive_finite_number(name, v)
    return value.reshape(())


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")


def check_non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
    return value


def check_positive_int(name: str, value: object, *, what: str = "") -> int:
    """An int >= 1: ``TypeError`` for another type (a bool or a float included), ``ValueError`` below 1."""
    meaning = f" ({what})" if what else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int{meaning}, got {type(value).__name__} ({value!r}).")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1{meaning}, got {value}.")
    return value


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts GEMM inputs to on ``device`` right now, or None when it is off."""
    device_type = device.type
    if device_type not in ("cpu", "cuda"):
        return None
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def cast_like_autocast(*tensors: object) -> tuple:
    """Under torch.autocast, fp32 features become the autocast dtype, as they would for the original loss's
    matmul; the loss then equals the one for such features outside autocast (computed in fp32 inside, fp32
    loss). Outside autocast, or for non-tensors and other dtypes, the inputs come back unchanged."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = None if first is None else autocast_dtype(first.device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t for t in tensors)


def check_backend(backend: object) -> str:
    """A backend name (checked at module construction too, so typos fail early)."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}.")
    return backend  # type: ignore[return-value]


def check_chunk_bytes(chunk_bytes: object) -> Optional[int]:
    """The torch engine's logits budget per chunk: None (the default) or a positive int of bytes."""
    if chunk_bytes is None:
        return None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"`chunk_bytes` must be a positive int (bytes of logits per chunk), got {chunk_bytes!r}.")
    return chunk_bytes


def check_false_negative_margin(margin: object) -> Optional[float]:
    """fastcontrast's ``false_negative_margin`` (MNRL, CLIP, NT-Xent): None (off) or a finite number, returned as
    a float (every engine takes it)."""
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise TypeError(f"`false_negative_margin` must be None or a finite float, got {margin!r}.")
    return float(margin)


def check_flags(**flags: object) -> None:
    """Boolean options: a bool, nothing else (a string "False" is truthy and would silently flip a flag)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} ({value!r}).")


def check_rank_world(rank: object, world_size: object) -> None:
    """open_clip's ``rank`` / ``world_size``: 0 ≤ rank < world_size."""
    check_non_negative_int("rank", rank)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}.")
    if rank >= world_size:  # type: ignore[operator]
        raise ValueError(f"`rank` must be smaller than `world_size` ({world_size}), got {rank}.")


def check_siglip_dist_impl(dist_impl: object) -> Optional[str]:
    check_choice("dist_impl", dist_impl, SIGLIP_DIST_IMPLS)
    return dist_impl  # type: ignore[return-value]


EXCHANGES = ("gather", "ring")


def check_exchange(exchange: object, *, what: str, needs: Optional[dict] = None, refuses: Optional[dict] = None) -> str:
    """``exchange="gather"`` or ``"ring"``. The ring scores only a rank's own rows with gradients through every
    block: ``needs`` are the flags that must be True for it, ``refuses`` the options it does not take."""
    check_choice("exchange", exchange, EXCHANGES)
    if exchange == "ring":
        missing = [name for name, value in (needs or {}).items() if not value]
        if missing:
            raise ValueError(
                f"{what}: exchange='ring' computes the loss of this rank's rows with gradients through every "
                f"rank's features, which needs {' and '.join(f'{n}=True' for n in missing)}; set "
                f"{'them' if len(missing) > 1 else 'it'}, or use exchange='gather'."
            )
        refused = [name for name, value in (refuses or {}).items() if value]
        if refused:
            raise ValueError(f"{what}: exchange='ring' does not take {', '.join(refused)}; use exchange='gather'.")
    return exchange


def check_temperature(temperature: object) -> float:
    """lightly's rule: |τ| < 1e-8 is an error; a negative τ is accepted, as lightly accepts it."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a float, got {type(temperature).__name__}.")
    if not abs(temperature) >= TEMPERATURE_EPS:  # also catches NaN
        raise ValueError(f"`temperature` must satisfy abs(temperature) >= 1e-8, got {temperature}.")
    return float(temperature)


def check_positive_temperature(temperature: object) -> float:
    """pytorch-metric-learning's τ: a finite positive number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a float, got {type(temperature).__name__}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a finite positive number, got {temperature}.")
    return float(temperature)


def check_labels(name: str, labels: object, *, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Class labels: a 1-D integer tensor with one entry per row of the features, on their device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be a 1-D integer torch.Tensor of class labels, got {type(labels).__name__}.")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"`{name}` must have shape [{rows}] (one label per row), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"`{name}` must hold integer class labels, got {labels.dtype}.")
    if labels.device != like.device:
        raise ValueError(f"`{name}` must be on the embeddings' device {like.device}, got {labels.device}.")
    return labels


def check_indices_tuple(indices_tuple: object, *, rows: int, ref_rows: int, like: torch.Tensor) -> tuple:
    """A miner's output as PML's pairs (a1, p, a2, n), on ``like``'s device.

    Takes pairs (a1, p, a2, n) or triplets (a, p, n, read as the pairs (a, p) and (a, n), as PML does): 1-D
    integer tensors, each anchor index in [0, rows) and each reference index in [0, ref_rows).
    """
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "`indices_tuple` must be a miner's pairs (a1, p, a2, n) or triplets (a, p, n) of index tensors, "
            f"got {type(indices_tuple).__name__}"
            + (f" of length {len(indices_tuple)}." if isinstance(indices_tuple, (tuple, list)) else ".")
        )
    names = ("a1", "p", "a2", "n") if len(indices_tuple) == 4 else ("a", "p", "n")
    checked = []
    for name, x in zip(names, indices_tuple):
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            described = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                         else type(x).__name__)
            raise TypeError(f"`indices_tuple` entry `{name}` must be a 1-D integer tensor, got {described}.")
        checked.append(x.to(device=like.device, dtype=torch.long))
    pairs = tuple(checked) if len(checked) == 4 else (checked[0], checked[1], checked[0], checked[2])
    pair_names = (("a1", "p"), ("a2", "n")) if len(names) == 4 else (("a", "p"), ("a", "n"))
    for (i, j), (name_i, name_j) in zip(((0, 1), (2, 3)), pair_names):
        if pairs[i].shape != pairs[j].shape:
            raise ValueError(
                f"`indices_tuple`: `{name_i}` and `{name_j}` must have the same length, got "
                f"{pairs[i].shape[0]} and {pairs[j].shape[0]}."
            )
    for k, x in enumerate(pairs):
        bound, what = (rows, "embeddings") if k % 2 == 0 else (ref_rows, "reference embeddings")
        if not x.numel():
            continue
        if values_readable(x):
            if int(x.min()) < 0 or int(x.max()) >= bound:
                raise ValueError(
                    f"`indices_tuple` holds an index out of range for the {bound} {what}: "
                    f"got values in [{int(x.min())}, {int(x.max())}]."
                )
        else:
            # On the device the check must not read the indices back: an asynchronous device-side assert
            # (a negative index would otherwise wrap around silently in the gathers).
            in_range = (x.min() >= 0) & (x.max() < bound)
            torch._assert_async(in_range, f"`indices_tuple` holds an index out of range for the {bound} {what}.")
    return pairs


def check_two_towers(
    name_a: str, a: object, name_b: str, b: object, scale: object, bias: object, *, scale_name: str = "logit_scale",
    bias_name: str = "logit_bias",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """open_clip's (image, text, scale, bias) inputs: two [n, d] towers, a positive scale, an optional bias.

    Returns the scale and bias as 0-dim tensors on the features' device (see :func:`as_scalar_tensor`).
    """
    check_features(name_a, a)
    check_features(name_b, b)
    check_pair(name_a, a, name_b, b, same_batch=True)  # type: ignore[arg-type]
    return (
        as_scalar_tensor(scale_name, scale, like=a, must_be_positive=True),  # type: ignore[arg-type]
        as_scalar_tensor(bias_name, bias, like=a, must_be_positive=False),  # type: ignore[arg-type]
    )
