"""Every kernel and every shipped config compiles for Ampere (sm_80) and Hopper (sm_90), without spills.

Real compilation on this CPU machine: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``,
read by ``ptxas -v`` (spill stores) and ``cuobjdump --dump-resource-usage`` (STACK). The compilation runs in
a subprocess without TRITON_INTERPRET (``compile_table`` handles that), because the interpreter's
``@triton.jit`` objects cannot be compiled (DESIGN §6).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def compile_rows():
    from fastcontrast.kernels.compile_report import compile_table

    return compile_table()


def test_every_kernel_dtype_dim_and_arch_is_compiled(compile_rows):
    from fastcontrast.kernels.compile_report import ARCHS, DTYPES, KERNELS
    from fastcontrast.kernels.configs import COMPILE_DIMS

    seen = {(r["kernel"], r["dtype"], r["d"], r["arch"]) for r in compile_rows}
    expected = {(k, t, d, f"sm_{a}") for k in KERNELS for t in DTYPES for d in COMPILE_DIMS for a in ARCHS}
    assert seen == expected, f"missing: {sorted(expected - seen)}"


def test_no_kernel_spills_registers(compile_rows):
    spilling = [
        f"{r['kernel']} {r['dtype']} d={r['d']} {r['arch']}: {r['spill_stores']} B spill stores, "
        f"{r['spill_loads']} B spill loads, STACK {r['stack']}"
        for r in compile_rows
        if r["spill_stores"] or r["spill_loads"] or r["stack"]
    ]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_shared_memory_fits_the_architecture(compile_rows):
    over = [
        f"{r['kernel']} {r['dtype']} d={r['d']} {r['arch']}: {r['shared_bytes']} B > {r['shared_limit']} B"
        for r in compile_rows
        if r["shared_bytes"] + r["static_shared"] > r["shared_limit"]
    ]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)


def test_register_accumulator_is_used_up_to_d_256_and_fp32_rows_above(compile_rows):
    grads = [r for r in compile_rows if r["kernel"].startswith("gradient") and r["dtype"] != "fp32"]
    for r in grads:
        expected = "registers" if r["d"] <= 256 else "fp32 rows"
        assert r["acc"] == expected, f"{r['kernel']} {r['dtype']} d={r['d']}: accumulator in {r['acc']}"
