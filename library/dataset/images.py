"""Loading one training image as sd-scripts does (specs/training.md 3.3): decode, resize to the placement, crop to
the bucket, color_aug, flip_aug, alpha mask, normalise to [-1, 1]; and the un-augmented pixels the latent cache
encodes (4.1).

Without bucketing the dataset planner still gives a Placement whose bucket is the fixed resolution and whose
resized size covers it, so one path serves both modes. sd-scripts' non-bucket path instead asserts on images of the
wrong size ("image size is small") and needs random_crop for larger ones; we resize to cover and crop, which is what
its own latent-cache path does."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.dataset.buckets import Placement, crop_offsets
from library.dataset.captions import FACE_CROP_PARTS
from library.dataset.config import IMAGE_SUFFIXES, SubsetConfig
from library.dataset.resize import resize_image
from library.errors import UserError

COLOR_AUG_PROBABILITY = 0.33
HUE_SHIFT_LIMIT = 8  # in OpenCV hue units, 0..180 for the full circle
OPENCV_HUE_CIRCLE, PIL_HUE_CIRCLE = 180, 255  # Pillow's HSV hue h*255 for h in [0, 1), so 255 wraps to 0
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors has no single truth value
class ImageSample:
    pixels: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    alpha_mask: torch.Tensor | None  # (H, W) float32 in [0, 1]
    flipped: bool
    crop_top_left: tuple[int, int]  # (top, left) of the bucket window in the resized image, before any flip
    original_size: tuple[int, int]  # (width, height) of the file


def load_image(
    path: str | Path,
    with_alpha: bool,
    remedy: str = "replace or delete it, or pass --skip_bad_images",
    mask_dir: str | None = None,
) -> Image.Image:
    """The decoded image in RGB, or RGBA with_alpha (an image without alpha gets an opaque one); with `mask_dir` the
    alpha is the red channel of the mask image of the same name there, so that it is resized, cropped and flipped
    with the image. A file that cannot be decoded is a UserError that ends with `remedy`.

    Like sd-scripts, the EXIF orientation is not applied: pixels are used as stored, so the bucket matches the size
    read from the file header."""
    try:
        with Image.open(path) as image:
            image.load()
            if mask_dir is None:
                return image.convert("RGBA" if with_alpha else "RGB")
            masked = image.convert("RGB")
        with Image.open(mask_file(path, mask_dir)) as mask:
            masked.putalpha(mask.convert("RGB").getchannel("R"))
        return masked
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot be decoded as an image ({error}); {remedy}.") from None


def mask_file(image_path: str | Path, mask_dir: str | Path) -> Path:
    """The mask of an image: the file of the same name (any image suffix) in the subset's conditioning_data_dir."""
    stem = Path(image_path).stem
    for candidate in sorted(Path(mask_dir).glob(f"{stem}.*")):
        if candidate.suffix.lower() in IMAGE_SUFFIXES:
            return candidate
    raise FileNotFoundError(f"no mask named {stem} in {mask_dir}")


