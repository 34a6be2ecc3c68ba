"""Ahead-of-time compilation of every kernel variant the engine can launch, for real GPU targets, no GPU needed.

Which variants? The ones the launchers produce, derived from the launchers themselves: the real
:class:`~fastcontrast.kernels.engine.TritonEngine` runs every flag combination the package's losses and
public core functions can reach (:func:`engine_calls`), for each dtype, TF32 setting and feature-dim bucket,
inside :func:`fastcontrast.kernels.launches.recorded_launches` under
:func:`fastcontrast.kernels.configs.assume_target`. Each recorded launch is then specialised exactly as
triton's launcher would specialise it for that target (its own binder: pointers, ints and strides divisible
by 16 only when they are, unit values as 1, None as a constexpr) and compiled with ``triton.compile``.
The kernels' signatures are thus written once, in the launchers' calls; nothing here repeats them.

Targets: sm_80, sm_90, sm_100 (``GPUTarget("cuda", arch, 32)``) and gfx90a, gfx942 (``GPUTarget("hip", …,
64)``). Read-outs (docs/kernels.md#compiled-for-every-target-without-spills):

- NVIDIA: ``cuobjdump --dump-resource-usage`` on the cubin (REG, STACK, SHARED) and ``ptxas-blackwell -v`` on
  the PTX (exact spill stores / loads; triton's plain ptxas may reject the PTX version triton emits);
  for sm_90 the PTX's wgmma shapes and ``cp.async`` count (pipelining).
- AMD: the amdgcn text's ``vgpr_count``, ``sgpr_count``, ``vgpr_spill_count`` (spills to memory),
  ``private_segment_fixed_size`` (scratch: the "stack") and ``sgpr_spill_count`` (reported only: SGPRs spill
  into VGPR lanes, not memory).

This must run in a process without ``TRITON_INTERPRET=1`` (``@triton.jit`` then returns an
InterpretedFunction that ``triton.compile`` cannot take): :func:`compile_table` re-runs itself in a clean
subprocess when the variable is set. Uses triton's launcher internals (3.9): other versions get a clear error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

NVIDIA_ARCHS = (80, 90, 100)
AMD_ARCHS = ("gfx90a", "gfx942")
ARCHS = tuple(f"sm_{a}" for a in NVIDIA_ARCHS) + AMD_ARCHS
DTYPES = ("fp16", "bf16", "fp32")
# Feature dims covering every config bucket (the narrowest, d ≤ 32; forward resident / looped, fused gradient
# 64 / 128 / 256, panel path) plus dims that are not multiples of 16, which the engine pads: they must add no
# variant.
DIMS = (16, 32, 48, 64, 100, 128, 200, 256, 300, 512, 1000)
# Per-block shared memory a kernel may use (opt-in maximum), bytes; AMD: LDS per workgroup. sm_80 binaries
# stand for every part that gets the Ampere tiles (configs._family): sm_86 / sm_89 / sm_120 (RTX, A10, L4,
# L40) allow 99 KiB against the A100's 163 KiB, so the smaller limit is the one checked.
SHARED_LIMIT = {"sm_80": 101376, "sm_90": 232448, "sm_100": 232448, "gfx90a": 65536, "gfx942": 65536}
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ROWS = 70  # rows of the recording calls: any size gives the same variants (lengths are not specialised)


def target_of(arch: str):
    """``"sm_90"`` → ``GPUTarget("cuda", 90, 32)``; ``"gfx942"`` → ``GPUTarget("hip", "gfx942", 64)``."""
    from fastcontrast.kernels.configs import gpu_target

    return gpu_target(_config_target(arch))


def _config_target(arch: str):
    """The fastcontrast.kernels.configs target name of ``arch``."""
    return ("cuda", int(arch[3:])) if arch.startswith("sm_") else ("hip", arch)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        saved = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:  # torch < 2.9
        saved = matmul.allow_tf32
        matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


def engine_calls(dtype: torch.dtype, d: int) -> Iterator[tuple[str, Callable]]:
    """(description, call(engine)) for every flag combination the package can hand the engine.

    The forward and backward of the LSE core with and without positives, both directions or one, the excluded
    diagonal, argmax, the decoupled (positive left out) and memory-bank (private columns) masks, each input
    needing a gradient or not; SigLIP with and without bias; distillation with and without teacher gradients.
    """
    g = torch.Generator().manual_seed(0)

    def features(rows, width=d):
        return torch.randn(rows, width, generator=g).to(dtype)

    n = m = _ROWS
    a, b = features(n), features(m)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    index = torch.arange(n) % m
    vector = torch.ones(n)
    lse_masks = [("plain", None, False, 0), ("exclude", 0, False, 0), ("decoupled", 0, True, 0),
                 ("bank", None, False, n)]
    for name, exclude_offset, exclude_positive, private in lse_masks:
        for positives in (False, True):
            if (exclude_positive or private) and not positives:
                continue  # these masks are defined by the positives
            directions = [(True, False), (False, True), (True, True)] + ([(False, False)] if positives else [])
            if exclude_positive or private:
                directions = [(True, False)]  # DCL and the memory bank are one-directional
            for need_row, need_col in directions:
                for argmax in (False, True):
                    masks = dict(exclude_offset=exclude_offset, exclude_positive=exclude_positive,
                                 private_columns=private)
                    pos = index if positives else None

                    def forward(engine, pos=pos, need_row=need_row, need_col=need_col, argmax=argmax, masks=masks):
                        engine.lse_forward(a, b, scale, pos, need_row=need_row, need_col=need_col, need_argmax=argmax,
                                           **masks)

                    yield f"lse_forward {name} pos={positives} rows={need_row} cols={need_col} argmax={argmax}", forward
                for need_a, need_b in ((True, True), (True, False), (False, True)):
                    def backward(engine, pos=pos, need_row=need_row, need_col=need_col, need_a=need_a, need_b=need_b,
                                 masks=masks):
                        engine.lse_backward(
                            a, b, scale, pos, vector, vector, vector if need_row else None,
                            vector if need_col else None, vector if pos is not None else None,
                            need_a=need_a, need_b=need_b, **masks,
                        )

                    yield (f"lse_backward {name} pos={positives} rows={need_row} cols={need_col} a={need_a} "
                           f"b={need_b}"), backward
    # Single-tower problems by symmetry (NT-Xent, DCL, SupCon against its own embeddings): rows only, the
    # diagonal left out, the other view as an involutive positive index, or no positives.
    partner = (torch.arange(n) + n // 2) % n
    for name, pos, exclude_positive in (("ntxent", partner, False), ("dcl", partner, True), ("supcon", None, False)):
        masks = dict(exclude_offset=0, exclude_positive=exclude_positive, private_columns=0)

        def symmetric_forward(engine, pos=pos, masks=masks):
            engine.lse_forward(a, a, scale, pos, need_row=True, need_col=False, need_argmax=False, symmetric=True,
                               **masks)

        def symmetric_backward(engine, pos=pos, masks=masks):
            engine.lse_backward(a, a, scale, pos, vector, vector[:0], vector, None,
                                vector if pos is not None else None, need_a=True, need_b=False, symmetric=True, **masks)

        yield f"lse_forward symmetric {name}", symmetric_forward
        yield f"lse_backward symmetric {name}", symmetric_backward
    # The masked LSE (false_negative_margin, GISTEmbed): the rule on the model's own similarity or a guide's
    # (fp32 guides: the launchers up-cast them), the positive protected or not, self excluded or not; argmax
    # with CLIP's accuracy; the thresholds' pair similarities; the backward with and without positives' term.
    guide_a, guide_b = torch.randn(n, 24, generator=g), torch.randn(m, 24, generator=g)
    for guided, protect, exclude in itertools.product((False, True), (None, 0), (None, 1)):
        guides = (guide_a, guide_b) if guided else (None, None)
        rule = dict(protect_offset=protect, exclude_offset=exclude)
        for argmax in ((False, True) if protect is not None and not guided and exclude is None else (False,)):
            def masked_forward(engine, guides=guides, rule=rule, argmax=argmax):
                engine.masked_lse_forward(a, b, scale, *guides, vector, need_argmax=argmax, **rule)

            yield f"masked_lse_forward guide={guided} protect={protect} exclude={exclude} argmax={argmax}", \
                masked_forward
        for with_positives in ((False, True) if protect is not None else (False,)):
            for need_a, need_b in ((True, True), (True, False), (False, True)):
                def masked_backward(engine, guides=guides, rule=rule, with_positives=with_positives, need_a=need_a,
                                    need_b=need_b):
                    engine.masked_lse_backward(a, b, scale, *guides, vector, vector, vector,
                                               vector if with_positives else None, need_a=need_a, need_b=need_b,
                                               **rule)

                yield (f"masked_lse_backward guide={guided} protect={protect} exclude={exclude} "
                       f"positives={with_positives} a={need_a} b={need_b}"), masked_backward
    for guided in (False, True):
        def pair(engine, guided=guided):
            engine.pair_similarity(guide_a if guided else a, guide_b if guided else b, 1, guide=guided,
                                   model_dtype=a.dtype)

        yield f"pair_similarity guide={guided}", pair
    for with_bias in (False, True):
        def siglip_forward(engine, with_bias=with_bias):
            engine.siglip_forward(a, b, scale, bias if with_bias else None, positive_offset=3)

        yield f"siglip_forward bias={with_bias}", siglip_forward
        for need_a, need_b in ((True, True), (True, False), (False, True), (False, False)):
            def siglip_forward_backward(engine, with_bias=with_bias, need_a=need_a, need_b=need_b):
                engine.siglip_forward_backward(a, b, scale, bias if with_bias else None, positive_offset=3,
                                               need_a=need_a, need_b=need_b)

            yield f"siglip_forward_backward bias={with_bias} a={need_a} b={need_b}", siglip_forward_backward
    from fastcontrast.engine import DistillStats

    a_t, b_t = features(n), features(m)
    stats = DistillStats(*(torch.zeros(n) for _ in range(6)))
    for need_row, need_col in ((True, True), (True, False)):
        def distill_forward(engine, need_row=need_row, need_col=need_col):
            engine.distill_forward(a, b, scale, a_t, b_t, scale, need_row=need_row, need_col=need_col)

        yield f"distill_forward rows={need_row} cols={need_col}", distill_forward
        grads = DistillStats(lse_row=vector, cross_row=vector, lse_col=vector if need_col else None,
                             cross_col=vector if need_col else None)
        for needs in ((True, True, False, False), (True, True, True, True), (True, False, False, False)):
            def distill_backward(engine, grads=grads, needs=needs):
                engine.distill_backward(a, b, scale, a_t, b_t, scale, stats, grads, need_a=needs[0], need_b=needs[1],
                                        need_a_t=needs[2], need_b_t=needs[3])

            yield f"distill_backward rows={need_row} cols={need_col} needs={needs}", distill_backward


@dataclass
class Variant:
    """One binary: a kernel specialised as the launcher calls it for ``arch``."""

    kernel: object
    arch: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    dtype: str
    precision: str

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def key(self) -> tuple:
        return (self.name, self.arch, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                self.options.num_warps, self.options.num_stages)

    def digest(self) -> str:
        """A short stable name of :meth:`key`: the compile table's row key."""
        import hashlib

        return hashlib.sha256(repr(self.key()).encode()).hexdigest()[:16]

    def flags(self) -> str:
        """The constexpr flags that are set, and the pointer arguments passed as None, in short."""
        names = list(self.signature)
        on = [names[path[0]] for path, value in self.constexprs.items() if value is True]
        none = [names[path[0]] for path, value in self.constexprs.items() if value is None]
        mode = [f"MODE={value}" for path, value in self.constexprs.items() if names[path[0]] == "MODE"]
        unit = [f"{names[path[0]]}=1" for path, value in self.constexprs.items() if value == 1 and value is not True
                and names[path[0]].startswith("stride")]
        return " ".join(mode + on + unit + ([f"none:{','.join(none)}"] if none else []))

    def tile(self) -> str:
        names = list(self.signature)
        value = {names[path[0]]: v for path, v in self.constexprs.items()}
        return f"{value.get('BLOCK_M')}x{value.get('BLOCK_N')}x{value.get('BLOCK_D')}"


