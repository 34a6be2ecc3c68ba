"""Classes imported at module level by open_clip / lightly; the tests never instantiate them."""

from torch import nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision test stub: ops.misc.FrozenBatchNorm2d is not available")


class StochasticDepth(nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision test stub: ops.StochasticDepth is not available")
