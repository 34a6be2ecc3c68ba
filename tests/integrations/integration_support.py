"""Shared setup of the integration tests (imported by conftest.py, so it runs before any test module here).

open_clip and lightly import torchvision at package import, and no CPU torchvision build matches the pinned
torch on the CI machines. When a real torchvision cannot be imported, the test-only stub in ``stubs/`` goes
on ``sys.path`` here (and on ``PYTHONPATH`` of the trainer subprocesses, see ``STUB_PYTHONPATH``). A
working torchvision is always preferred. fastcontrast itself never sees the stub.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

STUBS = Path(__file__).parent / "stubs"


def _real_torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    # A torchvision built for another torch fails at import (its C++ ops do not register); try it in a child
    # process so that a half-finished import cannot leave this one in a broken state.
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120)
    return probe.returncode == 0


def _install_torchvision_stub() -> Optional[str]:
    if _real_torchvision_imports():
        return None
    sys.path.insert(0, str(STUBS))
    return str(STUBS)


#: The directory to prepend to a subprocess's PYTHONPATH, or None when a real torchvision works.
STUB_PYTHONPATH = _install_torchvision_stub()


def subprocess_env() -> dict:
    """Environment for a trainer subprocess: this one, plus the torchvision stub when it is needed.

    ``TRITON_INTERPRET`` (set by tests/conftest.py for the kernel tests) is removed, so the trainer runs as
    a user's would.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if STUB_PYTHONPATH is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (STUB_PYTHONPATH, env.get("PYTHONPATH")) if p)
    return env
