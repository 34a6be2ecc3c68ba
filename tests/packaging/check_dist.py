"""Check what `make dist` built: the files in the wheel and the sdist, the metadata, and the build log.

    python tests/packaging/check_dist.py dist [--build-log dist/build.log]

- the build log has no warning (setuptools deprecations, MANIFEST.in patterns that match nothing, …);
- the wheel holds every file of the checkout's ``fastcontrast/`` and ``kernels/`` (the latter as
  ``fastcontrast/kernels/``): modules, subpackages, ``py.typed`` and any data file a module reads, the
  compile table ``fastcontrast/kernels/compile_table.json`` (gpu-check's reference) by name, git or not. A file
  the editable install finds in the source tree but the wheel lacks fails here. Nothing else is installed:
  no top-level ``kernels`` or ``tests``;
- the sdist holds every file of the packages, the test and benchmark suites and the docs, and LICENSE,
  README.md, CHANGELOG.md, pyproject.toml and MANIFEST.in;
- the metadata: SPDX license, LICENSE as license file, the classifiers (all known to PyPI where the
  ``trove-classifiers`` package is installed) and keywords.

"The checkout's files" are those git tracks (``git ls-files``), or every file under those folders outside git.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Folder in the checkout -> where its files go in the wheel.
WHEEL_MAP = {"fastcontrast/": "fastcontrast/", "kernels/": "fastcontrast/kernels/"}
# Data files a module reads at run time: required by name, so that a checkout outside git checks them too.
WHEEL_DATA = ("fastcontrast/py.typed", "fastcontrast/kernels/compile_table.json")
SDIST_FOLDERS = ("fastcontrast/", "kernels/", "tests/", "benchmarks/", "docs/")
SDIST_FILES = ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in")
REQUIRED_CLASSIFIERS = (
    "Environment :: GPU :: NVIDIA CUDA",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
    "Programming Language :: Python :: 3",
)
CACHE = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.hypothesis|\.benchmarks)/|\.py[cod]$")


def checkout_files() -> list[str]:
    if os.path.isdir(os.path.join(ROOT, ".git")) or os.path.isfile(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f and os.path.exists(os.path.join(ROOT, f))]
    else:
        files = []
        for folder in SDIST_FOLDERS:
            for dirpath, _dirs, names in os.walk(os.path.join(ROOT, folder)):
                files += [os.path.relpath(os.path.join(dirpath, n), ROOT).replace(os.sep, "/") for n in names]
        files += [f for f in SDIST_FILES if os.path.exists(os.path.join(ROOT, f))]
    return sorted(f for f in files if not CACHE.search(f))


def check_build_log(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip() for line in f if re.search(r"warn|deprecat", line, re.IGNORECASE)]
    return [f"build log {path}: {line}" for line in lines]


def check_metadata(text: str, where: str) -> list[str]:
    meta = email.parser.Parser().parsestr(text)
    errors = []
    if meta["License-Expression"] != "Apache-2.0":
        errors.append(f"{where}: License-Expression is {meta['License-Expression']!r}, expected 'Apache-2.0'")
    if "LICENSE" not in (meta.get_all("License-File") or []):
        errors.append(f"{where}: License-File LICENSE missing")
    classifiers = meta.get_all("Classifier") or []
    errors += [f"{where}: classifier {c!r} missing" for c in REQUIRED_CLASSIFIERS if c not in classifiers]
    errors += [f"{where}: license classifier {c!r} next to an SPDX License-Expression"
               for c in classifiers if c.startswith("License ::")]
    try:
        from trove_classifiers import classifiers as known
    except ImportError:
        known = None
    if known is not None:
        errors += [f"{where}: unknown classifier {c!r}" for c in classifiers if c not in known]
    if not meta["Keywords"]:
        errors.append(f"{where}: no keywords")
    if not meta["Requires-Python"]:
        errors.append(f"{where}: no Requires-Python")
    return errors


def check_wheel(path: str, tracked: list[str]) -> list[str]:
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        info = [n for n in names if n.endswith(".dist-info/METADATA")]
        errors = check_metadata(wheel.read(info[0]).decode(), os.path.basename(path)) if info else []
    if not info:
        return [f"{path}: no METADATA"]
    dist_info = info[0].split("/")[0]
    expected = set()
    for file in tracked:
        for source, target in WHEEL_MAP.items():
            if file.startswith(source):
                expected.add(target + file[len(source):])
    expected.update(WHEEL_DATA)
    errors += [f"{os.path.basename(path)}: {f} missing" for f in sorted(expected - names)]
    if f"{dist_info}/licenses/LICENSE" not in names:
        errors.append(f"{os.path.basename(path)}: {dist_info}/licenses/LICENSE missing")
    stray = sorted(n for n in names if not n.startswith(("fastcontrast/", dist_info + "/")))
    errors += [f"{os.path.basename(path)}: unexpected file {n} (outside the fastcontrast package)" for n in stray]
    print(f"[dist] {os.path.basename(path)}: {len(names)} files, {len(expected)} from the checkout: "
          f"{'ok' if not errors else 'FAILED'}")
    return errors


def check_sdist(path: str, tracked: list[str]) -> list[str]:
    with tarfile.open(path) as sdist:
        members = sdist.getnames()
        top = members[0].split("/")[0]
        names = {m[len(top) + 1:] for m in members if m.startswith(top + "/")}
        pkg_info = sdist.extractfile(f"{top}/PKG-INFO")
        errors = check_metadata(pkg_info.read().decode(), os.path.basename(path)) if pkg_info else []
    expected = {f for f in tracked if f.startswith(SDIST_FOLDERS) or f in SDIST_FILES}
    errors += [f"{os.path.basename(path)}: {f} missing (MANIFEST.in?)" for f in sorted(expected - names)]
    errors += [f"{os.path.basename(path)}: cache file {n}" for n in sorted(names) if CACHE.search(n)]
    print(f"[dist] {os.path.basename(path)}: {len(names)} entries, {len(expected)} from the checkout: "
          f"{'ok' if not errors else 'FAILED'}")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", help="the folder `python -m build` wrote to")
    parser.add_argument("--build-log", help="the build's output, to be free of warnings")
    args = parser.parse_args()
    wheels = sorted(f for f in os.listdir(args.dist) if f.endswith(".whl"))
    sdists = sorted(f for f in os.listdir(args.dist) if f.endswith(".tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"[dist] expected one wheel and one sdist in {args.dist}, found {wheels + sdists}", file=sys.stderr)
        return 1
    tracked = checkout_files()
    errors = check_build_log(args.build_log) if args.build_log else []
    errors += check_wheel(os.path.join(args.dist, wheels[0]), tracked)
    errors += check_sdist(os.path.join(args.dist, sdists[0]), tracked)
    for error in errors:
        print(f"[dist] FAILED {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
