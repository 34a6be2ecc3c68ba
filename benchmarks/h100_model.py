"""Modelled H100 time of the Triton kernels against the naive losses, from counted work. A model, not a measurement.

Counting (no GPU needed):
- fastcontrast: the shipped GPU tile configs run in triton's interpreter while
  ``fastcontrast.kernels.work_count.count_work`` counts every ``tl.dot`` (FLOPs), every exp/exp2/log/log2
  element (SFU work) and every load/store (bytes requested).
- naive: the reference (open_clip / lightly math as written) runs under a TorchDispatchMode that counts
  matmul FLOPs and the bytes every op reads and writes.

Counts are taken at three small N (multiples of every block size) and extrapolated exactly: for such N every
count is a polynomial of degree ≤ 2 in N. Modelled time = max(tensor cores, SFUs, HBM) for the kernels, and
GEMM time + elementwise traffic time for the naive loss (its elementwise ops are separate memory-bound
kernels). Peak figures: 989 TFLOP/s dense bf16, 3.35 TB/s HBM, 16 SFU ops/clk/SM × 132 SMs × 1.83 GHz.

The kernels' "bytes requested" count every tile load, also the B tiles that every row block re-reads and that
a GPU serves mostly from L2; the HBM term uses the compulsory traffic instead (each kernel reads A, B and its
vectors once, writes its outputs once), and both are printed.

    python benchmarks/h100_model.py            # markdown table on stdout
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastcontrast.kernels import engine as triton_engine  # noqa: E402
from fastcontrast.kernels.work_count import (  # noqa: E402
    H100_BF16_FLOPS,
    H100_HBM_BYTES_PER_S,
    H100_TRANSCENDENTALS_PER_S,
    count_work,
    gpu_configs,
)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastcontrast as fc  # noqa: E402
from fastcontrast import reference  # noqa: E402

SAMPLE_N = (256, 512, 768)
TARGET_N = (16_384, 65_536, 262_144)
DIMS = (512, 768)
DTYPE = torch.bfloat16


class _NaiveCounter(TorchDispatchMode):
    """Counts matmul FLOPs and bytes read + written by every op (the naive loss's memory traffic)."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        name = func.__name__.split(".")[0]
        if name in ("mm", "bmm", "addmm"):
            a, b = [t for t in tensors_in if t.dim() >= 2][-2:]
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        elif name not in ("view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "select",
                          "slice", "unsqueeze", "squeeze", "permute", "as_strided", "_to_copy"):
            self.bytes += sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        return out


def _inputs(n, d):
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DTYPE).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DTYPE).requires_grad_()
    return a, b


LOSSES = {
    # name: (fastcontrast call, naive call, rows of the similarity matrix for n samples)
    "CLIP": (lambda a, b: fc.clip_loss(a, b, torch.tensor(14.3), backend="triton"),
             lambda a, b: reference.clip_loss_reference(a, b, torch.tensor(14.3)), 1),
    "SigLIP": (lambda a, b: fc.siglip_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0), backend="triton"),
               lambda a, b: reference.siglip_loss_reference(a, b, torch.tensor(10.0), torch.tensor(-10.0)), 1),
    "NT-Xent": (lambda a, b: fc.nt_xent_loss(a, b, 0.1, backend="triton"),
                lambda a, b: reference.nt_xent_loss_reference(a, b, 0.1), 2),
}


def _count_kernels(loss_fn, n, d, single_pass):
    a, b = _inputs(n, d)
    saved = triton_engine.SINGLE_PASS_SCRATCH_BYTES
    triton_engine.SINGLE_PASS_SCRATCH_BYTES = saved if single_pass else 0
    try:
        with gpu_configs(), count_work() as work:
            loss_fn(a, b).backward()
    finally:
        triton_engine.SINGLE_PASS_SCRATCH_BYTES = saved
    return np.array([work.flops, work.transcendentals, work.bytes_requested], dtype=np.float64)


def _count_naive(loss_fn, n, d):
    a, b = _inputs(n, d)
    with _NaiveCounter() as counter:
        loss_fn(a, b).backward()
    return np.array([counter.flops, counter.bytes], dtype=np.float64)


def _extrapolate(samples, values, target):
    coefficients = np.polyfit(np.array(samples, dtype=np.float64), values, 2)
    return float(np.polyval(coefficients, target))


def main() -> int:
    print("| loss | N | d | passes (2·n·m·d) | kernel model | naive passes | naive model | modelled speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (fast_fn, naive_fn, factor) in LOSSES.items():
        for d in DIMS:
            kernel_counts = {
                single: np.stack([_count_kernels(fast_fn, n, d, single) for n in SAMPLE_N]) for single in (True, False)
            }
            naive_counts = np.stack([_count_naive(naive_fn, n, d) for n in SAMPLE_N])
            for n in TARGET_N:
                rows = factor * n
                scratch = -(-rows // 128) * rows * 4
                single = scratch <= triton_engine.SINGLE_PASS_SCRATCH_BYTES
                counts = kernel_counts[single]
                flops, sfu, _requested = (_extrapolate(SAMPLE_N, counts[:, i], n) for i in range(3))
                # Compulsory HBM traffic: every kernel launch reads A and B and writes fp32 rows or vectors.
                launches = (1 if single else 2) + 2
                compulsory = launches * (2 * rows * d * 2 + rows * d * 4)
                kernel_s = max(flops / H100_BF16_FLOPS, sfu / H100_TRANSCENDENTALS_PER_S,
                               compulsory / H100_HBM_BYTES_PER_S)
                naive_flops, naive_bytes = (_extrapolate(SAMPLE_N, naive_counts[:, i], n) for i in range(2))
                naive_s = naive_flops / H100_BF16_FLOPS + naive_bytes / H100_HBM_BYTES_PER_S
                gemm = 2.0 * rows * rows * d
                print(
                    f"| {name} | {n:,} | {d} | {flops / gemm:.2f} | {kernel_s * 1e3:.1f} ms | "
                    f"{naive_flops / gemm:.2f} | {naive_s * 1e3:.1f} ms "
                    f"(+{naive_bytes / 2**30:.0f} GiB moved) | {naive_s / kernel_s:.1f}× |"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
