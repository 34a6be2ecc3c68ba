"""Record one loss step's launches without the work model's code: ``python record_step.py LOSS D N``.

Prints JSON: the Triton launches by kernel name, as :func:`fastcontrast.kernels.launches.recorded_launches`
sees them, and the torch ops by aten name, as ``torch.profiler`` sees them (not a dispatch mode, as the
model uses), split into those inside the engines' custom ops (``fastcontrast::*``) and those around them.
A torch op is counted where it would launch on a GPU: not a view or an allocation, and not a composite op
(``aten::to``), whose decomposition is counted instead. ``tests/kernels/test_work_model.py`` compares this
with ``python -m fastcontrast model --json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import torch

# Ops that launch nothing: views and allocations.
NO_LAUNCH = {"view", "_unsafe_view", "t", "transpose", "expand", "detach", "alias", "select", "slice", "unsqueeze",
             "squeeze", "permute", "as_strided", "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh",
             "_reshape_alias", "resize_", "detach_"}


def _composite(name: str) -> bool:
    """Whether every overload of aten op ``name`` (a profiler name has no overload) decomposes into others."""
    packet = getattr(torch.ops.aten, name[len("aten::"):], None)
    if packet is None:
        return False
    kinds = []
    for overload in packet.overloads():
        try:  # TorchScript-only overloads (to.prim_Device) are not in the dispatcher
            kinds.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                getattr(packet, overload).name(), "CompositeImplicitAutograd"))
        except RuntimeError:
            continue
    return bool(kinds) and all(kinds)


def main(loss: str, d: int, n: int) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, by the imports below
    from fastcontrast.kernels.configs import assume_target
    from fastcontrast.kernels.launches import recorded_launches, without_storage
    from torch.profiler import ProfilerActivity, profile

    from fastcontrast.tools import model
    from fastcontrast.tools.bench.meters import pin_malloc_mmap_threshold

    pin_malloc_mmap_threshold()
    a, b = model._inputs(loss, n, d)
    with assume_target(("cuda", 90)), recorded_launches(without_storage) as launches, \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        model._run_loss(loss, a, b, "triton")
    inside, outside = Counter(), Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        short = event.name[len("aten::"):]
        if short in NO_LAUNCH or _composite(event.name):
            continue
        parent, engine = event.cpu_parent, False
        counted = True
        while parent is not None:
            if parent.name.startswith("fastcontrast::"):
                engine = True
                break
            if parent.name.startswith("aten::") and not _composite(parent.name):
                counted = False  # an op called by another op: part of that one's launch
                break
            parent = parent.cpu_parent
        if counted:
            (inside if engine else outside)[short] += 1
    return {"triton": dict(Counter(launch.name for launch in launches)), "torch_inside": dict(inside),
            "torch_outside": dict(outside)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
