"""gen_img_diffusers.py: images from an SD 1.x / 2.x / SDXL model with zero or more LoRA networks (docs/generation.md).

The flags are sd-scripts' (a subset of them); they become a `GenerationOptions` once, at the edge. Every image is
drawn by `library.sampling.generate_image`, so clip_skip, prompts longer than 75 tokens, samplers and seeds behave
as in the trainer's sample images. Networks are loaded and checked against the model before the first image, so a
LoRA for another model stops the run with one sentence and no output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from library.errors import UserError
from library.lora.files import AdapterModule, read_lora_file, read_modules
from library.lora.lycoris import LycorisModule
from library.lora.naming import OWN_MODULES, adaptable_layers, sd_scripts_view
from library.metadata import trained_for_note
from library.model_files.family import ModelFamily, family_from_flags
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, place
from library.sampling import (
    DEFAULT_SAMPLER,
    SAMPLER_NAMES,
    SamplePrompt,
    check_sampler,
    generate_image,
    parse_prompt_line,
    read_sample_prompts,
    save_sample_image,
)
from library.sampling.prompts import DEFAULT_SCALE, DEFAULT_SIZE

DEFAULT_STEPS = 50  # gen_img_diffusers' default (training samples use 30)
DEFAULT_NETWORK_MODULE = "networks.lora"
SEED_MODULUS = 2**64


@dataclass(frozen=True)
class NetworkChoice:
    module: str  # e.g. networks.lora
    weights: Path
    multiplier: float


@dataclass(frozen=True)
class GenerationOptions:
    ckpt: str
    outdir: Path
    prompts: list[SamplePrompt]
    images_per_prompt: int
    seed: int | None
    sampler: str
    dtype: torch.dtype
    family: ModelFamily | None
    v_parameterization: bool
    clip_skip: int | None
    xformers: bool
    networks: list[NetworkChoice]
    merge_networks: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate images with a Stable Diffusion 1.x/2.x or SDXL model and LoRA networks."
    )
    parser.add_argument("--ckpt", required=True, help="model: a .safetensors/.ckpt file or a Diffusers folder")
    parser.add_argument("--v2", action="store_true", help="the model is SD 2.x (checked against the file)")
    parser.add_argument("--v_parameterization", action="store_true", help="the model predicts v (SD 2.x 768-v)")
    parser.add_argument("--prompt", help="the prompt; options such as --n NEGATIVE may follow it as in prompt files")
    parser.add_argument(
        "--from_file", help="prompt file: one prompt per line with --n --w --h --d --l --s --ss (or .toml/.json)"
    )
    parser.add_argument("--outdir", required=True, help="folder for the PNG files")
    parser.add_argument("--W", type=int, default=DEFAULT_SIZE, help="width (default 512)")
    parser.add_argument("--H", type=int, default=DEFAULT_SIZE, help="height (default 512)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (default 50)")
    parser.add_argument(
        "--scale", type=float, default=DEFAULT_SCALE, help="classifier-free guidance scale (default 7.5)"
    )
    parser.add_argument("--seed", type=int, help="seed of the first image; image i of the run gets seed + i")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="images for each prompt (default 1)")
    parser.add_argument("--batch_size", type=int, default=1, help="accepted; images are drawn one at a time")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"one of {', '.join(SAMPLER_NAMES)} (default ddim)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="float16 weights and autocast (CUDA only)")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--xformers", action="store_true", help="xformers attention when installed on CUDA")
    attention.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    parser.add_argument("--clip_skip", type=int, help="use the output of the n-th last text encoder layer")
    parser.add_argument("--network_module", nargs="*", help="module of each network (one for all, or one per file)")
    parser.add_argument("--network_weights", nargs="*", help="LoRA files, applied together")
    parser.add_argument("--network_mul", type=float, nargs="*", help="strength of each network (default 1.0)")
    parser.add_argument(
        "--network_merge", action="store_true", help="merge the networks into the weights instead of applying them"
    )
    return parser


def options_from_arguments(args: argparse.Namespace, notes: list[str]) -> GenerationOptions:
    """The checked options; `notes` collects what was changed on this machine (e.g. --fp16 without CUDA)."""
    if args.images_per_prompt < 1:
        raise UserError(f"--images_per_prompt is {args.images_per_prompt}; use 1 or more.")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UserError(f"--clip_skip is {args.clip_skip}; use 1 or more (or leave it out).")
    if args.xformers and not torch.cuda.is_available():
        notes.append("--xformers needs a CUDA GPU; using PyTorch's scaled-dot-product attention.")
    if args.v2 and args.clip_skip:
        notes.append(
            f"--clip_skip {args.clip_skip} with --v2: SD 2.x text encoders already stop one layer early,"
            " so this skips more; usually leave it out."
        )
    if args.batch_size > 1:
        notes.append(f"--batch_size {args.batch_size}: images are drawn one at a time (same images, not batched).")
    dtype = _dtype(args, notes)
    return GenerationOptions(
        ckpt=args.ckpt,
        outdir=Path(args.outdir),
        prompts=_prompts(args),
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        sampler=check_sampler(args.sampler, "--sampler"),
        dtype=dtype,
        family=family_from_flags(v2=args.v2),
        v_parameterization=args.v_parameterization,
        clip_skip=args.clip_skip,
        xformers=args.xformers and torch.cuda.is_available(),
        networks=_network_choices(args.network_module, args.network_weights, args.network_mul),
        merge_networks=args.network_merge,
    )


def _dtype(args: argparse.Namespace, notes: list[str]) -> torch.dtype:
    if args.fp16 and not torch.cuda.is_available():
        notes.append("--fp16 needs a CUDA GPU; generating on the CPU in float32.")
        return torch.float32
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def _prompts(args: argparse.Namespace) -> list[SamplePrompt]:
    """`--prompt` or every prompt of `--from_file`; --W, --H, --steps, --scale fill what a prompt does not set."""
    defaults = {"width": args.W, "height": args.H, "steps": args.steps, "scale": args.scale}
    if (args.prompt is None) == (args.from_file is None):
        raise UserError('give the prompt with --prompt "..." or a prompt file with --from_file FILE (one of them).')
    if args.prompt is not None:
        return [parse_prompt_line(args.prompt, "--prompt", defaults)]
    if not Path(args.from_file).is_file():
        raise UserError(f"{args.from_file}: no such prompt file; check --from_file.")
    return read_sample_prompts(args.from_file, defaults)


def _network_choices(
    modules: list[str] | None, weights: list[str] | None, multipliers: list[float] | None
) -> list[NetworkChoice]:
    """One choice per --network_weights file. One --network_module serves every file; a missing --network_mul is 1."""
    weights, modules, multipliers = weights or [], modules or [DEFAULT_NETWORK_MODULE], multipliers or []
    if len(modules) not in (1, len(weights)) and weights:
        raise UserError(
            f"--network_module names {len(modules)} modules for {len(weights)} --network_weights files;"
            " give one module, or one per file."
        )
    if len(multipliers) > len(weights):
        raise UserError(
            f"--network_mul has {len(multipliers)} values for {len(weights)} --network_weights files;"
            " give at most one per file."
        )
    for file in weights:
        if not Path(file).is_file():
            raise UserError(f"{file}: no such LoRA file; check --network_weights.")
    return [
        NetworkChoice(
            modules[index if len(modules) > 1 else 0],
            Path(file),
            multipliers[index] if index < len(multipliers) else 1.0,
        )
        for index, file in enumerate(weights)
    ]


# ---------------------------------------------------------------- generating


def generate(options: GenerationOptions, now: datetime.datetime | None = None) -> list[Path]:
    """Load the model and networks, draw every image, save each as PNG; returns the files in order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(options)
    networks = attach_networks(model, options.networks, options.merge_networks)
    _place(model, networks, device, options.dtype, options.xformers)
    stamp = f"{now or datetime.datetime.now():%Y%m%d%H%M%S}"
    files = []
    for index, prompt in enumerate(planned_images(options.prompts, options.images_per_prompt, options.seed)):
        generated = generate_image(
            model.unet,
            model.text_encoders,
            model.tokenizers,
            model.vae,
            prompt,
            v_prediction=model.v_prediction,
            clip_skip=options.clip_skip,
            default_sampler=options.sampler,
            device=device,
            dtype=options.dtype,
        )
        files.append(save_sample_image(generated, options.outdir / image_file_name(stamp, index, generated.seed)))
        print(f"saved {files[-1]}")
    return files


