"""Encode every training image with the model's VAE once and keep the latents in `_sd.npz` files (`_sdxl.npz` with
--sdxl) beside the images, as sd-scripts' tools/cache_latents.py does; the next training run with
--cache_latents_to_disk and the same dataset settings reuses them. It takes the same dataset options as the trainers.

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors --dataset_config data.toml \
        --vae_batch_size 4
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from library.dataset.arguments import add_dataset_arguments, dataset_options, prepare_dataset_plans
from library.dataset.inspection import dataset_summary_lines, debug_dataset
from library.dataset.latent_cache import cache_latents
from library.dataset.loader import BatchSettings
from library.errors import UserError, run_cli
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import local_model_family, place
from library.training.arguments import add_model_arguments
from library.training.families import family_class
from library.training.options import ModelOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(parser.add_argument_group("model"))
    parser.add_argument(
        "--sdxl", action="store_true", help="the model is SDXL: write _sdxl.npz files for sdxl_train_network.py"
    )
    parser.add_argument("--seed", type=int, help="seed of the posterior samples that are cached")
    parser.add_argument(
        "--skip_existing", action="store_true", help="accepted for compatibility; up-to-date files are always kept"
    )
    parser.add_argument(
        "--output_dir", default=".", help="where --debug_dataset writes its contact sheets (under debug_dataset/)"
    )
    add_dataset_arguments(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    notes = []
    # this tool's only job is the disk cache, so caching conflicts are checked as in training
    dataset = replace(dataset_options(args, notes, args.sdxl), cache_latents=True, cache_latents_to_disk=True)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    plans, dataset_notes = prepare_dataset_plans(dataset)
    for line in notes + dataset_notes + dataset_summary_lines(plans):
        print(line)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_options = ModelOptions(
        args.pretrained_model_name_or_path,
        v2=args.v2,
        v_parameterization=args.v_parameterization,
        vae=args.vae,
        mixed_precision=args.mixed_precision if device == "cuda" else "no",
        no_half_vae=args.no_half_vae,
    )
    _check_sdxl_flag(args.pretrained_model_name_or_path, args.sdxl)
    family = family_class(args.sdxl)
    model = family.load(model_options)
    if dataset.debug_dataset:
        settings = BatchSettings(
            seed=seed, max_token_length=dataset.max_token_length, skip_bad_images=dataset.skip_bad_images
        )
        lines, _ = debug_dataset(plans, model.tokenizers[0], settings, Path(args.output_dir) / "debug_dataset")
        print("\n".join(lines))
        return
    dtype = family(model, model_options).vae_dtype
    vae = place(model.vae, device, dtype)
    torch.manual_seed(seed)
    started = time.perf_counter()
    _, encoded, reused = cache_latents(
        plans,
        vae,
        device,
        dtype,
        dataset.vae_batch_size,
        to_disk=True,
        skip_bad_images=dataset.skip_bad_images,
        suffix=family.latent_cache_suffix,
    )
    seconds = time.perf_counter() - started
    print(
        f"{encoded} images encoded on {device} in {dtype} ({encoded / max(seconds, 1e-9):.1f} images/s), {reused}"
        " up-to-date cache files reused"
    )


def _check_sdxl_flag(path: str, sdxl: bool) -> None:
    """The model's family against --sdxl, refused with this tool's fix (the trainers name the other script)."""
    found = local_model_family(path)
    if found is not None and sdxl != (found is ModelFamily.SDXL):
        fix = "leave out --sdxl" if sdxl else "add --sdxl"
        raise UserError(f"{path}: an {found.label} model; {fix}, so that the latents are cached for its trainer.")


if __name__ == "__main__":
    run_cli(main)
