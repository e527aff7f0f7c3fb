"""The dataset options of train_network.py and tools/cache_latents.py, with sd-scripts' names (specs/training.md
section 11). Options that are fallbacks of config keys take their type and default from the config schema (KEYS);
they parse to None (on/off flags: False) when not given, so that the schema's default is the only one."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from library.dataset.buckets import SDXL_STEP_DIVISOR, STEP_DIVISOR
from library.dataset.config import KEYS
from library.dataset.loader import DEFAULT_PRIOR_LOSS_WEIGHT, DEFAULT_WORKERS, WORKERS_WITH_CACHED_LATENTS
from library.dataset.plan import DatasetPlan, prepare_datasets
from library.dataset.resize import INTERPOLATIONS
from library.errors import UserError
from library.text_encoding import TOKEN_LENGTHS

CONFIG_KEY_HELP = {
    "train_batch_size": "batch size per device (config key batch_size)",
    "resolution": "training resolution, 'N' or 'W,H'",
    "enable_bucket": "enable aspect-ratio bucketing",
    "min_bucket_reso": "smallest bucket side",
    "max_bucket_reso": "largest bucket side",
    "bucket_reso_steps": "bucket sides are multiples of this (a multiple of 64)",
    "bucket_no_upscale": "make each image's bucket from its own size, never upscaling",
    "validation_seed": "seed of the validation split",
    "validation_split": "fraction of the images held out for validation",
    "dataset_repeats": "num_repeats of subsets that do not set it",
    "shuffle_caption": "shuffle the separated tags of each caption every time it is used",
    "caption_separator": "the tag separator",
    "keep_tokens": "keep the first N tags in place when shuffling or dropping",
    "keep_tokens_separator": "tags before this marker (and after a second one) stay in place",
    "secondary_separator": "tags joined by this count as one, and it becomes caption_separator afterwards",
    "enable_wildcard": "{a|b} choices and one random line of multi-line captions",
    "color_aug": "weak random hue or brightness change (not with latent caching)",
    "flip_aug": "random horizontal flip",
    "face_crop_aug_range": "'low,high': without buckets, scale name_cx_cy_w_h images so the face is 1/high..1/low",
    "random_crop": "crop at a random place instead of the centre (not with latent caching)",
    "caption_prefix": "text put before every caption",
    "caption_suffix": "text put after every caption",
    "token_warmup_min": "tags used at step 0 of token warmup",
    "token_warmup_step": "step at which all tags are used (below 1: fraction of max_train_steps); 0 = off",
    "resize_interpolation": "resize filter (default: area when shrinking, Lanczos when enlarging)",
    "caption_dropout_rate": "probability of training a sample with an empty caption",
    "caption_dropout_every_n_epochs": "empty captions in every epoch divisible by N",
    "caption_tag_dropout_rate": "probability of dropping each tag",
    "alpha_mask": "use the alpha channel as a per-pixel loss weight",
    "caption_extension": "caption file extension (.txt is used when there are no .caption files)",
    "cache_info": "accepted for compatibility; image sizes are read from the file headers, which is fast",
}
ARGPARSE_TYPES = {"int": int, "float": float, "str": str, "resolution": str}


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset_config", help="dataset config file (.toml or .json) with [general] and [[datasets]]")
    group.add_argument(
        "--train_data_dir", help="folder of <repeats>_<identifier> <class> image folders (without --dataset_config)"
    )
    group.add_argument("--reg_data_dir", help="folder of <repeats>_<class> regularization image folders")
    group.add_argument("--in_json", help="fine-tuning metadata JSON for --train_data_dir")
    for key in KEYS.values():
        if key.cli:
            _add_config_key_option(group, key.cli, key.kind, key.default)
    group.add_argument("--caption_extention", help=argparse.SUPPRESS)  # sd-scripts' misspelled alias
    group.add_argument(
        "--weighted_captions",
        action="store_true",
        help="read (word:1.2), (word) and [word] in captions as token weights",
    )
    group.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="leave out images that cannot be read, with a note, instead of stopping",
    )
    group.add_argument("--dataset_class", help=argparse.SUPPRESS)
    group.add_argument(
        "--max_token_length",
        type=int,
        choices=[n for n in TOKEN_LENGTHS if n],
        help="caption tokens: 75 (default), 150 or 225",
    )
    group.add_argument(
        "--prior_loss_weight",
        type=float,
        default=DEFAULT_PRIOR_LOSS_WEIGHT,
        help="loss weight of regularization images (default %(default)s)",
    )
    group.add_argument(
        "--debug_dataset",
        action="store_true",
        help="print the buckets and sample captions, write a contact sheet per bucket, and exit",
    )

    caching = parser.add_argument_group("latent caching and loading")
    caching.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image once with the VAE and keep the latents in memory",
    )
    caching.add_argument(
        "--cache_latents_to_disk",
        action="store_true",
        help="also keep them in _sd.npz files beside the images for the next run",
    )
    caching.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE batch while caching (default 1)")
    caching.add_argument(
        "--skip_cache_check", action="store_true", help="accepted for compatibility; cache files are always checked"
    )
    caching.add_argument(
        "--max_data_loader_n_workers",
        type=int,
        help=(
            f"data loader processes (default {DEFAULT_WORKERS}, or {WORKERS_WITH_CACHED_LATENTS} with cached latents;"
            " at most the CPU count)"
        ),
    )
    caching.add_argument(
        "--persistent_data_loader_workers", action="store_true", help="keep the data loader processes between epochs"
    )


def _add_config_key_option(group, name: str, kind: str, default: Any) -> None:
    help_text = CONFIG_KEY_HELP[name]
    if kind == "bool":
        group.add_argument(f"--{name}", action="store_true", help=help_text)
        return
    shown = f" (default {default})" if default not in (None, "") else ""
    if kind == "float_pair":
        group.add_argument(f"--{name}", type=_float_pair, help=help_text + shown)
    elif name == "resize_interpolation":
        group.add_argument(f"--{name}", choices=INTERPOLATIONS, help=help_text)
    else:
        group.add_argument(f"--{name}", type=ARGPARSE_TYPES[kind], help=help_text + shown)


def _float_pair(text: str) -> list[float]:
    parts = text.split(",")
    try:
        pair = [float(part) for part in parts]
    except ValueError:
        pair = []
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"'{text}' is not two numbers 'low,high'")
    return pair


@dataclass(frozen=True)
class DatasetOptions:
    """The dataset flags, typed: where the images are, the values config keys fall back to, caching and loading."""

    dataset_config: str | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None
    fallbacks: Mapping[str, Any] = field(default_factory=dict)  # config-key options by name (see config_fallbacks)
    skip_bad_images: bool = False
    max_token_length: int | None = None
    prior_loss_weight: float = DEFAULT_PRIOR_LOSS_WEIGHT
    debug_dataset: bool = False
    cache_latents: bool = False  # also on with --cache_latents_to_disk
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    max_data_loader_n_workers: int | None = None
    persistent_data_loader_workers: bool = False
    weighted_captions: bool = False
    bucket_step_divisor: int = STEP_DIVISOR  # bucket_reso_steps must be a multiple of it: 64, or 32 for SDXL


def dataset_options(args: argparse.Namespace, notes: list[str], sdxl: bool = False) -> DatasetOptions:
    """The typed dataset options of parsed flags. What is not supported is refused; options that are accepted but
    change nothing add a note to `notes`."""
    if args.dataset_class:
        raise UserError(
            "--dataset_class (a custom Python dataset) is not supported;"
            " describe the images with --dataset_config instead."
        )
    if args.vae_batch_size < 1:
        raise UserError(f"--vae_batch_size is {args.vae_batch_size}; use 1 or more.")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise UserError(
            f"--max_data_loader_n_workers is {args.max_data_loader_n_workers};"
            " use 0 (load in the main process) or more."
        )
    if args.skip_cache_check:
        notes.append(
            "--skip_cache_check ignored: existing latent files are always checked,"
            " so that stale ones are never trained on."
        )
    if args.persistent_data_loader_workers and args.max_data_loader_n_workers == 0:
        notes.append(
            "--persistent_data_loader_workers ignored:"
            " there are no worker processes with --max_data_loader_n_workers 0."
        )
    values = {name: getattr(args, name) for name in DATASET_FLAGS}
    return DatasetOptions(
        **values,
        fallbacks=config_fallbacks(args),
        cache_latents=bool(args.cache_latents or args.cache_latents_to_disk),  # --cache_latents_to_disk implies it
        bucket_step_divisor=SDXL_STEP_DIVISOR if sdxl else STEP_DIVISOR,
    )


DATASET_FLAGS = (
    "dataset_config",
    "train_data_dir",
    "reg_data_dir",
    "in_json",
    "skip_bad_images",
    "max_token_length",
    "prior_loss_weight",
    "debug_dataset",
    "weighted_captions",
    "cache_latents_to_disk",
    "vae_batch_size",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
)


def config_fallbacks(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line values that config keys fall back to, by option name."""
    values = {key.cli: getattr(args, key.cli) for key in KEYS.values() if key.cli}
    if args.caption_extention:  # as in sd-scripts, the misspelled alias wins when given
        values["caption_extension"] = args.caption_extention
    return values


def prepare_dataset_plans(options: DatasetOptions, seed: int = 0) -> tuple[list[DatasetPlan], list[str]]:
    """Checked dataset plans and the notes for the start-up summary; one UserError lists every problem. `seed`
    splits off the validation images of datasets without their own validation_seed."""
    return prepare_datasets(
        options.dataset_config,
        options.fallbacks,
        options.train_data_dir,
        options.reg_data_dir,
        options.in_json,
        skip_bad_images=options.skip_bad_images,
        cache_latents=options.cache_latents,
        bucket_step_divisor=options.bucket_step_divisor,
        split_seed=seed,
    )
