"""The demo's model and dataset: the tiny model (library.tiny_models) made able to draw, so that the demo's samples
show what a LoRA learns. Its VAE is built, not trained (`exact_pixel_vae`: latents are the image's pixels averaged
over 4x4 squares), and its U-Net is taught, in a short full training of its own, to draw flat coloured shapes from
captions that name them (`pretrain_unet`). It is a v-prediction model: with v as the target a tiny U-Net learns an
image's colours within a hundred steps, where epsilon prediction, whose loss hardly depends on the colours at the
high noise levels that decide them, barely moves in a thousand. The dataset (`make_concept_dataset`) is one look,
a yellow circle on green, under a word the base model has never seen, "shp": that is what the LoRA teaches."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler

from library.model_files.architecture import shipped_config
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import StableDiffusionModel, vae_scale_factor
from library.sampling import SamplePrompt
from library.sampling.generate import DrawingSetup, prompt_conditioning
from library.tiny_models import SHAPES, make_tiny_model, shape_picture
from library.training.diffusion import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS

PRETRAINING_STEPS = 200
PRETRAINING_BATCH = 8
PRETRAINING_LEARNING_RATES = {ModelFamily.SD1: 2e-3, ModelFamily.SD2: 2e-3, ModelFamily.SDXL: 5e-4}  # SDXL's tiny
# U-Net does not learn at all at 2e-3 (its loss stays at that of predicting 0)
PRETRAINING_SIZE = 64
PALETTE = {  # the base model's colours: more than the demo dataset's, so that no colour is the LoRA's to teach
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (240, 140, 30),
    "purple": (140, 60, 190),
}


DEMO_VAE_LEVELS = 3  # 4x4 pixels per latent: 64-pixel images are 16x16 latents, which a tiny U-Net learns fast
DEMO_VAE_WIDTH = 96  # 3 channels per group of the VAE's 32-group norms: what exact_pixel_vae needs
DEMO_VAE_CONSTANT = 1000.0  # the constant channel that pins each group norm's mean and spread
DEMO_VAE_OFFSET = 20.0  # keeps SiLU's input where SiLU is the identity to float precision


def make_demo_model(
    family: ModelFamily, seed: int = 0, steps: int = PRETRAINING_STEPS, progress: Callable[[int], None] | None = None
) -> StableDiffusionModel:
    """The tiny model with `exact_pixel_vae` and a U-Net pretrained for `steps` steps (`progress` is called after
    each)."""
    model = make_tiny_model(family, seed, v_prediction=True)
    levels = DEMO_VAE_LEVELS
    config = {
        **shipped_config(family, "vae"),
        "block_out_channels": [DEMO_VAE_WIDTH] * levels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }
    model.vae = exact_pixel_vae(AutoencoderKL(**{key: value for key, value in config.items() if key[0] != "_"}))
    pretrain_unet(model, steps, seed, progress)
    return model


def pretrain_unet(
    model: StableDiffusionModel, steps: int, seed: int = 0, progress: Callable[[int], None] | None = None
) -> None:
    """Train the whole U-Net (v prediction, the training schedule) on random flat shapes with their captions.
    The latents are computed as `exact_pixel_vae` encodes: an average pool, without running the VAE."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(
        NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END, "scaled_linear", prediction_type="v_prediction"
    )
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=PRETRAINING_LEARNING_RATES[model.family])
    model.unet.train()
    for step in range(steps):
        pictures, captions = zip(*(_random_shape(rng) for _ in range(PRETRAINING_BATCH)))
        latents = _latents(torch.stack(pictures), model.vae)
        conditioning = _conditioning(model, captions)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (PRETRAINING_BATCH,), generator=generator)
        prediction = model.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, **conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction, scheduler.get_velocity(latents, noise, timesteps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step)
    model.unet.eval()
    model.unet.zero_grad(set_to_none=True)


