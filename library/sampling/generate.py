"""Drawing sample images, their file names and their PNG text (specs/training.md section 8.3).

Images come from the diffusers pipelines (text-to-image, img2img, inpainting; SD 1.x/2.x with one text encoder,
SDXL with two) built around the given modules; several prompts that share size, steps, scale and sampler are drawn
in one call. The prompt embeddings come from our own text path as sd-scripts' generation pipelines compute them:
prompts longer than 75 tokens in 75-token windows, `clip_skip`, and emphasis (`(word:1.3)`, `(word)`, `[word]`).
Noise comes from a CPU generator per image seeded with its prompt's seed, so a seed gives the same image on any
device and in any batch. Generating leaves the global torch RNG state, the modules' devices and their train/eval
modes as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from library.model_files.stable_diffusion import vae_scale_factor
from library.sampling.prompts import SamplePrompt
from library.sampling.samplers import check_sampler, make_scheduler
from library.text_encoding import CONTENT, encode_tokens, stitch_windows
from library.weighted_captions import padded_windows, weighted_tokens

MAX_WINDOWS = 3  # prompts up to 3 x 75 tokens, as sd-scripts' sampling pipeline
SDXL_CLIP_SKIP = 2  # SDXL conditions on the penultimate layer of both text encoders
SEED_RANGE = 2**32


@dataclass(frozen=True)
class DrawingSetup:
    """What every image of a run shares. `dtype` is the autocast dtype (float32 runs without autocast);
    `max_windows` is sd-scripts' max_embeddings_multiples (prompts are cut after that many 75-token windows);
    `vae_batch_size` images are decoded at a time (None: all of a call)."""

    v_prediction: bool
    clip_skip: int | None
    default_sampler: str
    device: torch.device
    dtype: torch.dtype
    max_windows: int = MAX_WINDOWS
    vae_batch_size: int | None = None
    token_expansions: tuple[dict[int, list[int]], ...] = ()  # per tokenizer: a token id -> the ids it stands for


@dataclass(frozen=True)
class StartImage:
    """What img2img, inpainting and the highres fix's second pass start from: a picture of the prompt's size, or
    latents (1, 4, height / 8, width / 8), noised to `strength` (1: pure noise); with a mask (white: draw anew,
    black: keep) only the white part changes."""

    image: Image.Image | torch.Tensor
    strength: float
    mask: Image.Image | None = None


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image | None  # None when latents were asked for
    prompt: SamplePrompt
    seed: int  # the seed actually used: the prompt's, or the one drawn for it
    sampler: str  # the sampler actually used: the prompt's, or the run's default
    latents: torch.Tensor | None = None  # (1, 4, h, w), when asked for instead of the picture


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
    """One image for `prompt` (see generate_images)."""
    setup = DrawingSetup(v_prediction, clip_skip, default_sampler, torch.device(device), dtype)
    return generate_images(unet, text_encoders, tokenizers, vae, [prompt], setup)[0]


def batch_key(prompt: SamplePrompt, default_sampler: str) -> tuple:
    """What must be equal for images to be drawn in one call: everything but the texts and the seed."""
    same = dataclasses.replace(prompt, prompt="", negative_prompt=None, seed=None, seeds=None, sampler=None)
    return same, check_sampler(prompt.sampler or default_sampler)


def generate_images(
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    vae: torch.nn.Module,
    prompts: Sequence[SamplePrompt],
    setup: DrawingSetup,
    starts: Sequence[StartImage] | None = None,
    latents_only: bool = False,
) -> list[GeneratedImage]:
    """The images for `prompts`, which share a `batch_key`, drawn together: image i is the one `prompts[i]` alone
    gives, to float tolerance. `text_encoders` and `tokenizers` are the model's (`StableDiffusionModel`): one of
    each for SD 1.x/2.x, two for SDXL. Pass the unwrapped U-Net (with any LoRA applied). `starts` (one per prompt)
    makes it img2img or inpainting. The modules are moved to the setup's device for the call and back afterwards."""
    text_encoders, tokenizers = list(text_encoders), list(tokenizers)
    if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
        raise ValueError(
            "give one text encoder and tokenizer (SD 1.x/2.x) or two of each (SDXL),"
            f" not {len(text_encoders)} and {len(tokenizers)}"
        )
    if len({batch_key(prompt, setup.default_sampler) for prompt in prompts}) != 1:
        raise ValueError("the prompts of one call must share size, steps, scale and sampler (see batch_key)")
    sampler = batch_key(prompts[0], setup.default_sampler)[1]
    seeds = [
        prompt.seed if prompt.seed is not None else random.SystemRandom().randrange(SEED_RANGE) for prompt in prompts
    ]
    device = setup.device
    with (
        _global_rng_kept(),
        _modules_on(device, (unet, *text_encoders, vae)),
        torch.no_grad(),
        _autocast(device, setup.dtype),
    ):
        conditionings = [prompt_conditioning(text_encoders, tokenizers, prompt, setup) for prompt in prompts]
        latents: list[torch.Tensor | None] = [None] * len(prompts)
        for group in _same_shapes(conditionings):
            drawn = _draw(
                _pipeline(unet, text_encoders, tokenizers, vae, make_scheduler(sampler, setup.v_prediction), starts),
                prompts[group[0]],
                [conditionings[index] for index in group],
                [seeds[index] for index in group],
                [starts[index] for index in group] if starts else None,
            )
            for index, one in zip(group, drawn):
                latents[index] = one
        images = [None] * len(prompts) if latents_only else decode_latents(vae, latents, setup.vae_batch_size)
    return [
        GeneratedImage(image, prompt, seed, sampler, one if latents_only else None)
        for image, prompt, seed, one in zip(images, prompts, seeds, latents)
    ]


