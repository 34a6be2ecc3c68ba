"""Which GPUs the Triton engine has compiled and checked binaries for: the one place that decides it.

The compile table (``fastcontrast/kernels/compile_table.json``, made by :mod:`fastcontrast.kernels.aot`) holds
every binary the engine can launch, compiled for the architectures of ``aot.ARCHS`` and checked there: no
spills, no stack, shared memory within ``aot.SHARED_LIMIT``. A device runs the Triton engine only when one of
those architectures stands for it:

- NVIDIA, compute capability ``major.minor``: the table's ``sm_<major>0``, when the table has it and the
  config tables (:mod:`fastcontrast.kernels.configs`) give the device the same tiles as that architecture.
  So sm_80 stands for every 8.x part (its binaries are held to 99 KiB of shared memory, the smallest 8.x
  limit), sm_90 for 9.0 and sm_100 for 10.x. Nothing stands for sm_70 / sm_75 (V100, T4: 96 / 64 KiB per
  block, under the Ampere tiles' 99), consumer Blackwell sm_120 / sm_121 (the configs give it the Ampere
  tiles, but no sm_12x binary was ever compiled and checked) or any part not known yet.
- AMD: the device's ``gcnArchName`` (without its feature suffixes) must be one of the table's architectures.
- The device's opt-in shared memory per block must hold the limit the table checked (NVIDIA, where torch
  reports it): a part that allows less cannot launch every checked binary.

Everything else goes to the blockwise torch engine under ``backend="auto"``, and an explicit
``backend="triton"`` is a ``ValueError``. Nothing here imports triton or creates a CUDA tensor: the decision
reads the device's properties only (tests simulate them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TritonSupport:
    """Whether checked Triton binaries exist for one CUDA (or ROCm) device.

    Attributes:
        device: the device in words, e.g. ``"Tesla T4 (cuda:0, sm_75)"``.
        arch: the device's architecture, ``"sm_75"`` or ``"gfx942"``.
        table_arch: the compile table's architecture whose checked binaries stand for the device, or None.
        reason: why, in one sentence a user can act on.
    """

    device: str
    arch: str
    table_arch: Optional[str]
    reason: str

    @property
    def checked(self) -> bool:
        return self.table_arch is not None


def _table_archs() -> tuple[tuple[str, ...], dict]:
    """(architectures the compile table covers, their per-block shared-memory limits), from the compile checks."""
    from fastcontrast.kernels import aot

    return aot.ARCHS, aot.SHARED_LIMIT


def _same_tiles(device_target: tuple, table_arch: str) -> bool:
    """Whether the config tables give ``device_target`` the tiles they give ``table_arch``'s binaries."""
    from fastcontrast.kernels import aot, configs

    return configs._family(device_target) == configs._family(aot._config_target(table_arch))


def _support(name: str, index: int, props, hip: bool) -> TritonSupport:
    archs, shared_limit = _table_archs()
    covered = ", ".join(archs)
    if hip:
        arch = str(getattr(props, "gcnArchName", "") or "unknown").split(":")[0]
        device = f"{name} (cuda:{index}, {arch})"
        if arch in archs:
            return TritonSupport(device, arch, arch, f"{device} runs the binaries compiled and checked for {arch}")
        return TritonSupport(device, arch, None, f"no Triton binary is compiled and checked for {device}: the "
                             f"compile table covers {covered}")
    major, minor = int(props.major), int(props.minor)
    arch = f"sm_{major}{minor}"
    device = f"{name} (cuda:{index}, {arch})"
    table_arch = f"sm_{major}0"
    if table_arch not in archs or not _same_tiles(("cuda", 10 * major + minor), table_arch):
        return TritonSupport(device, arch, None, f"no Triton binary is compiled and checked for {device}: the "
                             f"compile table covers {covered}")
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin and optin < shared_limit[table_arch]:
        return TritonSupport(device, arch, None, f"{device} allows {optin / 1024:g} KiB of shared memory per "
                             f"block; the {table_arch} binaries were checked against "
                             f"{shared_limit[table_arch] / 1024:g} KiB")
    via = "" if table_arch == arch else f", which stand for every sm_{major}x part"
    return TritonSupport(device, arch, table_arch,
                         f"{device} runs the binaries compiled and checked for {table_arch}{via}")


@functools.cache
def _cached_support(index: int) -> TritonSupport:
    props = torch.cuda.get_device_properties(index)
    return _support(props.name, index, props, torch.version.hip is not None)


def triton_support(device: torch.device) -> TritonSupport:
    """Whether the compile table has checked binaries for the CUDA (or ROCm) ``device``, and why.

    Reads the device's properties (cached per device index); creates no tensor and imports no triton.

    Raises:
        ValueError: ``device`` is not a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"`device` must be a CUDA device, got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cached_support(index)

