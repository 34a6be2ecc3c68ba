"""Peak memory and time of a whole training step, with and without :class:`fastcontrast.GradCache`.

    .venv/bin/python benchmarks/step_memory.py [--sizes 1024 2048 4096 8192 16384] [--chunk 256]
        [--plain-max 4096] [--width 128] [--tokens 32] [--in-dim 32] [--dim 32] [--dropout 0.1]
        [--repeats 0] [--phases] [--json PATH] [--png PATH]

The model: two towers (image, text), each a token MLP: ``tokens`` × ``in_dim`` inputs per sample, per token
Linear(in_dim, width) → GELU → Dropout → Linear(width, width) → GELU → Dropout, mean over tokens, then
Linear(width, dim). The tokens stand in for a transformer's sequence: like a ViT's, the activations a sample
keeps for backward (here ≈ tokens·width·9 numbers: 37k at the defaults) are far larger than its embedding
(``dim``), which is what makes the step, not the loss, the memory problem (ViT-B/32: 50 tokens × 768 wide,
12 blocks, against a 512-wide embedding). The defaults keep width small and tokens many, so that activations
are large for the compute they cost on a CPU. The plain step is skipped above ``--plain-max`` (its memory is
N × the per-sample activations: gigabytes at 16k on this model), and the JSON records the skip.

The loss is ``fastcontrast.ClipLoss(backend="torch")`` with a learned logit scale; the optimizer SGD with
momentum. One step = ``zero_grad``, forward, loss, backward, ``optimizer.step()``:

- ``plain``: forward of the whole batch with grad, loss, ``backward()``;
- ``cached``: ``GradCache(chunk_size=--chunk).step(...)`` (embed in chunks without grad, loss once, re-forward
  chunk by chunk with the cached gradients).

Every (N, mode) point runs in a fresh worker process, so no point inherits another's heap. Peak memory is the
``cpu_vmhwm`` measure of :class:`fastcontrast.tools.bench.MemoryMeter`: the growth of the worker's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over its VmRSS just before the step, with glibc's
mmap threshold pinned at 64 KiB so that freed tensors leave the resident set. The inputs and the model exist
before the step and are not counted; a warm-up step at N = --chunk runs first (momentum buffers, oneDNN
state). Where VmHWM cannot be reset the meter falls back to ``tensor_bytes`` (live tensor storage counted by
a TorchDispatchMode) and the JSON says so. Time: the median wall time of the measured step and ``--repeats``
further steps in the same worker (with the pinned mmap threshold, which costs some page faults: a slight
overestimate for both modes).

``--phases`` (cached step, ``cpu_vmhwm`` only: ignored where the meter falls back) also records the peak of
each phase of the measured step, on the same baseline: ``embed`` (zero_grad and phase 1), ``loss`` (the
loss, its gradients w.r.t. the embeddings, releasing them), ``re-forward`` (phase 3) and ``optimizer``; the
step's peak is their maximum. It finds the phases by wrapping ``ChunkedForward.__init__`` and
``ChunkedForward.backward``.

Writes JSON (the points, the settings, the machine) and, with matplotlib, a PNG of peak memory and time
against N. Exit status 1 if any point failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
MODES = ("plain", "cached")
SEED = 1234
MIB = 2**20


class TokenMLP(nn.Module):
    """[n, tokens, in_dim] → [n, dim]: a per-token MLP with dropout, mean-pooled, then projected."""

    def __init__(self, in_dim: int, width: int, dim: int, dropout: float):
        super().__init__()
        self.tokens = nn.Sequential(
            nn.Linear(in_dim, width), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout),
        )
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x).mean(dim=1))


class TwoTowers(nn.Module):
    def __init__(self, in_dim: int, width: int, dim: int, dropout: float):
        super().__init__()
        self.image = TokenMLP(in_dim, width, dim, dropout)
        self.text = TokenMLP(in_dim, width, dim, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), open_clip's initial value


def run_worker(settings: dict) -> dict:
    """One (N, mode) point in this fresh process: warm-up step, one memory-measured step, timed steps."""
    import fastcontrast
    from fastcontrast.tools.bench import MemoryMeter

    n, mode, chunk = settings["n"], settings["mode"], settings["chunk"]
    torch.manual_seed(SEED)
    model = TwoTowers(settings["in_dim"], settings["width"], settings["dim"], settings["dropout"])
    loss_fn = fastcontrast.ClipLoss(backend="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cache = fastcontrast.GradCache([model.image, model.text], loss_fn, chunk_size=chunk)

    def batch(rows: int):
        shape = (rows, settings["tokens"], settings["in_dim"])
        return torch.randn(shape), torch.randn(shape)

    def step(images, texts) -> float:
        optimizer.zero_grad(set_to_none=True)
        if mode == "cached":
            loss = cache.step(images, texts, loss_args=(model.logit_scale.exp(),))
        else:
            loss = loss_fn(model.image(images), model.text(texts), model.logit_scale.exp())
            loss.backward()
            loss = loss.detach()
        optimizer.step()
        return float(loss)

    step(*batch(chunk))  # warm-up: momentum buffers, oneDNN primitives
    images, texts = batch(n)
    meter = MemoryMeter(torch.device("cpu"))

    def timed_step():
        start = time.perf_counter()
        loss = step(images, texts)
        return loss, time.perf_counter() - start

    phases = None
    if settings.get("phases") and mode == "cached" and meter.name == "cpu_vmhwm":
        (loss, first_time), phases = measure_phases(timed_step)
        peak = max(phases.values())
    else:
        (loss, first_time), peak = meter.measure(timed_step)
    times = [first_time]
    for _ in range(settings["repeats"]):
        times.append(timed_step()[1])
    point = {"n": n, "mode": mode, "peak_bytes": peak, "peak_mib": round(peak / MIB, 2), "measure": meter.name,
             "step_s": round(statistics.median(times), 4), "step_times_s": [round(t, 4) for t in times],
             "loss": loss}
    if phases is not None:
        point["phase_peak_mib"] = {name: round(value / MIB, 2) for name, value in phases.items()}
    return point


def measure_phases(fn):
    """Run ``fn`` (one cached step) with VmHWM read and reset at each phase boundary of the cached step;
    returns (its result, {phase: peak bytes over VmRSS before the call}). The cpu_vmhwm measure, per phase."""
    import gc

    from fastcontrast import cached
    from fastcontrast.tools.bench.meters import _proc_status_bytes, _reset_vmhwm

    peaks = {}
    init, backward = cached.ChunkedForward.__init__, cached.ChunkedForward.backward

    def mark(name):
        peaks[name] = max(0, _proc_status_bytes("VmHWM") - base)
        _reset_vmhwm()

    def init_then_mark(self, *args, **kwargs):
        init(self, *args, **kwargs)
        mark("embed")

    def backward_between_marks(self, *args, **kwargs):
        mark("loss")
        backward(self, *args, **kwargs)
        mark("re-forward")

    cached.ChunkedForward.__init__, cached.ChunkedForward.backward = init_then_mark, backward_between_marks
    try:
        gc.collect()
        _reset_vmhwm()
        base = _proc_status_bytes("VmRSS")
        result = fn()
        mark("optimizer")
    finally:
        cached.ChunkedForward.__init__, cached.ChunkedForward.backward = init, backward
    return result, peaks


def spawn_point(settings: dict, timeout_s: float) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 2**10))
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(settings)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"n": settings["n"], "mode": settings["mode"], "error": f"timed out after {timeout_s} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"n": settings["n"], "mode": settings["mode"],
                "error": f"worker exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def plot(points: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in zip(MODES, ("o-", "s-")):
        rows = sorted((p for p in points if p["mode"] == mode and "peak_mib" in p), key=lambda p: p["n"])
        if not rows:
            continue
        label = f"GradCache (chunk {rows[0]['chunk']})" if mode == "cached" else "plain step"
        memory_axis.plot([p["n"] for p in rows], [p["peak_mib"] for p in rows], style, label=label)
        time_axis.plot([p["n"] for p in rows], [p["step_s"] for p in rows], style, label=label)
    for axis, ylabel in ((memory_axis, "peak extra memory of the step (MiB)"), (time_axis, "step time (s)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch N")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _title(report: dict) -> str:
    settings = report["settings"]
    return (f"CPU training step: two token-MLP towers (width {settings['width']}, {settings['tokens']} tokens, "
            f"d={settings['dim']}, dropout {settings['dropout']}), ClipLoss torch engine, SGD\n"
            f"peak = {', '.join(report['measure'])}; {report['date']}; {report['environment'].get('device_name')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--plain-max", type=int, default=4096, help="largest N of the plain step")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--in-dim", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=0, help="timed steps after the measured one")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--phases", action="store_true", help="also record the cached step's peak per phase")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker")
    parser.add_argument("--json", type=Path, default=RESULTS / "cpu_step_memory_clip.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "cpu_step_memory_clip.png")
    parser.add_argument("--replot", type=Path, help="only redraw the PNG (--png) from this JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report["points"], args.png, _title(report))
        print(f"wrote {args.png}")
        return 0

    from fastcontrast.tools.bench import environment, load_average, now_utc
    from fastcontrast.tools.bench.meters import MEASURES

    common = {k: getattr(args, k) for k in ("chunk", "width", "tokens", "in_dim", "dim", "dropout", "repeats",
                                             "phases")}
    points = []
    for n in args.sizes:
        for mode in args.modes:
            if mode == "plain" and n > args.plain_max:
                skipped = f"N > --plain-max {args.plain_max}"
                points.append({"n": n, "mode": mode, "chunk": args.chunk, "skipped": skipped})
                print(f"N={n:6d}  {mode:6s}  skipped (N > --plain-max {args.plain_max})", flush=True)
                continue
            point = spawn_point({"n": n, "mode": mode, **common}, args.timeout)
            point["chunk"] = args.chunk
            points.append(point)
            shown = point.get("error") or f"peak {point['peak_mib']:9.1f} MiB  step {point['step_s']:8.3f} s"
            if "phase_peak_mib" in point:
                shown += "  " + "  ".join(f"{k} {v:.1f}" for k, v in point["phase_peak_mib"].items())
            print(f"N={n:6d}  {mode:6s}  {shown}", flush=True)
    measures = sorted({p["measure"] for p in points if "measure" in p})
    command = "benchmarks/step_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command.strip(),
        "date": now_utc(),
        "load_average": load_average(),
        "environment": environment(torch.device("cpu")),
        "settings": common,
        "measure": {name: MEASURES[name] for name in measures},
        "points": points,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    try:
        plot(points, args.png, _title(report))
        print(f"wrote {args.png}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 1 if any("error" in p for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