def prepare_image(
    image: Image.Image,
    placement: Placement,
    resize_interpolation: str | None,
    random_crop: bool,
    rng: random.Random | None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to placement.resized (when it differs), then crop to placement.bucket; returns (image, (top, left))."""
    if image.size != placement.resized:
        image = _resize(image, placement.resized, resize_interpolation)
    left, top = crop_offsets(placement.resized, placement.bucket, random_crop, rng)
    width, height = placement.bucket
    return image.crop((left, top, left + width, top + height)), (top, left)


def _resize(image: Image.Image, size: tuple[int, int], interpolation: str | None) -> Image.Image:
    if image.mode == "RGBA":
        # Pillow premultiplies alpha when resizing RGBA, which blackens transparent pixels; sd-scripts (OpenCV)
        # resizes each channel on its own, so do that.
        return Image.merge("RGBA", [resize_image(band, size, interpolation) for band in image.split()])
    return resize_image(image, size, interpolation)


def face_box(path: str | Path) -> tuple[int, int, int, int] | None:
    """The face box (centre x, centre y, width, height) that sd-scripts' face-crop tool writes into an image's name,
    `name_cx_cy_w_h`, or None."""
    parts = Path(path).stem.split("_")
    if len(parts) <= FACE_CROP_PARTS:
        return None
    try:
        cx, cy, width, height = (int(part) for part in parts[-FACE_CROP_PARTS:])
    except ValueError:
        return None
    return cx, cy, width, height


def face_crop(
    image: Image.Image,
    target: tuple[int, int],
    face: tuple[int, int, int, int],
    subset: SubsetConfig,
    rng: random.Random,
) -> tuple[Image.Image, tuple[int, int]]:
    """face_crop_aug_range (lo, hi), as sd-scripts applies it without buckets: scale the image so that the face's
    longer side is between 1/hi and 1/lo of the target's shorter side (never above the original size, never below
    covering the target), drawn uniformly when that is a range; then cut the target around the face, moved at random
    with random_crop, or a little (up to a twentieth of the face) when the range is not one value and the face is
    large; returns the crop and its (top, left)."""
    width, height = image.size
    target_width, target_height = target
    cx, cy, face_width, face_height = face
    low, high = subset.face_crop_aug_range
    face_size, short_side = max(face_width, face_height), min(target_width, target_height)
    cover = max(target_height / height, target_width / width)
    # sd-scripts caps both at 1 and then fails on an image smaller than the target; here such an image is enlarged
    min_scale = max(cover, min(1.0, short_side / (face_size * high)))
    max_scale = max(min_scale, min(1.0, short_side / (face_size * low)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    if resized != image.size:
        image = _resize(image, resized, subset.resize_interpolation)
    offsets = []
    for wanted, length, centre in (
        (target_height, resized[1], int(cy * scale + 0.5)),
        (target_width, resized[0], int(cx * scale + 0.5)),
    ):
        start = centre - wanted // 2
        if subset.random_crop:  # the face near the middle more often than not, the background still reachable
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif low != high and face_size > short_side // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(start, length - wanted)))
    top, left = offsets
    return image.crop((left, top, left + target_width, top + target_height)), (top, left)


def color_augment(array: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' color_aug on an H x W x 3 uint8 array: with probability 0.33, a hue shift or a pixel-power gamma,
    each half the time. The random draws are sd-scripts', in its order."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return array
    if rng.random() > 0.5:
        return shift_hue(array, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return apply_gamma(array, rng.uniform(*GAMMA_RANGE))


def shift_hue(array: np.ndarray, shift: float) -> np.ndarray:
    """Shift the hue by `shift` OpenCV hue units (180 per circle), reading the array as BGR as sd-scripts' cv2 call
    does. An approximation of cv2's BGR<->HSV: Pillow's HSV mode (hue 0..255 per circle, so the shift is scaled by
    255/180, and the hue truncated to an integer as cv2's uint8 store does) rounds differently, by a level or two."""
    as_rgb = Image.fromarray(np.ascontiguousarray(array[:, :, ::-1]), "RGB")
    hsv = np.array(as_rgb.convert("HSV"))
    hue = hsv[:, :, 0] + shift * PIL_HUE_CIRCLE / OPENCV_HUE_CIRCLE
    hsv[:, :, 0] = np.mod(hue, PIL_HUE_CIRCLE).astype(np.uint8)
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))[:, :, ::-1].copy()


def apply_gamma(array: np.ndarray, gamma: float) -> np.ndarray:
    """sd-scripts' "gamma": raw 0..255 values to the power gamma, clipped (a strong brightness change, a quirk)."""
    return np.clip(array.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def load_sample(path: str | Path, placement: Placement, subset: SubsetConfig, rng: random.Random) -> ImageSample:
    """One training sample without cached latents (specs/training.md 3.3), all randomness from rng."""
    flipped = bool(subset.flip_aug) and rng.random() < 0.5  # drawn first, as in sd-scripts
    image = load_image(path, with_alpha=subset.loss_mask, mask_dir=subset.conditioning_data_dir)
    original_size = image.size
    face = face_box(path) if subset.face_crop_aug_range else None
    if face is None:
        image, crop_top_left = prepare_image(image, placement, subset.resize_interpolation, subset.random_crop, rng)
    else:
        image, crop_top_left = face_crop(image, placement.bucket, face, subset, rng)
    array = np.array(image)
    if subset.color_aug:
        array[:, :, :3] = color_augment(array[:, :, :3], rng)
    if flipped:
        array = array[:, ::-1]
    pixels, alpha_mask = _to_tensors(array, subset.loss_mask)
    return ImageSample(pixels, alpha_mask, flipped, crop_top_left, original_size)


def cache_pixels(
    path: str | Path,
    placement: Placement,
    with_mask: bool,
    resize_interpolation: str | None = None,
    mask_dir: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the latent cache encodes (specs/training.md 4.1): resize and center crop, no augmentation and no flip
    (the cache flips the tensor itself for flip_aug). Returns (pixels (3, H, W), loss mask (H, W) or None)."""
    image = load_image(path, with_alpha=with_mask, mask_dir=mask_dir)
    image, _ = prepare_image(image, placement, resize_interpolation, random_crop=False, rng=None)
    return _to_tensors(np.array(image), with_mask)


def _to_tensors(array: np.ndarray, with_alpha_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H x W x C uint8 -> (3, H, W) float32 in [-1, 1], and alpha/255 as (H, W) float32 when asked."""
    pixels = torch.from_numpy(np.ascontiguousarray(array[:, :, :3].transpose(2, 0, 1))).float() / 127.5 - 1
    if not with_alpha_mask:
        return pixels, None
    alpha_mask = torch.from_numpy(array[:, :, 3].astype(np.float32) / 255)  # load_image made every image RGBA
    return pixels, alpha_mask
