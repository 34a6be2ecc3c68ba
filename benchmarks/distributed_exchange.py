"""Per-rank peak memory and time of forward + backward with ``exchange="gather"`` and ``exchange="ring"``.

On CPU, gloo over 127.0.0.1: for each loss and world size W, W processes are spawned
(``torch.multiprocessing``); every rank holds ``--rows`` rows of d features (per-rank batch B) and runs
forward + backward of the loss with each exchange, alternating between them so that a change in machine
load touches both. With ``"gather"`` a rank all-gathers the other tower (N·d, N = W·B, and its gradient);
with ``"ring"`` blocks travel point-to-point and a rank should hold O(B·d) at any W.

    .venv/bin/python benchmarks/distributed_exchange.py [--world-sizes 2 4] [--rows 4096] [--dim 512]
        [--dtype fp32] [--losses clip siglip ntxent distill] [--backend torch] [--repeats 3]
        [--json PATH] [--markdown]

Peak memory: :class:`fastcontrast.tools.bench.MemoryMeter` with ``prefer="tensor_bytes"``, the peak bytes of
tensor storage made during one forward + backward call and alive at once, over what was live before it
(the inputs). The returned gradients count; what is made and freed inside one op does not: the engine's
chunk workspaces inside fastcontrast's custom ops (``fastcontrast::lse_backward`` and the like, at most
``chunk_bytes`` each and the same for both exchanges), library workspaces, gloo's buffers. Measured on one
call after a warm-up, per rank; the table shows the max over ranks. Time: the median wall time of
``--repeats`` calls, each started after a barrier, per rank; the table shows the max over ranks.

Every spawn has a deadline (``--deadline``: its processes are killed and the row reports the failure) and
the gloo group a timeout (``--collective-timeout``), so a hang fails instead of blocking. The exit status
is 1 if any case failed.

The losses, in their distributed forms that take ``exchange``: ``clip`` is open_clip's ``ClipLoss`` with
``local_loss=True, gather_with_grad=True``; ``siglip`` its ``SigLipLoss``; ``ntxent`` lightly's
``NTXentLoss`` with ``gather_distributed=True`` (both views travel: B rows per rank are 2B embeddings);
``distill`` open_clip's ``DistillClipLoss`` with a teacher of the same d that takes no gradient (the
teacher's towers travel too). "global N" is W·B samples.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from fastcontrast import ClipLoss, DistillClipLoss, NTXentLoss, SigLipLoss
from fastcontrast.tools.bench import DTYPES, MIB, MemoryMeter, environment, load_average, now_utc

EXCHANGES = ("gather", "ring")
LOSSES = ("clip", "siglip", "ntxent", "distill")
BACKENDS = ("torch", "auto", "triton")
SEED = 1234
CLIP_SCALE = 1 / 0.07  # open_clip's initial exponentiated logit scale
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initial values
NTXENT_TEMPERATURE = 0.1
COLUMNS = ("loss", "W", "per-rank rows", "global N", "d", "exchange", "peak per rank (MiB)", "time (ms)",
           "peak ratio ring/gather")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _inputs(loss: str, rows: int, dim: int, dtype: torch.dtype, rank: int) -> dict:
    """This rank's leaves (features and scalars that take gradients) and the teacher's tensors."""
    generator = torch.Generator().manual_seed(SEED + rank)

    def features(requires_grad: bool = True) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)
        return x.to(dtype).requires_grad_(requires_grad)

    if loss == "ntxent":
        return {"leaves": [features(), features()]}
    leaves = [features(), features()]
    if loss == "siglip":
        leaves += [torch.tensor(SIGLIP_SCALE, requires_grad=True), torch.tensor(SIGLIP_BIAS, requires_grad=True)]
        return {"leaves": leaves}
    leaves.append(torch.tensor(CLIP_SCALE, requires_grad=True))
    if loss == "clip":
        return {"leaves": leaves}
    return {"leaves": leaves, "teacher": [features(False), features(False), torch.tensor(CLIP_SCALE)]}


def _loss_fn(loss: str, exchange: str, backend: str, rank: int, world_size: int, inputs: dict):
    """A callable computing this rank's loss (a 0-dim tensor) with ``exchange``."""
    leaves = inputs["leaves"]
    if loss == "clip":
        module = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size,
                          backend=backend, exchange=exchange)
        return lambda: module(*leaves)
    if loss == "siglip":
        module = SigLipLoss(rank=rank, world_size=world_size, backend=backend, exchange=exchange)
        return lambda: module(*leaves)
    if loss == "ntxent":
        module = NTXentLoss(temperature=NTXENT_TEMPERATURE, gather_distributed=True, backend=backend,
                            exchange=exchange)
        return lambda: module(*leaves)
    module = DistillClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size,
                             backend=backend, exchange=exchange)

    def distill():
        contrastive, distill_term = module(*leaves, *inputs["teacher"])
        return contrastive + distill_term

    return distill


