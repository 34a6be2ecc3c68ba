"""Every loss inside ``torch.compile(..., fullgraph=True)`` (inductor, CPU, torch engine).

fullgraph=True turns any graph break into an error, so passing means the whole loss, forward and backward,
is one graph. The compiled step runs at two batch sizes (the second forces a recompile with a new shape)
and must give eager's loss and gradients; the memory bank's state must evolve as in eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, squared_distance_weights

import fastcontrast as fc
import fastcontrast.ops  # noqa: F401  (fc.ops below)

D = 16
BATCH_SIZES = (12, 17)
pytestmark = pytest.mark.timeout(900)


def _inputs(n):
    g = torch.Generator().manual_seed(n)
    features = [F.normalize(torch.randn(n, D, generator=g), dim=1).requires_grad_() for _ in range(4)]
    return {
        "features": features,
        "scale": torch.tensor(14.3, requires_grad=True),
        "bias": torch.tensor(-3.0, requires_grad=True),
        "caption_logits": torch.randn(n, 5, 7, generator=g).requires_grad_(),
        "caption_labels": torch.randint(0, 7, (n, 5), generator=g),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def _make(name):
    """(module, step(module, inputs) -> loss); the module is built outside the compiled step, as in training."""
    if name == "clip":
        return fc.ClipLoss(backend="torch"), lambda m, x: m(*x["features"][:2], x["scale"], x["bias"])
    if name == "siglip":
        return fc.SigLipLoss(backend="torch"), lambda m, x: m(*x["features"][:2], x["scale"], x["bias"])
    if name == "nt_xent":
        return fc.NTXentLoss(0.2, backend="torch"), lambda m, x: m(*x["features"][:2])
    if name == "dclw":
        return fc.DCLWLoss(0.2, 0.3, backend="torch"), lambda m, x: m(*x["features"][:2])
    if name == "dcl_weight_fn":
        return fc.DCLLoss(0.2, squared_distance_weights, backend="torch"), lambda m, x: m(*x["features"][:2])
    if name == "memory_bank":
        torch.manual_seed(0)  # the same random initial bank for the compiled and the eager module
        return fc.NTXentLoss(0.2, memory_bank_size=(40, D), backend="torch"), lambda m, x: m(*x["features"][:2])
    if name == "distill":
        return fc.DistillClipLoss(backend="torch"), lambda m, x: sum(
            m(*x["features"][:2], x["scale"], *x["features"][2:], 20.0)
        )
    if name == "coca":
        return fc.CoCaLoss(2.0, 1.0, backend="torch"), lambda m, x: sum(
            m(*x["features"][:2], x["caption_logits"], x["caption_labels"], x["scale"])
        )
    if name == "supcon":
        return fc.SupConLoss(0.2, backend="torch"), lambda m, x: m(x["features"][0], x["labels"])
    raise ValueError(name)


def _leaves(x):
    return x["features"] + [x["scale"], x["bias"], x["caption_logits"]]


@pytest.mark.parametrize(
    "name", ["clip", "siglip", "nt_xent", "dclw", "dcl_weight_fn", "memory_bank", "distill", "coca", "supcon"]
)
def test_loss_compiles_as_one_graph_and_matches_eager(name):
    torch._dynamo.reset()
    compiled_module, step = _make(name)
    eager_module, _ = _make(name)
    compiled_step = torch.compile(step, fullgraph=True, backend="inductor")
    for n in BATCH_SIZES:
        results = []
        for module, fn in ((compiled_module, compiled_step), (eager_module, step)):
            x = _inputs(n)
            loss = fn(module, x)
            loss.backward()
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in _leaves(x)]
            results.append((loss.detach(), grads))
        (loss_c, grads_c), (loss_e, grads_e) = results
        assert_close(f"N={n} loss", loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for index, (g_c, g_e) in enumerate(zip(grads_c, grads_e)):
            assert_close(f"N={n} gradient of input {index}", g_c, g_e, atol=1e-5, rtol=1e-5)
    if name == "memory_bank":
        assert_close("bank after the steps", compiled_module.memory_bank.bank, eager_module.memory_bank.bank, atol=1e-6)


def test_engine_calls_are_custom_ops_in_the_compiled_graph():
    """The compiler sees each engine call as one fastcontrast op: it never traces the chunk loops."""
    torch._dynamo.reset()
    seen = []

    def recording_backend(graph_module, example_inputs):
        # The autograd Function is a higher-order op whose forward and backward are nested graph modules.
        for module in graph_module.modules():
            if isinstance(module, torch.fx.GraphModule):
                seen.extend(str(node.target) for node in module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    loss_fn = fc.ClipLoss(backend="torch")
    step = torch.compile(lambda a, b, s: loss_fn(a, b, s), fullgraph=True, backend=recording_backend)
    x = _inputs(12)
    step(x["features"][0], x["features"][1], x["scale"]).backward()
    assert any("fastcontrast.lse_forward" in target for target in seen), seen
    assert not any(target.endswith(("mm", "matmul")) for target in seen), f"an engine GEMM was traced: {seen}"


SWAPPED_PAIRS = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 8])
OPCHECK_CASES = {
    "lse_forward": lambda a, b, s: (a, b, s, torch.arange(9) % 7, True, True, None, False, 0, True, False, "torch",
                                    1024),
    "lse_forward_rows_excluded": lambda a, b, s: (a, b, s, None, True, False, 1, False, 0, False, False, "torch",
                                                  1024),
    "lse_forward_private_columns": lambda a, b, s: (a, b, s, torch.arange(9) % 7, True, False, None, True, 3, False,
                                                    False, "torch", 1024),
    # DCL: rows only, the diagonal and each row's positive both left out.
    "lse_forward_positive_excluded": lambda a, b, s: (a, b, s, (torch.arange(9) + 3) % 7, True, False, 0, True, 0,
                                                      False, False, "torch", 1024),
    # Single tower by symmetry: b is a, the positive an involution (pairs swapped, the last row its own).
    "lse_forward_symmetric": lambda a, b, s: (a, a, s, SWAPPED_PAIRS, True, False, 0, False, 0, False, True, "torch",
                                              1024),
    "lse_backward_symmetric": lambda a, b, s: (a, a, s, SWAPPED_PAIRS, torch.randn(9), torch.empty(0), torch.randn(9),
                                               None, torch.randn(9), 0, True, 0, True, True, True, "torch", 1024),
    "lse_backward_positive_excluded": lambda a, b, s: (a, b, s, (torch.arange(9) + 3) % 7, torch.randn(9),
                                                       torch.empty(0), torch.randn(9), None, torch.randn(9), 0, True,
                                                       0, True, True, False, "torch", 1024),
    "lse_backward": lambda a, b, s: (a, b, s, torch.arange(9) % 7, torch.randn(9), torch.randn(7), torch.randn(9),
                                     torch.randn(7), torch.randn(9), None, False, 0, True, True, False, "torch", 1024),
    "siglip_forward": lambda a, b, s: (a, b, s, torch.tensor(-1.0), 0, "torch", 1024),
    "siglip_forward_backward": lambda a, b, s: (a, b, s, torch.tensor(-1.0), 0, True, False, "torch", 1024),
    "distill_forward": lambda a, b, s: (a, b, s, torch.randn(9, 3), torch.randn(7, 3), s, True, True, "torch", 1024),
}


@pytest.mark.skipif(not fc.ops.HAS_CUSTOM_OP, reason="torch.library.custom_op needs torch >= 2.4")
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_custom_ops_pass_torch_library_opcheck(case):
    """Schema, fake-tensor implementation (shapes, dtypes) and dispatch checked by torch's own opcheck."""
    op_name = next(op for op in ("lse_forward", "lse_backward", "siglip_forward_backward", "siglip_forward",
                                 "distill_forward") if case.startswith(op))
    args = OPCHECK_CASES[case](torch.randn(9, 5), torch.randn(7, 5), torch.tensor(2.0))
    torch.library.opcheck(getattr(torch.ops.fastcontrast, op_name).default, args)
