"""Resizing and center-cropping images with Pillow, shared by the training dataset and
tools/resize_images_to_resolution.py."""

from __future__ import annotations

from PIL import Image

from library.dataset.buckets import crop_offsets
from library.errors import UserError

INTERPOLATIONS = {
    "area": Image.Resampling.BOX,  # area averaging, which is what a box filter does when downscaling
    "cubic": Image.Resampling.BICUBIC,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos4": Image.Resampling.LANCZOS,  # sd-scripts maps lanczos4 to no filter (Pillow's default); we mean Lanczos
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


def resize_image(image: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Resize to size = (width, height); without an interpolation, area when both sides shrink, else Lanczos."""
    if interpolation is None:
        interpolation = "area" if size[0] < image.width and size[1] < image.height else "lanczos"
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}.")
    return image.resize(size, INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the centered (width, height) window; odd leftovers go to the right and bottom."""
    width, height = size
    left, top = crop_offsets(image.size, size, random_crop=False, rng=None)
    return image.crop((left, top, left + width, top + height))
