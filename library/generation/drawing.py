"""Drawing the run's images: the plan (each prompt's images, seeds and start images), batches of images that share
size, steps, scale, sampler and network strengths, the highres fix's two passes, and file names as sd-scripts
writes them."""

from __future__ import annotations

import dataclasses
import datetime
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from library.dataset.images import load_image
from library.errors import UserError
from library.generation.options import IMAGE_SIZE_STEP, GenerationOptions, HighresFix
from library.model_files.stable_diffusion import StableDiffusionModel, vae_scale_factor
from library.sampling import GeneratedImage, SamplePrompt, save_sample_image
from library.sampling.generate import (
    DrawingSetup,
    StartImage,
    batch_key,
    decode_latents,
    generate_images,
)

SEED_MODULUS = 2**64
DRAWN_SEED_RANGE = 2**31  # seeds drawn for images without one, as sd-scripts draws them


@dataclass(frozen=True)
class PlannedImage:
    prompt: SamplePrompt  # with its seed and, for img2img, the start image's size
    index: int  # in the run, from 0
    start: Path | None = None  # --image_path file
    mask: Path | None = None  # --mask_path file


def planned_images(
    prompts: list[SamplePrompt],
    images_per_prompt: int,
    seed: int | None,
    iterations: int = 1,
    same_seed_per_iteration: bool = False,
) -> list[SamplePrompt]:
    """Each prompt `images_per_prompt` times, the whole list `iterations` times (--n_iter), with its seed: a prompt's
    own seeds (--d d1,d2,...) give its images d1, d2, ..., then count on from the last; otherwise --seed s gives
    image i of the run s + i, or with `same_seed_per_iteration` (--iter_same_seed) every image of iteration k the
    seed s + k; with neither, None (a random seed per image, or per iteration)."""
    planned = []
    for iteration in range(iterations):
        shared = _iteration_seed(seed, iteration) if same_seed_per_iteration else None
        for prompt in prompts:
            own = prompt.seeds if prompt.seeds is not None else None if prompt.seed is None else (prompt.seed,)
            for repeat in range(images_per_prompt):
                if own is not None:
                    image_seed = _own_seed(own, repeat)
                elif same_seed_per_iteration:
                    image_seed = shared
                elif seed is not None:
                    image_seed = (seed + len(planned)) % SEED_MODULUS
                else:
                    image_seed = None
                planned.append(dataclasses.replace(prompt, seed=image_seed, seeds=None))
    return planned


def _own_seed(seeds: tuple[int, ...], repeat: int) -> int:
    """A prompt's own seeds in turn; past the last one, counting on from it."""
    last = len(seeds) - 1
    return seeds[repeat] if repeat <= last else (seeds[last] + repeat - last) % SEED_MODULUS


def _iteration_seed(seed: int | None, iteration: int) -> int:
    return (seed + iteration) % SEED_MODULUS if seed is not None else random.randrange(SEED_MODULUS)


def plan(options: GenerationOptions) -> list[PlannedImage]:
    """Every image of the run in order, each with a seed (drawn where none was given, so that the highres fix's
    second pass and a grid's columns can reuse it) and its start image and mask, taken in turn as sd-scripts does."""
    prompts = planned_images(
        options.prompts, options.images_per_prompt, options.seed, options.iterations, options.same_seed_per_iteration
    )
    planned = []
    for index, prompt in enumerate(prompts):
        if prompt.seed is None:
            prompt = dataclasses.replace(prompt, seed=random.randrange(DRAWN_SEED_RANGE))
        start = options.start_images[index % len(options.start_images)] if options.start_images else None
        mask = options.masks[index % len(options.masks)] if options.masks else None
        if start is not None and not options.fixed_size and options.highres_fix is None:
            prompt = _sized_like(prompt, start)
        planned.append(PlannedImage(prompt, index, start, mask))
    return planned


def _sized_like(prompt: SamplePrompt, start: Path) -> SamplePrompt:
    """img2img draws at the start image's size, rounded down to a multiple of 32 (sd-scripts)."""
    with Image.open(start) as image:
        width, height = image.size
    return dataclasses.replace(prompt, width=_round_down(width), height=_round_down(height))


def _round_down(pixels: int) -> int:
    return max(IMAGE_SIZE_STEP, pixels - pixels % IMAGE_SIZE_STEP)


def batches(planned: list[PlannedImage], batch_size: int, default_sampler: str) -> Iterator[list[PlannedImage]]:
    """Consecutive images with the same batch key (and network strengths), at most `batch_size` at a time, as
    sd-scripts groups them."""
    batch: list[PlannedImage] = []
    for image in planned:
        if batch and (len(batch) == batch_size or _key(batch[0], default_sampler) != _key(image, default_sampler)):
            yield batch
            batch = []
        batch.append(image)
    if batch:
        yield batch


def _key(image: PlannedImage, default_sampler: str) -> tuple:
    return batch_key(image.prompt, default_sampler)


def draw_batch(
    model: StableDiffusionModel,
    batch: list[PlannedImage],
    setup: DrawingSetup,
    options: GenerationOptions,
) -> list[tuple[str, list[GeneratedImage]]]:
    """The batch's images as (file-name prefix, images) per pass to save: one pass, or with the highres fix its
    second pass ("1"), after its first ("0") when that is saved too."""
    prompts = [image.prompt for image in batch]
    starts = [_start(image, options.strength) for image in batch] if batch[0].start else None
    if options.highres_fix is None:
        return [("", _generate(model, prompts, setup, starts))]
    return _highres_fix(model, prompts, starts, setup, options.highres_fix, options.strength)


