"""``python -m fastcontrast info``: versions, devices, and which backend ``"auto"`` picks and why.

``--kernels`` adds the compile table of every kernel variant the engine can launch, compiled for sm_80, sm_90,
sm_100, gfx90a and gfx942 on this machine (no GPU needed; :mod:`fastcontrast.kernels.aot`): registers, spill
stores, stack, shared memory, and on sm_90 the wgmma shapes and ``cp.async`` count. ``--json FILE`` writes it
as JSON (one row per binary), ``--markdown`` prints it as the table of docs/kernels.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

# The compile table's JSON header: what it was made with, so a stale one can be told apart.
TABLE_FORMAT = 1


def kernel_sources_digest() -> str:
    """A digest of the kernel sources: the compile table is current only for the sources it was made from."""
    import hashlib

    import fastcontrast.kernels

    folder = os.path.dirname(fastcontrast.kernels.__file__)
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def compile_table_document(archs=None) -> dict:
    """The compile table with its header (triton version, kernel digest), as written by ``--json``."""
    from fastcontrast.kernels import aot
    from fastcontrast.tools.bench.cases import package_version

    rows = aot.compile_table(archs=archs or aot.ARCHS)
    return {"format": TABLE_FORMAT, "triton": package_version("triton"), "kernels_digest": kernel_sources_digest(),
            "archs": list(archs or aot.ARCHS), "rows": rows}


def info_cli(args) -> int:
    """Print the report; returns 0, or 1 when ``--kernels`` was asked for and the table cannot be made."""
    import fastcontrast
    from fastcontrast._dispatch import ENV_BACKEND, auto_backend, triton_import_error
    from fastcontrast.tools.bench.cases import device_name, package_version

    # With --markdown the table alone goes to stdout (docs/kernels.md is made from it).
    out = sys.stderr if args.kernels and args.markdown else sys.stdout
    print("fastcontrast", file=out)
    print(f"  {'version':<22} {fastcontrast.__version__}", file=out)
    print(f"  {'location':<22} {os.path.dirname(fastcontrast.__file__)}", file=out)
    print("software", file=out)
    print(f"  {'python':<22} {platform.python_version()} ({sys.executable})", file=out)
    print(f"  {'platform':<22} {platform.platform()}", file=out)
    print(f"  {'torch':<22} {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}, "
          f"ROCm build: {torch.version.hip or 'none'})", file=out)
    triton_version = package_version("triton")
    if triton_version is None:
        print(f"  {'triton':<22} not installed (pip install 'fastcontrast[triton]' for the fused kernels)", file=out)
    else:
        error = triton_import_error()
        print(f"  {'triton':<22} {triton_version}" + ("" if error is None else f" (does not import: {error})"),
              file=out)
    print("environment", file=out)
    print(f"  {ENV_BACKEND:<22} {os.environ.get(ENV_BACKEND, '(unset)')}", file=out)
    print(f"  {'TRITON_INTERPRET':<22} {os.environ.get('TRITON_INTERPRET', '(unset)')}", file=out)
    print("devices", file=out)
    print(f"  {'cpu':<22} {device_name(torch.device('cpu'))}", file=out)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"  {f'cuda:{index}':<22} {props.name}, sm_{props.major}{props.minor}, "
                  f"{props.total_memory / 2**30:.1f} GiB", file=out)
            devices.append(torch.device("cuda", index))
    else:
        print(f"  {'cuda':<22} not available", file=out)
    print('backend="auto" picks', file=out)
    for device in devices:
        for dtype in ((torch.bfloat16, torch.float64) if device.type == "cuda" else (None,)):
            label = str(device) + ("" if dtype is None else f" {str(dtype).replace('torch.', '')}")
            try:
                backend, reason = auto_backend(device, dtype)
                print(f"  {label:<22} {backend}: {reason}", file=out)
            except ValueError as exc:
                print(f"  {label:<22} error: {exc}", file=out)
    if not args.kernels:
        return 0

    archs = args.arch or None
    print(f"compiling every launchable kernel variant for {', '.join(archs or ('all targets',))} (no GPU "
          "needed; minutes)…", file=sys.stderr, flush=True)
    try:
        from fastcontrast.kernels import aot

        document = compile_table_document(archs)
    except Exception as exc:  # noqa: BLE001 - triton missing, ptxas / cuobjdump missing, a failing compile, …
        print(f"  cannot build the kernel table: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print(f"wrote {args.json} ({len(document['rows'])} binaries)", file=sys.stderr)
    if args.markdown or not args.json:
        print(aot.format_markdown(document["rows"]))
    return 0