# triton's argument binder of each (kernel, target): built once, it is generated code.
_BINDERS: dict = {}


def _specialise(launch, arch: str, backend) -> Variant:
    """The (signature, constexprs, attrs, options) triton's launcher would build for ``launch`` on ``arch``."""
    try:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:  # pragma: no cover - depends on the installed triton
        raise RuntimeError(f"the compile checks need triton's 3.9 launcher internals: {exc}") from exc
    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    # What JITFunction.run adds before binding (triton 3.9).
    kwargs.setdefault("debug", bool(getattr(knobs.runtime, "debug", False)))
    for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, option):
            kwargs.setdefault(option, getattr(knobs.compilation, option))
    binder_key = (id(kernel), str(backend.target))
    binder = _BINDERS.get(binder_key)
    if binder is None:
        binder = _BINDERS[binder_key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    # The features' dtype names a binary; the LSE partials' merge (no features, no dot) is fp32 through and through.
    x = launch.kwargs.get("X", launch.kwargs.get("A", launch.kwargs.get("P", launch.kwargs.get("PART_LSE"))))
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[x.dtype]
    return Variant(kernel, arch, signature, constexprs, attrs, options, dtype,
                   launch.kwargs.get("INPUT_PRECISION", "ieee"))


@contextlib.contextmanager
def _many_panels(enabled: bool) -> Iterator[None]:
    """With ``enabled``, the panel gradient path cuts the recording calls' few rows into panels of 32 × 32 and
    fills the GPU without splitting the reduction: the launches a real batch makes (N ≥ 4096 is several
    panels, and where a panel's output tiles fill the GPU its GEMM adds to the previous panel's result,
    ACCUMULATE), which ``_ROWS`` rows alone never reach. Only the panel extents and the split count change;
    configs and flags are the launchers' own."""
    if not enabled:
        yield
        return
    from fastcontrast.kernels import configs, distill_launch, gradient_launch

    saved = gradient_launch.panel_configs, distill_launch.panel_configs, gradient_launch.target_programs

    def small_panels(target, dtype, symmetric=False, **_shape):
        _, ds_config, matmul_config = configs.panel_configs(target, dtype, symmetric=symmetric)
        return configs.PanelConfig(32, 32), ds_config, matmul_config

    gradient_launch.panel_configs = distill_launch.panel_configs = small_panels
    gradient_launch.target_programs = lambda device: 1
    try:
        yield
    finally:
        gradient_launch.panel_configs, distill_launch.panel_configs, gradient_launch.target_programs = saved


def variants(archs: Iterable[str] = ARCHS, dtypes: Iterable[str] = DTYPES, dims: Iterable[int] = DIMS) -> list[Variant]:
    """Every distinct binary the engine launches on ``archs`` (see the module docstring)."""
    from fastcontrast.kernels import engine as triton_engine
    from fastcontrast.kernels.configs import assume_target
    from fastcontrast.kernels.launches import recorded_launches
    from triton.compiler import make_backend

    found: dict = {}
    for arch in archs:
        backend = make_backend(target_of(arch))
        for dtype_name in dtypes:
            dtype = _TORCH_DTYPES[dtype_name]
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                for d in dims:
                    for single_pass, many_panels in ((True, False), (False, False), (False, True)):
                        saved = triton_engine.SINGLE_PASS_SCRATCH_BYTES
                        triton_engine.SINGLE_PASS_SCRATCH_BYTES = saved if single_pass else 0
                        try:
                            with assume_target(_config_target(arch)), _tf32(tf32), recorded_launches() as launches, \
                                    _many_panels(many_panels):
                                engine = triton_engine.TritonEngine()
                                for _, call in engine_calls(dtype, d):
                                    call(engine)
                        finally:
                            triton_engine.SINGLE_PASS_SCRATCH_BYTES = saved
                        for launch in launches:
                            variant = _specialise(launch, arch, backend)
                            found.setdefault(variant.key(), variant)
    return list(found.values())


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found in triton's backends/nvidia/bin nor on PATH")
    return found


def _nvidia_usage(compiled, arch: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "kernel.cubin"), os.path.join(tmp, "kernel.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sm = f"{arch}a" if arch in ("sm_90", "sm_100") else arch
        ptxas = subprocess.run([_tool("ptxas-blackwell"), "-v", f"-arch={sm}", ptx, "-o",
                                os.path.join(tmp, "check.cubin")], capture_output=True, text=True, check=True)
    resources = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas.stdout + ptxas.stderr)
    if resources is None or spills is None:
        raise RuntimeError(f"could not read the resource usage of a {arch} binary:\n{usage}\n{ptxas.stderr}")
    ptx_text = compiled.asm["ptx"]
    return {
        "registers": int(resources.group(1)), "stack": int(resources.group(2)),
        "static_shared": int(resources.group(3)), "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx_text))),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.", ptx_text)),
    }


