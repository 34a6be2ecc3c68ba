"""The launched Triton binaries against the compile table (``gpu-check``'s "binaries match" check).

The table ships with the package (package data of ``fastcontrast.kernels``); each binary launched in this
process is matched to its row by the key :mod:`fastcontrast.kernels.aot` gives it, and a spill, registers or
shared memory other than the table's, or a binary the table does not hold, fails.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Optional

# The modules that define the @triton.jit kernels (the launchers import them from there).
KERNEL_MODULES = ("lse_forward", "siglip_forward", "gradient", "panel", "distill", "masked")

TABLE_RESOURCE = ("fastcontrast.kernels", "compile_table.json")


def load_table(path: Optional[str] = None) -> tuple[dict, str]:
    """(the compile table, where it was read): ``path``, or the one installed with the package (package data
    of ``fastcontrast.kernels``, found through importlib.resources, so an installed wheel has it too).

    Raises:
        FileNotFoundError: no table there; ValueError: a table without rows.
    """
    if path is None:
        resource = resources.files(TABLE_RESOURCE[0]) / TABLE_RESOURCE[1]
        where = str(resource)
        if not resource.is_file():
            raise FileNotFoundError(f"the compile table is not installed at {where}: reinstall fastcontrast, or "
                                    "pass --table FILE")
        document = json.loads(resource.read_text(encoding="utf-8"))
    else:
        where = path
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    if not document.get("rows"):
        raise ValueError(f"the compile table {where} has no rows")
    return document, where


def binary_record(kernel, compiled, table_arch: str) -> dict:
    """One launched binary as :func:`compare_with_table` takes it: its resources, and the compile table's
    row key, flags and tile rebuilt from its source exactly as :mod:`fastcontrast.kernels.aot` builds them for
    ``table_arch`` (the key is None, with ``key_error``, where triton's objects differ from what aot expects)."""
    from fastcontrast.kernels import aot

    metadata = compiled.metadata
    record = {"kernel": kernel.fn.__name__, "registers": compiled.n_regs, "spills": compiled.n_spills,
              "shared": int(metadata.shared), "warps": metadata.num_warps, "stages": metadata.num_stages,
              "key": None, "constexprs": None, "block": None}
    try:
        source = compiled.src
        variant = aot.Variant(kernel, table_arch, dict(source.signature), dict(source.constants), dict(source.attrs),
                              metadata, dtype="", precision="")
        record.update(key=variant.digest(), constexprs=variant.flags(), block=variant.tile())
    except Exception as exc:  # noqa: BLE001 - a binary that cannot be placed is reported as not in the table
        record["key_error"] = f"{type(exc).__name__}: {exc}"
    return record


def launched_binaries(table_arch: str) -> list[dict]:
    """Every binary the Triton engine has launched in this process, from triton's in-memory cache of each
    ``@triton.jit`` kernel of :data:`KERNEL_MODULES`."""
    import importlib

    from triton.runtime.jit import JITFunction

    kernels: dict = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"fastcontrast.kernels.{module_name}")
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and isinstance(kernel, JITFunction):
                kernels.setdefault(id(kernel), kernel)
    records = []
    for kernel in kernels.values():
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                compiled._init_handles()
                records.append(binary_record(kernel, compiled, table_arch))
    return records


def compare_with_table(launched: list[dict], rows: list[dict], table_arch: str) -> dict:
    """The "binaries match" verdict: each launched binary (:func:`binary_record`) against the compile table's
    row for ``table_arch`` with the same key (else, the rows with the same kernel, flags, tile, warps and
    stages). Fails on a spill, on registers or shared memory other than the table's, and on a binary the table
    does not hold: each of those is a binary nobody compiled and checked as it runs here.
    """
    here = [row for row in rows if row["arch"] == table_arch]
    by_key = {row["key"]: row for row in here}
    by_shape: dict = {}
    for row in here:
        shape = (row["kernel"], row["constexprs"], row["block"], row["warps"], row["stages"])
        by_shape.setdefault(shape, []).append(row)
    spilling, mismatched, not_in_table = [], [], []
    for binary in launched:
        if binary["spills"]:
            spilling.append(binary)
        shape = (binary["kernel"], binary["constexprs"], binary["block"], binary["warps"], binary["stages"])
        candidates = [by_key[binary["key"]]] if binary.get("key") in by_key else by_shape.get(shape, [])
        if not candidates:
            not_in_table.append({k: binary.get(k) for k in ("kernel", "key", "constexprs", "block", "key_error")
                                 if binary.get(k) is not None})
        elif not any(r["registers"] == binary["registers"] and r["shared"] == binary["shared"] for r in candidates):
            mismatched.append({"kernel": binary["kernel"], "key": binary.get("key"), "constexprs": binary["constexprs"],
                               "registers": binary["registers"],
                               "table_registers": sorted({r["registers"] for r in candidates}),
                               "shared": binary["shared"], "table_shared": sorted({r["shared"] for r in candidates})})
    failed = bool(spilling or mismatched or not_in_table)
    return {"status": "fail" if failed else "ok", "binaries": len(launched), "table_arch": table_arch,
            "spilling": spilling[:10], "differing_from_table": mismatched[:10], "not_in_table": not_in_table[:10]}
