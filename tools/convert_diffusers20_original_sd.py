"""Convert a Stable Diffusion model between a single file (.safetensors/.ckpt, LDM/SGM layout) and a Diffusers
folder, in either direction, for SD1.x, SD2.x and SDXL. The family is recognised from the weights.

    python tools/convert_diffusers20_original_sd.py model.safetensors model_diffusers/
    python tools/convert_diffusers20_original_sd.py model_diffusers/ model.safetensors --save_precision_as fp16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from library.compute_options import parse_precision
from library.errors import run_cli
from library.model_files.containers import CHECKPOINT_SUFFIXES
from library.model_files.family import family_from_flags
from library.model_files.stable_diffusion import (
    TOKENIZER_FOLDERS,
    load_stable_diffusion,
    save_diffusers_folder,
    save_stable_diffusion_checkpoint,
)
from library.model_files.tokenizer import load_tokenizers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_to_load", help="single file (.safetensors/.ckpt) or Diffusers folder to read")
    parser.add_argument(
        "model_to_save",
        help="a name ending in .safetensors/.ckpt writes a single file; anything else a Diffusers folder",
    )
    parser.add_argument("--v1", action="store_true", help="the model must be SD1.x (checked against the weights)")
    parser.add_argument("--v2", action="store_true", help="the model must be SD2.x (checked against the weights)")
    parser.add_argument("--sdxl", action="store_true", help="the model must be SDXL (checked against the weights)")
    parser.add_argument(
        "--v_parameterization", action="store_true", help="mark the model as v-prediction (SD2.x 768-v)"
    )
    parser.add_argument(
        "--unet_use_linear_projection",
        action="store_true",
        help="accepted for sd-scripts compatibility: the U-Net's projection type is always taken from the weights",
    )
    parser.add_argument("--fp16", action="store_true", help="load in fp16 and save in fp16")
    parser.add_argument("--bf16", action="store_true", help="load in bf16 and save in bf16")
    parser.add_argument("--float", action="store_true", help="load in float32 and save in float32")
    parser.add_argument(
        "--save_precision_as",
        "--save_precision",
        choices=["fp16", "bf16", "float"],
        default=None,
        help="precision of the saved model",
    )
    parser.add_argument("--epoch", type=int, default=0, help="epoch written into a .ckpt")
    parser.add_argument("--global_step", type=int, default=0, help="global step written into a .ckpt")
    parser.add_argument(
        "--reference_model",
        default=None,
        help="a Diffusers folder whose tokenizers are used instead of the shipped ones",
    )
    parser.add_argument(
        "--use_safetensors",
        action="store_true",
        help="accepted for compatibility: Diffusers folders are always written as safetensors",
    )
    parser.add_argument(
        "--tokenizer_cache_dir", default=None, help="folder with tokenizers in sd-scripts' cache layout"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    load_precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "float"
    save_dtype = parse_precision(
        args.save_precision_as or (load_precision if args.fp16 or args.bf16 or args.float else None)
    )
    started = time.perf_counter()
    model = load_stable_diffusion(
        args.model_to_load,
        family=family_from_flags(args.v1, args.v2, args.sdxl),
        v_parameterization=args.v_parameterization,
        dtype=parse_precision(load_precision),
        tokenizer_cache_dir=args.tokenizer_cache_dir,
    )
    if args.reference_model:
        reference = Path(args.reference_model)
        model.tokenizers = load_tokenizers(model.family, [reference / name for name in TOKENIZER_FOLDERS])
    print(
        f"loaded {model.family.label} model from {args.model_to_load}"
        f" ({'v-prediction' if model.v_prediction else 'epsilon'} prediction: {model.prediction_reason})"
    )
    target = Path(args.model_to_save)
    if target.suffix.lower() in CHECKPOINT_SUFFIXES:
        save_stable_diffusion_checkpoint(model, target, save_dtype, epoch=args.epoch, global_step=args.global_step)
    else:
        save_diffusers_folder(model, target, save_dtype)
    print(f"saved {target} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run_cli(main)