def _amd_usage(compiled) -> dict:
    text = compiled.asm["amdgcn"]

    def field(name: str) -> int:
        match = re.search(rf"\.{name}:\s+(\d+)", text)
        return int(match.group(1)) if match else -1

    # SGPR spills go to VGPR lanes (v_writelane), not memory; memory spills are VGPR spills, and any use of
    # scratch shows as a private segment: those are the "spill_stores" and "stack" of the checks.
    return {
        "registers": field("vgpr_count"), "sgprs": field("sgpr_count"),
        "stack": field("private_segment_fixed_size"), "static_shared": 0,
        "spill_stores": field("vgpr_spill_count"),
        "vgpr_spills": field("vgpr_spill_count"), "sgpr_spills": field("sgpr_spill_count"),
        "spill_loads": 0, "wgmma": [], "cp_async": 0,
    }


def compile_variant(variant: Variant) -> dict:
    """Compile one variant and read its resources: a row of the compile table."""
    import triton
    from triton.compiler import ASTSource

    source = ASTSource(fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs,
                       attrs=variant.attrs)
    compiled = triton.compile(source, target=target_of(variant.arch), options=variant.options.__dict__)
    usage = _nvidia_usage(compiled, variant.arch) if variant.arch.startswith("sm_") else _amd_usage(compiled)
    return {
        "key": variant.digest(),
        "kernel": variant.name, "arch": variant.arch, "dtype": variant.dtype, "precision": variant.precision,
        "constexprs": variant.flags(), "block": variant.tile(), "warps": variant.options.num_warps,
        "stages": variant.options.num_stages, "shared": int(compiled.metadata.shared),
        "shared_limit": SHARED_LIMIT[variant.arch], **usage,
    }