def _rank_main(rank: int, world_size: int, port: int, config: dict, out_dir: str) -> None:
    torch.set_num_threads(config["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=config["collective_timeout"]))
    try:
        result = _measure_rank(rank, world_size, config)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _measure_rank(rank: int, world_size: int, config: dict) -> dict:
    dtype = DTYPES[config["dtype"]]
    inputs = _inputs(config["loss"], config["rows"], config["dim"], dtype, rank)
    leaves = inputs["leaves"]
    steps = {}
    for exchange in EXCHANGES:
        loss_fn = _loss_fn(config["loss"], exchange, config["backend"], rank, world_size, inputs)

        def step(loss_fn=loss_fn):
            loss = loss_fn()
            return loss.detach(), torch.autograd.grad(loss, leaves)

        steps[exchange] = step

    # Warm-up, and the two exchanges' results compared: the ring must compute the same loss and gradients.
    outputs = {}
    for exchange in EXCHANGES:
        dist.barrier()
        outputs[exchange] = steps[exchange]()
    (loss_g, grads_g), (loss_r, grads_r) = outputs["gather"], outputs["ring"]
    max_abs_diff = max([(loss_g - loss_r).abs().item()]
                       + [(g - r).abs().max().item() for g, r in zip(grads_g, grads_r)])
    del outputs, grads_g, grads_r

    meter = MemoryMeter(torch.device("cpu"), prefer="tensor_bytes")
    result = {"rank": rank, "memory_measure": meter.name, "max_abs_diff_ring_vs_gather": max_abs_diff,
              "loss": loss_g.item()}
    for exchange in EXCHANGES:
        gc.collect()
        dist.barrier()
        _, peak = meter.measure(steps[exchange])
        result[exchange] = {"peak_bytes": peak, "times_s": []}
    for _ in range(config["repeats"]):
        for exchange in EXCHANGES:
            dist.barrier()
            start = time.perf_counter()
            steps[exchange]()
            result[exchange]["times_s"].append(time.perf_counter() - start)
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(context) -> None:
    for process in context.processes:
        if process.is_alive():
            process.kill()
    for process in context.processes:
        process.join(timeout=10)


def run_group(world_size: int, config: dict, deadline_s: float) -> dict:
    """Spawn ``world_size`` ranks that measure ``config``; returns every rank's result, or the failure."""
    with tempfile.TemporaryDirectory(prefix="fastcontrast-exchange-") as out_dir:
        context = mp.start_processes(_rank_main, args=(world_size, _free_port(), config, out_dir),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    _kill(context)
                    return {"status": "timeout",
                            "reason": f"not finished within the {deadline_s:g} s deadline; its processes were killed"}
        except ProcessException as exc:
            _kill(context)
            return {"status": "failed", "reason": str(exc).strip()}
        ranks = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world_size)]
    return {"status": "ok", "ranks": ranks}


def summarize(loss: str, world_size: int, config: dict, group: dict) -> list[dict]:
    """One row per exchange: peak bytes (max over ranks), time (max over ranks of each rank's median)."""
    base = {"loss": loss, "world_size": world_size, "rows_per_rank": config["rows"],
            "global_n": world_size * config["rows"], "dim": config["dim"], "dtype": config["dtype"],
            "backend": config["backend"], "threads_per_rank": config["threads"], "repeats": config["repeats"]}
    if group["status"] != "ok":
        return [{**base, "exchange": exchange, "status": group["status"], "reason": group["reason"]}
                for exchange in EXCHANGES]
    ranks = group["ranks"]
    rows = []
    for exchange in EXCHANGES:
        peaks = [r[exchange]["peak_bytes"] for r in ranks]
        medians = [statistics.median(r[exchange]["times_s"]) for r in ranks]
        rows.append({**base, "exchange": exchange, "status": "ok", "peak_bytes": max(peaks),
                     "time_s": max(medians), "peak_bytes_per_rank": peaks, "median_time_s_per_rank": medians,
                     "times_s_per_rank": [r[exchange]["times_s"] for r in ranks],
                     "memory_measure": ranks[0]["memory_measure"],
                     "max_abs_diff_ring_vs_gather": max(r["max_abs_diff_ring_vs_gather"] for r in ranks)})
    gather, ring = rows
    rows[1]["peak_ratio_ring_gather"] = ring["peak_bytes"] / gather["peak_bytes"] if gather["peak_bytes"] else None
    return rows


def _mib(n: int) -> str:
    mib = n / MIB
    return f"{mib:.1f}" if mib >= 10 else f"{mib:.3g}"


def _cells(row: dict) -> list[str]:
    cells = [row["loss"], str(row["world_size"]), str(row["rows_per_rank"]), str(row["global_n"]),
             str(row["dim"]), row["exchange"]]
    if row["status"] != "ok":
        return cells + [row["status"], row["status"], "—"]
    ratio = row.get("peak_ratio_ring_gather")
    ms = row["time_s"] * 1e3
    return cells + [_mib(row["peak_bytes"]), f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}",
                    "—" if ratio is None else f"{ratio:.2f}"]


