"""gen_img_diffusers.py and sdxl_gen_img.py: images from an SD 1.x / 2.x / SDXL model with zero or more LoRA networks
(docs/generation.md).

The flags are sd-scripts': every one is known, those not implemented are refused in one sentence unless they hold
sd-scripts' default; they become a `GenerationOptions` once, at the edge. Every image is
drawn by `library.sampling.generate_image`, so clip_skip, prompts longer than 75 tokens, samplers and seeds behave
as in the trainer's sample images. Networks are loaded and checked against the model before the first image, so a
LoRA for another model stops the run with one sentence and no output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import random
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
from library.model_files.stable_diffusion import (
    StableDiffusionModel,
    load_stable_diffusion,
    local_model_family,
    place,
)
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
from library.unsupported_options import UnsupportedOption, add_unsupported_arguments, refuse_unsupported

DEFAULT_STEPS = 50  # gen_img_diffusers' default (training samples use 30)
SDXL_SIZE = 1024  # sdxl_gen_img.py's default width and height
DEFAULT_NETWORK_MODULE = "networks.lora"
SEED_MODULUS = 2**64


NOT_YET = "not implemented here yet (docs/generation.md lists what is)"
GUIDANCE = "CLIP and VGG16 guidance are not implemented here; they date from SD 1.x and few use them"
CONTROL = "ControlNet and ControlNet-LLLite are not implemented here"
UNSUPPORTED_GENERATION_OPTIONS = (
    UnsupportedOption("interactive", "there is no interactive mode here; give --prompt or --from_file"),
    *(UnsupportedOption(name, NOT_YET, "value") for name in ("image_path", "mask_path", "strength", "vae")),
    UnsupportedOption("use_original_file_name", NOT_YET),
    UnsupportedOption("ddim_eta", NOT_YET, "value"),
    UnsupportedOption("vae_slices", NOT_YET, "value"),
    UnsupportedOption("replace_clip_l14_336", "the 336-pixel CLIP vision variant is not supported here"),
    UnsupportedOption("network_merge_n_models", NOT_YET, "value"),
    UnsupportedOption("network_pre_calc", NOT_YET),
    UnsupportedOption(
        "network_regional_mask_max_color_codes", "regional prompts with masks are not implemented here", "value"
    ),
    UnsupportedOption("textual_inversion_embeddings", NOT_YET, "value", nargs="*"),
    UnsupportedOption("XTI_embeddings", "XTI embeddings are not supported here", "value", nargs="*"),
    UnsupportedOption("clip_guidance_scale", GUIDANCE, "value", default=0.0),
    UnsupportedOption("clip_image_guidance_scale", GUIDANCE, "value", default=0.0),
    UnsupportedOption("vgg16_guidance_scale", GUIDANCE, "value", default=0.0),
    UnsupportedOption("vgg16_guidance_layer", GUIDANCE, "value", default=20),
    UnsupportedOption("guide_image_path", GUIDANCE, "value", nargs="*"),
    UnsupportedOption("highres_fix_scale", NOT_YET, "value"),
    UnsupportedOption("highres_fix_steps", NOT_YET, "value", default=28),
    UnsupportedOption("highres_fix_strength", NOT_YET, "value"),
    UnsupportedOption("highres_fix_save_1st", NOT_YET),
    UnsupportedOption("highres_fix_latents_upscaling", NOT_YET),
    UnsupportedOption("highres_fix_upscaler", NOT_YET, "value"),
    UnsupportedOption("highres_fix_upscaler_args", NOT_YET, "value"),
    UnsupportedOption("highres_fix_disable_control_net", CONTROL),
    UnsupportedOption("negative_scale", NOT_YET, "value"),
    *(
        UnsupportedOption(name, CONTROL, "value", nargs="*")
        for name in (
            "control_net_models",
            "control_net_preps",
            "control_net_weights",
            "control_net_ratios",
            "control_net_lllite_models",
            "control_net_multipliers",
        )
    ),
    UnsupportedOption("clip_vision_strength", CONTROL, "value"),
    *(
        UnsupportedOption(name, "Deep Shrink is not implemented here", "value", default=default)
        for name, default in (
            ("ds_depth_1", None),
            ("ds_timesteps_1", 650),
            ("ds_depth_2", None),
            ("ds_timesteps_2", 650),
            ("ds_ratio", 0.5),
        )
    ),
    *(
        UnsupportedOption(name, "gradual latent is not implemented here", "value", default=default)
        for name, default in (
            ("gradual_latent_timesteps", None),
            ("gradual_latent_ratio", 0.5),
            ("gradual_latent_ratio_step", 0.125),
            ("gradual_latent_every_n_steps", 3),
            ("gradual_latent_s_noise", 1.0),
            ("gradual_latent_unsharp_params", None),
        )
    ),
    *(
        UnsupportedOption(name, NOT_YET + "; the size conditioning is the image's size, the crop (0, 0)", "value")
        for name in (
            "original_height",
            "original_width",
            "original_height_negative",
            "original_width_negative",
            "crop_top",
            "crop_left",
        )
    ),
)
NO_EFFECT = {  # accepted, with a note: what they do in sd-scripts happens here anyway or has no use
    "no_preview": "there is no preview window here",
    "opt_channels_last": "channels-last is not used here (slower on the CPUs measured, bench/NOTES.md)",
    "no_half_vae": "the VAE always decodes in float32 here",
}


@dataclass(frozen=True)
class NetworkChoice:
    module: str  # e.g. networks.lora
    weights: Path
    multiplier: float
    arguments: dict[str, str] = dataclasses.field(default_factory=dict)  # --network_args: key=value;key=value


@dataclass(frozen=True)
class GenerationOptions:
    ckpt: str
    outdir: Path
    prompts: list[SamplePrompt]
    images_per_prompt: int
    iterations: int  # --n_iter: the whole prompt list this many times
    same_seed_per_iteration: bool  # --iter_same_seed
    seed: int | None
    sampler: str
    dtype: torch.dtype
    family: ModelFamily | None
    v_parameterization: bool
    clip_skip: int | None
    xformers: bool
    networks: list[NetworkChoice]
    merge_networks: bool
    show_network_metadata: bool = False
    sequential_file_names: bool = False  # --sequential_file_name
    tokenizer_cache_dir: str | None = None


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
    parser.add_argument("--outdir", default="outputs", help="folder for the PNG files (default outputs)")
    parser.add_argument("--W", type=int, help="width (default 512, 1024 for SDXL)")
    parser.add_argument("--H", type=int, help="height (default 512, 1024 for SDXL)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (default 50)")
    parser.add_argument(
        "--scale", type=float, default=DEFAULT_SCALE, help="classifier-free guidance scale (default 7.5)"
    )
    parser.add_argument("--seed", type=int, help="seed of the first image; image i of the run gets seed + i")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="images for each prompt (default 1)")
    parser.add_argument("--n_iter", type=int, default=1, help="go through the prompts this many times (default 1)")
    parser.add_argument(
        "--iter_same_seed", action="store_true", help="one seed for every prompt of an iteration (unless it has --d)"
    )
    parser.add_argument("--shuffle_prompts", action="store_true", help="draw the prompts in a random order")
    parser.add_argument(
        "--sequential_file_name", action="store_true", help="name the images im_000001.png, im_000002.png, ..."
    )
    parser.add_argument("--tokenizer_cache_dir", help="a folder with the CLIP tokenizers (sd-scripts' layout)")
    parser.add_argument("--vae_batch_size", type=float, help="accepted; each image is decoded on its own here")
    parser.add_argument(
        "--max_embeddings_multiples", type=int, help="prompt windows of 75 tokens: 3 here (the only value taken)"
    )
    parser.add_argument("--batch_size", type=int, default=1, help="accepted; images are drawn one at a time")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"one of {', '.join(SAMPLER_NAMES)} (default ddim)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="float16 weights and autocast (CUDA only)")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--xformers", action="store_true", help="xformers attention when installed on CUDA")
    attention.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    attention.add_argument("--diffusers_xformers", action="store_true", help="the same as --xformers here")
    parser.add_argument("--clip_skip", type=int, help="use the output of the n-th last text encoder layer")
    parser.add_argument("--network_module", nargs="*", help="module of each network (one for all, or one per file)")
    parser.add_argument("--network_weights", nargs="*", help="LoRA files, applied together")
    parser.add_argument("--network_mul", type=float, nargs="*", help="strength of each network (default 1.0)")
    parser.add_argument(
        "--network_merge", action="store_true", help="merge the networks into the weights instead of applying them"
    )
    parser.add_argument(
        "--network_args", nargs="*", help="arguments of each network's module, one string per network: key=value;..."
    )
    parser.add_argument("--network_show_meta", action="store_true", help="print each network file's metadata")
    for name, why in NO_EFFECT.items():
        parser.add_argument(f"--{name}", action="store_true", help=f"accepted: {why}")
    add_unsupported_arguments(
        parser.add_argument_group("sd-scripts options that are refused here (each says why)"),
        UNSUPPORTED_GENERATION_OPTIONS,
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
    refuse_unsupported(args, UNSUPPORTED_GENERATION_OPTIONS)
    notes.extend(f"--{name}: {why}." for name, why in NO_EFFECT.items() if getattr(args, name))
    if args.vae_batch_size is not None:
        notes.append(f"--vae_batch_size {args.vae_batch_size:g}: each image is decoded on its own here.")
    if args.max_embeddings_multiples not in (None, 3):
        raise UserError(
            f"--max_embeddings_multiples {args.max_embeddings_multiples}: prompts are cut into at most 3 windows of 75"
            " tokens here; leave it out or give 3."
        )
    if args.n_iter < 1:
        raise UserError(f"--n_iter is {args.n_iter}; use 1 or more.")
    dtype = _dtype(args, notes)
    return GenerationOptions(
        ckpt=args.ckpt,
        outdir=Path(args.outdir),
        prompts=_ordered(_prompts(args), args.shuffle_prompts, args.seed),
        images_per_prompt=args.images_per_prompt,
        iterations=args.n_iter,
        same_seed_per_iteration=args.iter_same_seed,
        seed=args.seed,
        sampler=check_sampler(args.sampler, "--sampler"),
        dtype=dtype,
        family=family_from_flags(v2=args.v2),
        v_parameterization=args.v_parameterization,
        clip_skip=args.clip_skip,
        xformers=(args.xformers or args.diffusers_xformers) and torch.cuda.is_available(),
        networks=_network_choices(args.network_module, args.network_weights, args.network_mul, args.network_args),
        merge_networks=args.network_merge,
        show_network_metadata=args.network_show_meta,
        sequential_file_names=args.sequential_file_name,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
    )


def _ordered(prompts: list[SamplePrompt], shuffle: bool, seed: int | None) -> list[SamplePrompt]:
    """The prompts in their order, or (--shuffle_prompts) in a random one, the same for the same --seed."""
    if shuffle:
        random.Random(seed).shuffle(prompts)
    return prompts


def _dtype(args: argparse.Namespace, notes: list[str]) -> torch.dtype:
    if args.fp16 and not torch.cuda.is_available():
        notes.append("--fp16 needs a CUDA GPU; generating on the CPU in float32.")
        return torch.float32
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def _prompts(args: argparse.Namespace) -> list[SamplePrompt]:
    """`--prompt` or every prompt of `--from_file`; --W, --H, --steps, --scale fill what a prompt does not set."""
    size = SDXL_SIZE if local_model_family(args.ckpt) is ModelFamily.SDXL else DEFAULT_SIZE
    defaults = {"width": args.W or size, "height": args.H or size, "steps": args.steps, "scale": args.scale}
    if (args.prompt is None) == (args.from_file is None):
        raise UserError('give the prompt with --prompt "..." or a prompt file with --from_file FILE (one of them).')
    if args.prompt is not None:
        return [parse_prompt_line(args.prompt, "--prompt", defaults)]
    if not Path(args.from_file).is_file():
        raise UserError(f"{args.from_file}: no such prompt file; check --from_file.")
    return read_sample_prompts(args.from_file, defaults)


def _network_choices(
    modules: list[str] | None,
    weights: list[str] | None,
    multipliers: list[float] | None,
    arguments: list[str] | None = None,
) -> list[NetworkChoice]:
    """One choice per --network_weights file. One --network_module serves every file; a missing --network_mul is 1;
    --network_args gives each file's module arguments as sd-scripts does, `key=value;key=value`, one per file."""
    weights, modules, multipliers = weights or [], modules or [DEFAULT_NETWORK_MODULE], multipliers or []
    arguments = arguments or []
    if len(modules) not in (1, len(weights)) and weights:
        raise UserError(
            f"--network_module names {len(modules)} modules for {len(weights)} --network_weights files;"
            " give one module, or one per file."
        )
    for flag, values in (("--network_mul", multipliers), ("--network_args", arguments)):
        if len(values) > len(weights):
            raise UserError(
                f"{flag} has {len(values)} values for {len(weights)} --network_weights files;"
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
            _module_arguments(arguments[index]) if index < len(arguments) else {},
        )
        for index, file in enumerate(weights)
    ]