# The variants being compiled, read by forked workers by index (jit functions do not pickle).
_POOL_VARIANTS: list = []


def _compile_index(index: int) -> dict:
    return compile_variant(_POOL_VARIANTS[index])


def compile_variants(chosen: list[Variant], workers: Optional[int] = None) -> list[dict]:
    """Compile ``chosen`` with ``workers`` forked processes (default: the CPUs); one row per variant."""
    global _POOL_VARIANTS
    workers = min(workers or os.cpu_count() or 1, max(1, len(chosen)))
    if workers == 1:
        return [compile_variant(v) for v in chosen]
    import multiprocessing

    _POOL_VARIANTS = chosen
    try:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(_compile_index, range(len(chosen)), chunksize=4))
    finally:
        _POOL_VARIANTS = []


def compile_table(archs: Iterable[str] = ARCHS, dtypes: Iterable[str] = DTYPES, dims: Iterable[int] = DIMS,
                  workers: Optional[int] = None) -> list[dict]:
    """Compile every launchable variant for ``archs``; one dict per binary (see :func:`compile_variant`).

    Runs in a subprocess if TRITON_INTERPRET is set; compiles with ``workers`` processes (default: the CPUs).
    """
    archs, dtypes, dims = tuple(archs), tuple(dtypes), tuple(dims)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _compile_table_in_subprocess(archs, dtypes, dims)
    rows = compile_variants(variants(archs, dtypes, dims), workers)
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["precision"], r["block"],
                                       r["constexprs"]))


