"""Capability routing: ``backend="auto"`` runs the Triton engine only on GPUs the compile table has checked
binaries for, and an explicit ``backend="triton"`` elsewhere is a clear error before any launch.

The GPUs are simulated (tests/ops/simulated_gpu.py): torch.cuda's device queries are monkeypatched, and no
CUDA tensor is created.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from fastcontrast.kernels import aot
from simulated_gpu import CHECKED, DEVICES, simulate_gpu

from fastcontrast import _dispatch, _targets

CUDA = torch.device("cuda")


@pytest.mark.parametrize("label", list(DEVICES))
def test_auto_runs_triton_only_where_the_compile_table_has_checked_binaries(monkeypatch, label):
    simulate_gpu(monkeypatch, label)
    expected = "triton" if label in CHECKED else "torch"
    for dtype in (torch.float16, torch.bfloat16, torch.float32, None):
        backend, reason = _dispatch.auto_backend(CUDA, dtype)
        assert backend == expected, f"{label} {dtype}: auto picked {backend} ({reason}), expected {expected}"
        assert f"({'cuda:0'}, {label})" in reason, f"{label}: the reason does not name the device: {reason}"


@pytest.mark.parametrize("label", sorted(set(DEVICES) - CHECKED))
def test_auto_on_an_unchecked_gpu_says_why_and_warns_once_without_suggesting_triton(monkeypatch, label):
    simulate_gpu(monkeypatch, label)
    monkeypatch.setattr(_dispatch, "_warned_triton_missing", False)
    with pytest.warns(RuntimeWarning, match=f"no Triton binary is compiled and checked for .*{label}") as caught:
        engine = _dispatch.resolve_engine("auto", CUDA, torch.bfloat16)
    assert engine.name == "torch"
    assert "Install triton" not in str(caught[0].message), "triton is installed; the GPU is the reason"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve_engine("auto", CUDA, torch.bfloat16).name == "torch"


@pytest.mark.parametrize("label", sorted(set(DEVICES) - CHECKED))
def test_explicit_triton_on_an_unchecked_gpu_is_a_value_error_naming_the_device(monkeypatch, label):
    simulate_gpu(monkeypatch, label)
    name = DEVICES[label][0]
    with pytest.raises(ValueError, match=rf"backend='triton': no Triton binary .*{name} \(cuda:0, {label}\)"):
        _dispatch.resolve_engine("triton", CUDA, torch.float16)


def test_triton_from_the_environment_on_an_unchecked_gpu_names_the_variable(monkeypatch):
    simulate_gpu(monkeypatch, "sm_75")
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "triton")
    with pytest.raises(ValueError, match=f"{_dispatch.ENV_BACKEND}=triton: no Triton binary .*sm_75"):
        _dispatch.resolve_engine("auto", CUDA, torch.float16)


@pytest.mark.parametrize("label", sorted(CHECKED))
def test_explicit_triton_on_a_checked_gpu_gives_the_triton_engine(monkeypatch, label):
    simulate_gpu(monkeypatch, label)
    assert _dispatch.resolve_engine("triton", CUDA, torch.bfloat16).name == "triton"


@pytest.mark.parametrize("label, table_arch", [("sm_80", "sm_80"), ("sm_86", "sm_80"), ("sm_89", "sm_80"),
                                               ("sm_90", "sm_90"), ("sm_100", "sm_100"), ("gfx90a", "gfx90a"),
                                               ("gfx942", "gfx942")])
def test_each_checked_gpu_maps_to_the_table_architecture_whose_binaries_stand_for_it(monkeypatch, label,
                                                                                     table_arch):
    simulate_gpu(monkeypatch, label)
    support = _targets.triton_support(CUDA)
    assert (support.arch, support.table_arch) == (label, table_arch), support


def test_a_part_with_less_shared_memory_than_the_table_checked_goes_to_the_torch_engine(monkeypatch):
    # An 8.x part allowing 64 KiB per block could not launch the sm_80 binaries, held to 99 KiB.
    simulate_gpu(monkeypatch, "sm_86", optin=64 * 1024)
    backend, reason = _dispatch.auto_backend(CUDA, torch.bfloat16)
    assert backend == "torch" and "64 KiB" in reason and "99 KiB" in reason, reason


def test_the_checked_architectures_are_read_from_the_compile_checks(monkeypatch):
    # Without sm_90 binaries in the table, an H100 must not get the Triton engine.
    simulate_gpu(monkeypatch, "sm_90")
    monkeypatch.setattr(aot, "ARCHS", tuple(a for a in aot.ARCHS if a != "sm_90"))
    backend, reason = _dispatch.auto_backend(CUDA, torch.bfloat16)
    assert backend == "torch" and "compile table covers sm_80, sm_100" in reason, reason


def test_the_device_check_is_for_cuda_devices_only():
    with pytest.raises(ValueError, match="`device` must be a CUDA device, got cpu"):
        _targets.triton_support(torch.device("cpu"))


@pytest.mark.parametrize("label", list(DEVICES))
def test_the_benchmark_skips_triton_with_the_reason_on_an_unchecked_gpu(monkeypatch, label):
    from fastcontrast.tools.bench.cases import provider_unavailable

    simulate_gpu(monkeypatch, label)
    reason = provider_unavailable("triton", CUDA)
    if label in CHECKED:
        assert reason is None, f"{label}: triton skipped on a checked GPU: {reason}"
    else:
        assert reason is not None and "no Triton binary is compiled and checked" in reason, (label, reason)
    assert provider_unavailable("torch", CUDA) is None
