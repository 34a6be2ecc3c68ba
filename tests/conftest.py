"""Test configuration.

Without a GPU, the Triton kernels run in triton's interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported, so it is set here, before anything imports fastcontrast.kernels. The compile
tests (sm_80 / sm_90) run in a subprocess whose environment drops it again (DESIGN §6).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
