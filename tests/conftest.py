"""Test configuration.

Without a GPU, the Triton kernels run in triton's interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported, so it is set here, before anything imports fastcontrast.kernels. The compile
tests (sm_80 / sm_90) run in a subprocess whose environment drops it again (docs/numerics.md#testing-gpu-code-on-a-cpu).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys

import pytest

# The test folders (ops/, kernels/, losses/, distributed/, tools/) share the helpers next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


_INTERPRETER_SETTING = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def interpreter_setting_is_left_as_found():
    """Every later test runs the kernels in the interpreter, which reads TRITON_INTERPRET on each call: a test
    (or a fixture it uses) that drops or changes it fails here, by name, instead of a hundred tests later."""
    yield
    found = os.environ.get("TRITON_INTERPRET")
    if found != _INTERPRETER_SETTING:
        if _INTERPRETER_SETTING is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _INTERPRETER_SETTING
        pytest.fail(f"TRITON_INTERPRET was {_INTERPRETER_SETTING!r} before this test and {found!r} after it")


@pytest.fixture(autouse=True)
def nan_filled_empty(request, monkeypatch):
    """In the interpreter tests every new float buffer starts as NaN (as fla's tests do), so an output
    element a kernel forgot to write fails loudly instead of passing with leftover memory."""
    if request.node.get_closest_marker("interpreter") is None:
        return
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", empty)