def image_file_name(stamp: str, index: int, seed: int) -> str:
    """sd-scripts' name: `im_<YYYYmmddHHMMSS>_<index:03d>_<seed>.png` (the index counts the run's images)."""
    return f"im_{stamp}_{index:03d}_{seed}.png"


def planned_images(prompts: list[SamplePrompt], images_per_prompt: int, seed: int | None) -> list[SamplePrompt]:
    """Each prompt `images_per_prompt` times, with its seed: a prompt's own seed d gives its images d, d+1, ...;
    otherwise --seed s gives image i of the run s + i; with neither, None (a random seed per image)."""
    planned = []
    for prompt in prompts:
        for repeat in range(images_per_prompt):
            if prompt.seed is not None:
                image_seed = (prompt.seed + repeat) % SEED_MODULUS
            elif seed is not None:
                image_seed = (seed + len(planned)) % SEED_MODULUS
            else:
                image_seed = None
            planned.append(dataclasses.replace(prompt, seed=image_seed))
    return planned


def load_model(options: GenerationOptions) -> StableDiffusionModel:
    """The model in float32 on the CPU (networks are merged in float32)."""
    return load_stable_diffusion(options.ckpt, family=options.family, v_parameterization=options.v_parameterization)


class _LoadedNetwork(NamedTuple):
    network: torch.nn.Module
    weights: dict[str, torch.Tensor]
    text_encoder: torch.nn.Module | list[torch.nn.Module]  # as the network's module sees it


