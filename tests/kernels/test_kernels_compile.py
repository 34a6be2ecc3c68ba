"""Every kernel binary the engine can launch compiles for sm_80, sm_90, sm_100, gfx90a and gfx942: no spills,
no stack, shared memory within the part's limit, and on Hopper the instructions the configs were chosen for.

The full compile of the ~2700 binaries takes about 40 minutes on 2 cores, so it is committed
(``kernels/compile_table.json``, package data, made by ``python -m fastcontrast info --kernels --json
kernels/compile_table.json --update-doc docs/kernels.md``) and checked here three ways:

- it is current: made with the installed triton, from the kernel sources as they are now (digest), and its
  binaries are exactly the ones the launchers produce today (every variant's key, re-derived from the engine
  in a subprocess without TRITON_INTERPRET: docs/numerics.md#testing-gpu-code-on-a-cpu);
- every row passes the resource checks;
- a sample (the binary with the most flags on, per kernel and backend, plus the fused gradient on every
  architecture) is compiled again here and must give the committed numbers, so the table cannot drift from
  what triton really builds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcontrast.tools import info

pytestmark = pytest.mark.compile

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "kernels" / "compile_table.json"
KERNELS_DOC = ROOT / "docs" / "kernels.md"
REGENERATE = ("regenerate it: python -m fastcontrast info --kernels --json kernels/compile_table.json "
              "--update-doc docs/kernels.md (about 40 minutes on 2 cores)")
# The numbers a recompile must reproduce exactly.
MEASURED = ("registers", "spill_stores", "spill_loads", "stack", "shared", "static_shared", "wgmma", "cp_async",
            "sgprs", "vgpr_spills", "sgpr_spills")


@pytest.fixture(scope="module")
def document():
    with open(TABLE) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def rows(document):
    return document["rows"]


def _triton_version():
    from fastcontrast.tools.bench.cases import package_version

    return package_version("triton")


def _hardness(row):
    return (len([f for f in row["constexprs"].split() if not f.startswith("none:")]), row["registers"])


def _sample(rows):
    """Per kernel, the hardest binary on NVIDIA (sm_90) and on AMD (gfx90a: the fewest registers and LDS);
    and the fused gradient's hardest on every architecture."""
    best = {}
    for row in rows:
        if row["arch"] in ("sm_90", "gfx90a") or row["kernel"] == "gradient_kernel":
            group = (row["kernel"], row["arch"])
            if group not in best or _hardness(row) > _hardness(best[group]):
                best[group] = row
    return [best[group] for group in sorted(best)]


@pytest.fixture(scope="module")
def rebuilt(rows):
    """The launchers' variant keys and the sample compiled anew, from a process without TRITON_INTERPRET."""
    if _triton_version() != json.load(open(TABLE))["triton"]:
        pytest.skip("the committed table is for another triton; the staleness test says which")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"sample": [r["key"] for r in _sample(rows)]})
    result = subprocess.run([sys.executable, "-m", "fastcontrast.kernels.aot", spec], capture_output=True, text=True,
                            env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_table_was_made_with_this_triton_and_these_kernel_sources(document):
    assert document["format"] == info.TABLE_FORMAT
    assert document["triton"] == _triton_version(), f"table made with triton {document['triton']}; {REGENERATE}"
    assert document["kernels_digest"] == info.kernel_sources_digest(), f"the kernel sources changed; {REGENERATE}"
    assert document["archs"] == ["sm_80", "sm_90", "sm_100", "gfx90a", "gfx942"]
    from fastcontrast.kernels.aot import DIMS, DTYPES

    assert document["dtypes"] == list(DTYPES) and document["dims"] == list(DIMS)


def test_the_table_holds_exactly_the_binaries_the_launchers_produce(rows, rebuilt):
    committed = {r["key"] for r in rows}
    assert len(committed) == len(rows), "duplicate rows"
    launched = set(rebuilt["keys"])
    assert committed == launched, (
        f"{len(launched - committed)} launchable binaries missing from the table, {len(committed - launched)} "
        f"no longer launched; {REGENERATE}"
    )


def test_a_recompiled_sample_gives_the_committed_numbers(rows, rebuilt):
    committed = {r["key"]: r for r in rows}
    assert len(rebuilt["rows"]) == len(_sample(rows))
    for row in rebuilt["rows"]:
        expected = committed[row["key"]]
        differing = {k: (expected[k], row[k]) for k in MEASURED if k in row and row[k] != expected.get(k)}
        assert not differing, f"{row['kernel']} {row['arch']} {row['constexprs']}: committed vs now {differing}"


def test_no_binary_spills_or_uses_a_stack(rows):
    bad = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['block']} {r['constexprs']}: spill stores "
           f"{r['spill_stores']}, loads {r['spill_loads']}, stack {r['stack']}"
           for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not bad, "spills:\n" + "\n".join(bad[:20])


def test_shared_memory_fits_every_architecture(rows):
    over = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['block']}: {r['shared'] + r['static_shared']} B > "
            f"{r['shared_limit']} B" for r in rows if r["shared"] + r["static_shared"] > r["shared_limit"]]
    assert not over, "\n".join(over[:20])


def test_every_kernel_compiles_for_every_architecture_and_dtype(rows):
    from fastcontrast.kernels.tune import KERNEL_TABLES

    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    expected = {(k, a, t) for k in KERNEL_TABLES for a in ("sm_80", "sm_90", "sm_100", "gfx90a", "gfx942")
                for t in ("fp16", "bf16", "fp32")}
    assert expected <= seen, f"never compiled: {sorted(expected - seen)}"


