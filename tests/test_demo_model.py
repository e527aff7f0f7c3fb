"""The demo's drawing model: its VAE is exact by construction, against plain average pooling and repetition."""

from __future__ import annotations

import pytest
import torch

from library.demo_model import exact_pixel_vae, make_concept_dataset
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion, save_stable_diffusion_checkpoint


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SDXL])
def test_the_demo_vae_encodes_to_pooled_pixels_and_decodes_by_repeating_them(family, tmp_path):
    from diffusers import AutoencoderKL

    from library.demo_model import DEMO_VAE_LEVELS, DEMO_VAE_WIDTH
    from library.model_files.architecture import shipped_config

    config = {key: value for key, value in shipped_config(family, "vae").items() if not key.startswith("_")}
    config |= {
        "block_out_channels": [DEMO_VAE_WIDTH] * DEMO_VAE_LEVELS,
        "down_block_types": ["DownEncoderBlock2D"] * DEMO_VAE_LEVELS,
        "up_block_types": ["UpDecoderBlock2D"] * DEMO_VAE_LEVELS,
    }
    vae = exact_pixel_vae(AutoencoderKL(**config))
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    pooled = torch.nn.functional.avg_pool2d(pixels, 4)
    assert torch.allclose(latents[:, :3], pooled, atol=5e-3) and latents[:, 3].abs().max() < 1e-3
    assert torch.allclose(decoded, pooled.repeat_interleave(4, 2).repeat_interleave(4, 3), atol=1e-2)  # 1.3 of 255


def test_the_concept_dataset_survives_a_checkpoint_round_trip_through_the_vae(tmp_path):
    """Saved (in float16) and loaded like any checkpoint, the demo VAE still reproduces the dataset's images."""
    import numpy as np
    from PIL import Image

    from library.demo_model import make_demo_model

    path = tmp_path / "demo.safetensors"
    save_stable_diffusion_checkpoint(make_demo_model(ModelFamily.SD1, steps=0), path)
    vae = load_stable_diffusion(path).vae
    image = Image.open(sorted(make_concept_dataset(tmp_path / "data").glob("*.png"))[0])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    expected = torch.nn.functional.avg_pool2d(pixels, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert (decoded - expected).abs().mean() < 0.01
