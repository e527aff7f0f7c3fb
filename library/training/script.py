"""What train_network.py and sdxl_train_network.py do: parse the flags (with --config_file), write them with
--output_config, or turn them into typed options once and train."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from library.training.arguments import build_parser
from library.training.config_file import parse_arguments, write_config_file
from library.training.options import training_options
from library.training.trainer import train


def run_training_script(sdxl: bool, argv: Sequence[str] | None = None) -> Path | None:
    parser = build_parser(sdxl)
    args = parse_arguments(parser, sys.argv[1:] if argv is None else list(argv))
    if args.output_config:
        print(f"wrote {write_config_file(args, parser)}")
        return None
    return train(training_options(args, sdxl))
