"""What train_network.py and sdxl_train_network.py do: parse the flags (with --config_file), write them with
--output_config, or turn them into typed options once and train."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from library.training.arguments import build_parser
from library.training.config_file import parse_arguments, write_config_file
from library.training.options import LoggingOptions, training_options
from library.training.trainer import train


def run_training_script(sdxl: bool, argv: Sequence[str] | None = None) -> Path | None:
    parser = build_parser(sdxl)
    args = parse_arguments(parser, sys.argv[1:] if argv is None else list(argv))
    if args.output_config:
        print(f"wrote {write_config_file(args, parser)}")
        return None
    options = training_options(args, sdxl)
    configure_console(options.logging)
    return train(options)


def configure_console(options: LoggingOptions) -> None:
    """--console_log_level, --console_log_file, --console_log_simple: the library's log messages (warnings about
    skipped images, caching, ...), as sd-scripts' logging options set them."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if options.console_log_file:
        handlers.append(logging.FileHandler(options.console_log_file, encoding="utf-8"))
    layout = "%(message)s" if options.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=options.console_log_level or "INFO", format=layout, handlers=handlers, force=True)
