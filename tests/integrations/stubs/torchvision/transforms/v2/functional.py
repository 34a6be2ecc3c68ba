"""The stub's ``torchvision.transforms.functional`` under the v2 name (see ``v2/__init__.py``)."""

from torchvision.transforms.functional import *  # noqa: F401, F403
from torchvision.transforms.functional import InterpolationMode  # noqa: F401
