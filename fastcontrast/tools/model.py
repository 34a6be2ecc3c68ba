"""``python -m fastcontrast model``: modelled H100 / H200 time of every kernel and every loss, from counted work.

A model, never a measurement (no GPU is used). How the numbers are made:

1. **What launches.** Each loss runs forward and backward at the target size (bf16, N = 65 536) on CPU tensors,
   through the real engine under :func:`fastcontrast.kernels.configs.assume_target` ``("cuda", 90)``, with
   every kernel launch recorded instead of run (:func:`fastcontrast.kernels.launches.recorded_launches`): the
   launch schedule, tile configs and flags are the engine's own. The torch ops between launches (merges,
   casts, the scale gradient) run for real and their bytes are counted by a ``TorchDispatchMode``.
2. **Counted work.** For each distinct launch, program 0 runs in triton's interpreter under
   :func:`fastcontrast.kernels.work_count.count_work` (every ``tl.dot``, exp2 / log2 and load / store), and the
   count is multiplied by the number of programs: exact at these sizes, where every program does the same
   work (tile-aligned shapes; ``tests/kernels/test_work_model.py`` checks the rule against full counts).
   ``flops`` and ``bytes`` (every global load and store) are counts.
3. **Modelled HBM bytes** (``bytes_hbm``), an assumption per kernel, stated in :func:`hbm_bytes`: stores go to
   HBM once; the row operand is read once; the column operand once per wave of resident programs unless it fits
   half the L2; a panel GEMM reads its dS panel and operand strip once (both fit the 50 MB L2 together).
4. **Time** = max(tensor, SFU, memory): tensor = FLOPs / (peak × efficiency of the kernel's wgmma instruction
   shape, :data:`WGMMA_EFFICIENCY`), SFU = exp2 / log2 elements / (16 per clock per SM), memory = bytes_hbm /
   HBM bandwidth. A loss is the sum of its launches plus its torch ops' traffic.
5. **Naive**, twice: as open_clip / lightly write it (``naive_as_written_s``, also ``naive_s``; open_clip's
   single-process CLIP runs two logits GEMMs), and as a careful user writes it (``naive_best_s``: one logits GEMM,
   CLIP's other direction its transpose, fp32 softmax / CE as under AMP: 3 passes). Matmul FLOPs and every op's
   bytes counted by a dispatch mode at small N and extrapolated exactly (each count is a polynomial of degree
   ≤ 2 in N); time = GEMM FLOPs at :data:`CUBLAS_EFFICIENCY` of peak + all bytes at HBM speed (its elementwise
   ops are separate kernels).
6. **Calibration.** The same model applied to a published, measured Triton kernel on H100 (:data:`REFERENCE`):
   how far it lands from the measurement is printed, and every fused time is also given × that factor.

    python -m fastcontrast model [--quick] [--gpus H100 …] [--json FILE] [--calibrate RESULTS.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

N_TARGET = 65_536
DIMS = (512, 768, 1024, 1280)
QUICK_DIMS = (512, 1280)
LOSSES = ("CLIP", "SigLIP", "NT-Xent")
SAMPLE_N = (256, 512, 768)  # the naive loss's counts, extrapolated


@dataclass(frozen=True)
class GpuSpec:
    name: str
    tensor_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    sfu_per_s: float  # exp2 / log2 elements per second
    sms: int
    l2_bytes: int
    arch: str = "sm_90"  # the compile table's rows that give a launch's registers and shared memory
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    programs_per_sm: int = 32
    shared_per_sm: int = 228 * 1024  # of which 1 KiB per resident program is reserved by the driver


# Vendor figures (dense, no sparsity): H100 SXM 989 TFLOP/s bf16, 3.35 TB/s; H200 SXM the same chip with 4.8 TB/s
# HBM3e. SFU: 16 exp2 per clock per SM, 132 SMs, 1.83 GHz boost clock.
GPUS = {
    "H100": GpuSpec("H100 SXM", 989e12, 3.35e12, 16 * 132 * 1.83e9, 132, 50 * 2**20),
    "H200": GpuSpec("H200 SXM", 989e12, 4.8e12, 16 * 132 * 1.83e9, 132, 50 * 2**20),
}
# Fraction of peak a kernel's tensor-core work reaches, by the N of its narrowest wgmma instruction. An
# assumption: larger N amortises the A-operand reads of each warpgroup (FlashAttention-3 paper, sec. 3; CUTLASS's
# Hopper tile guidance), m64n256 being the full-width instruction.
WGMMA_EFFICIENCY = {256: 0.80, 128: 0.75, 64: 0.65, 32: 0.45, 16: 0.35, 8: 0.30}
# Large bf16 GEMMs on cuBLAS reach about 750 of 989 TFLOP/s on an H100 SXM (an assumption for the naive loss).
CUBLAS_EFFICIENCY = 0.75
# Launches cost a few µs each on the host's side; counted per launch (an assumption).
LAUNCH_S = 4e-6

# A published measurement of a Triton kernel on an H100: Triton's fused-attention tutorial (FlashAttention-2
# forward) in pytorch/benchmark, "triton_tutorial_flash_v2" at batch 128, 8 heads, head dim 128, sequence
# 16384: 334.992 ms, 420.1 TFLOP/s (github.com/pytorch/benchmark, PR #2296, commit d5f0a12b). Its work: 4·B·H·S²·D
# FLOPs, B·H·S² exp2, Q/K/V/O read or written once; tiles 128×128 with 8 warps (m64n128 instructions).
REFERENCE = {
    "name": "Triton tutorial FlashAttention-2 forward, H100 SXM, B=128 H=8 D=128 S=16384 (pytorch/benchmark #2296)",
    "measured_s": 0.334992,
    "flops": 4 * 128 * 8 * 16384**2 * 128,
    "transcendentals": 128 * 8 * 16384**2,
    "bytes_hbm": 4 * 128 * 8 * 16384 * 128 * 2,
    "instruction_n": 128,
}


def wgmma_n(kernel: str, kwargs: dict, warps: int) -> int:
    """The N of the narrowest wgmma instruction of a 16-bit kernel on Hopper: a dot's N divided by the
    warpgroups along N (the warpgroups split M first, 64 rows each); 256 for a kernel without tiles (it has no
    dot, so no tensor time to scale)."""
    if "BLOCK_M" not in kwargs:
        return 256
    block_m, block_n, block_d = kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_D"]
    warpgroups = max(1, warps // 4)
    along_m = max(1, min(warpgroups, block_m // 64))
    along_n = max(1, warpgroups // along_m)
    dot_ns = {"gradient_kernel": (block_n, block_d), "distill_gradient_kernel": (block_n, block_d)}.get(
        kernel, (block_n,))
    return min(256, min(n // along_n for n in dot_ns))


def _table_rows(arch: str) -> dict:
    """Compile-table rows of ``arch`` by (kernel, dtype, tile, warps, stages); cached."""
    if arch not in _TABLE_ROWS:
        from fastcontrast.tools.binaries import load_table

        rows: dict = {}
        for row in load_table()[0]["rows"]:
            if row["arch"] == arch:
                key = (row["kernel"], row["dtype"], row["block"], row["warps"], row["stages"])
                rows.setdefault(key, []).append(row)
        _TABLE_ROWS[arch] = rows
    return _TABLE_ROWS[arch]


_TABLE_ROWS: dict = {}


def resident_programs(launch, gpu: GpuSpec) -> Optional[int]:
    """Programs of ``launch`` that fit on one SM at once, from the compile table's registers and shared memory
    of its binary on ``gpu.arch``: the rows of the same kernel, dtype, tile, warps and stages (their constexpr
    variants differ little; the largest footprint is taken). None if the table has no such row."""
    kw = launch.kwargs
    x = kw.get("X", kw.get("A", kw.get("P", kw.get("PART_LSE"))))
    dtype = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(x.dtype)]
    tile = f"{kw.get('BLOCK_M')}x{kw.get('BLOCK_N')}x{kw.get('BLOCK_D')}"
    rows = _table_rows(gpu.arch).get((launch.name, dtype, tile, kw["num_warps"], kw["num_stages"]))
    if not rows:
        return None
    warps = kw["num_warps"]
    # Registers are allocated per warp in units of 256; shared memory per program plus 1 KiB reserved.
    per_warp = -(-max(r["registers"] for r in rows) * 32 // 256) * 256
    by_registers = (gpu.registers_per_sm // per_warp) // warps
    by_shared = gpu.shared_per_sm // (max(r["shared"] for r in rows) + 1024)
    return max(1, min(by_registers, by_shared, gpu.warps_per_sm // warps, gpu.programs_per_sm))


def wave_factor(programs: int, resident: Optional[int], gpu: GpuSpec) -> float:
    """Time of ``programs`` in whole waves over the time if the last wave were full: ⌈w⌉ / w, w = programs /
    (SMs × resident). A launch without a table row is taken as one resident program per SM."""
    waves = programs / (gpu.sms * (resident or 1))
    return math.ceil(waves) / waves


def _efficiency(n: int) -> float:
    return max(e for width, e in WGMMA_EFFICIENCY.items() if width <= max(n, 8))


def hbm_bytes(launch, bytes_stored: int, gpu: GpuSpec, resident_per_sm: int = 1) -> int:
    """Modelled HBM traffic of one launch (the assumptions of the module docstring, item 3)."""
    kw = launch.kwargs
    name = launch.name

    def nbytes(t, rows=None):
        if t is None:
            return 0
        if t.dim() == 0:
            return t.element_size()
        rows = t.shape[0] if rows is None else rows
        return rows * (t.numel() // max(1, t.shape[0])) * t.element_size()

    vectors = sum(nbytes(v) for k, v in kw.items() if hasattr(v, "dim") and v.dim() <= 1)
    if name == "panel_matmul_kernel":
        p_bytes = kw["rows"] * kw["depth"] * kw["P"].element_size()
        y_bytes = kw["depth"] * kw["cols"] * kw["Y"].element_size()
        out_read = kw["rows"] * kw["cols"] * 4 if kw["ACCUMULATE"] else 0
        return p_bytes + y_bytes + out_read + bytes_stored + vectors
    if name == "merge_partials_kernel":  # the LSE partials, each read once
        return nbytes(kw["PART_LSE"]) + nbytes(kw["PART_LOW"]) + bytes_stored
    if name in ("ds_panel_kernel", "distill_panel_kernel"):
        rows = kw["row_stop"] - kw["row_start"]
        cols = kw["col_stop"] - kw["col_start"]
        operands = sum(nbytes(kw[k], rows) for k in ("A", "AT") if k in kw) + sum(
            nbytes(kw[k], cols) for k in ("B", "BT") if k in kw)
        return operands + bytes_stored + vectors
    # Row-block kernels: X once; Y (and the teacher's) once per wave unless it fits half the L2.
    programs = launch.programs
    waves = -(-programs // (gpu.sms * resident_per_sm))
    y_bytes = nbytes(kw["Y"]) + nbytes(kw.get("YT"))
    y_reads = 1 if y_bytes <= gpu.l2_bytes // 2 else waves
    return nbytes(kw["X"]) + nbytes(kw.get("XT")) + y_reads * y_bytes + bytes_stored + vectors


@dataclass
class KernelRecord:
    loss: str
    kernel: str
    d: int
    n: int
    launches: int
    flops: float
    transcendentals: float
    bytes: float
    bytes_hbm: float
    instruction_n: int
    tensor_s: float
    sfu_s: float
    memory_s: float
    modelled_s: float
    naive_s: Optional[float] = None
    gpu: str = "H100"
    resident_programs: Optional[int] = None  # per SM, from the compile table; None: no row for this launch
    wave_factor: float = 1.0  # the largest ⌈waves⌉ / waves of its launches
    wave_s: float = 0.0  # the partial last waves' idle compute, included in modelled_s


def _inputs(loss: str, n: int, d: int):
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(torch.bfloat16).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(torch.bfloat16).requires_grad_()
    return a, b


def _run_loss(loss: str, a, b, backend: str):
    import torch

    import fastcontrast as fc
    from fastcontrast import reference

    if loss == "CLIP":
        scale = torch.tensor(14.3, requires_grad=True)
        value = fc.clip_loss(a, b, scale, backend=backend) if backend else reference.clip_loss_reference(a, b, scale)
    elif loss == "SigLIP":
        scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        value = (fc.siglip_loss(a, b, scale, bias, backend=backend) if backend
                 else reference.siglip_loss_reference(a, b, scale, bias))
    else:  # NT-Xent over the 2n×2n matrix of both views
        value = fc.nt_xent_loss(a, b, 0.1, backend=backend) if backend else reference.nt_xent_loss_reference(a, b, 0.1)
    value.backward()


def _run_naive_best(loss: str, a, b):
    """The naive loss a careful user writes: one logits GEMM (CLIP's other direction is its transpose, NT-Xent
    one 2n×2n matrix of both views), softmax / CE in fp32 as autocast runs it (open_clip trains under AMP), and
    autograd's two gradient GEMMs: 3 passes. SigLIP as open_clip writes it is already this."""
    import torch
    import torch.nn.functional as F

    if loss == "CLIP":
        scale = torch.tensor(14.3, requires_grad=True)
        logits = (scale * (a @ b.t())).float()
        labels = torch.arange(a.shape[0])
        value = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    elif loss == "SigLIP":
        scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        logits = (scale * (a @ b.t()) + bias).float()
        labels = 2 * torch.eye(a.shape[0]) - 1
        value = -F.logsigmoid(labels * logits).sum() / a.shape[0]
    else:
        z = F.normalize(torch.cat([a, b]), dim=1)
        n2 = z.shape[0]
        logits = (z @ z.t()).float() / 0.1
        logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
        value = F.cross_entropy(logits, torch.arange(n2).add(n2 // 2).remainder(n2))
    value.backward()


@dataclass
class TorchOps:
    """The torch ops a loss's step issues, beside its Triton launches: each one is a GPU launch of its own.

    ``engine_*``: inside the engines' custom ops (split-K merges, casts, the scale gradient); ``outer_*``: in the
    loss's Python around them (the mean over rows, the positive's term); ``*_by_name``: aten op name → count."""

    engine_ops: int = 0
    engine_bytes: int = 0
    outer_ops: int = 0
    outer_bytes: int = 0
    engine_by_name: dict = field(default_factory=dict)
    outer_by_name: dict = field(default_factory=dict)

    @property
    def ops(self) -> int:
        return self.engine_ops + self.outer_ops

    @property
    def bytes(self) -> int:
        return self.engine_bytes + self.outer_bytes


class _TrafficCounter:
    """A TorchDispatchMode counting matmul FLOPs, and every other (non-view) op and the bytes it reads and writes.

    A custom op of the engines reaches a dispatch mode as one call, so its Python body
    (:data:`fastcontrast.ops.IMPLEMENTATIONS`) is run under the mode instead: its torch ops are counted one by
    one, as ``engine_*``."""

    # Ops that launch nothing on a GPU: views, and allocations (an uninitialised tensor is not written).
    VIEWS = ("view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "select", "slice", "unsqueeze",
             "squeeze", "permute", "as_strided", "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh",
             "_reshape_alias", "detach_")

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from fastcontrast.ops import IMPLEMENTATIONS

        counter = self
        self.flops = 0
        self.ops = TorchOps()
        self._depth = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "namespace", "") == "fastcontrast":
                    # The mode is off inside its own handler: entered again, it sees the body's ops.
                    counter._depth += 1
                    try:
                        with self:
                            return IMPLEMENTATIONS[func._schema.name](*args, **kwargs)
                    finally:
                        counter._depth -= 1
                if counter._depth and torch._C._dispatch_has_kernel_for_dispatch_key(
                        func.name(), "CompositeImplicitAutograd"):
                    # Under the body's mode, composite ops (``.to``) reach the mode whole: run their
                    # decomposition under it, so that a real copy is counted and a no-op ``.to`` is not.
                    with self:
                        return func.decompose(*args, **kwargs)
                out = func(*args, **kwargs)
                name = func.__name__.split(".")[0]
                if name in counter.VIEWS:
                    return out
                tensors_in = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                tensors_out = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
                if name in ("mm", "bmm", "addmm"):
                    x, y = [t for t in tensors_in if t.dim() >= 2][-2:]
                    counter.flops += 2 * x.shape[-2] * x.shape[-1] * y.shape[-1] * (x.shape[0] if x.dim() == 3 else 1)
                moved = sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
                ops = counter.ops
                if counter._depth:
                    ops.engine_ops, ops.engine_bytes = ops.engine_ops + 1, ops.engine_bytes + moved
                    names = ops.engine_by_name
                else:
                    ops.outer_ops, ops.outer_bytes = ops.outer_ops + 1, ops.outer_bytes + moved
                    names = ops.outer_by_name
                names[name] = names.get(name, 0) + 1
                return out

        self.mode = Mode()

    @property
    def bytes(self) -> int:
        return self.ops.bytes


# Kernels whose programs loop over a long dimension: (the arguments bounding program 0's loop, the block that
# one iteration covers). Program 0's work is linear in its iterations, so it is counted at 1 and 2 of them and
# extended exactly to the launch's count.
_LOOPS = {
    "lse_forward_kernel": (("n_y", "cols_per_split"), "BLOCK_N"),
    "siglip_forward_kernel": (("n_y", "cols_per_split"), "BLOCK_N"),
    "gradient_kernel": (("n_y", "cols_per_split"), "BLOCK_N"),
    "distill_forward_kernel": (("n_y",), "BLOCK_N"),
    "distill_gradient_kernel": (("n_y",), "BLOCK_N"),
    "panel_matmul_kernel": (("depth", "k_per_split"), "BLOCK_D"),
}
# Arguments that only place a launch (which panel), not its work.
_PLACEMENT = ("row_start", "row_stop", "col_start", "col_stop")


def _launch_key(launch) -> tuple:
    kw = launch.kwargs
    scalars = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, (int, float, str, bool)) and
                           k not in _PLACEMENT))
    extents = tuple(kw[stop] - kw[start] for start, stop in (("row_start", "row_stop"), ("col_start", "col_stop"))
                    if start in kw)
    if kw.get("SYMMETRIC") and "row_start" in kw:  # a symmetric panel's work depends on whether it is diagonal
        extents += (kw["row_start"] == kw["col_start"],)
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in kw.items() if hasattr(v, "shape")))
    return (launch.name, tuple(launch.grid), scalars, extents, shapes)


