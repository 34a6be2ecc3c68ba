"""Backend choice: "auto" picks Triton on CUDA when triton imports, else the torch engine (warning once).

The CUDA device is a simulated A100 (tests/ops/simulated_gpu.py); test_device_targets.py covers the others."""

from __future__ import annotations

import warnings

import pytest
import torch
from simulated_gpu import simulate_gpu

from fastcontrast import _dispatch


def test_auto_picks_the_torch_engine_for_cpu_tensors():
    backend, reason = _dispatch.auto_backend(torch.device("cpu"))
    assert backend == "torch"
    assert "CUDA" in reason


def test_auto_picks_triton_for_cuda_tensors_when_triton_imports(monkeypatch):
    simulate_gpu(monkeypatch, "sm_80")
    assert _dispatch.auto_backend(torch.device("cuda"))[0] == "triton"


def test_auto_falls_back_to_torch_on_cuda_with_one_warning_when_triton_is_missing(monkeypatch):
    simulate_gpu(monkeypatch, "sm_80")
    monkeypatch.setattr(_dispatch, "triton_import_error", lambda: "ImportError: No module named 'triton'")
    monkeypatch.setattr(_dispatch, "_warned_triton_missing", False)
    with pytest.warns(RuntimeWarning, match="Install triton"):
        engine = _dispatch.resolve_engine("auto", torch.device("cuda"))
    assert engine.name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve_engine("auto", torch.device("cuda")).name == "torch"


def test_environment_variable_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "reference")
    assert _dispatch.resolve_engine("auto", torch.device("cpu")) is None
    assert _dispatch.resolve_engine("torch", torch.device("cpu")).name == "torch"
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match="FASTCONTRAST_BACKEND"):
        _dispatch.resolve_engine("auto", torch.device("cpu"))


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.resolve_engine("triton", torch.device("cpu"))


def test_importing_fastcontrast_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, fastcontrast; print('triton' in sys.modules, 'fastcontrast.kernels.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"import side effects: triton imported={out[0]}, engine imported={out[1]}"


def test_auto_sends_float64_cuda_tensors_to_the_torch_engine_and_says_why(monkeypatch):
    # The Triton kernels take fp16 / bf16 / fp32: an fp64 CUDA batch must not reach them (it used to, and the
    # engine then rejected it with a TypeError mid-training).
    simulate_gpu(monkeypatch, "sm_80")
    backend, reason = _dispatch.auto_backend(torch.device("cuda"), torch.float64)
    assert backend == "torch" and "float64" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate choice, not a missing triton: no warning
        assert _dispatch.resolve_engine("auto", torch.device("cuda"), torch.float64).name == "torch"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _dispatch.auto_backend(torch.device("cuda"), dtype)[0] == "triton"


def test_explicit_triton_with_float64_is_a_clear_type_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        _dispatch.resolve_engine("triton", torch.device("cpu"), torch.float64)
