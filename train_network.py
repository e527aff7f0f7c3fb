"""Train a LoRA for Stable Diffusion 1.x / 2.x with sd-scripts' command line:

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors --dataset_config data.toml \
        --output_dir out --output_name my_lora --network_module networks.lora --learning_rate 1e-4 --max_train_steps 400

`python train_network.py ...` works the same on one device. See docs/training.md.
"""

from __future__ import annotations

import sys

from library.errors import run_cli
from library.training.config_file import parse_arguments, write_config_file
from library.training.options import build_parser
from library.training.trainer import train


def main() -> None:
    parser = build_parser()
    args = parse_arguments(parser, sys.argv[1:])
    if args.output_config:
        print(f"wrote {write_config_file(args, parser)}")
        return
    train(args)


if __name__ == "__main__":
    run_cli(main)
