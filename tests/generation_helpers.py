"""Shared pieces of the generation tests: drawing in this process, and comparing images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from library.generation import build_parser, generate, options_from_arguments
from lora_helpers import fill_randomly
from networks.lora import create_network

FAST = ["--W", "64", "--H", "64", "--steps", "2"]


def draw(ckpt, outdir, *flags: str, sized: bool = True) -> list[np.ndarray]:
    """Run the generator in this process (64x64, 2 steps unless `sized` is False: then 2 steps at the default or
    the flags' size); the images as int arrays, in order."""
    return [as_array(path) for path in draw_files(ckpt, outdir, *flags, sized=sized)]


def draw_files(ckpt, outdir, *flags: str, sized: bool = True) -> list:
    fast = FAST if sized else FAST[4:]
    args = build_parser().parse_args(["--ckpt", str(ckpt), "--outdir", str(outdir), *fast, *flags])
    return generate(options_from_arguments(args, []))


def as_array(image_or_path) -> np.ndarray:
    image = image_or_path if isinstance(image_or_path, Image.Image) else Image.open(image_or_path)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_difference(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first - second).max())


def random_lora_files(model, folder, names: list[str]) -> list[str]:
    """One SD1 LoRA file per name with random (non-zero) weights on the text encoder and the U-Net, seeds 1, 2, ..."""
    files = []
    for seed, name in enumerate(names, start=1):
        network = create_network(1.0, 4, 2, model.vae, model.text_encoders[0], model.unet)
        fill_randomly(network, seed=seed)
        network.save_weights(folder / name)
        files.append(str(folder / name))
    return files
