"""Write a small Stable Diffusion model with random weights (SD1-, SD2- or SDXL-shaped) as a single file and as a
Diffusers folder, and optionally a small captioned image dataset. Nothing is downloaded.

    python tools/make_tiny_model.py --family sd1 --output_dir tiny --dataset
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.compute_options import parse_precision
from library.errors import run_cli
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import save_diffusers_folder, save_stable_diffusion_checkpoint
from library.tiny_models import make_tiny_dataset, make_tiny_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[f.value for f in ModelFamily], default="sd1")
    parser.add_argument(
        "--output_dir", required=True, help="folder for tiny-<family>.safetensors, tiny-<family>/ and dataset/"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--v_parameterization", action="store_true", help="mark the model as v-prediction")
    parser.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None)
    parser.add_argument("--dataset", action="store_true", help="also write a small DreamBooth-style dataset")
    parser.add_argument("--images", type=int, default=8, help="number of dataset images")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    output = Path(args.output_dir)
    family = ModelFamily(args.family)
    model = make_tiny_model(family, seed=args.seed, v_prediction=args.v_parameterization)
    dtype = parse_precision(args.save_precision)
    single_file = output / f"tiny-{family.value}.safetensors"
    save_stable_diffusion_checkpoint(model, single_file, dtype)
    save_diffusers_folder(model, output / f"tiny-{family.value}", dtype)
    print(f"wrote {single_file} and {output / f'tiny-{family.value}'}/")
    if args.dataset:
        dataset = make_tiny_dataset(output / "dataset", images=args.images, seed=args.seed)
        print(f"wrote {args.images} captioned images to {dataset}/")


if __name__ == "__main__":
    run_cli(main)
