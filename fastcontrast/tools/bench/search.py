"""The largest batch each provider fits in a memory budget: N doubled until a step runs out of memory or time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from fastcontrast.tools.bench.cases import Case


@dataclass
class SearchResult:
    """Largest N a provider fits in the memory budget, and why the doubling stopped."""

    loss: str
    provider: str
    d: int
    dtype: str
    mode: str
    budget_bytes: int
    largest_n: Optional[int] = None
    total_bytes_at_largest: Optional[int] = None
    time_s_at_largest: Optional[float] = None
    stopped_at_n: Optional[int] = None
    stop: str = ""  # memory | time | max-n | error | skipped
    stop_reason: str = ""
    projected_memory_limit_n: Optional[int] = None
    steps: list = field(default_factory=list)


def _project_memory_limit(steps: list, budget: int) -> Optional[int]:
    """N at which inputs + peak would reach the budget, extrapolated from the last two good steps: linear
    in N when memory grew less than 3× per doubling, quadratic otherwise. A projection, not a measurement."""
    good = [s for s in steps if s["status"] == "ok" and s.get("total_bytes")]
    if len(good) < 2:
        return None
    (n1, m1), (n2, m2) = [(s["n"], s["total_bytes"]) for s in good[-2:]]
    if m2 <= m1 or n2 <= n1:
        return None
    power = 2 if m2 / m1 > 3 else 1
    slope = (m2 - m1) / (n2**power - n1**power)
    intercept = m2 - slope * n2**power
    if budget <= intercept:
        return None
    return int(((budget - intercept) / slope) ** (1 / power))


def largest_n(
    run: Callable[[Case], dict],
    template: Case,
    *,
    budget: int,
    start: int,
    max_n: int,
    hard_budget: bool,
    known: Optional[dict] = None,
    time_limit: Optional[float] = None,
) -> SearchResult:
    """Double N from ``start`` until a step runs out of memory, passes the time limit, or N passes ``max_n``.

    ``run(case)`` measures one step (the caller applies the budget and the time limit). ``known`` maps N to
    results already measured (e.g. in the table) under the same budget, reused instead of re-run. Without a
    ``hard_budget`` (no RLIMIT_AS / CUDA fraction), a step whose memory, extrapolated from the previous two,
    would exceed the budget is not run. With ``time_limit``, a step whose time, extrapolated as 4× the last
    one's (every provider does O(N²·d) work), would pass the limit is not run either: it is reported as
    time-limited (projected) instead of spending the whole limit to find out.
    """
    search = SearchResult(template.loss, template.provider, template.d, template.dtype, template.mode, budget)
    n = start
    while True:
        if n > max_n:
            search.stop, search.stop_reason = "max-n", f"reached --search-max {max_n}"
            break
        if not hard_budget:
            projected = _project_memory_limit(search.steps, budget)
            if projected is not None and projected < n:
                search.stopped_at_n, search.stop = n, "memory"
                search.stop_reason = f"projected to exceed the budget above N≈{projected} (not run)"
                break
        last_time = search.time_s_at_largest
        if time_limit is not None and last_time is not None and search.largest_n and n > search.largest_n:
            projected_time = last_time * (n / search.largest_n) ** 2
            if projected_time > time_limit and n not in (known or {}):
                search.stopped_at_n, search.stop = n, "time"
                search.stop_reason = (f"projected {projected_time:.0f} s per step (N² × the last), past the "
                                      f"{time_limit:g} s limit; not run")
                break
        result = (known or {}).get(n) or run(Case(**{**asdict(template), "n": n}))
        search.steps.append(result)
        if result["status"] != "ok":
            search.stopped_at_n = n
            search.stop = {"oom": "memory", "time-limited": "time"}.get(result["status"], result["status"])
            search.stop_reason = result.get("reason") or result["status"]
            break
        search.largest_n = n
        search.total_bytes_at_largest = result["total_bytes"]
        search.time_s_at_largest = result["time_s"]
        n *= 2
    if search.stop == "time":
        search.projected_memory_limit_n = _project_memory_limit(search.steps, budget)
    return search
