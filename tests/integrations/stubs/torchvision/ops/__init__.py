"""Names imported at module level by open_clip / lightly; the tests never call them."""

from torchvision.ops.misc import FrozenBatchNorm2d, StochasticDepth


def roi_align(*args, **kwargs):
    raise NotImplementedError("torchvision test stub: ops.roi_align is not available")


__all__ = ["FrozenBatchNorm2d", "StochasticDepth", "roi_align"]
