"""Benchmark results as Markdown tables and a PNG plot, with the run's date and load."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Optional

from fastcontrast.tools.bench.cases import PROVIDER_LABELS, PROVIDERS, format_bytes, format_flops, format_seconds


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}×"


def _status_cell(result: dict) -> str:
    return {"oom": "OOM", "time-limited": "time limit", "skipped": "skipped", "error": "error"}.get(
        result["status"], result["status"])


def format_results_table(results: list) -> str:
    """Markdown tables, one per (loss, mode, dtype, d): time, peak memory and both ratios against naive."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["loss"], r["mode"], r["dtype"], r["d"]), []).append(r)
    out = []
    for (loss, mode, dtype, d), rows in groups.items():
        naive = {r["n"]: r for r in rows if r["provider"] == "reference" and r["status"] == "ok"}
        out.append(f"{loss}, {mode}, {dtype}, d={d}")
        out.append("")
        out.append("| N | provider | time | peak memory | time vs naive | memory vs naive | model FLOP/s |")
        out.append("|---:|---|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: (r["n"], PROVIDERS.index(r["provider"]))):
            label = PROVIDER_LABELS[r["provider"]]
            if r["status"] == "skipped":
                continue  # said once below
            if r["status"] != "ok":
                out.append(f"| {r['n']} | {label} | {_status_cell(r)} | | | | |")
                continue
            base = naive.get(r["n"])
            rate = format_flops(r.get("flops_per_s"))
            out.append(
                f"| {r['n']} | {label} | {format_seconds(r['time_s'])} | {format_bytes(r['peak_bytes'])} | "
                f"{_ratio(r['time_s'], base and base['time_s'])} | "
                f"{_ratio(r['peak_bytes'], base and base['peak_bytes'])} | {rate} |"
            )
        notes = sorted({f"{PROVIDER_LABELS[r['provider']]}: skipped, {r['reason']}" for r in rows
                        if r["status"] == "skipped"})
        notes += [f"{PROVIDER_LABELS[r['provider']]} N={r['n']}: {r['reason']}" for r in rows
                  if r["status"] not in ("ok", "skipped") and r.get("reason")]
        out.extend(["", *[f"- {note}" for note in notes]] if notes else [])
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def format_search_table(searches: list) -> str:
    if not searches:
        return ""
    out = []
    groups: dict = {}
    for s in searches:
        groups.setdefault((s.loss, s.mode, s.dtype, s.d, s.budget_bytes), []).append(s)
    for (loss, mode, dtype, d, budget), rows in groups.items():
        out.append(f"Largest N within a {format_bytes(budget)} budget ({loss}, {mode}, {dtype}, d={d}; "
                   "the budget covers inputs, gradients and everything the step allocates)")
        out.append("")
        out.append("| provider | largest N | memory at that N | step time | stopped at N | why |")
        out.append("|---|---:|---:|---:|---:|---|")
        for s in rows:
            why = {"time": "time limit (not memory)", "max-n": "search cap"}.get(s.stop, s.stop)
            detail = f"{why}: {s.stop_reason}" if s.stop_reason else why
            if s.projected_memory_limit_n:
                detail += f"; memory alone would allow N≈{s.projected_memory_limit_n} (projected)"
            out.append(f"| {PROVIDER_LABELS[s.provider]} | {s.largest_n or '—'} | "
                       f"{format_bytes(s.total_bytes_at_largest)} | {format_seconds(s.time_s_at_largest)} | "
                       f"{s.stopped_at_n or '—'} | {detail} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot_results(results: list, path: str, title: str = "") -> None:
    """PNG of time and peak memory against N (log axes), one line per provider, one row per configuration."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib, an optional dependency: pip install matplotlib "
            "(or pip install 'fastcontrast[bench]')."
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    groups: dict = {}
    for r in results:
        if r["status"] == "ok":
            groups.setdefault((r["loss"], r["mode"], r["dtype"], r["d"]), []).append(r)
    if not groups:
        raise ValueError("no successful measurement to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
    for row, ((loss, mode, dtype, d), rows) in enumerate(groups.items()):
        ax_time, ax_mem = axes[row]
        all_n = sorted({r["n"] for r in rows})
        for provider in PROVIDERS:
            points = sorted((r["n"], r["time_s"], r["peak_bytes"]) for r in rows if r["provider"] == provider)
            if not points:
                continue
            label = PROVIDER_LABELS[provider]
            ax_time.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            # A peak of 0 (the call fit in memory already resident) has no place on a log axis.
            mem = [(p[0], p[2]) for p in points if p[2]]
            ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label)
        for ax, ylabel, fmt in ((ax_time, "time per call", format_seconds),
                                (ax_mem, "peak extra memory", format_bytes)):
            ax.set_xscale("log", base=2)
            if not ax.lines:
                # Every peak was 0 (the calls fit in memory already resident): nothing to draw on a log axis.
                ax.text(0.5, 0.5, "no extra memory measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{loss}, {mode}, {dtype}, d={d}")
                continue
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(all_n))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x)}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _, fmt=fmt: fmt(y)))
            low, high = ax.get_ylim()
            # Within one decade there is no major tick to label: label the minor ones instead.
            minor = FuncFormatter(lambda y, _, fmt=fmt: fmt(y)) if high < 10 * low else NullFormatter()
            ax.yaxis.set_minor_formatter(minor)
            ax.set_xlabel("N (batch size)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend()
            ax.set_title(f"{loss}, {mode}, {dtype}, d={d}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
