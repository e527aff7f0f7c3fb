"""Small SD1-, SD2- and SDXL-shaped models with random weights, and a small captioned image dataset.

The models have the real architectures (diffusers U-Net and VAE, transformers CLIP text models, the real tokenizer)
with small widths. They follow the same rules as the released models (layers per block, head widths, which levels
have attention), so the loader recognises them from their shapes like any other checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig

from library.model_files.architecture import ATTENTION_HEAD_WIDTH, TEXT_ENCODER_FOLDERS, shipped_config
from library.model_files.family import TEXT_ENCODER_LAYOUTS, ModelFamily
from library.model_files.stable_diffusion import StableDiffusionModel, text_encoder_class
from library.model_files.tokenizer import load_tokenizers

TEXT_WIDTH = 64
TINY_UNET = {
    ModelFamily.SD1: dict(block_out_channels=[32, 32, 64, 64], cross_attention_dim=TEXT_WIDTH),
    ModelFamily.SD2: dict(
        block_out_channels=[64, 64, 128, 128], attention_head_dim=[1, 1, 2, 2], cross_attention_dim=TEXT_WIDTH
    ),
    ModelFamily.SDXL: dict(
        block_out_channels=[64, 128, 128],
        attention_head_dim=[1, 2, 2],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=2 * TEXT_WIDTH,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 256,
    ),
}
TINY_VAE = dict(
    block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2
)
TINY_TEXT = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=2 * TEXT_WIDTH,
    num_attention_heads=TEXT_WIDTH // ATTENTION_HEAD_WIDTH,
    num_hidden_layers=3,
    projection_dim=TEXT_WIDTH,
)


def make_tiny_model(family: ModelFamily, seed: int = 0, v_prediction: bool = False) -> StableDiffusionModel:
    """A complete Stable Diffusion model of the given family with small widths and seeded random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_without_private({**shipped_config(family, "unet"), **TINY_UNET[family]}))
    vae = AutoencoderKL(**_without_private({**shipped_config(family, "vae"), **TINY_VAE}))
    text_encoders = []
    for folder, layout in zip(TEXT_ENCODER_FOLDERS, TEXT_ENCODER_LAYOUTS[family]):
        config = CLIPTextConfig(**{**shipped_config(family, folder), **TINY_TEXT})
        text_encoders.append(text_encoder_class(layout)(config))
    for module in (unet, vae, *text_encoders):
        module.eval()
    return StableDiffusionModel(
        family,
        v_prediction,
        unet,
        vae,
        text_encoders,
        load_tokenizers(family),
        source=f"tiny {family.label} (seed {seed})",
    )


def _without_private(config: dict) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
SIZES = ((64, 64), (96, 64), (64, 96))


def make_tiny_dataset(
    folder: str | Path,
    images: int = 8,
    repeats: int = 10,
    identifier: str = "shp",
    class_name: str = "shape",
    seed: int = 0,
) -> Path:
    """A DreamBooth-style dataset `<folder>/<repeats>_<identifier> <class>/` of simple coloured shapes on a
    contrasting background, each with a `.txt` caption that says what is drawn. Returns the image folder."""
    rng = random.Random(seed)
    image_dir = Path(folder) / f"{repeats}_{identifier} {class_name}"
    image_dir.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        shape = SHAPES[index % len(SHAPES)]
        color, background = rng.sample(sorted(COLORS), 2)
        width, height = SIZES[index % len(SIZES)]
        radius = min(width, height) // 3
        box = (width // 2 - radius, height // 2 - radius, width // 2 + radius, height // 2 + radius)
        picture = shape_picture(shape, COLORS[color], COLORS[background], (width, height), box)
        stem = image_dir / f"{index:03d}"
        picture.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(
            f"{identifier} {class_name}, a {color} {shape} on a {background} background\n", encoding="utf-8"
        )
    return image_dir


def shape_picture(shape: str, color: tuple, background: tuple, size: tuple[int, int], box: tuple) -> Image.Image:
    """A `shape` ("circle" or "square") of `color` filling `box` on a `background` of `size`."""
    picture = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(picture)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return picture