def decode_latents(vae: torch.nn.Module, latents: Sequence[torch.Tensor], batch_size: int | None) -> list[Image.Image]:
    """Pictures from latents (each (1, 4, h, w), all of one size), `batch_size` at a time, as the pipelines decode."""
    from diffusers.image_processor import VaeImageProcessor

    stacked = torch.cat(list(latents))
    images = []
    for chunk in stacked.split(batch_size or len(stacked)):
        decoded = vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor).sample
        images += VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).postprocess(decoded, output_type="pil")
    return images


def _draw(pipeline, prompt: SamplePrompt, conditionings, seeds, starts) -> list[torch.Tensor]:
    conditioning = {key: torch.cat([one[key] for one in conditionings]) for key in conditionings[0]}
    if starts:
        conditioning["image"] = _start_images(starts)
        conditioning["strength"] = starts[0].strength
        if starts[0].mask is not None:
            conditioning["mask_image"] = [start.mask for start in starts]
    if len(conditionings[0]) > 2:  # SDXL: its size and crop conditioning
        conditioning.update(sdxl_size_conditioning(prompt))
    latents = pipeline(
        **conditioning,
        height=prompt.height,
        width=prompt.width,
        num_inference_steps=prompt.steps,
        guidance_scale=prompt.scale,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        output_type="latent",
    ).images
    return list(latents.split(1))


def _start_images(starts: Sequence[StartImage]) -> list[Image.Image] | torch.Tensor:
    if isinstance(starts[0].image, torch.Tensor):
        return torch.cat([start.image for start in starts])
    return [start.image for start in starts]


def sdxl_size_conditioning(prompt: SamplePrompt) -> dict[str, tuple[int, int]]:
    """SDXL's micro-conditioning as sd-scripts' sdxl_gen_img.py sets it: the original size (default: the image's),
    the negative original size (default: the original size), the crop's top-left corner (default 0, 0), and the
    target size (default, and always in sd-scripts: the image's)."""
    original = (prompt.original_height or prompt.height, prompt.original_width or prompt.width)
    negative = (prompt.original_height_negative or original[0], prompt.original_width_negative or original[1])
    crop = (prompt.crop_top or 0, prompt.crop_left or 0)
    target = (prompt.target_height or prompt.height, prompt.target_width or prompt.width)
    return {
        "original_size": original,
        "crops_coords_top_left": crop,
        "target_size": target,
        "negative_original_size": negative,
        "negative_crops_coords_top_left": crop,
        "negative_target_size": target,
    }


def _same_shapes(conditionings: Sequence[dict[str, torch.Tensor]]) -> list[list[int]]:
    """Indices of the prompts grouped by embedding length (prompts of more 75-token windows are drawn apart, so
    that each image is the one its prompt alone gives)."""
    groups: dict[int, list[int]] = {}
    for index, conditioning in enumerate(conditionings):
        groups.setdefault(conditioning["prompt_embeds"].shape[1], []).append(index)
    return list(groups.values())


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


def prompt_conditioning(
    text_encoders, tokenizers, prompt: SamplePrompt, setup: DrawingSetup
) -> dict[str, torch.Tensor]:
    """The pipeline's conditioning tensors for one prompt and its negative prompt ("" when none), each of batch 1:
    `prompt_embeds` and `negative_prompt_embeds`, and for SDXL the pooled ones too."""
    texts = [prompt.prompt, prompt.negative_prompt or ""]
    expansions = setup.token_expansions or ({},) * len(tokenizers)
    if len(text_encoders) == 1:
        positive, negative = _prompt_embeddings(
            text_encoders[0], tokenizers[0], prompt, setup.clip_skip, setup.max_windows, expansions[0]
        )
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}
    return _sdxl_prompt_embeddings(text_encoders, tokenizers, texts, setup.clip_skip, setup.max_windows, expansions)


