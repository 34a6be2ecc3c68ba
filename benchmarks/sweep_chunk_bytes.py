"""Time and peak memory of the blockwise torch engine against its ``chunk_bytes`` (logits per chunk).

    .venv/bin/python benchmarks/sweep_chunk_bytes.py [--shapes 8192x256 16384x512 --chunks 4 8 16 32]

Forward + backward, fp32, in a worker subprocess; chunk sizes alternate round by round so that load
changes hit them alike. Chunks are in MiB.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from fastcontrast.tools.bench import MIB, Case, Runner, format_bytes, format_seconds, load_average, now_utc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x256", "16384x512"], help="NxD")
    parser.add_argument("--chunks", nargs="+", type=int, default=[4, 8, 16, 32], help="MiB")
    parser.add_argument("--loss", nargs="+", default=["clip"])
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    print(f"date: {now_utc()}; load average at start {load_average()}")
    with Runner(args.device) as worker:
        hello = worker.start()
        print(f"device: {hello['environment']['device_name']}; peak memory: {hello['memory_measure']}")
        rows = {}
        for shape in args.shapes:
            n, d = (int(x) for x in shape.lower().split("x"))
            for _ in range(args.rounds):
                for loss in args.loss:
                    for chunk in args.chunks:
                        case = Case(loss, "torch", n, d, args.dtype, "forward+backward", hello["device"],
                                    chunk * MIB)
                        result = worker.run(case, warmup=1, repeats=args.repeats, time_limit=None,
                                            budget=None)
                        if result["status"] != "ok":
                            raise SystemExit(f"{case.label()}: {result['status']} ({result['reason']})")
                        row = rows.setdefault((loss, n, d, chunk), {"times": [], "peaks": []})
                        row["times"] += result["times_s"]
                        row["peaks"].append(result["peak_bytes"])
    print(f"load average at end {load_average()}")
    print()
    print("| loss | N | d | chunk | time (median) | peak extra memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for (loss, n, d, chunk), row in rows.items():
        print(f"| {loss} | {n} | {d} | {chunk} MiB | {format_seconds(statistics.median(row['times']))} | "
              f"{format_bytes(max(row['peaks']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
