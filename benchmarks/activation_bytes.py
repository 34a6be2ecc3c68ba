"""Bytes an open_clip model keeps for backward per sample: the input of docs/cached_step.md's ViT-B/32 model.

    PYTHONPATH=tests/integrations/stubs .venv/bin/python benchmarks/activation_bytes.py [--model ViT-B-32]
        [--batches 1 2 4]

Builds the model with random weights (no download) in training mode on the CPU, runs its forward with grad
on random images at its image size and random 77-token texts, and counts the bytes of tensor storage alive
after the forward (what autograd saved for backward, plus the outputs), by a ``TorchDispatchMode``
(:mod:`fastcontrast.tools.bench.meters`). The per-sample figure is the difference between batch sizes.
fp32 and eager attention: on a GPU with fused attention the attention probabilities are not kept, and
autocast keeps most tensors in 16 bits. (The PYTHONPATH stub stands in for torchvision, which open_clip
imports but this does not use.)
"""

from __future__ import annotations

import argparse
import json

import torch

MIB = 2**20


def retained_bytes(model, batch: int, image_size: int, context_length: int) -> int:
    from fastcontrast.tools.bench.meters import _LiveTensorBytes

    images = torch.randn(batch, 3, image_size, image_size)
    texts = torch.randint(0, 49408, (batch, context_length))
    meter = _LiveTensorBytes()
    with meter.mode:
        out = model(images, texts)
        meter.prune()
        retained = meter.current
    del out
    return retained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).train()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    context_length = model.context_length
    retained = {b: retained_bytes(model, b, image_size, context_length) for b in args.batches}
    smallest, largest = min(args.batches), max(args.batches)
    per_sample = (retained[largest] - retained[smallest]) / max(1, largest - smallest)
    print(json.dumps({
        "model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
        "image_size": image_size, "context_length": context_length, "dtype": "float32",
        "retained_mib_by_batch": {b: round(v / MIB, 3) for b, v in retained.items()},
        "retained_mib_per_sample": round(per_sample / MIB, 3),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