def _prompt_embeddings(
    text_encoder,
    tokenizer,
    prompt: SamplePrompt,
    clip_skip: int | None,
    max_windows: int = MAX_WINDOWS,
    expansion: dict[int, list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the prompt and the negative prompt ("" when none), emphasis applied, with as many 75-token
    windows as the longer of the two needs (at most `max_windows`), as sd-scripts' generation pipeline does."""
    ids, weights = _weighted_ids(tokenizer, [prompt.prompt, prompt.negative_prompt or ""], max_windows, expansion)
    states = emphasised(encode_tokens(text_encoder, ids, clip_skip), weights)
    return states[:1], states[1:]


def _sdxl_prompt_embeddings(
    text_encoders, tokenizers, texts: list[str], clip_skip: int | None, max_windows: int, expansions
) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's four conditioning tensors for a prompt and its negative prompt, as sd-scripts'
    sdxl_gen_img.py computes them: for each encoder, its penultimate hidden states (`clip_skip` k takes the k-th
    layer from the end instead, with no final layer norm) window by window, emphasis applied; the two concatenated
    on the feature axis; and the second encoder's pooled, projected output of the first window."""
    layer = clip_skip if clip_skip is not None else SDXL_CLIP_SKIP
    windows = _weighted_ids(tokenizers[0], texts, max_windows, expansions[0])[0].shape[1]
    states = []
    for text_encoder, tokenizer, expansion in zip(text_encoders, tokenizers, expansions):
        ids, weights = _weighted_ids(tokenizer, texts, windows, expansion)
        output = text_encoder(ids.flatten(0, 1).to(text_encoder.device), output_hidden_states=True)
        hidden = output.hidden_states[-layer]
        states.append(emphasised(stitch_windows(hidden.unflatten(0, ids.shape[:2])), weights))
    pooled = output.text_embeds.unflatten(0, ids.shape[:2])[:, 0]  # the second encoder's
    embeds = torch.cat(states, dim=-1)
    return {
        "prompt_embeds": embeds[:1],
        "negative_prompt_embeds": embeds[1:],
        "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": pooled[1:],
    }


def _weighted_ids(
    tokenizer, texts: list[str], max_windows: int, expansion: dict[int, list[int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and emphasis weights (B, n, 77) of the texts, n windows for the longest (at most `max_windows`);
    `expansion` replaces a token by several (a textual-inversion embedding's word by all its vectors)."""
    parsed = [_expanded(*weighted_tokens(tokenizer, text), expansion or {}) for text in texts]
    windows = min(max_windows, max(1, -(-max(len(ids) for ids, _ in parsed) // CONTENT)))
    return padded_windows(tokenizer, parsed, CONTENT * windows)


def _expanded(ids: list[int], weights: list[float], expansion: dict[int, list[int]]) -> tuple[list, list]:
    pairs = [(new, weight) for token, weight in zip(ids, weights) for new in expansion.get(token, [token])]
    return [token for token, _ in pairs], [weight for _, weight in pairs]


def emphasised(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Prompt emphasis as sd-scripts' generation scripts apply it: each token's hidden state times its weight
    (`weights` in windows (B, n, 77)), then the whole sequence rescaled so that its mean is what it was (unless that
    mean is 0, which a rescale cannot restore)."""
    if bool((weights == 1).all()):
        return states
    weights = stitch_windows(weights).to(states.device, states.dtype).unsqueeze(-1)
    before = states.float().mean(dim=(-2, -1))
    weighted = states * weights
    after = weighted.float().mean(dim=(-2, -1))
    ratio = torch.where(after == 0, 1.0, before / after)
    return weighted * ratio.to(states.dtype)[:, None, None]


def _pipeline(unet, text_encoders, tokenizers, vae, scheduler, starts: Sequence[StartImage] | None):
    """The diffusers pipeline for the model (SD or SDXL) and the task (text-to-image, img2img or inpainting).
    Its constructor rewrites scheduler settings it deems outdated (steps_offset, clip_sample), so the scheduler is
    set afterwards, as sd-scripts does. No safety checker; no SDXL watermark, which would change the pixels."""
    task = "text" if not starts else "inpaint" if starts[0].mask is not None else "image"
    with _transformers_quiet():  # transformers notes on import that torchvision is missing (safety checker only)
        import diffusers
    if len(text_encoders) == 1:
        classes = {
            "text": diffusers.StableDiffusionPipeline,
            "image": diffusers.StableDiffusionImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionInpaintPipeline,
        }
        modules = {"text_encoder": text_encoders[0], "tokenizer": tokenizers[0]}
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    else:
        classes = {
            "text": diffusers.StableDiffusionXLPipeline,
            "image": diffusers.StableDiffusionXLImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
        }
        modules = {
            "text_encoder": text_encoders[0],
            "text_encoder_2": text_encoders[1],
            "tokenizer": tokenizers[0],
            "tokenizer_2": tokenizers[1],
        }
        extra = {"add_watermarker": False}
    pipeline = classes[task](vae=vae, unet=unet, scheduler=None, **modules, **extra)
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
