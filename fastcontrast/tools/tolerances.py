"""The one tolerance table: how far a fastcontrast result may lie from the reference, per input dtype.

Used by the test suite and by ``python -m fastcontrast check`` (and ``gpu-check``). Half-precision inputs are
rounded once on the way in; the engines then accumulate in fp32, and gradients come back rounded once to the
input dtype, so the bounds follow each dtype's unit roundoff (2⁻⁸ bf16, 2⁻¹¹ fp16, fp32 accumulation noise).
"""

from __future__ import annotations

import torch

# (atol, rtol) of a loss or gradient against the fp64 reference on the same rounded inputs.
ELEMENTWISE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}

# Max error relative to the largest reference magnitude of a tensor, for the Triton kernels: they round dS to
# the input dtype before the second tensor-core product, as FlashAttention does with P, so gradients carry
# about one half-precision rounding; LSE and loss stay fp32.
KERNEL_RELATIVE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# (atol, rtol) of a per-rank result against one process computing the global batch (sums in another order).
DISTRIBUTED = {torch.float64: (1e-9, 1e-9), torch.float32: (5e-5, 5e-5)}
