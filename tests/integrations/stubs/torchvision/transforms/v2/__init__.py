"""``torchvision.transforms.v2``: transformers' image-processing modules import ``v2.functional`` at module level
when they see a torchvision. Here it is the stub's v1 ``functional``; the text-only paths the tests run never
call it."""

from torchvision.transforms.v2 import functional

__all__ = ["functional"]