def _generate(model, prompts, setup, starts=None, latents_only=False) -> list[GeneratedImage]:
    return generate_images(
        model.unet, model.text_encoders, model.tokenizers, model.vae, prompts, setup, starts, latents_only
    )


def _highres_fix(
    model: StableDiffusionModel,
    prompts: list[SamplePrompt],
    starts: list[StartImage] | None,
    setup: DrawingSetup,
    fix: HighresFix,
    strength: float,
) -> list[tuple[str, list[GeneratedImage]]]:
    """sd-scripts' highres fix: the first pass at `scale` times the size (rounded down to 32) with the fix's steps,
    upscaled (Lanczos, or the latents bilinearly), then img2img at the full size with seed + 1."""
    small = [
        dataclasses.replace(
            prompt,
            width=_round_down(int(prompt.width * fix.scale + 0.5)),
            height=_round_down(int(prompt.height * fix.scale + 0.5)),
            steps=fix.steps,
        )
        for prompt in prompts
    ]
    if starts:
        starts = [
            _resized(start, (prompt.width, prompt.height), fix.first_strength or start.strength)
            for start, prompt in zip(starts, small)
        ]
    first = _generate(model, small, setup, starts, latents_only=fix.latents_upscaling)
    passes = []
    if fix.save_first:
        pictures = _pictures(model, first, setup) if fix.latents_upscaling else [one.image for one in first]
        passes.append(("0", [dataclasses.replace(one, image=picture) for one, picture in zip(first, pictures)]))
    scale = vae_scale_factor(model.vae)
    second_starts = [
        StartImage(_upscaled(one, prompt, scale), prompt.strength or strength) for one, prompt in zip(first, prompts)
    ]
    second = _generate(model, [dataclasses.replace(p, seed=p.seed + 1) for p in prompts], setup, second_starts)
    passes.append(("1", [dataclasses.replace(one, prompt=p, seed=p.seed) for one, p in zip(second, prompts)]))
    return passes


def _pictures(model: StableDiffusionModel, generated: list[GeneratedImage], setup: DrawingSetup) -> list[Image.Image]:
    with torch.no_grad():
        return decode_latents(model.vae, [one.latents.to(setup.device) for one in generated], setup.vae_batch_size)


def _upscaled(first: GeneratedImage, prompt: SamplePrompt, scale: int) -> Image.Image | torch.Tensor:
    if first.latents is None:
        return first.image.resize((prompt.width, prompt.height), Image.Resampling.LANCZOS)
    size = (prompt.height // scale, prompt.width // scale)
    return torch.nn.functional.interpolate(first.latents.float(), size, mode="bilinear").to(first.latents.dtype)


def _start(image: PlannedImage, strength: float) -> StartImage:
    """The start image (and mask) at the prompt's size. A mask must have its image's size."""
    picture = load_image(image.start, with_alpha=False, remedy="replace it or remove it from --image_path")
    mask = None
    if image.mask is not None:
        mask = load_image(image.mask, with_alpha=False, remedy="replace it or remove it from --mask_path").convert("L")
        if mask.size != picture.size:
            raise UserError(
                f"{image.mask}: the mask is {mask.size[0]}x{mask.size[1]} but its image {image.start} is"
                f" {picture.size[0]}x{picture.size[1]}; give a mask of the image's size."
            )
    start = StartImage(picture, image.prompt.strength or strength, mask)
    return _resized(start, (image.prompt.width, image.prompt.height), start.strength)


def _resized(start: StartImage, size: tuple[int, int], strength: float) -> StartImage:
    def fit(picture: Image.Image | None) -> Image.Image | None:
        return picture if picture is None or picture.size == size else picture.resize(size, Image.Resampling.LANCZOS)

    return StartImage(fit(start.image), strength, fit(start.mask))


class ImageWriter:
    """Saves the run's images under sd-scripts' names: `im_<YYYYmmddHHMMSS>_<prefix><index in batch:03d>_<seed>.png`
    with one time per batch, or `im_<prefix><index in run + 1:06d>.png` (--sequential_file_name), or the start
    image's name (--use_original_file_name). A name this run has already written gets `_2`, `_3`, ... where
    sd-scripts would overwrite the earlier image."""

    def __init__(self, options: GenerationOptions, now: datetime.datetime | None = None):
        self.options = options
        self.now = now
        self.files: list[Path] = []

    def save(self, batch: list[PlannedImage], passes: list[tuple[str, list[GeneratedImage]]]) -> None:
        stamp = f"{self.now or datetime.datetime.now():%Y%m%d%H%M%S}"
        for prefix, generated in passes:
            for position, (planned, image) in enumerate(zip(batch, generated)):
                path = self._unique(self.options.outdir / self._name(planned, image, stamp, prefix, position))
                self.files.append(save_sample_image(image, path))
                print(f"saved {path}")

    def _name(self, planned: PlannedImage, image: GeneratedImage, stamp: str, prefix: str, position: int) -> str:
        if self.options.original_file_names and planned.start is not None:
            return f"{planned.start.stem}.png"
        return image_file_name(stamp, position, image.seed, self.options.sequential_file_names, prefix, planned.index)

    def _unique(self, path: Path) -> Path:
        candidate, number = path, 1
        while candidate in self.files:
            number += 1
            candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
        return candidate


def image_file_name(
    stamp: str, position: int, seed: int, sequential: bool = False, prefix: str = "", index: int = 0
) -> str:
    """sd-scripts' names: `im_<stamp>_<prefix><position in the batch:03d>_<seed>.png`, or with --sequential_file_name
    `im_<prefix><index in the run + 1:06d>.png`."""
    return f"im_{prefix}{index + 1:06d}.png" if sequential else f"im_{stamp}_{prefix}{position:03d}_{seed}.png"