def _module_arguments(text: str) -> dict[str, str]:
    pairs = [pair for pair in text.split(";") if pair.strip()]
    malformed = next((pair for pair in pairs if "=" not in pair), None)
    if malformed is not None:
        raise UserError(f"--network_args '{text}': '{malformed}' is not key=value; separate pairs with ';'.")
    return dict(pair.strip().split("=", 1) for pair in pairs)


# ---------------------------------------------------------------- generating


def generate(options: GenerationOptions, now: datetime.datetime | None = None) -> list[Path]:
    """Load the model and networks, draw every image, save each as PNG; returns the files in order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(options)
    if options.show_network_metadata:
        for choice in options.networks:
            print(f"{choice.weights}:")
            print("\n".join(f"  {key}: {value}" for key, value in sorted(read_lora_file(choice.weights)[1].items())))
    networks = attach_networks(model, options.networks, options.merge_networks)
    _place(model, networks, device, options.dtype, options.xformers)
    stamp = f"{now or datetime.datetime.now():%Y%m%d%H%M%S}"
    files = []
    planned = planned_images(
        options.prompts, options.images_per_prompt, options.seed, options.iterations, options.same_seed_per_iteration
    )
    for index, prompt in enumerate(planned):
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
        name = image_file_name(stamp, index, generated.seed, options.sequential_file_names)
        files.append(save_sample_image(generated, options.outdir / name))
        print(f"saved {files[-1]}")
    return files


def image_file_name(stamp: str, index: int, seed: int, sequential: bool = False) -> str:
    """sd-scripts' names: `im_<YYYYmmddHHMMSS>_<index:03d>_<seed>.png` (the index counts the run's images), or with
    --sequential_file_name `im_<index + 1:06d>.png`."""
    return f"im_{index + 1:06d}.png" if sequential else f"im_{stamp}_{index:03d}_{seed}.png"


def planned_images(
    prompts: list[SamplePrompt],
    images_per_prompt: int,
    seed: int | None,
    iterations: int = 1,
    same_seed_per_iteration: bool = False,
) -> list[SamplePrompt]:
    """Each prompt `images_per_prompt` times, the whole list `iterations` times (--n_iter), with its seed: a prompt's
    own seed d gives its images d, d+1, ...; otherwise --seed s gives image i of the run s + i, or with
    `same_seed_per_iteration` (--iter_same_seed) every image of iteration k the seed s + k; with neither, None (a
    random seed per image, or per iteration)."""
    planned = []
    for iteration in range(iterations):
        shared = _iteration_seed(seed, iteration) if same_seed_per_iteration else None
        for prompt in prompts:
            for repeat in range(images_per_prompt):
                if prompt.seed is not None:
                    image_seed = (prompt.seed + repeat) % SEED_MODULUS
                elif same_seed_per_iteration:
                    image_seed = shared
                elif seed is not None:
                    image_seed = (seed + len(planned)) % SEED_MODULUS
                else:
                    image_seed = None
                planned.append(dataclasses.replace(prompt, seed=image_seed))
    return planned


def _iteration_seed(seed: int | None, iteration: int) -> int:
    return (seed + iteration) % SEED_MODULUS if seed is not None else random.randrange(SEED_MODULUS)


def load_model(options: GenerationOptions) -> StableDiffusionModel:
    """The model in float32 on the CPU (networks are merged in float32)."""
    return load_stable_diffusion(
        options.ckpt,
        family=options.family,
        v_parameterization=options.v_parameterization,
        tokenizer_cache_dir=options.tokenizer_cache_dir,
    )


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
        choice.multiplier, str(choice.weights), model.vae, text_encoder, model.unet, **choice.arguments
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


def run_generation_script(sdxl: bool = False, argv: list[str] | None = None) -> list[Path]:
    """gen_img_diffusers.py (every family) and sdxl_gen_img.py (SDXL models only): flags to images."""
    args = build_parser().parse_args(argv)
    if sdxl and local_model_family(args.ckpt) not in (ModelFamily.SDXL, None):
        raise UserError(f"--ckpt {args.ckpt}: not an SDXL model; draw with it using gen_img_diffusers.py.")
    notes: list[str] = []
    options = options_from_arguments(args, notes)
    for note in notes:
        print(note)
    return generate(options)
