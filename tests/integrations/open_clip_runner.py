"""Subprocess entry for the open_clip training tests: run open_clip's real trainer and record every loss call.

    python open_clip_runner.py JOB.json      # {"prefix": ..., "via": "open_clip" | "fastcontrast", "argv": [...]}

``open_clip`` runs ``open_clip_train.main.main`` unpatched; ``fastcontrast`` runs
``python -m fastcontrast.open_clip_train``'s ``main`` (which patches, then calls the same function). Every
forward of the loss module is recorded through a global module forward hook — the trainer itself is not
touched — as the loss class, each output term's exact fp32 value (``.item()``, so no rounding from
open_clip's 5-digit log lines) and the logit scale it was given. Each rank writes ``<prefix>.rank<R>.json``.
The trainer's arguments come in a file because torchrun's own parser rejects some of them even after the
script name (``--logs`` is an "ambiguous option" for it: ``--logs-specs``).

One CPU workaround, test-side only: open_clip_train wraps the model in
``DistributedDataParallel(model, device_ids=[device])`` even when the device is the CPU, which torch rejects
("device_ids ... only work with ... GPU modules"). For CPU runs, ``device_ids`` is dropped here before DDP
sees it; on GPUs nothing changes.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.nn.modules.module import register_module_forward_hook

# CachedCaptionCoCaLoss: what --fastcontrast-grad-cache calls in place of a CoCaLoss (it wraps one, as .loss).
LOSS_CLASS_NAMES = {"ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss", "CachedCaptionCoCaLoss"}


class CpuFriendlyDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    prefix, via, argv = job["prefix"], job["via"], job["argv"]
    records = []

    def record(module, args, kwargs, output):
        cls = type(module)
        if cls.__name__ not in LOSS_CLASS_NAMES:
            return
        terms = output if isinstance(output, dict) else {"loss": output}
        records.append({
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "mro": [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__],
            "backend": getattr(module, "backend", None),
            "chunk_bytes": getattr(module, "chunk_bytes", None),
            "wraps": [f"{c.__module__}.{c.__qualname__}" for c in type(getattr(module, "loss", None)).__mro__]
            if isinstance(getattr(module, "loss", None), torch.nn.Module) else None,
            "terms": {name: float(value.item()) for name, value in terms.items()},
            # open_clip_train calls its loss with keyword arguments only (loss(**model_out, output_dict=True)).
            "logit_scale": float(kwargs["logit_scale"]) if "logit_scale" in kwargs else None,
        })

    register_module_forward_hook(record, with_kwargs=True)
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP

    if via == "open_clip":
        from open_clip_train.main import main as train

        status = train(argv)
    elif via == "fastcontrast":
        from fastcontrast.open_clip_train import main as train

        status = train(argv)
    else:
        raise SystemExit(f"unknown runner {via!r}")

    rank = int(os.environ.get("RANK", "0"))
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump({"status": status, "records": records}, f)
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
