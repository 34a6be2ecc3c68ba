"""The call path from a loss module to its kernels stays short (the architecture issue).

At most 4 package frames lie between ``ClipLoss.forward`` and the engine's launcher, the custom op that
torch.compile sees included: ``clip_loss`` → the autograd Function → the custom op → the engine → launcher.
Frames of torch itself (``Function.apply``, the dispatcher) do not count.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fastcontrast
from fastcontrast.blockwise import TorchEngine

MAX_FRAMES = 4
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(path))
    for path in (fastcontrast.__file__, os.path.join(os.path.dirname(fastcontrast.__file__), "..", "kernels", "x"))
)


def _in_package(filename: str) -> bool:
    path = os.path.abspath(filename)
    return any(path.startswith(d + os.sep) for d in PACKAGE_DIRS) or "fastcontrast" + os.sep + "kernels" in path


def _stack_at(code, run):
    """The (function name, file) frames on the stack the first time ``code`` is entered while ``run()`` runs."""
    captured = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code and not captured:
            f = frame
            while f is not None:
                captured.append((f.f_code.co_name, f.f_code.co_filename))
                f = f.f_back

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    assert captured, f"{code.co_name} was never called"
    return captured[::-1]  # outermost first


def _frames_between_forward_and(code, backend):
    a = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    b = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    loss = fastcontrast.ClipLoss(backend=backend)
    stack = _stack_at(code, lambda: loss(a, b, 10.0))
    names = [name for name, _ in stack]
    forward_file = fastcontrast.ClipLoss.forward.__code__.co_filename
    start = max(i for i, (name, file) in enumerate(stack) if name == "forward" and file == forward_file)
    between = [(name, file) for name, file in stack[start + 1:-1] if _in_package(file)]
    return between, names


def test_torch_engine_is_reached_in_at_most_four_package_frames():
    between, names = _frames_between_forward_and(TorchEngine.lse_forward.__code__, "torch")
    assert len(between) <= MAX_FRAMES, f"{len(between)} package frames: {[n for n, _ in between]} (stack {names})"


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")
def test_triton_launcher_is_reached_in_at_most_four_package_frames():
    from fastcontrast.kernels import engine

    between, names = _frames_between_forward_and(engine._launch_lse.__code__, "triton")
    assert len(between) <= MAX_FRAMES, f"{len(between)} package frames: {[n for n, _ in between]} (stack {names})"
    # The launcher really launches: the frame after it is triton's, not another package helper.
    assert [n for n, _ in between][-1] == "lse_forward", between
