"""The built-in demo: make a tiny SD1-shaped model and dataset, load the model file the way the trainer will,
convert it to a Diffusers folder and back, and render one image through text encoder, U-Net and VAE.

Until the trainer lands, this shows the model-file path end to end on a machine with no GPU and no network.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from library.errors import run_cli
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, save_diffusers_folder, save_stable_diffusion_checkpoint
from library.tiny_models import make_tiny_dataset, make_tiny_model


def render(model: StableDiffusionModel, prompt: str, steps: int = 10, size: int = 64, seed: int = 0) -> Image.Image:
    """A plain DDIM loop with classifier-free guidance: enough to show every module is wired up."""
    scheduler = DDIMScheduler.from_config(model.scheduler_config())
    scheduler.set_timesteps(steps)
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    tokens = tokenizer([prompt, ""], padding="max_length", truncation=True, return_tensors="pt").input_ids
    scale = 2 ** (len(model.vae.config.block_out_channels) - 1)
    with torch.no_grad():
        context = encoder(tokens).last_hidden_state
        latents = torch.randn(1, model.unet.config.in_channels, size // scale, size // scale, generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            conditional, unconditional = model.unet(torch.cat([latents] * 2), t, context).sample.chunk(2)
            latents = scheduler.step(unconditional + 7.5 * (conditional - unconditional), t, latents).prev_sample
        pixels = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    array = ((pixels[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    output = Path(parser.parse_args().output_dir)
    started = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f} s] {message}")

    model_file = output / "tiny-sd1.safetensors"
    save_stable_diffusion_checkpoint(make_tiny_model(ModelFamily.SD1, seed=0), model_file)
    step(f"made a tiny SD1-shaped model: {model_file}")
    image_dir = make_tiny_dataset(output / "dataset")
    step(f"made a captioned dataset: {image_dir}/ ({len(list(image_dir.glob('*.png')))} images)")

    model = load_stable_diffusion(model_file)
    parameters = sum(p.numel() for module in (model.unet, model.vae, *model.text_encoders) for p in module.parameters())
    step(f"loaded {model_file.name}: {model.family.label}, {parameters:,} parameters, {'v' if model.v_prediction else 'epsilon'} prediction")
    diffusers_folder = output / "tiny-sd1-diffusers"
    save_diffusers_folder(model, diffusers_folder)
    reloaded = load_stable_diffusion(diffusers_folder)
    step(f"converted to a Diffusers folder and loaded it back: {diffusers_folder}/")

    caption = sorted(image_dir.glob("*.txt"))[0].read_text(encoding="utf-8").strip()
    first, second = render(model, caption), render(reloaded, caption)
    difference = int(np.abs(np.asarray(first, dtype=int) - np.asarray(second, dtype=int)).max())
    image_path = output / "demo_image.png"
    first.save(image_path)
    step(f"rendered '{caption}' -> {image_path} (random weights, so noise); single file vs Diffusers folder: largest pixel difference {difference}")
    if difference > 2:
        raise SystemExit("the single file and the Diffusers folder gave different images")


if __name__ == "__main__":
    run_cli(main)
