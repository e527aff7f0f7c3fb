"""The generation scripts' flags (sd-scripts' names; every one is known, those not implemented are refused in one
sentence unless they hold sd-scripts' default) and the `GenerationOptions` they become, once, at the edge."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from library.dataset.config import IMAGE_SUFFIXES
from library.errors import UserError
from library.model_files.family import ModelFamily, family_from_flags
from library.model_files.stable_diffusion import local_model_family
from library.sampling import (
    DEFAULT_SAMPLER,
    SAMPLER_NAMES,
    SamplePrompt,
    check_sampler,
    parse_prompt_line,
    read_sample_prompts,
)
from library.sampling.prompts import DEFAULT_SCALE, DEFAULT_SIZE
from library.unsupported_options import UnsupportedOption, add_unsupported_arguments, refuse_unsupported
from library.weighted_captions import check_prompt_weights

DEFAULT_STEPS = 50  # gen_img_diffusers' default (training samples use 30)
SDXL_SIZE = 1024  # sdxl_gen_img.py's default width and height
DEFAULT_NETWORK_MODULE = "networks.lora"
DEFAULT_STRENGTH = 0.8  # sd-scripts' img2img strength
DEFAULT_HIGHRES_STEPS = 28  # sd-scripts' first-pass steps of the highres fix
IMAGE_SIZE_STEP = 32  # img2img and the highres fix's first pass round sizes down to this, as sd-scripts

NOT_YET = "not implemented here yet (docs/generation.md lists what is)"
GUIDANCE = "CLIP and VGG16 guidance are not implemented here; they date from SD 1.x and few use them"
CONTROL = "ControlNet and ControlNet-LLLite are not implemented here"
UNSUPPORTED_GENERATION_OPTIONS = (
    UnsupportedOption("ddim_eta", NOT_YET, "value"),
    UnsupportedOption("vae_slices", NOT_YET, "value"),
    UnsupportedOption("replace_clip_l14_336", "the 336-pixel CLIP vision variant is not supported here"),
    UnsupportedOption("network_merge_n_models", NOT_YET, "value"),
    UnsupportedOption(
        "network_regional_mask_max_color_codes", "regional prompts with masks are not implemented here", "value"
    ),
    UnsupportedOption("XTI_embeddings", "XTI embeddings are not supported here", "value", nargs="*"),
    UnsupportedOption("clip_guidance_scale", GUIDANCE, "value", default=0.0),
    UnsupportedOption("clip_image_guidance_scale", GUIDANCE, "value", default=0.0),
    UnsupportedOption("vgg16_guidance_scale", GUIDANCE, "value", default=0.0),
    UnsupportedOption("vgg16_guidance_layer", GUIDANCE, "value", default=20),
    UnsupportedOption(
        "guide_image_path",
        "guide images (ControlNet hints, CLIP and VGG16 guidance) are not implemented here",
        "value",
        nargs="*",
    ),
    UnsupportedOption(
        "highres_fix_upscaler",
        "upscaler modules are not supported here; the highres fix upscales with Lanczos or, with"
        " --highres_fix_latents_upscaling, in latent space",
        "value",
    ),
    UnsupportedOption("highres_fix_upscaler_args", "upscaler modules are not supported here", "value"),
    UnsupportedOption("highres_fix_disable_control_net", CONTROL),
    UnsupportedOption(
        "negative_scale", "sd-scripts' separate guidance scale for the negative prompt is not implemented here", "value"
    ),
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
)
NO_EFFECT = {  # accepted, with a note: what they do in sd-scripts happens here anyway or has no use
    "no_preview": "there is no preview window here",
    "opt_channels_last": "channels-last is not used here (slower on the CPUs measured, bench/NOTES.md)",
    "no_half_vae": "the VAE always decodes in float32 here",
}
SDXL_CONDITIONING = (  # sdxl_gen_img.py's flags -> SamplePrompt fields (also prompt-line options --ow, --oh, ...)
    "original_width",
    "original_height",
    "original_width_negative",
    "original_height_negative",
    "crop_top",
    "crop_left",
    "target_width",  # not in sd-scripts, whose target size is always the image's
    "target_height",
)


@dataclass(frozen=True)
class NetworkChoice:
    module: str  # e.g. networks.lora
    weights: Path
    multiplier: float
    arguments: dict[str, str] = field(default_factory=dict)  # --network_args: key=value;key=value


@dataclass(frozen=True)
class HighresFix:
    """sd-scripts' highres fix: draw at `scale` times the size with `steps`, upscale (Lanczos, or the latents
    bilinearly), then img2img at the full size with the run's steps and strength, seed + 1."""

    scale: float
    steps: int = DEFAULT_HIGHRES_STEPS
    first_strength: float | None = None  # --highres_fix_strength: the first pass's img2img strength
    latents_upscaling: bool = False
    save_first: bool = False


