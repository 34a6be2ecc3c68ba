"""Simulated GPUs for the backend-choice tests: torch.cuda's device queries monkeypatched, no CUDA touched.

Each entry is what ``torch.cuda.get_device_properties`` reports on that part (name, capability, opt-in shared
memory per block; ``gcnArchName`` on ROCm). Imported by tests/ops/test_device_targets.py and
tests/tools/test_cli.py.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from fastcontrast import _dispatch, _targets

KIB = 1024
# label -> (name, (major, minor), opt-in shared memory per block, gcnArchName or None for NVIDIA)
DEVICES = {
    "sm_70": ("Tesla V100-SXM2-16GB", (7, 0), 96 * KIB, None),
    "sm_75": ("Tesla T4", (7, 5), 64 * KIB, None),
    "sm_80": ("NVIDIA A100-SXM4-80GB", (8, 0), 163 * KIB, None),
    "sm_86": ("NVIDIA A10", (8, 6), 99 * KIB, None),
    "sm_89": ("NVIDIA L4", (8, 9), 99 * KIB, None),
    "sm_90": ("NVIDIA H100 80GB HBM3", (9, 0), 227 * KIB, None),
    "sm_100": ("NVIDIA B200", (10, 0), 227 * KIB, None),
    "sm_120": ("NVIDIA GeForce RTX 5090", (12, 0), 99 * KIB, None),
    "gfx90a": ("AMD Instinct MI250X", (9, 0), 64 * KIB, "gfx90a:sramecc+:xnack-"),
    "gfx942": ("AMD Instinct MI300X", (9, 4), 64 * KIB, "gfx942:sramecc+:xnack-"),
    "gfx1100": ("Radeon RX 7900 XTX", (11, 0), 64 * KIB, "gfx1100"),
}
# What the compile table has checked binaries for (aot.ARCHS: sm_80 stands for every 8.x part).
CHECKED = {"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "gfx90a", "gfx942"}


def simulate_gpu(monkeypatch, label: str, optin: int = None) -> SimpleNamespace:
    """Make torch report one GPU, ``DEVICES[label]`` (``optin`` overrides its shared memory), with triton
    importing; returns the fake device properties."""
    name, (major, minor), shared, gcn = DEVICES[label]
    props = SimpleNamespace(name=name, major=major, minor=minor, total_memory=16 * 2**30, multi_processor_count=80,
                            shared_memory_per_block_optin=shared if optin is None else optin,
                            gcnArchName=gcn or "NVIDIA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133" if gcn else None)
    monkeypatch.delenv(_dispatch.ENV_BACKEND, raising=False)
    monkeypatch.setattr(_dispatch, "triton_import_error", lambda: None)
    # The answer is cached per device index: the simulated device gets a cache of its own, gone with the test.
    monkeypatch.setattr(_targets, "_cached_support", functools.cache(_targets._cached_support.__wrapped__))
    return props
