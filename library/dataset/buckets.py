"""Aspect-ratio buckets exactly as sd-scripts makes them (specs/training.md 3.1, 3.2, 4.2): the bucket list, the
bucket and resize size of each image, the crop offsets, the cache's crop box and the start-up summary.

Sizes are (width, height) tuples of ints. The arithmetic is sd-scripts' Python float arithmetic, step for step, so
that the same images land in the same buckets with the same resized sizes."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

Size = tuple[int, int]
STEP_DIVISOR, SDXL_STEP_DIVISOR = (
    64,
    32,
)  # sd-scripts asserts bucket_reso_steps % 64 == 0 (SD 1.x/2.x), % 32 == 0 (SDXL)


@dataclass(frozen=True)
class BucketSettings:
    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass(frozen=True)
class Placement:
    bucket: Size
    resized: Size  # the image is resized to this size, which covers the bucket, then cropped to the bucket


def check_bucket_settings(settings: BucketSettings, where: str, step_divisor: int = STEP_DIVISOR) -> list[str]:
    """The problems of one dataset's bucket keys, one sentence each starting with `where`; empty when all is well.

    Like sd-scripts, the bucket keys are only checked with enable_bucket, and min/max are compared with the
    resolution after rounding them to bucket_reso_steps. Unlike sd-scripts, min/max are not compared with the
    resolution under bucket_no_upscale, which ignores them."""
    problems = []
    width, height = settings.resolution
    if width <= 0 or height <= 0:
        problems.append(f"{where}: resolution is {width}x{height}; both sides must be positive, e.g. resolution = 512.")
    if not settings.enable_bucket:
        return problems
    steps = settings.bucket_reso_steps
    if steps <= 0 or steps % step_divisor:
        problems.append(
            f"{where}: bucket_reso_steps is {steps}, but this model family's trainer (as sd-scripts')"
            f" requires it to be divisible by {step_divisor}; use a positive multiple of {step_divisor} such as 64."
        )
    if width <= 0 or height <= 0 or settings.bucket_no_upscale or steps <= 0:
        return problems
    limits = normalized(settings)[0]
    if limits.min_bucket_reso < steps:
        problems.append(
            f"{where}: min_bucket_reso is {settings.min_bucket_reso}, smaller than one bucket_reso_steps ({steps});"
            f" set it to {steps} or more."
        )
    if limits.min_bucket_reso > min(width, height):
        problems.append(
            f"{where}: min_bucket_reso is {settings.min_bucket_reso}, larger than the shorter side of resolution "
            f"{width}x{height}; set min_bucket_reso to {min(width, height)} or less, or raise the resolution."
        )
    if limits.max_bucket_reso < max(width, height):
        problems.append(
            f"{where}: max_bucket_reso is {settings.max_bucket_reso}, smaller than the longer side of resolution "
            f"{width}x{height}; set max_bucket_reso to {max(width, height)} or more, or lower the resolution."
        )
    return problems


def normalized(settings: BucketSettings) -> tuple[BucketSettings, list[str]]:
    """min_bucket_reso floored and max_bucket_reso ceiled to multiples of bucket_reso_steps, with sd-scripts'
    warnings as notes. Without enable_bucket (or with an unusable step) the settings are returned unchanged."""
    steps = settings.bucket_reso_steps
    if not settings.enable_bucket or steps <= 0:
        return settings, []
    low = settings.min_bucket_reso - settings.min_bucket_reso % steps
    high = settings.max_bucket_reso + (-settings.max_bucket_reso) % steps
    notes = []
    if low != settings.min_bucket_reso:
        notes.append(
            f"min_bucket_reso {settings.min_bucket_reso} is not a multiple of bucket_reso_steps {steps}; using {low}."
        )
    if high != settings.max_bucket_reso:
        notes.append(
            f"max_bucket_reso {settings.max_bucket_reso} is not a multiple of bucket_reso_steps {steps}; using {high}."
        )
    if settings.bucket_no_upscale:
        notes.append(
            "min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale: buckets follow the image sizes."
        )
    return replace(settings, min_bucket_reso=low, max_bucket_reso=high), notes


def bucket_resolutions(resolution: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """The predefined buckets (specs/training.md 3.1): about the resolution's area, sides in [min_size, max_size]."""
    area = resolution[0] * resolution[1]
    square = int(math.sqrt(area) // step) * step
    sizes = {(square, square)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, area // width // step * step)
        if height >= min_size:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


class BucketAssigner:
    """Places images into buckets (specs/training.md 3.2). Stateless: with bucket_no_upscale the buckets are simply
    whatever the images' placements produce."""

    def __init__(self, settings: BucketSettings):
        self.settings = normalized(settings)[0]
        resolution = self.settings.resolution
        self.area = resolution[0] * resolution[1]
        if not self.settings.enable_bucket:
            self.resolutions = [resolution]
        elif self.settings.bucket_no_upscale:
            self.resolutions = []
        else:
            limits = self.settings
            self.resolutions = bucket_resolutions(
                resolution, limits.min_bucket_reso, limits.max_bucket_reso, limits.bucket_reso_steps
            )
        self._aspects = [width / height for width, height in self.resolutions]
        self._known = set(self.resolutions)

    def place(self, image_size: Size) -> Placement:
        """Raises ValueError for an image that cannot be placed (callers add the file name)."""
        width, height = image_size
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} cannot be bucketed; the image is empty or unreadable.")
        if self.settings.enable_bucket and self.settings.bucket_no_upscale:
            return self._place_without_upscale(width, height)
        return self._place_in_list(width, height)

    def _place_in_list(self, width: int, height: int) -> Placement:
        aspect = width / height
        bucket = (width, height)
        if bucket not in self._known:
            errors = [abs(bucket_aspect - aspect) for bucket_aspect in self._aspects]
            bucket = self.resolutions[errors.index(min(errors))]  # first minimum, like numpy's argmin
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        return Placement(bucket, (int(width * scale + 0.5), int(height * scale + 0.5)))

    def _place_without_upscale(self, width: int, height: int) -> Placement:
        step = self.settings.bucket_reso_steps
        aspect = width / height
        too_small = (
            f"image size {width}x{height} is too small or too narrow for bucket_reso_steps {step} with "
            "bucket_no_upscale; enlarge or remove the image."
        )
        if width * height > self.area:
            # Shrink to the resolution's area, then round either the width or the height to the step (the other
            # side follows the aspect, also rounded) and keep the candidate whose aspect is closer; ties: height.
            resized_width = math.sqrt(self.area * aspect)
            resized_height = self.area / resized_width
            width_first = self._round_to_step(resized_width)
            height_first = self._round_to_step(resized_height)
            try:
                aspect_width_first = width_first / self._round_to_step(width_first / aspect)
                aspect_height_first = self._round_to_step(height_first * aspect) / height_first
            except ZeroDivisionError:
                raise ValueError(too_small) from None
            if abs(aspect_width_first - aspect) < abs(aspect_height_first - aspect):
                resized = (width_first, int(width_first / aspect + 0.5))
            else:
                resized = (int(height_first * aspect + 0.5), height_first)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if 0 in bucket:
            raise ValueError(too_small)
        return Placement(bucket, resized)

    def _round_to_step(self, x: float) -> int:
        rounded = int(x + 0.5)
        return rounded - rounded % self.settings.bucket_reso_steps


def crop_offsets(resized: Size, bucket: Size, random_crop: bool, rng: random.Random) -> tuple[int, int]:
    """(left, top) of the bucket window in the resized image: centered, or uniform in [0, excess] with random_crop.
    As in sd-scripts, a random number is drawn only for a side with excess, width first."""
    offsets = []
    for excess in (resized[0] - bucket[0], resized[1] - bucket[1]):
        if excess <= 0:
            offsets.append(0)
        else:
            offsets.append(rng.randint(0, excess) if random_crop else excess // 2)
    return offsets[0], offsets[1]


def crop_ltrb(original_size: Size, bucket: Size) -> tuple[float, float, float, float]:
    """The `crop_ltrb` stored in latent cache files: sd-scripts' BucketManager.get_crop_ltrb(bucket, original_size).

    It is the box, in bucket pixels, that the whole original image would fill if it were scaled to fit inside the
    bucket and centred (left/top floored), not the crop actually applied (that is crop_offsets). Right/bottom can
    be fractional, so the values are floats; sd-scripts writes them with np.array, which is float64 there too."""
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = original_size[0] / original_size[1]
    if bucket_aspect > image_aspect:  # the bucket is wider: fit the height
        fitted_width, fitted_height = bucket[1] * image_aspect, bucket[1]
    else:
        fitted_width, fitted_height = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - fitted_width) // 2
    top = (bucket[1] - fitted_height) // 2
    return float(left), float(top), float(left + fitted_width), float(top + fitted_height)


def mean_aspect_error(placements_and_sizes: Iterable[tuple[Placement, Size]]) -> float:
    """Mean |bucket aspect - image aspect| over (placement, original image size) pairs, each image once."""
    errors = [abs(p.bucket[0] / p.bucket[1] - size[0] / size[1]) for p, size in placements_and_sizes]
    return float(np.mean(errors)) if errors else 0.0  # numpy's pairwise sum, as sd-scripts logs it


def bucket_summary_lines(counts: Mapping[Size, int]) -> list[str]:
    """sd-scripts' start-up lines for the non-empty buckets (counts include repeats). Buckets are numbered by their
    position among all the buckets given, sorted, as sd-scripts numbers them among all the buckets it made."""
    return [
        f"bucket {index}: resolution ({bucket[0]}, {bucket[1]}), count: {count}"
        for index, (bucket, count) in enumerate(sorted(counts.items()))
        if count > 0
    ]