def _compile_table_in_subprocess(archs, dtypes, dims) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"archs": archs, "dtypes": dtypes, "dims": dims})
    result = subprocess.run([sys.executable, "-m", "fastcontrast.kernels.aot", spec], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"kernel compilation failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


COLUMNS = ("kernel", "arch", "dtype", "precision", "constexprs", "block", "warps", "stages", "registers",
           "spill_stores", "stack", "shared", "wgmma", "cp_async")


def format_markdown(rows: list[dict]) -> str:
    """The compile table as Markdown, one row per binary (docs/kernels.md is generated from it)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [", ".join(row[c]) if isinstance(row[c], list) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cell or "-" for cell in cells) + " |")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (kernel, arch) of the compile table: binaries, the worst registers / shared memory /
    spills / stack over them, and on sm_90 the wgmma instruction shapes and the fewest ``cp.async``."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["arch"]), []).append(row)
    order = {arch: i for i, arch in enumerate(ARCHS)}
    summary = []
    for (kernel, arch), members in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        shapes = sorted({s for r in members for s in r["wgmma"]}, key=lambda s: (int(s.split("n")[1].split("k")[0]), s))
        pipelined = [r["cp_async"] for r in members if r["stages"] >= 2]
        summary.append({
            "kernel": kernel, "arch": arch, "binaries": len(members),
            "max_registers": max(r["registers"] for r in members),
            "max_shared_kib": round(max(r["shared"] + r["static_shared"] for r in members) / 1024, 1),
            "spill_stores": sum(r["spill_stores"] for r in members),
            "stack": max(r["stack"] for r in members),
            "wgmma": " ".join(shapes) if arch == "sm_90" else "",
            "min_cp_async": min(pipelined) if pipelined and arch.startswith("sm_") else "",
        })
    return summary


SUMMARY_COLUMNS = ("kernel", "arch", "binaries", "max_registers", "max_shared_kib", "spill_stores", "stack", "wgmma",
                   "min_cp_async")


def format_summary(rows: list[dict]) -> str:
    """:func:`summarise` as Markdown (the table in docs/kernels.md)."""
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in summarise(rows):
        lines.append("| " + " | ".join(str(row[c]) if row[c] != "" else "-" for c in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


def keys_and_sample(sample: Iterable[str], workers: Optional[int] = None) -> dict:
    """The row keys of every launchable variant, and the rows of the variants keyed ``sample`` compiled anew:
    what the compile test checks the committed table against (in a process without TRITON_INTERPRET)."""
    found = {v.digest(): v for v in variants()}
    chosen = [found[k] for k in sample if k in found]
    return {"keys": sorted(found), "rows": compile_variants(chosen, workers)}


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    if "sample" in arguments:
        print(json.dumps(keys_and_sample(arguments["sample"])))

    else:
        print(json.dumps(compile_table(**arguments)))
