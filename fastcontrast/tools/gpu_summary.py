"""gpu-check's Markdown summary, made from its JSONL alone (``gpu-check --summarize DIR`` rebuilds it after a
run that was cut short): the sections, the failures, the performance probe beside the work model (measured ÷
modelled per kernel), the numerics, the ring, the largest N, the cache misses, then every other check."""

from __future__ import annotations

import os
from typing import Optional

from fastcontrast.tools.gpu_check import JSONL, SUMMARY, read_records


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _num(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _model_for(records: list[dict], loss: str, n: int, d: int, device_name: str) -> Optional[dict]:
    from fastcontrast.tools.gpu_measure import pick_model

    return pick_model(records, loss, n, d, device_name)


def summarize(records: list[dict]) -> str:
    """The Markdown summary of a run's records."""
    env = next((r for r in records if r.get("check") == "environment"), {})
    engine = next((r for r in records if r.get("check") == "engine under test"), {})
    device_name = env.get("device_name", "")
    lines = ["# gpu-check", ""]
    if env:
        lines.append(f"{device_name or env.get('device')}; fastcontrast {env.get('fastcontrast')}, torch "
                     f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda', '-')}."
                     + (" **--dry: tiny shapes in triton's interpreter on the CPU; times are meaningless.**"
                        if env.get("dry") else ""))
    if engine:
        lines.append(f"Engine under test: {engine.get('backend')} ({engine.get('reason')}).")
    checks = [r for r in records if r.get("status") in ("ok", "fail", "skip") and not
              r.get("check", "").startswith("section ")]
    failed = [r for r in records if r.get("status") == "fail"]
    lines += ["", f"{len(checks)} checks: {sum(r['status'] == 'ok' for r in checks)} ok, "
              f"{sum(r['status'] == 'fail' for r in checks)} failed, {sum(r['status'] == 'skip' for r in checks)} "
              "skipped.", ""]

    sections = [r for r in records if r.get("check", "").startswith("section ")]
    if sections:
        lines += ["## Sections", "", "| section | status | seconds | failed checks | note |", "|---|---|---:|---:|---|"]
        for r in sections:
            name = r["check"].split(" ", 1)[1]
            failures = sum(1 for c in records if c.get("section") == name and c.get("status") == "fail")
            lines.append(f"| {name} | {r['status']} | {_num(r.get('seconds'), '.1f')} | {failures} | "
                         f"{r.get('reason', '')} |")
        lines.append("")

    if failed:
        lines += ["## Failures", "", "| check | section | what |", "|---|---|---|"]
        for r in failed:
            what = r.get("error") or r.get("reason") or ", ".join(
                f"{k}={v}" for k, v in r.items() if k not in ("check", "status", "section", "elapsed_s", "traceback"))
            lines.append(f"| {r['check']} | {r.get('section', '-')} | {str(what)[:300].replace('|', '/')} |")
        lines.append("")

    probes = [r for r in records if r.get("check", "").startswith("probe ") and r.get("status") == "ok"]
    if probes:
        lines += ["## Performance probe (forward + backward, bf16)", "",
                  "| loss | N | d | median | peak memory | TFLOP/s | % dense peak | naive N | naive median | "
                  "naive peak | speedup | modelled | measured ÷ modelled |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        kernel_rows = []
        for r in probes:
            model = _model_for(records, r["loss"], r["n"], r["d"], device_name)
            modelled = model["modelled_s"] if model else r.get("modelled_s")
            lines.append(
                f"| {r['loss']} | {r['n']} | {r['d']} | {_ms(r['median_s'])} | {_gib(r.get('peak_bytes'))} | "
                f"{_num(r.get('tflops'), '.1f')} | {_num(r.get('percent_of_dense_peak'), '.1f')} | "
                f"{r.get('naive_n', '-')} | {_ms(r.get('naive_median_s'))} | {_gib(r.get('naive_peak_bytes'))} | "
                f"{_num(r.get('speedup_over_naive'), '.2f')} | {_ms(modelled)} | "
                f"{_num(r['median_s'] / modelled if modelled else None, '.2f')} |")
            for kernel, measured in sorted(r.get("kernels", {}).items()):
                predicted = (model or {}).get("kernels", {}).get(kernel, {}).get("modelled_s")
                ratio = measured["ms"] / 1e3 / predicted if predicted else None
                kernel_rows.append(f"| {r['loss']} | {kernel} | {measured['launches']} | {measured['ms']:.3f} ms | "
                                   f"{_ms(predicted)} | {_num(ratio, '.2f')} |")
        lines.append("")
        lines.append(f"Counted work: {probes[0].get('flops_counted', '-')}."
                     + (f" {probes[0]['note']}." if probes[0].get("note") else ""))
        if kernel_rows:
            lines += ["", "| loss | kernel | launches | measured | modelled | measured ÷ modelled |",
                      "|---|---|---:|---:|---:|---:|", *kernel_rows]
        lines.append("")

    panels = [r for r in records if r.get("check", "").startswith("multi-panel numerics")]
    if panels:
        lines += ["## Multi-panel numerics (against the fp64 torch engine)", "",
                  "| check | status | worst gradient error (loss; bound) | worst negatives' term error (loss; bound) |",
                  "|---|---|---|---|"]
        for r in panels:
            gradient, negatives = r.get("gradient") or {}, r.get("negatives") or {}
            bounds = r.get("negatives_bound") or {}
            cells = []
            if gradient:
                loss = max(gradient, key=gradient.get)
                cells.append(f"{gradient[loss]:.2e} ({loss}; {r.get('bound')})")
            else:
                cells.append("-")
            if negatives:
                loss = max(negatives, key=lambda k: negatives[k] / bounds.get(k, 1.0))
                cells.append(f"{negatives[loss]:.2e} ({loss}; {bounds.get(loss, '-')})")
            else:
                cells.append("-")
            lines.append(f"| {r['check']} | {r['status']} | {cells[0]} | {cells[1]} |")
        lines.append("")

    rings = [r for r in records if r.get("check", "").startswith("ring ") and r.get("status") == "ok"]
    if rings:
        lines += ["## Ring per-block shapes", "", "| N | world | block rows | ring (one rank) | one call | ratio |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in rings:
            lines.append(f"| {r['n']} | {r['world']} | {r['block_rows']} | {_ms(r['ring_rank_s'])} | "
                         f"{_ms(r['one_call_s'])} | {r['ring_over_one_call']:.2f} |")
        lines.append("")

    largest = [r for r in records if r.get("check", "").startswith("largest N") and r.get("status") == "ok"]
    if largest:
        lines += ["## Largest N in 90 % of memory (d = 768, bf16, forward + backward)", "",
                  "| check | fused N (extrapolated) | naive N (run) | naive peak | fused ÷ naive |",
                  "|---|---:|---:|---:|---:|"]
        for r in largest:
            lines.append(f"| {r['check']} | {r.get('fused_largest_n', '-')} | {r.get('naive_largest_n', '-')} | "
                         f"{_gib(r.get('naive_peak_bytes'))} | {_num(r.get('fused_over_naive_n'), '.1f')} |")
        lines.append("")

    misses = [r for r in records if r.get("check", "").startswith("cache miss")]
    compiled = [r for r in records if r.get("check") in ("compile plan", "compile into triton's cache")]
    if compiled or misses:
        lines += ["## Compilation", ""]
        for r in compiled:
            detail = ", ".join(f"{k}={r[k]}" for k in ("arch", "variants", "not_in_table", "not_in_table_from",
                                                       "compiled", "already_cached", "failed", "workers", "seconds",
                                                       "record_s", "reason") if k in r)
            lines.append(f"- {r['check']} ({r['status']}): {detail}")
        later = [r for r in misses if r.get("section") != "compile"]
        lines.append(f"- cache misses after the compile section: {len(later)}"
                     + (": " + ", ".join(sorted({str(r.get('kernel')) for r in later})) if later else ""))
        lines.append("")

    shown = {"environment", "engine under test", "sections", "compile plan", "compile into triton's cache"}
    others = [r for r in checks if r["check"] not in shown and not r["check"].startswith(
        ("probe ", "multi-panel numerics", "ring ", "largest N", "cache miss", "model "))]
    if others:
        lines += ["## Other checks", "", "| check | status | details |", "|---|---|---|"]
        for r in others:
            detail = ", ".join(f"{k}={v}" for k, v in r.items() if k not in (
                "check", "status", "elapsed_s", "section", "traceback"))
            lines.append(f"| {r['check']} | {r['status']} | {detail[:300].replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def write_summary(out_dir: str) -> str:
    """Write ``out_dir``'s Markdown summary from its JSONL; returns its path."""
    path = os.path.join(out_dir, SUMMARY)
    with open(path, "w", encoding="utf-8") as f:
        f.write(summarize(read_records(os.path.join(out_dir, JSONL))))
    return path
