"""The scale type the references take."""

from __future__ import annotations

from typing import Union

import torch

Scale = Union[torch.Tensor, float]
