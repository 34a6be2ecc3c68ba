"""How far fastcontrast's loss *values* are from the originals', measured (docs/numerics.md quotes the maxima).

The originals compute a row's loss as ``log Σ exp(x − max) − (positive − max)`` over a materialised logits
matrix; fastcontrast stores each row's log-sum-exp as one fp32 number and subtracts the positive from it, so
the two differ in the last bits of the LSE. This script measures that difference, in fp32, on random unit
features whose positives are correlated:

- lightly 1.6 ``NTXentLoss(memory_bank_size=(K, D))`` at τ = 0.1 and 0.01 (logits up to 1/τ = 100);
- lightly 1.6 ``NTXentLoss`` without a bank at τ = 0.5 and 0.1;
- open_clip 3.x ``ClipLoss`` at logit scale 100 (its clamp) and 1/0.07 (its initial value).

Each case runs every seed at every batch size of ``--rows`` (1 row is where no mean over rows averages the
rounding away) and every positive-pair noise of ``--noise`` (0.05: nearly separable, small losses; 0.5: hard).

    .venv/bin/python benchmarks/measure_loss_value_difference.py [--seeds 20] [--backend torch triton]

``--backend triton`` runs the kernels in triton's interpreter on CPU (``TRITON_INTERPRET=1`` is set here when
CUDA is absent). It prints one line per case: the largest |fastcontrast − original| over all runs, the loss
value there, and that difference in units of the fp32 ulp of the loss. Needs lightly and open_clip; when
torchvision does not import, the test suite's torchvision stub is put on ``sys.path`` (both import it at
package import, and no loss here uses it).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prepare_imports() -> None:
    if importlib.util.find_spec("torch") and not _cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.path.insert(0, str(ROOT / "tests" / "integrations" / "stubs"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _unit_pair(rows: int, dim: int, noise: float, generator):
    import torch
    import torch.nn.functional as F

    a = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    b = F.normalize(a + noise * torch.randn(rows, dim, generator=generator), dim=-1)
    return a, b


def _ulp(value: float) -> float:
    import math

    import torch

    x = torch.tensor(abs(value), dtype=torch.float32)
    return float(torch.nextafter(x, torch.tensor(math.inf)) - x)


def measure(seeds: int, backend: str, rows_list: list, noises: list, dim: int, bank: int) -> list[dict]:
    import lightly.loss as lightly_loss
    import open_clip
    import torch

    import fastcontrast

    cases = []
    for tau in (0.1, 0.01):
        cases.append((f"lightly NTXentLoss, memory bank ({bank}, {dim}), tau={tau}", "bank", tau))
    for tau in (0.5, 0.1):
        cases.append((f"lightly NTXentLoss, no bank, tau={tau}", "ntxent", tau))
    for scale in (100.0, 1 / 0.07):
        cases.append((f"open_clip ClipLoss, logit scale {scale:.4g}", "clip", scale))

    results = []
    for label, kind, parameter in cases:
        worst = {"abs_diff": -1.0}
        for seed, rows, noise in itertools.product(range(seeds), rows_list, noises):
            generator = torch.Generator().manual_seed(seed)
            out0, out1 = _unit_pair(rows, dim, noise=noise, generator=generator)
            if kind == "clip":
                scale = torch.tensor(parameter)
                original = open_clip.loss.ClipLoss()(out0, out1, scale)
                ours = fastcontrast.ClipLoss(backend=backend)(out0, out1, scale)
            elif kind == "ntxent":
                original = lightly_loss.NTXentLoss(temperature=parameter)(out0, out1)
                ours = fastcontrast.NTXentLoss(temperature=parameter, backend=backend)(out0, out1)
            else:
                # Both banks start as torch.randn under the same seed (lightly 1.6's rule, which ours follows).
                torch.manual_seed(1000 + seed)
                original_fn = lightly_loss.NTXentLoss(temperature=parameter, memory_bank_size=(bank, dim))
                torch.manual_seed(1000 + seed)
                ours_fn = fastcontrast.NTXentLoss(temperature=parameter, memory_bank_size=(bank, dim), backend=backend)
                if not torch.equal(original_fn.memory_bank.bank, ours_fn.memory_bank.bank):
                    raise SystemExit(f"{label}: the two memory banks differ at the start; the comparison is void")
                original = original_fn(out0, out1)
                ours = ours_fn(out0, out1)
            difference = abs(float(ours) - float(original))
            if difference > worst["abs_diff"]:
                worst = {"abs_diff": difference, "loss": float(original), "seed": seed, "rows": rows, "noise": noise}
        worst["ulps"] = worst["abs_diff"] / _ulp(worst["loss"])
        results.append({"case": label, "backend": backend, **worst})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "triton"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256], help="batch sizes (rows per view)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.5], help="positive-pair noise")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bank", type=int, default=4096, help="memory bank entries")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    _prepare_imports()
    import torch

    results = []
    for backend in args.backend:
        for row in measure(args.seeds, backend, args.rows, args.noise, args.dim, args.bank):
            results.append(row)
            print(f"{row['backend']:6s} {row['case']:55s} max |diff| {row['abs_diff']:.2e} at loss "
                  f"{row['loss']:.6g} ({row['ulps']:.1f} ulp of the loss): seed {row['seed']}, {row['rows']} rows, "
                  f"noise {row['noise']}", flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "rows": args.rows, "noise": args.noise, "dim": args.dim, "bank": args.bank,
                "seeds": args.seeds, "dtype": "float32"}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