def _computes_s_tile(row) -> bool:
    # A dS kernel with neither LSE (only the positives' gradients, e.g. the memory bank's keys) needs no S tile:
    # triton drops that dot (ds_panel_kernel then has none; gradient_kernel keeps its dS·Y).
    if row["kernel"] in ("ds_panel_kernel", "gradient_kernel") and "MODE=0" in row["constexprs"]:
        absent = row["constexprs"].split("none:")[-1].split(",") if "none:" in row["constexprs"] else []
        lse = ("LSE_ROW", "LSE_COL") if row["kernel"] == "ds_panel_kernel" else ("LSE_X", "LSE_Y")
        return not all(name in absent for name in lse)
    return True


def test_hopper_16_bit_dots_run_on_wgmma_at_least_64_wide(rows):
    # wgmma's N is the tile's N per warpgroup; below 64 the instruction wastes most of its issue rate (and the
    # configs were chosen to avoid it, kernels/configs.py).
    half = [r for r in rows if r["arch"] == "sm_90" and r["dtype"] in ("fp16", "bf16") and _computes_s_tile(r)]
    assert len(half) > 100
    narrow = [f"{r['kernel']} {r['block']} {r['constexprs']}: {r['wgmma']}" for r in half
              if not r["wgmma"] or any(int(s.split("n")[1].split("k")[0]) < 64 for s in r["wgmma"])]
    assert not narrow, "16-bit sm_90 binaries without wgmma N ≥ 64:\n" + "\n".join(narrow[:20])


def test_the_work_models_instruction_shapes_are_the_compiled_ones(rows):
    # python -m fastcontrast model rates each kernel's tensor-core time by its narrowest wgmma N, derived from
    # the tile and warps (tools/model.py); here that rule is held to the PTX of every 16-bit sm_90 binary.
    from fastcontrast.tools.model import wgmma_n

    wrong = []
    for r in rows:
        if r["arch"] != "sm_90" or r["dtype"] == "fp32" or not r["wgmma"]:
            continue
        block_m, block_n, block_d = (int(x) for x in r["block"].split("x"))
        kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d}
        compiled = min(int(s.split("n")[1].split("k")[0]) for s in r["wgmma"])
        modelled = wgmma_n(r["kernel"], kwargs, r["warps"])
        # Without the S tile's dot, the model's narrower guess only makes it pessimistic.
        if modelled != compiled and (_computes_s_tile(r) or modelled > compiled):
            wrong.append(f"{r['kernel']} {r['block']} warps={r['warps']}: model {modelled}, PTX {r['wgmma']}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_pipelined_16_bit_nvidia_binaries_prefetch_with_cp_async(rows):
    # num_stages ≥ 2 exists to overlap the next tiles' loads with the dots: the PTX must show cp.async. (fp32
    # kernels are left out: triton pipelines their IEEE dots on the CUDA cores differently.)
    unpipelined = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['block']} stages={r['stages']} {r['constexprs']}"
                   for r in rows if r["arch"].startswith("sm_") and r["dtype"] != "fp32" and r["stages"] >= 2
                   and _computes_s_tile(r) and r["cp_async"] == 0]
    assert not unpipelined, "stages ≥ 2 without cp.async:\n" + "\n".join(unpipelined[:20])


def test_docs_kernels_md_shows_this_tables_summary(document):
    text = KERNELS_DOC.read_text()
    start, end = info.DOC_MARKERS
    assert start in text and end in text, f"docs/kernels.md lacks the compile-table markers; {REGENERATE}"
    shown = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == info.summary_section(document).strip(), f"docs/kernels.md's summary is stale; {REGENERATE}"


# gpu-check matches each launched binary to its table row by a key rebuilt from triton's compiled kernel
# (its source's signature, constants and attrs, its metadata's warps and stages): one binary compiled here
# exactly as a launch would compile it must get its committed row's key, flags, tile and shared memory.
_REBUILD_KEY = """
import json, triton
from triton.compiler import ASTSource
from fastcontrast.kernels import aot
from fastcontrast.tools import binaries
variant = next(v for v in aot.variants(archs=["sm_80"], dtypes=["bf16"], dims=[48]) if v.name == "gradient_kernel")
source = ASTSource(fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs, attrs=variant.attrs)
compiled = triton.compile(source, target=aot.target_of("sm_80"), options=variant.options.__dict__)
compiled.n_regs, compiled.n_spills = -1, 0  # the driver sets these when a GPU loads the binary
print(json.dumps({"digest": variant.digest(), "record": binaries.binary_record(variant.kernel, compiled, "sm_80")}))
"""


def test_gpu_check_rebuilds_the_table_row_key_of_a_compiled_binary(rows):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _REBUILD_KEY], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    record = answer["record"]
    assert "key_error" not in record, record["key_error"]
    assert record["key"] == answer["digest"], f"gpu-check's key {record['key']} != aot's {answer['digest']}"
    row = {r["key"]: r for r in rows}.get(record["key"])
    assert row is not None, f"the rebuilt key {record['key']} is not in the compile table"
    for field in ("kernel", "constexprs", "block", "warps", "stages", "shared"):
        assert record[field] == row[field], f"{field}: gpu-check read {record[field]!r}, the table has {row[field]!r}"