class _WeightPatches(NamedTuple):
    """A LyCORIS file's modules with the layers they adapt, merged into the weights (there is no network to run)."""

    patches: list[tuple[torch.nn.Module, AdapterModule]]

    def merge(self, multiplier: float) -> None:
        for layer, module in self.patches:
            layer.weight.data = module.adapted(layer.weight, multiplier).to(layer.weight.dtype)


def attach_networks(model: StableDiffusionModel, choices: list[NetworkChoice], merge: bool) -> list[torch.nn.Module]:
    """Create each network from its file (checked against the model) and apply it, or merge it into the weights.
    A LyCORIS file given to this project's modules is merged into the weights with the exact weight its algorithm
    defines; a third-party module (lycoris.kohya) sees the text encoders as sd-scripts' models look. All files are
    checked before any is merged, so a bad file leaves the model untouched."""
    loaded = [(_lycoris_patches(model, choice) or _loaded_network(model, choice), choice) for choice in choices]
    networks = []
    for attached, choice in loaded:
        if isinstance(attached, _WeightPatches):
            attached.merge(choice.multiplier)
        elif merge:
            attached.network.merge_to(attached.text_encoder, model.unet, attached.weights)
        else:
            attached.network.apply_to(attached.text_encoder, model.unet, True, True)  # LyCORIS builds its modules here
            attached.network.load_state_dict(attached.weights)
            attached.network.eval()
            networks.append(attached.network)
        how = "merged" if merge or isinstance(attached, _WeightPatches) else "applied"
        print(f"{how} {choice.weights} ({choice.module}) with multiplier {choice.multiplier:g}")
    return networks


def _loaded_network(model: StableDiffusionModel, choice: NetworkChoice) -> _LoadedNetwork:
    text_encoder = _network_text_encoder(model)
    if choice.module not in OWN_MODULES:
        text_encoder = sd_scripts_view(text_encoder)
    network, weights = _network_module(choice).create_network_from_weights(
        choice.multiplier, str(choice.weights), model.vae, text_encoder, model.unet
    )
    return _LoadedNetwork(network, weights, text_encoder)


def _lycoris_patches(model: StableDiffusionModel, choice: NetworkChoice) -> _WeightPatches | None:
    """For a LyCORIS file given to this project's modules, its modules checked against the model's layers; None
    for any other file or module."""
    if choice.module not in OWN_MODULES:
        return None
    weights, metadata = read_lora_file(choice.weights)
    modules = read_modules(weights, str(choice.weights))
    if not any(isinstance(module, LycorisModule) for module in modules.values()):
        return None
    layers = adaptable_layers(model.text_encoders, model.unet)
    patches = []
    for name, module in modules.items():
        layer = layers.get(name)
        if layer is None or not module.fits(layer.weight.shape):
            problem = "names no layer of" if layer is None else "does not fit the shape of its layer in"
            raise UserError(
                f"{choice.weights}: module '{name}' {problem} this {model.family.label} model"
                f"{trained_for_note(metadata)}; use the model the LyCORIS file was trained for."
            )
        patches.append((layer, module.for_layer(layer.weight.shape)))
    return _WeightPatches(patches)


def _network_text_encoder(model: StableDiffusionModel):
    """What networks take as `text_encoder`: the one encoder of SD 1.x/2.x, the list of both for SDXL (whose LoRA
    files name them lora_te1_ and lora_te2_)."""
    return list(model.text_encoders) if len(model.text_encoders) > 1 else model.text_encoders[0]


def _network_module(choice: NetworkChoice):
    try:
        module = importlib.import_module(choice.module)
    except ModuleNotFoundError:
        raise UserError(
            f"--network_module {choice.module}: no such module;"
            " use networks.lora, networks.dylora or an importable module."
        ) from None
    if not hasattr(module, "create_network_from_weights"):
        raise UserError(
            f"--network_module {choice.module}: the module has no create_network_from_weights;"
            " use networks.lora or networks.dylora."
        )
    return module


def _place(
    model: StableDiffusionModel,
    networks: list[torch.nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    xformers: bool,
) -> None:
    """U-Net and text encoders in `dtype`; the VAE and the applied networks stay float32 (autocast mixes them)."""
    place(model.unet, device, dtype)
    for text_encoder in model.text_encoders:
        place(text_encoder, device, dtype)
    place(model.vae, device)
    for network in networks:
        network.to(device)
    if xformers:
        try:
            model.unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as error:
            print(f"--xformers: not usable here ({error}); using PyTorch's scaled-dot-product attention.")
