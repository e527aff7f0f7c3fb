"""The built-in demo: train a LoRA with train_network.py on a tiny model and dataset that the demo makes itself,
on the CPU in about a minute, with a sample image before the first step and after the last. With --sdxl it trains a
tiny SDXL model with sdxl_train_network.py instead.

It writes `demo_output/samples_before_after.png`: the sample before training, the sample after, and the dataset image
whose caption was the prompt as the tiny model's VAE reproduces it (encoded and decoded). The tiny model has random
weights and a few hundred thousand parameters: a minute of training lowers its loss (the progress bar's avr_loss)
but does not teach it to draw, so both samples look like noise. The demo shows the whole path a real run takes:
dataset checks, latent caching, training, sample images, the saved LoRA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from library.errors import run_cli
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion, save_stable_diffusion_checkpoint
from library.tiny_models import make_tiny_dataset, make_tiny_model
from library.training.script import run_training_script

RESOLUTION = 64
SAMPLE_SEED = 1
LABEL_HEIGHT = 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output", help="where the model, dataset, LoRA and images go")
    parser.add_argument(
        "--max_train_steps", type=int, default=150, help="optimizer steps (default 150: about a minute on 2 CPU cores)"
    )
    parser.add_argument("--sdxl", action="store_true", help="train the tiny SDXL model with sdxl_train_network.py")
    options = parser.parse_args()
    family = ModelFamily.SDXL if options.sdxl else ModelFamily.SD1
    output = Path(options.output_dir)
    started = time.perf_counter()

    def report(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f} s] {message}", flush=True)

    model_file = output / f"tiny-{family.value}.safetensors"
    save_stable_diffusion_checkpoint(make_tiny_model(family, seed=0), model_file)
    image_dir = make_tiny_dataset(output / "dataset", images=4, repeats=10)
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

    samples = sorted((output / "sample").glob("*.png"))
    before, after = samples[0], samples[-1]
    sheet = output / "samples_before_after.png"
    side_by_side(
        [
            (Image.open(before), "step 0"),
            (Image.open(after), f"step {options.max_train_steps}"),
            (_through_vae(model_file, reference), "dataset"),
        ]
    ).save(sheet)
    report(f"wrote {sheet}: the sample before training, after training, and the prompt's dataset image through the VAE")


def _training_command(model_file: Path, output: Path, prompts: Path, steps: int, sdxl: bool) -> list[str]:
    """The seed's example command, scaled down for a tiny model on a CPU (for SDXL with cached text-encoder outputs)."""
    paths = ["--pretrained_model_name_or_path", str(model_file), "--train_data_dir", str(output / "dataset")]
    paths += ["--output_dir", str(output), "--sample_prompts", str(prompts)]
    flags = (
        f"--resolution {RESOLUTION} --output_name demo_lora --network_module networks.lora --network_dim 16 "
        f"--network_alpha 16 --learning_rate 1e-2 --network_train_unet_only --max_train_steps {steps} --cache_latents "
        f"--seed 0 --max_data_loader_n_workers 0 --sample_at_first --sample_every_n_steps {steps} "
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
