"""``python -m fastcontrast info``: versions, devices, and which backend ``"auto"`` picks and why.

``--kernels`` adds the Triton compile table from :func:`fastcontrast.kernels.compile_report.compile_table`
(registers, shared memory, spills for sm_80 / sm_90; no GPU needed). That function compiles in a process
without ``TRITON_INTERPRET=1`` by itself (DESIGN §6): under the interpreter ``@triton.jit`` returns an
object ``triton.compile`` cannot take.
"""

from __future__ import annotations

import os
import platform
import sys

import torch


def _line(label: str, value: object) -> None:
    print(f"  {label:<22} {value}")


def info_cli(args) -> int:
    """Print the report; returns 0, or 1 when ``--kernels`` was asked for and the table cannot be made."""
    import fastcontrast
    from fastcontrast._bench import device_name, package_version
    from fastcontrast._dispatch import ENV_BACKEND, auto_backend, triton_import_error

    print("fastcontrast")
    _line("version", fastcontrast.__version__)
    _line("location", os.path.dirname(fastcontrast.__file__))
    print("software")
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("platform", platform.platform())
    _line("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    triton_version = package_version("triton")
    if triton_version is None:
        _line("triton", "not installed (pip install 'fastcontrast[triton]' for the fused kernels)")
    else:
        error = triton_import_error()
        _line("triton", triton_version + ("" if error is None else f" (does not import: {error})"))
    print("environment")
    _line(ENV_BACKEND, os.environ.get(ENV_BACKEND, "(unset)"))
    _line("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "(unset)"))
    print("devices")
    _line("cpu", device_name(torch.device("cpu")))
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            _line(f"cuda:{index}", f"{props.name}, sm_{props.major}{props.minor}, "
                  f"{props.total_memory / 2**30:.1f} GiB")
            devices.append(torch.device("cuda", index))
    else:
        _line("cuda", "not available")
    print('backend="auto" picks')
    for device in devices:
        try:
            backend, reason = auto_backend(device)
            _line(str(device), f"{backend}: {reason}")
        except ValueError as exc:
            _line(str(device), f"error: {exc}")
    if not args.kernels:
        return 0

    print("Triton kernels compiled for sm_80 / sm_90 (no GPU needed)")
    try:
        from fastcontrast.kernels.compile_report import compile_table, format_table
    except Exception as exc:  # ImportError, or a broken triton raising anything else
        print(f"  cannot build the kernel table: importing fastcontrast.kernels.compile_report failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        rows = compile_table()
    except Exception as exc:  # noqa: BLE001 - ptxas/cuobjdump missing, a kernel that fails to compile, …
        print(f"  kernel compilation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0
