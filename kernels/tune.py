"""Offline choice of the config tables: for each kernel, target family and precision, the first candidate
tile (largest first) whose hardest launch variants compile without spills, stack or excess shared memory.

    python -m fastcontrast.kernels.tune [--families hopper ampere ...] [--top 3]

It prints the tables for ``kernels/configs.py``. No GPU is needed: the variants come from the launchers
(:func:`fastcontrast.kernels.aot.variants`) with their tile constexprs and warps replaced by each candidate's,
and are compiled for the family's architectures. The hardest variants of a kernel are the ones with the most
flags on (argmax, column partials, positives, masks); by default every variant of a group is compiled per
candidate (``--top N``: only the N most-flagged, a quick first pass that the compile checks may then
refute). The full compile checks (``tests/kernels/test_kernels_compile.py``) confirm every variant.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys

FAMILY_ARCHS = {"ampere": ("sm_80",), "hopper": ("sm_90",), "blackwell": ("sm_100",), "amd": ("gfx90a", "gfx942")}
KERNEL_TABLES = {
    "lse_forward_kernel": "_FORWARD", "siglip_forward_kernel": "_SIGLIP_FORWARD", "ds_panel_kernel": "_DS_PANEL",
    "gradient_kernel": "_GRADIENT", "panel_matmul_kernel": "_PANEL_MATMUL",
    "distill_forward_kernel": "_DISTILL_FORWARD", "distill_gradient_kernel": "_DISTILL_GRADIENT",
    "distill_panel_kernel": "_DISTILL_PANEL",
}
# (BLOCK_M, BLOCK_N, warps, stages), most preferred first; BLOCK_D stays the variant's.
CANDIDATES = {
    "half": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
             (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
    "fp32": [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2), (32, 64, 8, 2), (32, 64, 8, 1),
             (32, 32, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1), (16, 32, 4, 1)],
}
# wgmma wants 64-row tiles per warpgroup and an instruction N ≥ 64 on Hopper: no smaller 16-bit tiles there.
HOPPER_HALF_MIN = (64, 64)


def _with_config(variant, block_m: int, block_n: int, warps: int, stages: int):
    names = list(variant.signature)
    constexprs = dict(variant.constexprs)
    for path in constexprs:
        if names[path[0]] == "BLOCK_M":
            constexprs[path] = block_m
        elif names[path[0]] == "BLOCK_N":
            constexprs[path] = block_n
    options = dataclasses.replace(variant.options, num_warps=warps, num_stages=stages)
    return dataclasses.replace(variant, constexprs=constexprs, options=options)


def _passes(row: dict) -> bool:
    """The compile checks' criteria: no spill, no stack, shared memory within the limit, and on sm_90 no
    16-bit wgmma narrower than N = 64 (tests/kernels/test_kernels_compile.py)."""
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        return False
    if row["shared"] + row["static_shared"] > row["shared_limit"]:
        return False
    narrow = [s for s in row["wgmma"] if int(s.split("n")[1].split("k")[0]) < HOPPER_HALF_MIN[1]]
    return not (row["arch"] == "sm_90" and row["dtype"] != "fp32" and narrow)


def tune(families, top: int) -> dict:
    """{(table, family, precision, BLOCK_D): (BLOCK_M, BLOCK_N, warps, stages) or None} for the variants."""
    from fastcontrast.kernels import aot

    chosen = {}
    for family in families:
        groups = collections.defaultdict(list)
        for variant in aot.variants(archs=FAMILY_ARCHS[family]):
            precision = "fp32" if variant.dtype == "fp32" else "half"
            block_d = dict(zip(variant.signature, [None] * len(variant.signature)))
            names = list(variant.signature)
            block_d = next(v for p, v in variant.constexprs.items() if names[p[0]] == "BLOCK_D")
            groups[(KERNEL_TABLES[variant.name], family, precision, block_d)].append(variant)
        for key, members in sorted(groups.items()):
            members.sort(key=lambda v: -len([f for f in v.flags().split() if not f.startswith("none:")]))
            # The flag count is a heuristic for difficulty, and a poor one (TF32 and mask variants spill
            # where the most-flagged one does not): by default every member is compiled.
            hardest = members if top <= 0 else members[:top] + [m for m in members if m.dtype != members[0].dtype][:1]
            chosen[key] = None
            for block_m, block_n, warps, stages in CANDIDATES[key[2]]:
                if family in ("hopper", "blackwell") and key[2] == "half" and (block_m, block_n) < HOPPER_HALF_MIN:
                    continue
                trial = [_with_config(v, block_m, block_n, warps, stages) for v in hardest]
                rows = aot.compile_variants(trial)
                if all(_passes(r) for r in rows):
                    chosen[key] = (block_m, block_n, warps, stages)
                    break
            print(key, "->", chosen[key], file=sys.stderr, flush=True)
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcontrast.kernels.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILY_ARCHS), choices=list(FAMILY_ARCHS))
    parser.add_argument("--top", type=int, default=0,
                        help="compile only the N most-flagged variants per candidate (a quick first pass); "
                        "0 (default): all of them")
    args = parser.parse_args(argv)
    for key, value in sorted(tune(args.families, args.top).items(), key=str):
        print(key, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
