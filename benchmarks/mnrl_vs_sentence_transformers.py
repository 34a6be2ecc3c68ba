"""Peak memory and time of MultipleNegativesRankingLoss: sentence-transformers 6.2.0's against fastcontrast's.

    .venv/bin/python benchmarks/mnrl_vs_sentence_transformers.py [--n 16384] [--d 384] [--negatives 1]
        [--repeats 2] [--json PATH]

N queries, each with its positive and ``--negatives`` hard negatives (N·(1 + k) candidates per query), fp32
embeddings of width d, ``cos_sim`` at scale 20, the default ``("query_to_doc",)`` direction: the loss and its
backward through ``compute_loss_from_embeddings``, on the CPU. Each loss runs in a fresh worker process, so neither
inherits the other's heap; peak memory is :class:`fastcontrast.tools.bench.MemoryMeter`'s ``cpu_vmhwm`` (the growth
of the worker's peak resident set over its resident set just before the measured step; the embeddings exist before
and are not counted, and a warm-up step on 64 rows runs first). Time is the median of the measured step and
``--repeats`` further steps in the same worker. Both workers draw the same embeddings, and the JSON records both
loss values, which must agree.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time

PROVIDERS = ("sentence-transformers 6.2.0", "fastcontrast (torch engine)")


def _worker(provider: str, n: int, d: int, negatives: int, repeats: int, queue) -> None:
    import torch

    from fastcontrast.tools.bench import MemoryMeter

    torch.manual_seed(0)
    columns = [torch.randn(n, d, requires_grad=True) for _ in range(2 + negatives)]
    if provider == PROVIDERS[0]:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    else:
        from fastcontrast import MultipleNegativesRankingLoss
    kwargs = {} if provider == PROVIDERS[0] else {"backend": "torch"}
    loss_fn = MultipleNegativesRankingLoss(None, **kwargs)

    def step():
        for x in columns:
            x.grad = None
        loss = loss_fn.compute_loss_from_embeddings(columns, None)
        loss.backward()
        return float(loss.detach())

    # A warm-up step on a slice first: lazy imports, the custom ops' first dispatch and oneDNN's state are not
    # the loss's memory.
    warm = [x.detach()[:64].clone().requires_grad_() for x in columns]
    loss_fn.compute_loss_from_embeddings(warm, None).backward()
    del warm
    meter = MemoryMeter(torch.device("cpu"))
    start = time.perf_counter()
    value, peak = meter.measure(step)
    times = [time.perf_counter() - start]
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    queue.put({"provider": provider, "loss": value, "peak_bytes": peak, "memory_measure": meter.name,
               "step_s": statistics.median(times), "times_s": times})


def run_provider(provider: str, n: int, d: int, negatives: int, repeats: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(provider, n, d, negatives, repeats, queue))
    process.start()
    process.join()
    if process.exitcode != 0 or queue.empty():
        return {"provider": provider, "error": f"worker exited with {process.exitcode}"}
    return queue.get()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16384, help="queries")
    parser.add_argument("--d", type=int, default=384, help="embedding width")
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    parser.add_argument("--repeats", type=int, default=2, help="further timed steps after the measured one")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    import torch

    results = [run_provider(p, args.n, args.d, args.negatives, args.repeats) for p in PROVIDERS]
    print(f"MNRL, N = {args.n:,} queries × {1 + args.negatives} candidates each (N·{1 + args.negatives} columns), "
          f"d = {args.d}, fp32, CPU ({torch.get_num_threads()} threads)")
    print("| loss | step time | peak extra memory | loss value |")
    print("|---|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['provider']} | {r['error']} | | |")
        else:
            print(f"| {r['provider']} | {r['step_s']:.2f} s | {r['peak_bytes'] / 2**20:,.1f} MiB | {r['loss']:.6f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "d": args.d, "negatives": args.negatives, "repeats": args.repeats,
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
