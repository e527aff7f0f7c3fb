"""Encode every training image with the model's VAE once and keep the latents in `_sd.npz` files beside the
images, as sd-scripts' tools/cache_latents.py does; the next `train_network.py --cache_latents_to_disk` run with the
same dataset settings reuses them. It takes the same dataset options as train_network.py.

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors --dataset_config data.toml --vae_batch_size 4
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from library.dataset.arguments import add_dataset_arguments, datasets_from_arguments
from library.dataset.inspection import dataset_summary_lines, debug_dataset
from library.dataset.latent_cache import cache_latents
from library.dataset.loader import BatchSettings
from library.errors import UserError, run_cli
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import place
from library.training.options import add_model_arguments, load_base_model, vae_dtype

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(parser.add_argument_group("model"))
    parser.add_argument("--seed", type=int, help="seed of the posterior samples that are cached")
    parser.add_argument("--skip_existing", action="store_true", help="accepted for compatibility; up-to-date files are always kept")
    parser.add_argument("--output_dir", default=".", help="where --debug_dataset writes its contact sheets (under debug_dataset/)")
    add_dataset_arguments(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.cache_latents_to_disk = True  # this tool's only job, so caching conflicts are checked as in training
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    plans, notes = datasets_from_arguments(args)
    for line in notes + dataset_summary_lines(plans):
        print(line)
    model = load_base_model(args)
    if model.family is ModelFamily.SDXL:
        raise UserError(f"{args.pretrained_model_name_or_path}: an SDXL model; SDXL latent caching (_sdxl.npz files) is not supported yet.")
    if args.debug_dataset:
        settings = BatchSettings(seed=seed, max_token_length=args.max_token_length, skip_bad_images=args.skip_bad_images)
        lines, _ = debug_dataset(plans, model.tokenizers[0], settings, Path(args.output_dir) / "debug_dataset")
        print("\n".join(lines))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else vae_dtype(args)
    vae = place(model.vae, device, dtype)
    torch.manual_seed(seed)
    started = time.perf_counter()
    _, encoded, reused = cache_latents(plans, vae, device, dtype, args.vae_batch_size, to_disk=True, skip_bad_images=args.skip_bad_images)
    seconds = time.perf_counter() - started
    print(f"{encoded} images encoded on {device} in {dtype} ({encoded / max(seconds, 1e-9):.1f} images/s), {reused} up-to-date cache files reused")


if __name__ == "__main__":
    run_cli(main)