def label() -> str:
    return f"CPU / gloo, {cpu_model()}, torch {torch.__version__}"


def format_table(rows: list[dict], markdown: bool) -> str:
    body = [list(COLUMNS)] + [_cells(row) for row in rows]
    # A Markdown delimiter cell needs a few dashes besides its colon.
    widths = [max(3, *(len(line[i]) for line in body)) for i in range(len(COLUMNS))]
    right = set(range(1, 5)) | set(range(6, len(COLUMNS)))

    def line(cells):
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded)

    if markdown:
        rule = "| " + " | ".join("-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    else:
        rule = "  ".join("-" * w for w in widths)
    lines = [label(), "", line(body[0]), rule] + [line(cells) for cells in body[1:]]
    settings = sorted({(r["dtype"], r["backend"], r["world_size"], r["threads_per_rank"]) for r in rows})
    notes = [
        f"{settings[0][0]}, backend={settings[0][1]}; torch threads per rank: "
        + ", ".join(f"W={w}: {t}" for _, _, w, t in settings) + f"; {os.cpu_count()} logical CPUs.",
        "peak: max over ranks of the peak extra tensor bytes of one forward+backward (MemoryMeter "
        f"tensor_bytes: not the workspaces inside an op); time: max over ranks of each rank's median of "
        f"{rows[0]['repeats']} calls, each after a barrier.",
    ]
    diffs = [(r["loss"], r["world_size"], r["max_abs_diff_ring_vs_gather"]) for r in rows
             if r["status"] == "ok" and r["exchange"] == "ring"]
    if diffs:
        notes.append("max |ring − gather| over loss and gradients: "
                     + ", ".join(f"{loss} W={w}: {d:.1e}" for loss, w, d in diffs) + ".")
    for row in rows:
        if row["status"] != "ok":
            notes.append(f"{row['loss']} W={row['world_size']} {row['exchange']}: {row['status']}: "
                         f"{row['reason'].strip().splitlines()[-1] if row['reason'].strip() else ''}")
    return "\n".join(lines + [""] + notes)


def source_digest() -> str:
    """sha256 of the installed package's .py files: which version of the losses was measured."""
    import fastcontrast

    digest = hashlib.sha256()
    root = Path(fastcontrast.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rows", type=int, default=4096, help="rows per rank (B)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=["clip"])
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per exchange and rank")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: CPU count // W, at least 1)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds per spawned group")
    parser.add_argument("--collective-timeout", type=float, default=600.0, help="gloo timeout, seconds")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    for name in ("rows", "dim", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.world_sizes) < 2:
        parser.error(f"--world-sizes must be at least 2 (an exchange needs two ranks), got {args.world_sizes}")

    started, load_start, digest = now_utc(), load_average(), source_digest()
    rows = []
    for loss in args.losses:
        for world_size in args.world_sizes:
            config = {"loss": loss, "rows": args.rows, "dim": args.dim, "dtype": args.dtype,
                      "backend": args.backend, "repeats": args.repeats,
                      "threads": args.threads or max(1, (os.cpu_count() or 1) // world_size),
                      "collective_timeout": args.collective_timeout}
            print(f"{loss} W={world_size} B={args.rows} d={args.dim} ...", file=sys.stderr, flush=True)
            begin = time.monotonic()
            try:
                group = run_group(world_size, config, args.deadline)
            except Exception:
                group = {"status": "failed", "reason": traceback.format_exc()}
            rows += summarize(loss, world_size, config, group)
            print(f"  {group['status']} in {time.monotonic() - begin:.0f} s", file=sys.stderr, flush=True)

    table = format_table(rows, args.markdown)
    if source_digest() != digest:
        table += "\nwarning: fastcontrast's source changed during the run; rows may mix versions."
    print(table)
    if args.json:
        meta = {"label": label(), "fastcontrast_source_sha256": digest, "cpu_model": cpu_model(),
                "started": started, "finished": now_utc(), "load_average_start": load_start,
                "load_average_end": load_average(), "environment": environment(torch.device("cpu")),
                "argv": sys.argv[1:] if argv is None else argv, "columns": list(COLUMNS)}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
