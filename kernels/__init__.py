"""fastcontrast.kernels: the Triton engine (fused blockwise LSE and SigLIP kernels).

Installed as ``fastcontrast.kernels`` (never as a top-level ``kernels``). Importing this package does not
import triton; ``fastcontrast.kernels.engine`` does.
"""
