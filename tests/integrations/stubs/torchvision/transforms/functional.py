"""The PIL/tensor helpers open_clip's transforms call, following torchvision's semantics for PIL images."""

from __future__ import annotations

import enum
from typing import List, Sequence, Union

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_MODES = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _pil(img) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise NotImplementedError("torchvision test stub: only PIL images are supported")
    return img


def get_dimensions(img) -> List[int]:
    img = _pil(img)
    return [len(img.getbands()), img.height, img.width]


def to_tensor(pic) -> torch.Tensor:
    array = np.array(_pil(pic), dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def pil_to_tensor(pic) -> torch.Tensor:
    """A PIL image as a [C, H, W] tensor of its own dtype (uint8 for RGB), unscaled, as torchvision's.
    transformers' image_utils imports it at module level when it sees a torchvision."""
    array = np.array(_pil(pic), copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def resize(img, size: Union[int, Sequence[int]], interpolation=InterpolationMode.BILINEAR, max_size=None,
           antialias=True):
    img = _pil(img)
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if isinstance(size, int):
        # torchvision: the shorter edge becomes `size`, the longer keeps the aspect ratio.
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    return img.resize((new_w, new_h), _PIL_MODES[interpolation])


def crop(img, top: int, left: int, height: int, width: int):
    return _pil(img).crop((left, top, left + width, top + height))


def center_crop(img, output_size):
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    elif len(output_size) == 1:
        output_size = (output_size[0], output_size[0])
    _, h, w = get_dimensions(img)
    th, tw = output_size
    return crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


def resized_crop(img, top, left, height, width, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
    return resize(crop(img, top, left, height, width), size, interpolation)


def pad(img, padding, fill=0, padding_mode="constant"):
    img = _pil(img)
    if isinstance(padding, int):
        padding = [padding] * 4
    elif len(padding) == 2:
        padding = [padding[0], padding[1], padding[0], padding[1]]
    left, top, right, bottom = padding
    out = Image.new(img.mode, (img.width + left + right, img.height + top + bottom), fill)
    out.paste(img, (left, top))
    return out