@dataclass(frozen=True)
class Grid:
    """--grid: one contact sheet, rows = prompts, columns = the network files one at a time (`epochs`) or the
    networks at each strength of `multipliers`."""

    multipliers: tuple[float, ...] | None = None  # None: one column per file


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
    merge_networks: bool  # --network_merge or --network_pre_calc
    show_network_metadata: bool = False
    sequential_file_names: bool = False  # --sequential_file_name
    tokenizer_cache_dir: str | None = None
    batch_size: int = 1
    vae_batch_size: int | None = None  # images decoded at a time; None: a whole batch
    max_windows: int = 1  # --max_embeddings_multiples: 75-token windows of a prompt
    vae: str | None = None
    start_images: list[Path] = field(default_factory=list)  # --image_path
    masks: list[Path] = field(default_factory=list)  # --mask_path
    strength: float = DEFAULT_STRENGTH
    fixed_size: bool = False  # --W and --H both given: img2img images are resized to them
    original_file_names: bool = False  # --use_original_file_name
    highres_fix: HighresFix | None = None
    grid: Grid | None = None
    embeddings: list[Path] = field(default_factory=list)  # --textual_inversion_embeddings
    interactive: bool = False  # --interactive: prompts typed one at a time, read with `line_defaults`
    line_defaults: dict[str, object] = field(default_factory=dict)


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
    parser.add_argument(
        "--interactive", action="store_true", help="type prompts (with prompt-line options) one at a time; Ctrl+D ends"
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
    parser.add_argument(
        "--vae_batch_size", type=float, help="images decoded at a time; below 1, that share of the batch (default all)"
    )
    parser.add_argument(
        "--max_embeddings_multiples", type=int, help="prompts may be this many 75-token windows long (default 1)"
    )
    parser.add_argument("--batch_size", type=int, default=1, help="images drawn in one U-Net call (default 1)")
    parser.add_argument("--vae", help="use this VAE instead of the model's: a VAE file or a Diffusers VAE folder")
    parser.add_argument("--image_path", help="img2img: an image, or a folder of them (png, jpg, jpeg, webp, bmp)")
    parser.add_argument("--mask_path", help="inpainting: a mask image or a folder of them (white is drawn anew)")
    parser.add_argument("--strength", type=float, help="img2img: how far the image is noised, 0 to 1 (default 0.8)")
    parser.add_argument(
        "--use_original_file_name", action="store_true", help="img2img: name each image after its source image"
    )
    parser.add_argument("--highres_fix_scale", type=float, help="highres fix: draw at this share of the size first")
    parser.add_argument(
        "--highres_fix_steps", type=int, default=DEFAULT_HIGHRES_STEPS, help="highres fix: first-pass steps (28)"
    )
    parser.add_argument(
        "--highres_fix_strength", type=float, help="highres fix: first-pass img2img strength (default --strength)"
    )
    parser.add_argument("--highres_fix_save_1st", action="store_true", help="highres fix: save the first pass too")
    parser.add_argument(
        "--highres_fix_latents_upscaling", action="store_true", help="highres fix: upscale the latents, not the image"
    )
    for name in SDXL_CONDITIONING:
        parser.add_argument(f"--{name}", type=int, help="SDXL size conditioning (sdxl_gen_img.py)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"one of {', '.join(SAMPLER_NAMES)} (default ddim)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="float16 weights and autocast (CUDA only)")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--xformers", action="store_true", help="xformers attention when installed on CUDA")
    attention.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    attention.add_argument("--diffusers_xformers", action="store_true", help="the same as --xformers here")
    parser.add_argument(
        "--textual_inversion_embeddings", nargs="*", help="embedding files; each file's name becomes a prompt word"
    )
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
    parser.add_argument(
        "--network_pre_calc",
        action="store_true",
        help="merge the networks into the weights before drawing (applied instead when --am changes their strengths)",
    )
    parser.add_argument(
        "--grid",
        help="one contact sheet: 'epochs' (a column per --network_weights file) or 'mul=0,0.5,1' (per strength)",
    )
    for name, why in NO_EFFECT.items():
        parser.add_argument(f"--{name}", action="store_true", help=f"accepted: {why}")
    add_unsupported_arguments(
        parser.add_argument_group("sd-scripts options that are refused here (each says why)"),
        UNSUPPORTED_GENERATION_OPTIONS,
    )
    return parser


def options_from_arguments(args: argparse.Namespace, notes: list[str]) -> GenerationOptions:
    """The checked options; `notes` collects what was changed on this machine (e.g. --fp16 without CUDA)."""
    for flag, value in (
        ("--images_per_prompt", args.images_per_prompt),
        ("--n_iter", args.n_iter),
        ("--batch_size", args.batch_size),
        ("--max_embeddings_multiples", args.max_embeddings_multiples),
        ("--clip_skip", args.clip_skip),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} is {value}; use 1 or more.")
    if args.xformers and not torch.cuda.is_available():
        notes.append("--xformers needs a CUDA GPU; using PyTorch's scaled-dot-product attention.")
    if args.v2 and args.clip_skip:
        notes.append(
            f"--clip_skip {args.clip_skip} with --v2: SD 2.x text encoders already stop one layer early,"
            " so this skips more; usually leave it out."
        )
    refuse_unsupported(args, UNSUPPORTED_GENERATION_OPTIONS)
    notes.extend(f"--{name}: {why}." for name, why in NO_EFFECT.items() if getattr(args, name))
    if args.mask_path and args.network_weights:
        raise UserError(
            f"--mask_path {args.mask_path} with --network_weights: sd-scripts takes the mask as the networks' regions"
            " (regional LoRA), which is not implemented here, so it is not read as an inpainting mask either; inpaint"
            " without networks, or with a checkpoint the LoRA is merged into (networks/merge_lora.py)."
        )
    if args.mask_path and not args.image_path:
        raise UserError(f"--mask_path {args.mask_path}: a mask needs the image it masks; give --image_path too.")
    start_images = _image_files(args.image_path, "--image_path")
    masks = _image_files(args.mask_path, "--mask_path")
    strength = _fraction(args.strength, "--strength", DEFAULT_STRENGTH)
    line_defaults = _line_defaults(args)
    prompts = [_weights_checked(prompt) for prompt in _prompts(args, start_images, line_defaults)]
    if args.prompt is None and args.from_file is None and not args.interactive:  # each image with its own prompt
        start_images = [file for file in start_images for _ in range(args.images_per_prompt)]
        masks = [file for file in masks for _ in range(args.images_per_prompt)]
    grid = _grid(args.grid, args.network_weights)
    if grid and args.interactive:
        raise UserError("--grid draws a whole prompt list on one sheet; leave out --interactive.")
    merge = args.network_merge or _pre_calculated(args, prompts, grid, notes)
    if grid and merge:
        raise UserError("--grid changes the networks' strengths between columns; leave out --network_merge.")
    return GenerationOptions(
        ckpt=args.ckpt,
        outdir=Path(args.outdir),
        prompts=_ordered(prompts, args.shuffle_prompts, args.seed),
        images_per_prompt=args.images_per_prompt,
        iterations=1 if args.interactive else args.n_iter,
        same_seed_per_iteration=args.iter_same_seed,
        seed=args.seed,
        sampler=check_sampler(args.sampler, "--sampler"),
        dtype=_dtype(args, notes),
        family=family_from_flags(v2=args.v2),
        v_parameterization=args.v_parameterization,
        clip_skip=args.clip_skip,
        xformers=(args.xformers or args.diffusers_xformers) and torch.cuda.is_available(),
        networks=_network_choices(args.network_module, args.network_weights, args.network_mul, args.network_args),
        merge_networks=merge,
        show_network_metadata=args.network_show_meta,
        sequential_file_names=args.sequential_file_name,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        batch_size=args.batch_size,
        vae_batch_size=_vae_batch_size(args.vae_batch_size, args.batch_size),
        max_windows=args.max_embeddings_multiples or 1,
        vae=args.vae,
        start_images=start_images,
        masks=masks,
        strength=strength,
        fixed_size=args.W is not None and args.H is not None,
        original_file_names=args.use_original_file_name,
        highres_fix=_highres_fix(args),
        grid=grid,
        embeddings=[Path(file) for file in args.textual_inversion_embeddings or []],
        interactive=args.interactive,
        line_defaults=line_defaults,
    )


def _pre_calculated(args: argparse.Namespace, prompts: list[SamplePrompt], grid: Grid | None, notes: list[str]) -> bool:
    """--network_pre_calc merges the networks unless their strengths change during the run (a prompt's --am, typed
    prompts, a grid): sd-scripts then merges again for each batch; here they are applied, which draws the same
    images up to rounding."""
    if not args.network_pre_calc:
        return False
    if args.interactive or grid is not None or any(prompt.network_multipliers is not None for prompt in prompts):
        notes.append(
            "--network_pre_calc: the networks' strengths change during this run, so they are applied rather than"
            " merged (the same images up to rounding)."
        )
        return False
    return True


def _vae_batch_size(value: float | None, batch_size: int) -> int | None:
    """sd-scripts' --vae_batch_size: a count, or below 1 a share of the batch."""
    if value is None:
        return None
    if value <= 0:
        raise UserError(f"--vae_batch_size is {value:g}; use a count such as 2, or a share of the batch such as 0.5.")
    return max(1, int(batch_size * value)) if value < 1 else int(value)


def _fraction(value: float | None, flag: str, default: float | None) -> float | None:
    if value is None:
        return default
    if not 0 < value <= 1:
        raise UserError(f"{flag} is {value:g}; use a value above 0 and at most 1, such as 0.8.")
    return value


def _highres_fix(args: argparse.Namespace) -> HighresFix | None:
    if args.highres_fix_scale is None:
        return None
    if not 0 < args.highres_fix_scale < 1:
        raise UserError(
            f"--highres_fix_scale is {args.highres_fix_scale:g}; give the first pass's share of the size, such as 0.5."
        )
    if args.highres_fix_steps < 1:
        raise UserError(f"--highres_fix_steps is {args.highres_fix_steps}; use 1 or more.")
    return HighresFix(
        scale=args.highres_fix_scale,
        steps=args.highres_fix_steps,
        first_strength=_fraction(args.highres_fix_strength, "--highres_fix_strength", None),
        latents_upscaling=args.highres_fix_latents_upscaling,
        save_first=args.highres_fix_save_1st,
    )


def _grid(text: str | None, weights: list[str] | None) -> Grid | None:
    if text is None:
        return None
    if text == "epochs":
        if len(weights or []) < 2:
            raise UserError("--grid epochs: give two or more --network_weights files, one column each.")
        return Grid()
    if text.startswith("mul="):
        try:
            multipliers = tuple(float(value) for value in text[4:].split(","))
        except ValueError:
            multipliers = ()
        if multipliers and weights:
            return Grid(multipliers)
    raise UserError(
        f"--grid {text}: use 'epochs' (one column per --network_weights file) or 'mul=0,0.5,1' (one column per"
        " strength), with --network_weights."
    )


def _image_files(path: str | None, flag: str) -> list[Path]:
    """--image_path / --mask_path: the file, or the folder's images (the dataset's suffixes: png, jpg, jpeg, webp,
    bmp) sorted by name; each checked to open as an image."""
    if path is None:
        return []
    folder = Path(path)
    if folder.is_dir():
        files = sorted(file for file in folder.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{flag} {path}: the folder holds no image (png, jpg, jpeg, webp, bmp); check the path.")
    elif folder.is_file():
        files = [folder]
    else:
        raise UserError(f"{flag} {path}: no such file or folder; check the path.")
    for file in files:
        try:
            with Image.open(file) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(
                f"{file}: cannot be read as an image ({error}); replace it or remove it from {flag}."
            ) from None
    return files


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


def _prompts(args: argparse.Namespace, start_images: list[Path], defaults: dict[str, object]) -> list[SamplePrompt]:
    """`--prompt`, every prompt of `--from_file`, or (img2img with neither, as sd-scripts) the prompts written in
    the start images' PNG text; --W, --H, --steps, --scale and sdxl_gen_img.py's conditioning flags fill what a
    prompt does not set (`defaults`)."""
    if args.interactive:
        if args.prompt is not None or args.from_file is not None:
            raise UserError("--interactive reads the prompts as they are typed; leave out --prompt and --from_file.")
        return []
    if args.prompt is not None and args.from_file is not None:
        raise UserError("give the prompt with --prompt or a prompt file with --from_file, not both.")
    if args.prompt is not None:
        return [parse_prompt_line(args.prompt, "--prompt", defaults, generation=True)]
    if args.from_file is not None:
        if not Path(args.from_file).is_file():
            raise UserError(f"{args.from_file}: no such prompt file; check --from_file.")
        return read_sample_prompts(args.from_file, defaults, generation=True)
    if start_images:
        return _prompts_of_images(start_images, defaults)
    raise UserError('give the prompt with --prompt "..." or a prompt file with --from_file FILE.')


def _line_defaults(args: argparse.Namespace) -> dict[str, object]:
    """What a prompt line does not set: --W, --H, --steps, --scale and sdxl_gen_img.py's conditioning flags."""
    size = SDXL_SIZE if local_model_family(args.ckpt) is ModelFamily.SDXL else DEFAULT_SIZE
    defaults = {"width": args.W or size, "height": args.H or size, "steps": args.steps, "scale": args.scale}
    return defaults | {name: getattr(args, name) for name in SDXL_CONDITIONING if getattr(args, name) is not None}


def typed_prompt(line: str, defaults: dict[str, object]) -> SamplePrompt:
    """A prompt typed in --interactive mode, read as a prompt-file line."""
    return _weights_checked(parse_prompt_line(line, "the typed prompt", defaults, generation=True))


def _weights_checked(prompt: SamplePrompt) -> SamplePrompt:
    for text in (prompt.prompt, prompt.negative_prompt or ""):
        check_prompt_weights(text, f"prompt '{prompt.prompt}'")
    return prompt


def _prompts_of_images(files: list[Path], defaults: dict) -> list[SamplePrompt]:
    prompts = []
    for file in files:
        with Image.open(file) as image:
            text = getattr(image, "text", {})
        if "prompt" not in text:
            raise UserError(f"{file}: the image has no prompt in its PNG text; give --prompt or --from_file.")
        prompts.append(SamplePrompt(**defaults, prompt=text["prompt"], negative_prompt=text.get("negative-prompt")))
    return prompts


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
