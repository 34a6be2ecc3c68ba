"""The foundation issue's acceptance check, measured.

At N = 8192, d = 256, fp32 on CPU, forward + backward: the blockwise torch engine's peak extra memory is
at most 25 % of the naive reference's, and its time is no worse than the reference's.

    .venv/bin/python benchmarks/measure_foundation.py [--n 8192 --d 256 --rounds 2 --repeats 3 --json PATH]

Every case runs in worker subprocesses (fastcontrast.tools.bench.Runner: peak memory in one whose glibc mmap
threshold is fixed, times in one with glibc's defaults). The providers alternate round by round so that
a change in machine load affects both; the time is the median over all timed calls, the memory the
largest peak seen. Peak memory is measured as
``python -m fastcontrast bench`` does (see its header; VmHWM growth on Linux).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from fastcontrast.tools.bench import Case, Runner, format_bytes, format_seconds, load_average, now_utc

MEMORY_RATIO_MAX = 0.25
TIME_RATIO_MAX = 1.0


def measure(args) -> dict:
    rows = {}
    with Runner(args.device) as worker:
        hello = worker.start()
        for _ in range(args.rounds):
            for loss in args.loss:
                for provider in ("reference", "torch"):
                    case = Case(loss, provider, args.n, args.d, args.dtype, "forward+backward",
                                hello["device"])
                    result = worker.run(case, warmup=1, repeats=args.repeats, time_limit=None, budget=None)
                    if result["status"] != "ok":
                        raise SystemExit(f"{loss}/{provider}: {result['status']} ({result['reason']})")
                    row = rows.setdefault((loss, provider), {"times": [], "peaks": []})
                    row["times"] += result["times_s"]
                    row["peaks"].append(result["peak_bytes"])
    return {"hello": hello, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss", nargs="+", default=["clip", "siglip", "nt_xent"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (naive, blockwise)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case and round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    load_start = load_average()
    data = measure(args)
    hello, rows = data["hello"], data["rows"]
    env = hello["environment"]
    print(f"date: {now_utc()}; device: {env['device_name']}; torch {env['torch']}")
    print(f"peak memory: {hello['memory_measure_description']}")
    print(f"N={args.n}, d={args.d}, {args.dtype}, forward+backward; {args.rounds} rounds × {args.repeats} "
          f"timed calls per provider; load average at start {load_start}, at end {load_average()}")
    print()
    print("| loss | naive time | blockwise time | time ratio | naive peak | blockwise peak | memory ratio "
          "| verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    summary, all_pass = [], True
    for loss in args.loss:
        naive, block = rows[(loss, "reference")], rows[(loss, "torch")]
        t_naive, t_block = statistics.median(naive["times"]), statistics.median(block["times"])
        m_naive, m_block = max(naive["peaks"]), max(block["peaks"])
        time_ratio, memory_ratio = t_block / t_naive, m_block / m_naive
        ok_memory, ok_time = memory_ratio <= MEMORY_RATIO_MAX, time_ratio <= TIME_RATIO_MAX
        all_pass &= ok_memory and ok_time
        verdict = ", ".join([f"memory {'PASS' if ok_memory else 'FAIL'} (≤ {MEMORY_RATIO_MAX:.0%})",
                             f"time {'PASS' if ok_time else 'FAIL'} (≤ {TIME_RATIO_MAX:.2f}×)"])
        print(f"| {loss} | {format_seconds(t_naive)} | {format_seconds(t_block)} | {time_ratio:.2f}× | "
              f"{format_bytes(m_naive)} | {format_bytes(m_block)} | {memory_ratio:.3f} | {verdict} |")
        summary.append({"loss": loss, "naive_time_s": t_naive, "blockwise_time_s": t_block,
                        "time_ratio": time_ratio, "naive_peak_bytes": m_naive,
                        "blockwise_peak_bytes": m_block,
                        "memory_ratio": memory_ratio, "memory_pass": ok_memory, "time_pass": ok_time,
                        "naive_times_s": naive["times"], "blockwise_times_s": block["times"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": now_utc(), "args": vars(args), "environment": hello["environment"],
                       "memory_measure": hello["memory_measure"], "results": summary}, f, indent=1)
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