def _count_program_zero(launch, **overrides):
    from fastcontrast.kernels.work_count import count_work

    with count_work() as count:
        launch.kernel[(1, 1, 1)](*launch.args, **{**launch.kwargs, **overrides})
    return count


def count_launch(launch):
    """Exact work of one launch: program 0 counted in the interpreter, times the programs (module docstring)."""
    from fastcontrast.kernels.work_count import WorkCount

    fields = ("flops", "dots", "transcendentals", "bytes_loaded", "bytes_stored")
    if launch.kwargs.get("SYMMETRIC"):
        return _count_triangle(launch, fields)
    if launch.name in _LOOPS:
        bounds, block_name = _LOOPS[launch.name]
        block = launch.kwargs[block_name]
        extent = min(launch.kwargs[name] for name in bounds)
        iterations = -(-extent // block)
        one, two = (_count_program_zero(launch, **{name: k * block for name in bounds}) for k in (1, 2))
        per_program = [getattr(one, f) + (getattr(two, f) - getattr(one, f)) * (iterations - 1) for f in fields]
    else:
        count = _count_program_zero(launch)
        per_program = [getattr(count, f) for f in fields]
    return WorkCount(*(launch.programs * v for v in per_program))


def _count_triangle(launch, fields):
    """A symmetric launch's work: its programs differ (each covers the triangle from its diagonal on), so
    program 0 is counted per unit of work and the units are summed over the programs.

    lse_forward_kernel: program i (row block block_offset + i) runs its columns from its diagonal block on;
    program 0 is counted at k and k + 1 column blocks past a diagonal block (k = ⌈BLOCK_M / BLOCK_N⌉ + 1, so
    the step is a tile with column partials), each program extended linearly to its own count.
    ds_panel_kernel: a tile wholly below the diagonal does nothing, every other the same work (program 0's),
    and the panel's stores are each of its entries once."""
    from fastcontrast.kernels.work_count import WorkCount

    kw = launch.kwargs
    if launch.name == "lse_forward_kernel":
        block_m, block_n, n = kw["BLOCK_M"], kw["BLOCK_N"], kw["n_y"]
        k = -(-block_m // block_n) + 1
        one, two = (_count_program_zero(launch, block_offset=0, n_y=j * block_n) for j in (k, k + 1))
        blocks = range(kw["block_offset"], kw["block_offset"] + launch.grid[0])
        # The positives' stores depend on where each row's positive lies, not on the loop: counted apart.
        for count, n_y in ((one, k * block_n), (two, (k + 1) * block_n)):
            count.bytes_stored -= _positive_store_bytes(kw, range(1), n_y)
        extra = sum(-(-(n - i * block_m) // block_n) - k for i in blocks)
        total = WorkCount(*(launch.programs * getattr(one, f) + (getattr(two, f) - getattr(one, f)) * extra
                            for f in fields))
        total.bytes_stored += _positive_store_bytes(kw, blocks, n)
        return total
    block_m, block_n = kw["BLOCK_M"], kw["BLOCK_N"]
    working = sum(1 for i_m in range(launch.grid[0]) for i_n in range(launch.grid[1])
                  if kw["col_start"] + (i_n + 1) * block_n - 1 >= kw["row_start"] + i_m * block_m)
    count = _count_program_zero(launch)
    total = WorkCount(*(working * getattr(count, f) for f in fields))
    # Stores: every entry of the panel once (on the diagonal, half of them as mirror images).
    total.bytes_stored = (kw["row_stop"] - kw["row_start"]) * (kw["col_stop"] - kw["col_start"]) * \
        kw["DS"].element_size()
    return total


def _positive_store_bytes(kw: dict, blocks, n_y: int) -> int:
    """Bytes the symmetric lse_forward_kernel's programs for row ``blocks`` store as positives over columns
    [its diagonal block, n_y): each row's own where its positive lies there, and its partner's where that lies
    past its diagonal block (kernels/lse_forward.py)."""
    if kw["POSITIVES"] is None:
        return 0
    import torch

    block_m = kw["BLOCK_M"]
    rows = torch.arange(blocks.start * block_m, min(kw["n_x"], blocks.stop * block_m))
    pos, first = kw["POSITIVE_INDEX"][rows], rows // block_m * block_m
    found = (pos >= first) & (pos < n_y)
    stores = int(found.sum()) + int((found & (pos >= first + block_m)).sum())
    return stores * kw["POSITIVES"].element_size()


def count_loss(loss: str, d: int, n: int) -> tuple[list, TorchOps]:
    """The launches of one loss's forward + backward with their counted work, and its torch ops."""
    from fastcontrast.kernels.configs import assume_target
    from fastcontrast.kernels.launches import recorded_launches, without_storage

    a, b = _inputs(loss, n, d)
    glue = _TrafficCounter()
    first: dict = {}  # the first launch of each kind, with its tensors: program 0 is counted on them

    def keep(launch):
        # Every later launch of a kind keeps only its shapes: at N = 65,536 the records of thousands of panel
        # launches would otherwise hold every split-K slab (tens of GB).
        key = _launch_key(launch)
        if key in first:
            return without_storage(launch)
        first[key] = launch
        return launch

    with assume_target(("cuda", 90)), recorded_launches(keep) as launches, glue.mode:
        _run_loss(loss, a, b, "triton")
    counted = {key: count_launch(launch) for key, launch in first.items()}
    return [(launch, counted[_launch_key(launch)]) for launch in launches], glue.ops


def time_loss(loss: str, d: int, n: int, launches: list, torch_ops: TorchOps, gpu: GpuSpec):
    """Per-kernel records of one loss's counted launches on ``gpu``, and the loss's own record: the launches'
    times plus its torch ops', each op one launch (:data:`LAUNCH_S`) and its bytes at HBM speed."""
    by_kernel: dict[str, KernelRecord] = {}
    for launch, work in launches:
        n_instr = wgmma_n(launch.name, launch.kwargs, launch.kwargs["num_warps"])
        resident = resident_programs(launch, gpu)
        hbm = hbm_bytes(launch, work.bytes_stored, gpu, resident or 1)
        tensor_s = work.flops / (gpu.tensor_flops * _efficiency(n_instr))
        sfu_s = work.transcendentals / gpu.sfu_per_s
        memory_s = hbm / gpu.hbm_bytes_per_s
        # A last wave that leaves SMs idle costs a whole wave of compute (the tail), not its share of the work.
        waves = wave_factor(launch.programs, resident, gpu)
        record = by_kernel.setdefault(launch.name, KernelRecord(loss, launch.name, d, n, 0, 0, 0, 0, 0, n_instr, 0, 0,
                                                                 0, 0, gpu=gpu.name))
        record.resident_programs = resident
        record.wave_factor = max(record.wave_factor, waves)
        record.wave_s += (waves - 1) * max(tensor_s, sfu_s)
        record.launches += 1
        record.flops += work.flops
        record.transcendentals += work.transcendentals
        record.bytes += work.bytes_requested
        record.bytes_hbm += hbm
        record.instruction_n = min(record.instruction_n, n_instr)
        record.tensor_s += tensor_s
        record.sfu_s += sfu_s
        record.memory_s += memory_s
        record.modelled_s += max(waves * max(tensor_s, sfu_s), memory_s) + LAUNCH_S
    kernels = list(by_kernel.values())
    glue_bytes = torch_ops.bytes
    glue_s = glue_bytes / gpu.hbm_bytes_per_s + torch_ops.ops * LAUNCH_S
    triton_launches = sum(k.launches for k in kernels)
    total = {
        "loss": loss, "kernel": "forward+backward", "d": d, "n": n, "gpu": gpu.name,
        "launches": triton_launches + torch_ops.ops, "triton_launches": triton_launches,
        "torch_ops": torch_ops.engine_ops, "torch_ops_outside": torch_ops.outer_ops,
        "torch_op_names": dict(sorted(torch_ops.engine_by_name.items())),
        "torch_op_names_outside": dict(sorted(torch_ops.outer_by_name.items())),
        "triton_launch_names": dict(sorted(Counter(launch.name for launch, _ in launches).items())),
        "flops": sum(k.flops for k in kernels), "transcendentals": sum(k.transcendentals for k in kernels),
        "bytes": sum(k.bytes for k in kernels) + glue_bytes,
        "bytes_hbm": sum(k.bytes_hbm for k in kernels) + glue_bytes,
        "glue_bytes": glue_bytes, "torch_op_bytes": torch_ops.engine_bytes,
        "torch_op_bytes_outside": torch_ops.outer_bytes, "glue_s": glue_s,
        "launch_s": (triton_launches + torch_ops.ops) * LAUNCH_S,
        "tensor_s": sum(k.tensor_s for k in kernels), "sfu_s": sum(k.sfu_s for k in kernels),
        "memory_s": sum(k.memory_s for k in kernels) + glue_bytes / gpu.hbm_bytes_per_s,
        "kernels_s": sum(k.modelled_s for k in kernels), "wave_s": sum(k.wave_s for k in kernels),
        "launches_without_table_row": sum(1 for launch, _ in launches if resident_programs(launch, gpu) is None),
        "modelled_s": sum(k.modelled_s for k in kernels) + glue_s,
        "passes": sum(k.flops for k in kernels) / (2 * _rows(loss, n) ** 2 * d),
    }
    return kernels, total


def _rows(loss: str, n: int) -> int:
    return 2 * n if loss == "NT-Xent" else n


def naive_model(loss: str, d: int, n: int, gpu: GpuSpec, *, best: bool = False) -> dict:
    """The naive loss's counted FLOPs and bytes at ``n`` (extrapolated from :data:`SAMPLE_N`) and its time: as
    open_clip / lightly write it, or (``best``) as a careful user would (:func:`_run_naive_best`)."""
    import numpy as np

    samples = []
    for sample in SAMPLE_N:
        a, b = _inputs(loss, sample, d)
        counter = _TrafficCounter()
        with counter.mode:
            if best:
                _run_naive_best(loss, a, b)
            else:
                _run_loss(loss, a, b, None)
        samples.append((counter.flops, counter.bytes))
    flops, nbytes = (float(np.polyval(np.polyfit(SAMPLE_N, [s[i] for s in samples], 2), n)) for i in range(2))
    seconds = flops / (gpu.tensor_flops * CUBLAS_EFFICIENCY) + nbytes / gpu.hbm_bytes_per_s
    return {"flops": flops, "bytes": nbytes, "naive_s": seconds, "passes": flops / (2 * _rows(loss, n) ** 2 * d)}


def calibration(gpu: GpuSpec) -> dict:
    """The model applied to :data:`REFERENCE`, and how far it lands from the measurement."""
    tensor_s = REFERENCE["flops"] / (gpu.tensor_flops * _efficiency(REFERENCE["instruction_n"]))
    sfu_s = REFERENCE["transcendentals"] / gpu.sfu_per_s
    memory_s = REFERENCE["bytes_hbm"] / gpu.hbm_bytes_per_s
    modelled = max(tensor_s, sfu_s, memory_s)
    return {"name": REFERENCE["name"], "measured_s": REFERENCE["measured_s"], "modelled_s": modelled,
            "tensor_s": tensor_s, "sfu_s": sfu_s, "memory_s": memory_s,
            "measured_over_modelled": REFERENCE["measured_s"] / modelled}


def run(dims=DIMS, losses=LOSSES, n: int = N_TARGET, gpus=("H100", "H200")) -> dict:
    """Every record (kernels and losses) for ``losses`` × ``dims`` on ``gpus``, with the calibration."""
    records, totals = [], []
    cal = calibration(GPUS["H100"])
    for loss in losses:
        for d in dims:
            launches, torch_ops = count_loss(loss, d, n)
            naive_counts = naive_model(loss, d, n, GPUS[gpus[0]])
            best_counts = naive_model(loss, d, n, GPUS[gpus[0]], best=True)
            for gpu_name in gpus:
                gpu = GPUS[gpu_name]

                def naive_time(counts, gpu=gpu):
                    gemm_s = counts["flops"] / (gpu.tensor_flops * CUBLAS_EFFICIENCY)
                    return gemm_s + counts["bytes"] / gpu.hbm_bytes_per_s

                naive_s, naive_best_s = naive_time(naive_counts), naive_time(best_counts)
                kernels, total = time_loss(loss, d, n, launches, torch_ops, gpu)
                for record in kernels:
                    record.naive_s = naive_s
                    records.append(asdict(record))
                total.update(naive_s=naive_s, naive_flops=naive_counts["flops"], naive_bytes=naive_counts["bytes"],
                             naive_passes=naive_counts["passes"], naive_as_written_s=naive_s,
                             naive_best_s=naive_best_s, naive_best_passes=best_counts["passes"],
                             naive_best_flops=best_counts["flops"], naive_best_bytes=best_counts["bytes"],
                             # One calibration rule, applied to both sides: the ratios do not move.
                             calibrated_s=total["modelled_s"] * cal["measured_over_modelled"],
                             naive_calibrated_s=naive_s * cal["measured_over_modelled"],
                             naive_best_calibrated_s=naive_best_s * cal["measured_over_modelled"])
                totals.append(total)
                print(f"  {gpu.name} {loss} d={d}: fused {total['modelled_s'] * 1e3:.1f} ms (model), naive "
                      f"{naive_s * 1e3:.1f} ms as written, {naive_best_s * 1e3:.1f} ms at best", file=sys.stderr,
                      flush=True)
    return {"assumptions": {"gpus": {k: asdict(v) for k, v in GPUS.items()}, "wgmma_efficiency": WGMMA_EFFICIENCY,
                            "cublas_efficiency": CUBLAS_EFFICIENCY, "launch_s": LAUNCH_S, "n": n, "dtype": "bf16"},
            "calibration": cal, "kernels": records, "losses": totals}


def format_markdown(result: dict) -> str:
    """The per-loss table of the README / docs (a model: says so in its header)."""
    cal = result["calibration"]
    measured = result.get("measured_calibration")
    lines = [
        f"Model (not a measurement), bf16, N = {result['assumptions']['n']:,}: fused = per launch, the slowest of "
        "tensor cores (with its partial last wave), SFU and HBM, plus every torch op the engine issues (its bytes "
        "and a launch each); naive = open_clip / lightly as written, and written with care (3 GEMM passes). "
        f"Ratios are model ÷ model. The same model lands {cal['measured_over_modelled']:.2f}× under a measured "
        f"Triton kernel ({cal['name']}); 'calibrated' multiplies both sides by that, so the ratios are the same.",
        "",
        "| GPU | loss | d | passes | launches (Triton + torch) | bytes to HBM | fused (model) | fused (calibrated) "
        "| naive as written (model) | naive at best (model) | as written ÷ fused | best ÷ fused |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if measured:
        lines.insert(1, f"Calibrated from a GPU run ({measured['source']}): per kernel kind, modelled × "
                        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(measured["kernels"].items())) + ".")
    for t in result["losses"]:
        lines.append(
            f"| {t['gpu']} | {t['loss']} | {t['d']} | {t['passes']:.2f} | {t['launches']:,} "
            f"({t['triton_launches']:,} + {t['torch_ops'] + t['torch_ops_outside']:,}) | "
            f"{t['bytes_hbm'] / 2**30:.2f} GiB | {t['modelled_s'] * 1e3:.1f} ms | {t['calibrated_s'] * 1e3:.1f} ms | "
            f"{t['naive_s'] * 1e3:.1f} ms | {t['naive_best_s'] * 1e3:.1f} ms | {t['naive_s'] / t['modelled_s']:.2f}× | "
            f"{t['naive_best_s'] / t['modelled_s']:.2f}× |"
        )
    lines += ["", "| GPU | loss | d | kernel | launches | FLOPs | bytes counted | bytes to HBM (model) | wgmma N | "
              "resident / SM | wave factor | tensor | SFU | memory | modelled |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in result["kernels"]:
        lines.append(
            f"| {k['gpu']} | {k['loss']} | {k['d']} | {k['kernel']} | {k['launches']} | {k['flops']:.3g} | "
            f"{k['bytes'] / 2**30:.2f} GiB | {k['bytes_hbm'] / 2**30:.2f} GiB | {k['instruction_n']} | "
            f"{k['resident_programs'] if k['resident_programs'] is not None else 'no row'} | "
            f"{k['wave_factor']:.2f} | {k['tensor_s'] * 1e3:.2f} ms | {k['sfu_s'] * 1e3:.2f} ms | "
            f"{k['memory_s'] * 1e3:.2f} ms | {k['modelled_s'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines)


def read_gpu_check(path: str) -> list[dict]:
    """The performance-probe records of a ``gpu-check`` run (its JSONL): each line with ``loss``, ``d``, ``n``
    and ``kernel_times_s`` (Triton kernel name → measured seconds per step, from torch.profiler), and
    optionally ``naive_best_s`` (the best naive loss, measured in the same run)."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                continue  # a last line without its newline: the run was killed while writing it
            raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from None
        if isinstance(record, dict) and record.get("kernel_times_s"):
            records.append(record)
    if not records:
        raise ValueError(f"{path} has no performance-probe record (a line with 'kernel_times_s'): run "
                         "`python -m fastcontrast gpu-check` on a GPU first")
    return records


def measured_calibration(path: str, gpu: GpuSpec) -> dict:
    """Measured ÷ modelled per kernel kind (and for the best naive loss, if measured), from a gpu-check run:
    the model is run at each probe's (loss, d, n) and compared kernel by kernel; factors of a kind measured
    more than once are averaged geometrically."""
    ratios: dict = {}
    naive: list = []
    for probe in read_gpu_check(path):
        launches, torch_ops = count_loss(probe["loss"], probe["d"], probe["n"])
        kernels, _ = time_loss(probe["loss"], probe["d"], probe["n"], launches, torch_ops, gpu)
        modelled = {k.kernel: k.modelled_s for k in kernels}
        for name, seconds in probe["kernel_times_s"].items():
            if name in modelled and seconds > 0:
                ratios.setdefault(name, []).append(seconds / modelled[name])
        if probe.get("naive_best_s"):
            naive.append(probe["naive_best_s"] / naive_model(probe["loss"], probe["d"], probe["n"], gpu, best=True)[
                "naive_s"])

    def mean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values))

    return {"source": path, "gpu": gpu.name, "kernels": {k: mean(v) for k, v in ratios.items()},
            "naive_best": mean(naive) if naive else None}


def apply_calibration(result: dict, measured: dict) -> dict:
    """``result`` with ``calibrated_s`` from measured factors: each kernel kind's modelled time × its factor
    (kinds not measured: × 1, and listed), torch ops unchanged; the naive columns × the naive factor if it was
    measured, else as modelled (and said so in ``calibration_note``)."""
    by_loss: dict = {}
    for k in result["kernels"]:
        factor = measured["kernels"].get(k["kernel"], 1.0)
        k["calibrated_s"] = k["modelled_s"] * factor
        key = (k["gpu"], k["loss"], k["d"])
        by_loss[key] = by_loss.get(key, 0.0) + k["calibrated_s"] - k["modelled_s"]
    naive = measured["naive_best"]
    for t in result["losses"]:
        t["calibrated_s"] = t["modelled_s"] + by_loss.get((t["gpu"], t["loss"], t["d"]), 0.0)
        t["naive_calibrated_s"] = t["naive_s"] * (naive or 1.0)
        t["naive_best_calibrated_s"] = t["naive_best_s"] * (naive or 1.0)
    unmeasured = sorted({k["kernel"] for k in result["kernels"]} - set(measured["kernels"]))
    result["measured_calibration"] = {**measured, "unmeasured_kernels": unmeasured}
    result["calibration_note"] = (
        "per kernel kind from " + measured["source"]
        + (f"; not measured (× 1): {', '.join(unmeasured)}" if unmeasured else "")
        + ("; naive × its measured factor" if naive else "; naive not measured: as modelled"))
    return result


def model_cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcontrast model", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"CLIP only at d = {', '.join(map(str, QUICK_DIMS))}, H100 only (under 2 minutes)")
    parser.add_argument("--json", metavar="FILE", help="write every record as JSON")
    parser.add_argument("--n", type=int, default=N_TARGET, help="batch size (a multiple of 4096)")
    parser.add_argument("--gpus", nargs="+", choices=sorted(GPUS), default=None,
                        help="the GPUs to model (default: H100 and H200; H100 alone with --quick)")
    parser.add_argument("--calibrate", metavar="RESULTS.jsonl",
                        help="a gpu-check run's JSONL: replace the assumed efficiencies by the measured ones, per "
                             "kernel kind (measured ÷ modelled at the probe's sizes), and the naive loss's if measured")
    args = parser.parse_args(argv)
    if args.calibrate and not os.path.isfile(args.calibrate):
        raise SystemExit(f"--calibrate: no such file: {args.calibrate}")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # The counts come from the interpreter, which must be on before triton is imported.
        if "triton" in sys.modules:
            raise SystemExit("python -m fastcontrast model needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    if args.n % 4096:
        raise SystemExit(f"--n must be a multiple of 4096 (tile-aligned panels), got {args.n}")
    from fastcontrast.tools.bench.meters import pin_malloc_mmap_threshold

    # Thousands of panel-sized temporaries come and go at N = 65,536: with glibc's default, its raised mmap
    # threshold serves them from the heap, which keeps them resident (17 GB instead of 1.8 GB for NT-Xent).
    pin_malloc_mmap_threshold()
    gpus = tuple(args.gpus or (("H100",) if args.quick else ("H100", "H200")))
    if args.quick:
        result = run(dims=QUICK_DIMS, losses=("CLIP",), n=args.n, gpus=gpus)
    else:
        result = run(n=args.n, gpus=gpus)
    if args.calibrate:
        try:
            measured = measured_calibration(args.calibrate, GPUS[gpus[0]])
        except ValueError as exc:
            raise SystemExit(f"--calibrate: {exc}") from None
        result = apply_calibration(result, measured)
    print(format_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
