"""The built-in demo: train a LoRA with train_network.py on a tiny model and dataset that the demo makes itself,
on the CPU in about a minute and a half, with a sample image before the first step and after the last. With --sdxl
it trains a tiny SDXL model with sdxl_train_network.py instead.

The tiny model is made able to draw first (library.demo_model: a VAE built to encode and decode pixels exactly, and
a U-Net taught in a short training to draw flat coloured shapes from captions that name them). The dataset is four
yellow circles on green captioned "shp shape", a word the model has never seen. The LoRA learns what it means:
`demo_output/samples_before_after.png` shows the sample for "shp shape" before training (the base model's guess),
after training (a yellow blob on green), and a dataset image as the VAE reproduces it. The demo shows the whole
path a real run takes: dataset checks, latent caching, training, sample images, the saved LoRA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from library.demo_model import PRETRAINING_STEPS, make_concept_dataset, make_demo_model
from library.errors import run_cli
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion, save_stable_diffusion_checkpoint
from library.training.script import run_training_script

RESOLUTION = 64
SAMPLE_SEED = 1
LABEL_HEIGHT = 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output", help="where the model, dataset, LoRA and images go")
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=200,
        help="the LoRA's optimizer steps (default 200: about 20 s on 2 CPU cores)",
    )
    parser.add_argument(
        "--base_steps", type=int, default=PRETRAINING_STEPS, help="steps that teach the tiny base model to draw shapes"
    )
    parser.add_argument("--sdxl", action="store_true", help="train the tiny SDXL model with sdxl_train_network.py")
    options = parser.parse_args()
    family = ModelFamily.SDXL if options.sdxl else ModelFamily.SD1
    output = Path(options.output_dir)
    started = time.perf_counter()

    def report(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f} s] {message}", flush=True)

    model_file = output / f"tiny-{family.value}.safetensors"
    with tqdm(total=options.base_steps, desc="base model", unit="step") as bar:
        save_stable_diffusion_checkpoint(
            make_demo_model(family, 0, options.base_steps, lambda _: bar.update()), model_file
        )
    report(f"taught the tiny base model to draw flat shapes ({options.base_steps} steps)")
    image_dir = make_concept_dataset(output / "dataset")
    reference = sorted(image_dir.glob("*.png"))[0]
    caption = reference.with_suffix(".txt").read_text(encoding="utf-8").strip()
    prompts = output / "prompts.txt"
    prompts.write_text(
        f"{caption} --w {RESOLUTION} --h {RESOLUTION} --d {SAMPLE_SEED} --s 20 --l 1\n", encoding="utf-8"
    )
    report(
        f"made a tiny {family.label} model ({model_file}), a dataset of 4 captioned images ({image_dir}/) and a "
        "prompt file"
    )

    command = _training_command(model_file, output, prompts, options.max_train_steps, options.sdxl)
    lora = run_training_script(sdxl=options.sdxl, argv=command)
    report(f"trained {lora}")

    [before] = (output / "sample").glob("*_e000000_*.png")  # --sample_at_first names its image after epoch 0
    [after] = (output / "sample").glob(f"*_{options.max_train_steps:06d}_*.png")
    sheet = output / "samples_before_after.png"
    target = _through_vae(model_file, reference)
    side_by_side(
        [(Image.open(before), "step 0"), (Image.open(after), f"step {options.max_train_steps}"), (target, "dataset")]
    ).save(sheet)
    report(f"wrote {sheet}: the sample before training, after training, and the prompt's dataset image through the VAE")
    report(
        f"mean distance from the dataset image (0-255 per channel): {distance(Image.open(before), target):.1f} before"
        f" training, {distance(Image.open(after), target):.1f} after"
    )


def _training_command(model_file: Path, output: Path, prompts: Path, steps: int, sdxl: bool) -> list[str]:
    """The seed's example command, scaled down for a tiny model on a CPU (for SDXL with cached text-encoder outputs)."""
    paths = ["--pretrained_model_name_or_path", str(model_file), "--train_data_dir", str(output / "dataset")]
    paths += ["--output_dir", str(output), "--sample_prompts", str(prompts)]
    flags = (
        f"--resolution {RESOLUTION} --output_name demo_lora --network_module networks.lora --network_dim 16 "
        f"--network_alpha 16 --learning_rate 5e-3 --network_train_unet_only --max_train_steps {steps} --cache_latents "
        f"--seed 0 --max_data_loader_n_workers 0 --sample_at_first --sample_every_n_steps {steps} "
        "--sample_sampler k_euler_a --v_parameterization "
        "--save_model_as safetensors --prior_loss_weight 1.0"
    )
    return paths + flags.split() + (["--cache_text_encoder_outputs"] if sdxl else [])


def _through_vae(model_file: Path, image_path: Path) -> Image.Image:
    """The image as the model's VAE reproduces it: the best a sample of this model can look."""
    vae = load_stable_diffusion(model_file).vae
    picture = Image.open(image_path).convert("RGB").resize((RESOLUTION, RESOLUTION))
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    array = ((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def distance(image: Image.Image, target: Image.Image) -> float:
    """The mean absolute difference of two images' pixels, 0 to 255."""
    first, second = (np.asarray(picture.convert("RGB"), dtype=np.float32) for picture in (image, target))
    return float(np.abs(first - second).mean())


def side_by_side(labelled: list[tuple[Image.Image, str]], scale: int = 3) -> Image.Image:
    """The images in one row, each enlarged `scale` times, with its label underneath."""
    tiles = [
        image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST) for image, _ in labelled
    ]
    width, height = sum(tile.width for tile in tiles), max(tile.height for tile in tiles) + LABEL_HEIGHT
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    left = 0
    for tile, (_, label) in zip(tiles, labelled):
        sheet.paste(tile, (left, 0))
        draw.text((left + 4, tile.height + 1), label, fill="black")
        left += tile.width
    return sheet


if __name__ == "__main__":
    run_cli(main)
