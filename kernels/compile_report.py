"""Ahead-of-time compilation of every kernel and config for Ampere (sm_80) and Hopper (sm_90), no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` builds PTX and cubin on any machine.
Two tools bundled with triton read the result (DESIGN §6):

- ``cuobjdump --dump-resource-usage`` on the cubin: REG, SHARED, STACK (and LOCAL, which stays 0 even when
  a kernel spills, so it proves nothing on its own);
- ``ptxas -v`` on the PTX: the exact "bytes spill stores / loads". triton's plain ``ptxas`` may reject the
  PTX version triton emits; ``ptxas-blackwell`` (newer) reads it, sm_80 and sm_90a included.

This must run in a process *without* ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` returns
an InterpretedFunction that ``triton.compile`` cannot take. :func:`compile_table` therefore re-runs itself
in a clean subprocess when the variable is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Optional

import torch

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
KERNELS = (
    "lse_forward", "lse_forward_argmax", "siglip_forward", "gradient_lse", "gradient_siglip",
    "distill_forward", "distill_gradient", "distill_gradient_teacher",
)
# Per-block shared memory a kernel may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if os.path.exists(path):
        return path
    found = shutil.which(tool)
    if found is None:
        raise FileNotFoundError(f"{tool} not found in triton's backends/nvidia/bin nor on PATH")
    return found


def _kernel_source(kernel: str, dtype: str, d: int):
    """(jit function, signature, constexprs, config, register_acc) for one kernel variant."""
    from fastcontrast.kernels.configs import distill_config, forward_config, gradient_config
    from fastcontrast.kernels.distill import distill_forward_kernel, distill_gradient_kernel
    from fastcontrast.kernels.gradient import MODE_LSE, MODE_SIGLIP, gradient_kernel
    from fastcontrast.kernels.lse_forward import lse_forward_kernel
    from fastcontrast.kernels.siglip_forward import siglip_forward_kernel

    torch_dtype = _TORCH_DTYPES[dtype]
    ptr = "*" + dtype
    precision = "tf32" if dtype == "fp32" else "ieee"
    if kernel in ("lse_forward", "lse_forward_argmax", "siglip_forward"):
        config = forward_config(d, torch_dtype, interpreter=False, kernel=kernel.split("_")[0])
    elif kernel.startswith("distill"):
        stage = "forward" if kernel == "distill_forward" else "gradient"
        config = distill_config(stage, torch_dtype, interpreter=False)
    else:
        config = gradient_config(d, torch_dtype, interpreter=False)
    blocks = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_D": config.block_d,
              "DOT_FP32": False, "INPUT_PRECISION": precision}
    ints = {"n_x": "i32", "n_y": "i32", "d": "i32", "stride_x": "i32", "stride_y": "i32"}
    register_acc = False
    if kernel.startswith("lse_forward"):
        fn = lse_forward_kernel
        signature = {"X": ptr, "Y": ptr, "SCALE": "*fp32", "LSE_X": "*fp32", "COL_PARTIAL": "*fp32",
                     "ARGMAX_X": "*i64", "MAX_X": "*fp32", "COL_ARGMAX": "*i64", "COL_MAX": "*fp32",
                     **ints, "exclude_offset": "i64", "cols_per_split": "i32"}
        constexprs = {"HAS_EXCLUDE": True, "WRITE_COL_PARTIAL": True,
                      "WRITE_ARGMAX": kernel == "lse_forward_argmax", **blocks}
    elif kernel == "siglip_forward":
        fn = siglip_forward_kernel
        signature = {"X": ptr, "Y": ptr, "SCALE": "*fp32", "BIAS": "*fp32", "PARTIAL": "*fp32",
                     **ints, "positive_offset": "i64", "cols_per_split": "i32"}
        constexprs = {"HAS_BIAS": True, **blocks}
    elif kernel == "distill_forward":
        fn = distill_forward_kernel
        signature = {"X": ptr, "Y": ptr, "XT": ptr, "YT": ptr, "SCALE": "*fp32", "SCALE_T": "*fp32",
                     "LSE_X": "*fp32", "TEACHER_LSE_X": "*fp32", "CROSS_X": "*fp32", "COL_PARTIAL": "*fp32",
                     **ints, "d_t": "i32", "stride_xt": "i32", "stride_yt": "i32"}
        constexprs = {"WRITE_COL_PARTIAL": True, **blocks}
    elif kernel.startswith("distill_gradient"):
        fn = distill_gradient_kernel
        # The teacher's dim is taken equal to the student's here (d is a runtime value; only the
        # accumulator's place depends on it).
        register_acc = d <= config.block_d
        stats = [f"{name}_{side}" for side in ("X", "Y")
                 for name in ("LSE", "GRAD_LSE", "TEACHER_LSE", "CROSS", "GRAD_CROSS")]
        signature = {"X": ptr, "Y": ptr, "XT": ptr, "YT": ptr, "SCALE": "*fp32", "SCALE_T": "*fp32",
                     **{name: "*fp32" for name in stats}, "OUT": "*fp32",
                     **ints, "d_t": "i32", "stride_xt": "i32", "stride_yt": "i32", "stride_out": "i32"}
        constexprs = {"TEACHER_GRAD": kernel == "distill_gradient_teacher", "HAS_X_TERM": True, "HAS_Y_TERM": True,
                      "REGISTER_ACC": register_acc, **blocks}
    else:
        fn = gradient_kernel
        register_acc = d <= config.block_d
        signature = {"X": ptr, "Y": ptr, "SCALE": "*fp32", "BIAS": "*fp32", "LSE_X": "*fp32",
                     "GRAD_X": "*fp32", "LSE_Y": "*fp32", "GRAD_Y": "*fp32", "GRAD_TOTAL": "*fp32",
                     "OUT": "*fp32", "BIAS_PARTIAL": "*fp32", **ints, "stride_out": "i32", "offset": "i64",
                     "cols_per_split": "i32"}
        lse = kernel == "gradient_lse"
        constexprs = {"MODE": MODE_LSE if lse else MODE_SIGLIP, "HAS_X_TERM": lse, "HAS_Y_TERM": lse,
                      "HAS_EXCLUDE": lse, "HAS_BIAS": not lse, "WRITE_BIAS_PARTIAL": not lse,
                      "REGISTER_ACC": register_acc, **blocks}
    signature.update({name: "constexpr" for name in constexprs})
    # What the JIT specialises at run time for torch tensors (16-byte aligned) and d a multiple of 16:
    # 16-divisible pointers, d and row strides. Without these hints loads are not vectorised and the
    # numbers would describe a kernel that never runs. Lengths and offsets are never specialised.
    aligned = [name for name, kind in signature.items()
               if kind.startswith("*") or name in ("d", "d_t", "stride_x", "stride_y", "stride_xt", "stride_yt",
                                                   "stride_out")]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return fn, signature, constexprs, attrs, config, register_acc


def _parse_resource_usage(text: str) -> dict:
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{text}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def _parse_ptxas(text: str) -> dict:
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if match is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{text}")
    return {"spill_stores": int(match.group(1)), "spill_loads": int(match.group(2))}


def compile_one(kernel: str, dtype: str, d: int, arch: int) -> dict:
    """Compile one kernel variant for ``sm_{arch}`` and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, config, register_acc = _kernel_source(kernel, dtype, d)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        usage = subprocess.run(
            [_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        ptxas = subprocess.run(
            [_nvidia_bin("ptxas-blackwell"), "-v", f"-arch={sm}", ptx, "-o", os.path.join(tmp, "check.cubin")],
            capture_output=True, text=True, check=True,
        )
    row = {
        "kernel": kernel, "dtype": dtype, "d": d, "arch": f"sm_{arch}",
        "block": f"{config.block_m}x{config.block_n}x{config.block_d}",
        "warps": config.num_warps, "stages": config.num_stages,
        "acc": ("registers" if register_acc else "fp32 rows") if "gradient" in kernel else "-",
    }
    row.update(_parse_resource_usage(usage))
    row.update(_parse_ptxas(ptxas.stdout + ptxas.stderr))
    # Dynamic shared memory (the pipelining buffers) comes from triton's metadata.
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["shared_limit"] = SHARED_LIMIT[arch]
    return row


def compile_table(
    kernels: Iterable[str] = KERNELS,
    dtypes: Iterable[str] = DTYPES,
    dims: Optional[Iterable[int]] = None,
    archs: Iterable[int] = ARCHS,
) -> list[dict]:
    """Compile every requested variant; returns one dict per (kernel, dtype, d, arch).

    Keys: kernel, dtype, d, arch, block, warps, stages, acc, registers, stack, static_shared, local,
    spill_stores, spill_loads, shared_bytes, shared_limit. Runs in a subprocess if TRITON_INTERPRET is set.
    """
    from fastcontrast.kernels.configs import COMPILE_DIMS

    dims = tuple(COMPILE_DIMS if dims is None else dims)
    kernels, dtypes, archs = tuple(kernels), tuple(dtypes), tuple(archs)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _compile_table_in_subprocess(kernels, dtypes, dims, archs)
    rows, compiled = [], {}
    for arch in archs:
        for kernel in kernels:
            for dtype in dtypes:
                for d in dims:
                    # d is a runtime argument: dims that share a config share one binary, so compile once.
                    _, _, constexprs, _, config, _ = _kernel_source(kernel, dtype, d)
                    key = (arch, kernel, dtype, config, tuple(sorted(constexprs.items())))
                    if key not in compiled:
                        compiled[key] = compile_one(kernel, dtype, d, arch)
                    rows.append({**compiled[key], "d": d})
    return rows


def _compile_table_in_subprocess(kernels, dtypes, dims, archs) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"kernels": kernels, "dtypes": dtypes, "dims": dims, "archs": archs})
    result = subprocess.run(
        [sys.executable, "-m", "fastcontrast.kernels.compile_report", spec],
        capture_output=True, text=True, env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kernel compilation failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`compile_table` rows; the d values that share one binary share a line."""
    columns = ("kernel", "dtype", "d", "arch", "block", "warps", "acc", "registers",
               "shared_bytes", "spill_stores", "spill_loads", "stack")
    merged: dict[tuple, list[int]] = {}
    for row in rows:
        key = tuple(row[c] for c in columns if c != "d")
        merged.setdefault(key, []).append(row["d"])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key, dims in merged.items():
        values = dict(zip((c for c in columns if c != "d"), key))
        values["d"] = ", ".join(str(d) for d in dims)
        lines.append("| " + " | ".join(str(values[c]) for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    table = compile_table(**args)
    print(json.dumps(table))
