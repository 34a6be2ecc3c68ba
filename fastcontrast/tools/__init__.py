"""Tooling around the losses, out of the loss path: ``python -m fastcontrast bench | check | info | gpu-check |
model`` and what they share (the benchmark machinery, the one tolerance table).

Nothing here is imported by the losses; importing a tool never touches CUDA at import time.
"""