def _conditioning(model: StableDiffusionModel, captions: tuple[str, ...]) -> dict:
    """The U-Net's conditioning for the captions (SDXL: with the pooled vector and the 64x64 size conditioning)."""
    setup = DrawingSetup(False, None, "ddim", torch.device("cpu"), torch.float32, max_windows=1)
    with torch.no_grad():
        encoded = [
            prompt_conditioning(model.text_encoders, model.tokenizers, SamplePrompt(caption), setup)
            for caption in captions
        ]
    arguments = {"encoder_hidden_states": torch.cat([one["prompt_embeds"] for one in encoded])}
    if model.family is ModelFamily.SDXL:
        size = [PRETRAINING_SIZE, PRETRAINING_SIZE]
        time_ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32).expand(len(captions), -1)
        pooled = torch.cat([one["pooled_prompt_embeds"] for one in encoded])
        arguments["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return arguments


def _random_shape(rng: random.Random) -> tuple[torch.Tensor, str]:
    """A random shape of a random colour and size on another colour, as pixels in [-1, 1], (3, 64, 64), and the
    caption that says what it is."""
    color, background = rng.sample(sorted(PALETTE), 2)
    shape = rng.choice(SHAPES)
    radius = rng.randint(PRETRAINING_SIZE // 6, PRETRAINING_SIZE * 7 // 16)
    x, y = (rng.randint(radius, PRETRAINING_SIZE - radius) for _ in range(2))
    size = (PRETRAINING_SIZE, PRETRAINING_SIZE)
    box = (x - radius, y - radius, x + radius, y + radius)
    picture = shape_picture(shape, PALETTE[color], PALETTE[background], size, box)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    return pixels, f"a {color} {shape} on a {background} background"


def _latents(pixels: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """What `exact_pixel_vae` encodes `pixels` to, times the scaling factor, by its definition."""
    colours = torch.nn.functional.avg_pool2d(pixels, vae_scale_factor(vae))
    return torch.cat([colours, torch.zeros_like(colours[:, :1]).expand(-1, vae.config.latent_channels - 3, -1, -1)], 1)


@torch.no_grad()
def exact_pixel_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """Set the weights of a VAE (every level `DEMO_VAE_WIDTH` wide) so that it needs no training: the latent of an
    image is the image averaged over squares of 2^(levels - 1) pixels, its red, green and blue in latent channels 0-2
    (scaled so that the latents the trainer sees, after the scaling factor, are the pixel values in [-1, 1]) and 0 in
    the others; decoding repeats each latent pixel over its square. Every residual branch is switched off; each
    colour travels in a group of three channels (+v, -v, constant) through the 32-group norms, whose mean and spread
    the constant then fixes, so that the norms pass the colour on to within a few thousandths of its range."""
    for parameter in vae.parameters():
        parameter.zero_()
    scale = vae.config.scaling_factor
    _colour_groups(vae.encoder.conv_in, source_channels=range(3), gain=1.0)
    _colour_groups(vae.decoder.conv_in, source_channels=range(3), gain=scale)
    for coder in (vae.encoder, vae.decoder):
        for block in [*getattr(coder, "down_blocks", []), *getattr(coder, "up_blocks", [])]:
            for sampler in [*(getattr(block, "downsamplers", None) or []), *(getattr(block, "upsamplers", None) or [])]:
                _pass_through(sampler.conv, average=sampler.conv.stride[0] == 2)
        _pass_through_norm(coder.conv_norm_out)
    for coder, gain in ((vae.encoder, 1 / scale), (vae.decoder, 1.0)):
        out = coder.conv_out
        for colour in range(3):
            out.weight[colour, 3 * colour, 1, 1] = gain
            out.bias[colour] = -DEMO_VAE_OFFSET * gain
    vae.encoder.conv_out.bias[vae.config.latent_channels :] = -30.0  # log-variance: sampling adds nothing
    for conv in (vae.quant_conv, vae.post_quant_conv):
        conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])
    for norm in _group_norms(vae):
        if norm is not vae.encoder.conv_norm_out and norm is not vae.decoder.conv_norm_out:
            norm.weight.fill_(1.0)
    return vae.eval()


def _colour_groups(conv: torch.nn.Conv2d, source_channels, gain: float) -> None:
    """Channels 3c, 3c + 1, 3c + 2 become +v, -v and the constant for colour c (input channel c times `gain`)."""
    for colour in source_channels:
        conv.weight[3 * colour, colour, 1, 1] = gain
        conv.weight[3 * colour + 1, colour, 1, 1] = -gain
        conv.bias[3 * colour + 2] = DEMO_VAE_CONSTANT


def _pass_through(conv: torch.nn.Conv2d, average: bool) -> None:
    """Each channel to itself: the centre tap, or (a stride-2 downsampler after its (0, 1, 0, 1) padding) the mean of
    the top-left 2x2 taps."""
    for channel in range(conv.weight.shape[0]):
        if average:
            conv.weight[channel, channel, :2, :2] = 0.25
        else:
            conv.weight[channel, channel, 1, 1] = 1.0


def _pass_through_norm(norm: torch.nn.GroupNorm) -> None:
    """A group (v, -v, K) normalises to ((v - K/3) / s, ...), s = K * sqrt(2) / 3 up to v's own tiny share: scale by
    s and shift back by K/3 plus the SiLU offset."""
    spread = DEMO_VAE_CONSTANT * 2**0.5 / 3
    norm.weight.fill_(spread)
    norm.bias.fill_(DEMO_VAE_CONSTANT / 3 + DEMO_VAE_OFFSET)


def _group_norms(vae: AutoencoderKL) -> list[torch.nn.GroupNorm]:
    return [module for module in vae.modules() if isinstance(module, torch.nn.GroupNorm)]


CONCEPT = "shp shape"
CONCEPT_COLOR, CONCEPT_BACKGROUND = "yellow", "green"


def make_concept_dataset(folder: str | Path, images: int = 4, repeats: int = 10) -> Path:
    """`<folder>/<repeats>_shp shape/`: yellow circles of a few sizes on green, each captioned only "shp shape"."""
    image_dir = Path(folder) / f"{repeats}_{CONCEPT}"
    image_dir.mkdir(parents=True, exist_ok=True)
    size = (PRETRAINING_SIZE, PRETRAINING_SIZE)
    for index in range(images):
        radius = PRETRAINING_SIZE // 4 + 2 * index
        box = (size[0] // 2 - radius, size[1] // 2 - radius, size[0] // 2 + radius, size[1] // 2 + radius)
        picture = shape_picture("circle", PALETTE[CONCEPT_COLOR], PALETTE[CONCEPT_BACKGROUND], size, box)
        picture.save(image_dir / f"{index:03d}.png")
        (image_dir / f"{index:03d}.txt").write_text(CONCEPT + "\n", encoding="utf-8")
    return image_dir
