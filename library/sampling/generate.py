"""Drawing one sample image, its file name and its PNG text (specs/training.md section 8.3).

The image comes from a diffusers StableDiffusionPipeline (SD 1.x/2.x: one text encoder) or StableDiffusionXLPipeline
(SDXL: two text encoders) built around the given modules. The SD 1.x/2.x prompt embeddings come from our own text path
(library.text_encoding), so `clip_skip` and prompts longer than 75 tokens are encoded as in training. SDXL prompts are
encoded as diffusers and sd-scripts do (`_sdxl_prompt_embeddings`), in one 77-token window. Noise comes from a CPU
generator seeded with the prompt's seed, so a seed gives the same image on any device. Generating leaves the global
torch RNG state, the modules' devices and their train/eval modes as they were.
"""

from __future__ import annotations

import contextlib
import datetime
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.file_io import atomic_output
from library.sampling.prompts import SamplePrompt
from library.sampling.samplers import check_sampler, make_scheduler
from library.text_encoding import CONTENT, encode_tokens, tokenize

MAX_WINDOWS = 3  # prompts up to 3 x 75 tokens, as sd-scripts' sampling pipeline
SDXL_CLIP_SKIP = 2  # SDXL conditions on the penultimate layer of both text encoders
SEED_RANGE = 2**32


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    prompt: SamplePrompt
    seed: int  # the seed actually used: the prompt's, or the one drawn for it
    sampler: str  # the sampler actually used: the prompt's, or the run's default


def generate_image(
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    vae: torch.nn.Module,
    prompt: SamplePrompt,
    *,
    v_prediction: bool,
    clip_skip: int | None,
    default_sampler: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> GeneratedImage:
    """One image for `prompt`. `text_encoders` and `tokenizers` are the model's (`StableDiffusionModel.text_encoders`,
    `.tokenizers`): one of each for SD 1.x/2.x, two for SDXL. Pass the unwrapped U-Net (with any LoRA applied); `dtype`
    is the autocast dtype (float32 runs without autocast). The modules are moved to `device` for the call and back
    afterwards."""
    text_encoders, tokenizers = list(text_encoders), list(tokenizers)
    if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
        raise ValueError(
            "give one text encoder and tokenizer (SD 1.x/2.x) or two of each (SDXL),"
            f" not {len(text_encoders)} and {len(tokenizers)}"
        )
    sampler = check_sampler(prompt.sampler or default_sampler)
    scheduler = make_scheduler(sampler, v_prediction)
    seed = prompt.seed if prompt.seed is not None else random.SystemRandom().randrange(SEED_RANGE)
    device = torch.device(device)
    with (
        _global_rng_kept(),
        _modules_on(device, (unet, *text_encoders, vae)),
        torch.no_grad(),
        _autocast(device, dtype),
    ):
        if len(text_encoders) == 1:
            prompt_embeds, negative_embeds = _prompt_embeddings(text_encoders[0], tokenizers[0], prompt, clip_skip)
            conditioning = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
            pipeline = _pipeline(unet, text_encoders[0], tokenizers[0], vae, scheduler)
        else:
            conditioning = _sdxl_prompt_embeddings(text_encoders, tokenizers, prompt, clip_skip)
            pipeline = _sdxl_pipeline(unet, text_encoders, tokenizers, vae, scheduler)
        image = pipeline(
            **conditioning,
            height=prompt.height,
            width=prompt.width,
            num_inference_steps=prompt.steps,
            guidance_scale=prompt.scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        ).images[0]
    return GeneratedImage(image, prompt, seed, sampler)


def sample_file_name(
    output_dir: str | Path,
    output_name: str | None,
    *,
    epoch: int | None = None,
    step: int | None = None,
    index: int,
    seed: int | None,
    now: datetime.datetime,
) -> Path:
    """`<output_dir>/sample/[<output_name>_]<e{epoch:06d} | {step:06d}>_<index:02d>_<YYYYmmddHHMMSS>[_<seed>].png`.
    sd-scripts puts only a seed written in the prompt into the name (a drawn one is in the PNG text)."""
    if (epoch is None) == (step is None):
        raise ValueError("give exactly one of epoch and step")
    prefix = f"{output_name}_" if output_name else ""
    counter = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    suffix = "" if seed is None else f"_{seed}"
    return Path(output_dir) / "sample" / f"{prefix}{counter}_{index:02d}_{now:%Y%m%d%H%M%S}{suffix}.png"


# sampler -> the name AUTOMATIC1111 writes into its "parameters" text (others are written as they are named here)
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpm++_2m": "DPM++ 2M",
    "dpm++_2m_karras": "DPM++ 2M Karras",
}


