"""Check that an installed fastcontrast extra delivers what it declares.

    python check_extra.py test [--interpreter] [--includes EXTRA...]

For every ``Requires-Dist: …; extra == "NAME"`` of the installed fastcontrast: the distribution is installed,
its version satisfies the requirement, and its top-level module imports. ``--includes test bench`` also
checks that every requirement of those extras is one of NAME's, with the same version specifier (``[dev]``
is meant to be everything the others give a developer). ``--interpreter`` sets
TRITON_INTERPRET=1 first, as the test suite does on CPU, so that importing triton also loads its interpreter
(which needs numpy, a dependency triton does not declare).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
except ImportError:  # an extra that does not bring packaging: use pip's copy (pip is in every venv)
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]


def normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def requirements_of(extra: str) -> list:
    dist = importlib.metadata.distribution("fastcontrast")
    declared = dist.metadata.get_all("Provides-Extra") or []
    if extra not in declared:
        raise SystemExit(f"fastcontrast declares no extra {extra!r} (it declares {', '.join(declared)})")
    found = []
    for line in dist.requires or ():
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker):
            continue
        if Marker(str(req.marker)).evaluate({"extra": extra}):
            found.append(req)
    if not found:
        raise SystemExit(f"extra {extra!r} declares no requirements")
    return found


def modules_of(dist_name: str) -> list[str]:
    """Top-level import names of an installed distribution: the one named like it, else all public ones."""
    by_module = importlib.metadata.packages_distributions()
    modules = sorted(m for m, dists in by_module.items() if normalize(dist_name) in map(normalize, dists))
    same = [m for m in modules if normalize(m) == normalize(dist_name)]
    return same or [m for m in modules if not m.startswith("_")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra")
    parser.add_argument("--interpreter", action="store_true", help="set TRITON_INTERPRET=1 before importing")
    parser.add_argument("--includes", nargs="+", default=[], metavar="EXTRA",
                        help="extras whose every requirement this one must declare too")
    args = parser.parse_args()
    if args.interpreter:
        os.environ["TRITON_INTERPRET"] = "1"
    failures = []
    declared = {(normalize(r.name), str(r.specifier)) for r in requirements_of(args.extra)}
    for other in args.includes:
        for req in requirements_of(other):
            if (normalize(req.name), str(req.specifier)) not in declared:
                failures.append(f"{req.name}{req.specifier} of [{other}] is not in [{args.extra}]")
    if args.includes and not failures:
        print(f"[extra {args.extra}] declares every requirement of {', '.join(args.includes)}", flush=True)
    for req in requirements_of(args.extra):
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            failures.append(f"{req.name}{req.specifier}: not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            failures.append(f"{req.name}{req.specifier}: {version} installed")
            continue
        modules = modules_of(req.name)
        if not modules:
            failures.append(f"{req.name}{req.specifier}: {version} installed but provides no importable module")
            continue
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - any import failure is the finding
                failures.append(f"{req.name}{req.specifier}: `import {module}` failed: {type(exc).__name__}: {exc}")
                break
        else:
            print(f"[extra {args.extra}] {req.name}{req.specifier}: {version}, import {', '.join(modules)}: ok",
                  flush=True)
    for failure in failures:
        print(f"[extra {args.extra}] FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
