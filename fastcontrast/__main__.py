"""``python -m fastcontrast bench | check | info | gpu-check | model`` (the commands live in fastcontrast.tools).

- ``bench``: time and peak memory of the naive reference, the blockwise torch engine and the Triton engine
  (CUDA) on this device, as a table, plus the largest batch each fits in a memory budget.
- ``check``: a self-test of every backend available here against the reference (values and gradients).
- ``info``: versions, devices, the backend ``"auto"`` picks and why; ``--kernels`` adds the compile table
  of every kernel variant (sm_80, sm_90, sm_100, gfx90a, gfx942; no GPU needed).
- ``gpu-check``: the one-shot check for a first GPU run (``--dry``: the same at tiny sizes on the CPU).
- ``model``: modelled H100 / H200 time of every kernel and loss from counted work (a model).

Importing this module imports nothing heavy (no triton, matplotlib or tqdm) and never touches CUDA; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _size(text: str) -> int:
    from fastcontrast.tools.bench.cases import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastcontrast",
        description="fastcontrast: blockwise contrastive losses with O(N·d) memory.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{bench,check,info,gpu-check,model}")

    bench = commands.add_parser(
        "bench",
        help="time and peak memory against the naive losses, and the largest N each fits in memory",
        description=(
            "Compare the naive reference (open_clip / lightly / sentence-transformers math, full logits), the "
            "blockwise torch engine and the Triton engine (CUDA only) on this device. Every case runs in a worker "
            "subprocess under the memory budget; then N is doubled per provider until a step runs out of the budget or "
            "one call passes --time-limit."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--loss", nargs="+", default=["clip"], choices=["clip", "siglip", "nt_xent", "mnrl"],
                       help="losses to compare")
    bench.add_argument("--n", nargs="+", type=_positive_int, default=None,
                       help="batch sizes N (default: 1024 2048 4096 8192 on CPU, 4096 … 262144 on CUDA)")
    bench.add_argument("--d", nargs="+", type=_positive_int, default=None,
                       help="feature dims (default: 256 on CPU, 512 on CUDA)")
    bench.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "fp16", "bf16", "fp64"],
                       help="feature dtypes (default: fp32 on CPU, bf16 on CUDA)")
    bench.add_argument("--mode", nargs="+", default=["fwd+bwd"], choices=["fwd", "fwd+bwd"],
                       help="forward only, or forward + backward (a training step's loss work)")
    bench.add_argument("--providers", nargs="+", default=None, choices=["reference", "torch", "triton"],
                       help="providers to compare (default: all; unavailable ones are listed as skipped)")
    bench.add_argument("--repeats", type=_positive_int, default=3,
                       help="timed calls per case (the median is shown)")
    bench.add_argument("--warmup", type=int, default=1,
                       help="untimed calls before timing; the first call also measures peak memory")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda if available)")
    bench.add_argument("--chunk-bytes", type=_size, default=None,
                       help="logits budget per chunk of the torch engine, e.g. 8MiB (default: the engine's)")
    bench.add_argument("--memory-budget", default=None,
                       help="e.g. 8GiB; covers inputs, gradients and all the step allocates (default: free "
                       "device memory; on CPU 90%% of available RAM). Enforced on Linux with RLIMIT_AS in "
                       "the worker, on CUDA with the allocator's per-process fraction")
    bench.add_argument("--time-limit", type=_positive_float, default=60.0,
                       help="seconds one call may take; a slower step stops the search as time-limited")
    bench.add_argument("--no-search", action="store_true", help="skip the largest-N search")
    bench.add_argument("--search-start", type=_positive_int, default=None,
                       help="first N of the largest-N search (default: the smallest --n)")
    bench.add_argument("--search-max", type=_positive_int, default=2**24, help="largest N the search tries")
    bench.add_argument("--json", metavar="PATH", default=None, help="write the raw results as JSON")
    bench.add_argument("--plot", metavar="PATH.png", default=None,
                       help="write time and memory against N (log axes) as a PNG; needs matplotlib")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--quiet", action="store_true", help="print the run's header on stderr")

    check = commands.add_parser(
        "check",
        help="self-test: every available backend against the reference, values and gradients",
        description=(
            "Run every backend available on this device against the naive reference on a few shapes and "
            "dtypes, comparing the loss and the gradients of every input. Exits 1 on any failure."
        ),
    )
    check.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda if available)")
    check.add_argument("--interpreter", action="store_true",
                       help="on CPU, also check the Triton kernels in triton's interpreter "
                       "(TRITON_INTERPRET=1; slow, for debugging)")
    check.add_argument("--verbose", action="store_true",
                       help="print every tensor's error, not just the worst")

    info = commands.add_parser("info", help="versions, devices, and which backend 'auto' picks and why")
    info.add_argument("--kernels", action="store_true",
                      help="also compile every launchable kernel variant for sm_80, sm_90, sm_100, gfx90a and "
                      "gfx942 and print registers, spills, stack, shared memory, wgmma shapes (no GPU needed; "
                      "tens of minutes on 2 cores for all targets)")
    info.add_argument("--arch", nargs="+", default=None, choices=["sm_80", "sm_90", "sm_100", "gfx90a", "gfx942"],
                      help="with --kernels: only these targets")
    info.add_argument("--dtypes", nargs="+", default=None, choices=["fp16", "bf16", "fp32"],
                      help="with --kernels: only the binaries for these input dtypes")
    info.add_argument("--dims", nargs="+", type=_positive_int, default=None,
                      help="with --kernels: only the binaries these feature dims launch (default: dims covering "
                      "every config bucket)")
    info.add_argument("--json", metavar="FILE", default=None,
                      help="with --kernels: write the table as JSON (one row per binary)")
    info.add_argument("--markdown", action="store_true",
                      help="with --kernels: print only the table, as Markdown (one row per binary)")
    info.add_argument("--from-json", metavar="FILE", default=None,
                      help="with --kernels: take the table from FILE (written by --json) instead of compiling")
    info.add_argument("--update-doc", metavar="FILE", default=None,
                      help="with --kernels: rewrite the summary table between FILE's compile-table markers "
                      "(docs/kernels.md)")

    gpu = commands.add_parser(
        "gpu-check", help="the one-shot check for a first GPU run: compile, speed, numerics, crash paths, memory",
        description="Compile every variant first (in parallel), then the performance probe, multi-panel numerics, "
        "crash scenarios, host syncs, determinism, the launched binaries, the ring and the largest N; each section "
        "in its own subprocess with its own timeout, JSON lines in --out as checks finish, a Markdown summary at "
        "the end.",
    )
    gpu.add_argument("--out", metavar="DIR", default=None,
                     help="folder for the JSON lines (gpu_check.jsonl) and the Markdown summary (default: a new "
                     "temporary folder)")
    gpu.add_argument("--budget", metavar="SECONDS", type=_positive_float, default=480.0,
                     help="start no new section past this many seconds (none runs past 1.25 × this)")
    gpu.add_argument("--dry", action="store_true",
                     help="tiny shapes on the CPU in triton's interpreter (what the test suite runs)")
    gpu.add_argument("--table", metavar="FILE", default=None,
                     help="the compile table to compare the launched binaries with (default: the one installed "
                     "with the package, fastcontrast/kernels/compile_table.json)")
    gpu.add_argument("--plan", action="store_true",
                     help="print the sections, the kernel variants the run will compile and the time estimate; "
                     "no GPU needed (with --dry: for the --dry shapes, seconds; else the GPU shapes, minutes on a "
                     "2-core CPU)")
    gpu.add_argument("--arch", default=None, choices=["sm_80", "sm_90", "sm_100", "gfx90a", "gfx942"],
                     help="with --plan: the target to record the variants for (default: this GPU, else sm_90)")
    gpu.add_argument("--summarize", metavar="DIR", default=None,
                     help="rebuild the Markdown summary in DIR from DIR/gpu_check.jsonl (a run cut short) and print it")
    gpu.add_argument("--sections", nargs="+", default=None,
                     choices=["compile", "probe", "numerics", "crash", "syncs", "determinism", "binaries", "ring",
                              "max_n"],
                     help="run only these sections (in the standard order)")
    # One section in this process: how gpu-check runs each of its subprocesses.
    gpu.add_argument("--section", default=None, help=argparse.SUPPRESS)

    # Parsed by fastcontrast.tools.model itself (main() hands it the arguments); listed here for --help.
    commands.add_parser("model", help="modelled H100 / H200 time of every kernel and loss (a model)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"]:  # its own parser (fastcontrast.tools.model)
        from fastcontrast.tools.model import model_cli

        return model_cli(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        from fastcontrast.tools.bench.cli import bench_cli

        args.argv = argv[1:]
        return bench_cli(args)
    if args.command == "check":
        from fastcontrast.tools.check import check_cli

        return check_cli(args)
    if args.command == "gpu-check":
        from fastcontrast.tools.gpu_check import gpu_check_cli

        return gpu_check_cli(args)
    from fastcontrast.tools.info import info_cli

    return info_cli(args)


if __name__ == "__main__":
    sys.exit(main())