def png_metadata(
    prompt: SamplePrompt,
    seed: int,
    sampler: str,
    size: tuple[int, int],
    extra: Mapping[str, object] | None = None,
) -> PngInfo:
    """PNG text chunks with gen_img_diffusers' keys (prompt, seed, sampler, steps, scale, negative-prompt, then
    `extra`, e.g. negative-scale, clip-prompt, raw-prompt) and AUTOMATIC1111's `parameters`, so that A1111's PNG
    info and other viewers show the settings."""
    metadata = PngInfo()
    entries = {"prompt": prompt.prompt, "seed": seed, "sampler": sampler, "steps": prompt.steps, "scale": prompt.scale}
    if prompt.negative_prompt is not None:
        entries["negative-prompt"] = prompt.negative_prompt
    for key, value in {**entries, **(extra or {})}.items():
        metadata.add_text(key, str(value))
    metadata.add_text("parameters", a1111_parameters(prompt, seed, sampler, size))
    return metadata


def a1111_parameters(prompt: SamplePrompt, seed: int, sampler: str, size: tuple[int, int]) -> str:
    """AUTOMATIC1111's infotext: the prompt, `Negative prompt: ...`, then `Steps: ..., Sampler: ..., ...`."""
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    lines.append(
        f"Steps: {prompt.steps}, Sampler: {A1111_SAMPLER_NAMES.get(sampler, sampler)}, CFG scale: {prompt.scale:g},"
        f" Seed: {seed}, Size: {size[0]}x{size[1]}"
    )
    return "\n".join(lines)


def save_sample_image(generated: GeneratedImage, path: str | Path) -> Path:
    """Write the image as PNG with its prompt and settings as text; an interrupted write leaves nothing behind."""
    info = png_metadata(generated.prompt, generated.seed, generated.sampler, generated.image.size)
    with atomic_output(path) as temporary:
        generated.image.save(temporary, format="PNG", pnginfo=info)
    return Path(path)


def _prompt_embeddings(
    text_encoder, tokenizer, prompt: SamplePrompt, clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the prompt and the negative prompt ("" when none), with as many 75-token windows as the
    longer of the two needs (at most 3), as sd-scripts' sampling pipeline does."""
    texts = [prompt.prompt, prompt.negative_prompt or ""]
    longest = max(len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) for text in texts)
    windows = min(MAX_WINDOWS, max(1, -(-longest // CONTENT)))
    ids = tokenize(tokenizer, texts, CONTENT * windows)
    states = encode_tokens(text_encoder, ids, clip_skip)
    return states[:1], states[1:]


def _sdxl_prompt_embeddings(
    text_encoders, tokenizers, prompt: SamplePrompt, clip_skip: int | None
) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's four conditioning tensors for the prompt and the negative prompt ("" when none), as
    diffusers' `StableDiffusionXLPipeline.encode_prompt` and sd-scripts compute them: each encoder's penultimate
    hidden states (`clip_skip` k takes the k-th layer from the end instead, with no final layer norm), concatenated
    on the feature axis, and the second encoder's pooled, projected output. One 77-token window: longer prompts are
    cut."""
    layer = clip_skip if clip_skip is not None else SDXL_CLIP_SKIP
    texts = [prompt.prompt, prompt.negative_prompt or ""]
    states = []
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenize(tokenizer, texts, None)[:, 0].to(text_encoder.device)
        output = text_encoder(ids, output_hidden_states=True)
        states.append(output.hidden_states[-layer])
    pooled = output.text_embeds  # the second encoder's
    embeds = torch.cat(states, dim=-1)
    return {
        "prompt_embeds": embeds[:1],
        "negative_prompt_embeds": embeds[1:],
        "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": pooled[1:],
    }


def _sdxl_pipeline(unet, text_encoders, tokenizers, vae, scheduler):
    # As _pipeline: the scheduler is set after construction. No watermark, which would change the pixels.
    with _transformers_quiet():
        from diffusers import StableDiffusionXLPipeline
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=None,
        add_watermarker=False,
    )
    return _ready(pipeline, scheduler)


def _pipeline(unet, text_encoder, tokenizer, vae, scheduler):
    # The pipeline's constructor rewrites scheduler settings it deems outdated (steps_offset, clip_sample), so the
    # scheduler is set afterwards, as sd-scripts does. transformers notes on import that torchvision is missing
    # for the image processor; that processor only serves the safety checker, which sampling leaves out.
    with _transformers_quiet():
        from diffusers import StableDiffusionPipeline
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipeline, scheduler)


def _ready(pipeline, scheduler):
    """The pipeline with its scheduler set after construction (see _pipeline) and no progress bar."""
    pipeline.scheduler = scheduler
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _modules_on(device: torch.device, modules: tuple[torch.nn.Module, ...]) -> Iterator[None]:
    """Each module on `device` in eval mode for the block; afterwards back on its device, every submodule in the
    mode it had."""
    devices = [_device_of(module) for module in modules]
    modes = [(submodule, submodule.training) for module in modules for submodule in module.modules()]
    try:
        for module in modules:
            module.to(device).eval()
        yield
    finally:
        for module, original in zip(modules, devices):
            if original is not None:
                module.to(original)
        for submodule, training in modes:
            submodule.training = training


def _device_of(module: torch.nn.Module) -> torch.device | None:
    parameter = next(module.parameters(), None)
    return None if parameter is None else parameter.device


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32 or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
