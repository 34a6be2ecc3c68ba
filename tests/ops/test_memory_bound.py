"""The O(N·d) memory promise as a test: no tensor of N²/4 elements or more is created, forward or backward.

A TorchDispatchMode sees every aten op that runs (autograd's backward included) and records the size of
each tensor the op returns. With default settings, N = 4096 and d = 64, the naive losses create N×N
logits (16.8M elements); the blockwise engine's largest temporaries are one chunk of logits.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import BOUND, TensorSizeRecorder
from _helpers import BOUND_D as D
from _helpers import BOUND_N as N

from fastcontrast import ClipLoss, DCLWLoss, NTXentLoss, SigLipLoss


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    return a, b, scale, bias


LOSSES = {
    "ClipLoss": lambda backend: lambda a, b, s, bias: ClipLoss(backend=backend)(a, b, s, bias),
    "SigLipLoss": lambda backend: lambda a, b, s, bias: SigLipLoss(backend=backend)(a, b, s, bias),
    "NTXentLoss": lambda backend: lambda a, b, s, bias: NTXentLoss(backend=backend)(a, b),
}


def nt_xent_with_bank(backend: str):
    loss_fn = NTXentLoss(memory_bank_size=(N, D), backend=backend)
    return lambda a, b, s, bias: loss_fn(a, b)


LOSSES["NTXentLoss-memory-bank"] = nt_xent_with_bank
# DCL runs NT-Xent's core with the positive masked, plus O(N) weights; DCLW stands for all DCL variants
# (each N = 4096 run costs seconds).
LOSSES["DCLWLoss"] = lambda backend: lambda a, b, s, bias: DCLWLoss(backend=backend)(a, b)


def record_forward_and_backward(make_loss, backend: str) -> tuple[TensorSizeRecorder, TensorSizeRecorder]:
    a, b, scale, bias = make_inputs(seed=0)
    loss_fn = make_loss(backend)  # built outside the mode: the bank's random init is not under test
    with TensorSizeRecorder() as forward:
        loss = loss_fn(a, b, scale, bias)
    with TensorSizeRecorder() as backward:
        loss.backward()
    assert a.grad is not None and b.grad is not None
    return forward, backward


@pytest.mark.parametrize("loss_name", LOSSES)
def test_no_tensor_of_a_quarter_of_n_squared_is_created(loss_name, monkeypatch):
    monkeypatch.delenv("FASTCONTRAST_BACKEND", raising=False)  # default settings: "auto" picks the engine
    forward, backward = record_forward_and_backward(LOSSES[loss_name], backend="auto")
    for phase, recorder in (("forward", forward), ("backward", backward)):
        assert recorder.created, f"{phase}: the dispatch mode recorded nothing"
        numel, op = recorder.largest()
        assert numel < BOUND, f"{phase}: {op} created a tensor of {numel} elements (bound N²/4 = {BOUND})"


# NTXentLoss and DCLWLoss are left out here only for cost: their naive logits are 2N×(2N−1) fp32 (270 MB,
# several copies).
@pytest.mark.parametrize("loss_name", [name for name in LOSSES if name not in ("NTXentLoss", "DCLWLoss")])
def test_the_recorder_sees_the_n_by_n_logits_of_the_reference_backend(loss_name):
    # The same measurement must catch the naive losses, in forward and in backward (softmax's gradient).
    forward, backward = record_forward_and_backward(LOSSES[loss_name], backend="reference")
    for phase, recorder in (("forward", forward), ("backward", backward)):
        numel, op = recorder.largest()
        assert numel >= N * N, f"{phase}: largest tensor is {numel} elements ({op}), expected an N×N one"


@pytest.mark.parametrize("directions", ["row-and-column", "row", "column"])
def test_torch_engine_backward_holds_at_most_two_chunks_of_logits_at_once(directions):
    # The torch engine's backward, called directly (inside the fastcontrast::lse_backward op a dispatch mode
    # sees nothing): per chunk it needs S and dS, two chunk-sized buffers. Live tensor storage must stay
    # under the outputs (dS·B, dSᵀ·A), two chunks and the O(n) vectors.
    from fastcontrast.blockwise import TorchEngine
    from fastcontrast.tools.bench import MemoryMeter

    n, d, chunk_bytes = 1024, 16, 64 * 2**10  # 16 rows of 1024 fp32 logits per chunk
    g = torch.Generator().manual_seed(1)
    a, b = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(2))
    scale = torch.tensor(14.3)
    engine = TorchEngine(chunk_bytes=chunk_bytes)
    masks = {"exclude_offset": None, "exclude_positive": False, "private_columns": 0}
    positive_index = torch.arange(n)
    lse_row, lse_col, *_ = engine.lse_forward(a, b, scale, positive_index, need_row=True, need_col=True,
                                              need_argmax=False, **masks)
    grad_row = torch.full((n,), 1.0 / n) if directions != "column" else None
    grad_col = torch.full((n,), 1.0 / n) if directions != "row" else None
    (grad_a, grad_b), peak = MemoryMeter(torch.device("cpu"), prefer="tensor_bytes").measure(
        lambda: engine.lse_backward(a, b, scale, positive_index, lse_row, lse_col, grad_row, grad_col,
                                    -torch.ones(n) / n, need_a=True, need_b=True, **masks)
    )
    assert grad_a.shape == grad_b.shape == (n, d)
    output_bytes, vector_bytes = 2 * n * d * 4, 8 * n * 4
    bound = output_bytes + 2 * chunk_bytes + vector_bytes
    assert peak <= bound, (
        f"{directions}: backward peak {peak} B of live tensors; bound {bound} B = outputs {output_bytes} + "
        f"2 chunks {2 * chunk_bytes} + O(n) {vector_bytes}"
    )
