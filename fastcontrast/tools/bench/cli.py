"""``python -m fastcontrast bench``: the comparison table, the largest-N search, JSON, a plot (docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Optional

import torch

from fastcontrast.tools.bench.cases import (
    DTYPES,
    FLOPS_FORMULA,
    LOSSES,
    PROVIDER_LABELS,
    PROVIDERS,
    Case,
    format_bytes,
    parse_bytes,
    parse_mode,
)
from fastcontrast.tools.bench.report import (
    format_results_table,
    format_search_table,
    load_average,
    now_utc,
    plot_results,
)
from fastcontrast.tools.bench.search import largest_n
from fastcontrast.tools.bench.worker import Runner, empty_row

DEFAULT_N = {"cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 16384, 65536, 262144]}
DEFAULT_D = {"cpu": 256, "cuda": 512}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
# On CPU the default budget leaves a tenth of the available RAM to the rest of the machine.
CPU_BUDGET_FRACTION = 0.9


class _Progress:
    """tqdm over the cases when tqdm is installed (and wanted), else silent."""

    def __init__(self, enabled: bool, total: Optional[int], desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print("(install tqdm for a progress bar: pip install tqdm)", file=sys.stderr)
            else:
                # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
                self.bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True,
                                disable=None)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def bench_cli(args) -> int:
    """``python -m fastcontrast bench``: see ``python -m fastcontrast bench --help``."""
    started = time.time()
    load_start = load_average()
    modes = [parse_mode(m) for m in args.mode]
    for loss in args.loss:
        if loss not in LOSSES:
            raise SystemExit(f"--loss must be among {', '.join(LOSSES)}, got {loss!r}")
    for dtype in args.dtype or []:
        if dtype not in DTYPES:
            raise SystemExit(f"--dtype must be among {', '.join(DTYPES)}, got {dtype!r}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise SystemExit(f"--plot writes a PNG: give a path ending in .png, got {args.plot!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib, an optional dependency: pip install matplotlib "
                             "(or pip install 'fastcontrast[bench]').") from None

    print("starting the benchmark worker…", file=sys.stderr)
    with Runner(args.device) as worker:
        hello = worker.start()
        device = hello["device"]
        kind = torch.device(device).type
        env = hello["environment"]
        ns = args.n or DEFAULT_N.get(kind, DEFAULT_N["cpu"])
        d_list = args.d or [DEFAULT_D.get(kind, 256)]
        dtypes = args.dtype or [DEFAULT_DTYPE.get(kind, "fp32")]
        providers = args.providers or list(PROVIDERS)
        if args.memory_budget is not None:
            budget = parse_bytes(args.memory_budget)
            budget_source = "--memory-budget"
        elif kind == "cuda":
            budget, budget_source = hello["free_bytes"], "free device memory"
        else:
            budget = int(hello["free_bytes"] * CPU_BUDGET_FRACTION)
            budget_source = f"{CPU_BUDGET_FRACTION:.0%} of available RAM"
        header = [
            f"command: python -m fastcontrast bench {' '.join(args.argv)}".rstrip(),
            f"device: {env['device_name']}",
            f"date: {now_utc()}",
            f"versions: fastcontrast {env['fastcontrast']}, torch {env['torch']}, triton {env['triton']}, "
            f"python {env['python']}",
            f"peak memory: {hello['memory_measure_description']}",
            f"memory budget: {format_bytes(budget)} ({budget_source}; "
            + ("enforced: allocations past it fail" if hello["hard_budget"] else "checked on measured peaks")
            + f"); time limit per call: {args.time_limit:g} s",
            f"model FLOPs: {FLOPS_FORMULA}",
        ]
        if kind == "cpu":
            header.insert(1, "CPU figures (no GPU used).")
        print("\n".join(header), file=sys.stderr if args.quiet else sys.stdout, flush=True)

        cases = [Case(loss, provider, n, d, dtype, mode, device, args.chunk_bytes)
                 for loss in args.loss for mode in modes for dtype in dtypes for d in d_list for n in ns
                 for provider in providers]
        results = []
        progress = _Progress(not args.no_progress, len(cases), "bench")
        for case in cases:
            progress.describe(f"{case.loss} {PROVIDER_LABELS[case.provider]} N={case.n}")
            reason = hello["providers"].get(case.provider, "unknown provider")
            if reason is not None:
                result = empty_row(case, "skipped", reason)
            else:
                def on_event(event, case=case):
                    if event.get("event") == "call":
                        progress.describe(f"{case.loss} {PROVIDER_LABELS[case.provider]} N={case.n} "
                                          f"call {event['index'] + 1}/{event['calls']}")
                result = worker.run(case, warmup=args.warmup, repeats=args.repeats,
                                    time_limit=args.time_limit, budget=budget, on_event=on_event)
            results.append(result)
            progress.advance()
        progress.close()

        searches = []
        if not args.no_search:
            search_mode = "forward+backward" if "forward+backward" in modes else modes[0]
            progress = _Progress(not args.no_progress, None, "largest N")

            def run_step(case):
                progress.describe(f"{case.loss} {PROVIDER_LABELS[case.provider]} N={case.n}")
                step = worker.run(case, warmup=1, repeats=0, time_limit=args.time_limit, budget=budget)
                progress.advance()
                return step

            for loss, dtype, d, provider in itertools.product(args.loss, dtypes, d_list, providers):
                if hello["providers"].get(provider, "unknown") is not None:
                    continue
                template = Case(loss, provider, 0, d, dtype, search_mode, device, args.chunk_bytes)
                known = {r["n"]: r for r in results
                         if {**r, "n": 0}.items() >= asdict(template).items()}
                searches.append(largest_n(
                    run_step, template, budget=budget, start=args.search_start or min(ns),
                    max_n=args.search_max, hard_budget=hello["hard_budget"], known=known,
                    time_limit=args.time_limit))
            progress.close()

    print()
    print(format_results_table(results))
    if searches:
        print(format_search_table(searches))
    load_end = load_average()
    if load_start is not None:
        print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}; "
              f"{os.cpu_count()} logical cores; wall time {time.time() - started:.0f} s")
    meta = {"command": "python -m fastcontrast bench " + " ".join(args.argv), "date": now_utc(),
            "environment": env, "memory_measure": hello["memory_measure"],
            "memory_measure_description": hello["memory_measure_description"],
            "memory_budget_bytes": budget, "memory_budget_source": budget_source,
            "budget_enforced": hello["hard_budget"], "time_limit_s": args.time_limit,
            "flops_formula": FLOPS_FORMULA, "load_average_start": load_start, "load_average_end": load_end,
            "wall_time_s": time.time() - started}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "largest_n": [asdict(s) for s in searches]}, f,
                      indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(results, args.plot, title=f"{env['device_name']} — {now_utc()}")
        print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "error" for r in results) else 0
