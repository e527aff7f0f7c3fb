"""What the training tests share: train_network.py's (or sdxl_train_network.py's) options for a tiny model and
dataset."""

from __future__ import annotations

from library.training.arguments import build_parser
from library.training.options import TrainingOptions, training_options


def training_flags(model_file, data, output, *extra, sdxl: bool = False):
    """Parsed flags: 64-pixel images, seed 3, no data-loader workers, plus `extra`."""
    return build_parser(sdxl).parse_args(
        [
            "--pretrained_model_name_or_path",
            str(model_file),
            "--train_data_dir",
            str(data),
            "--resolution",
            "64",
            "--output_dir",
            str(output),
            "--network_module",
            "networks.lora",
            "--seed",
            "3",
            "--max_data_loader_n_workers",
            "0",
            *extra,
        ]
    )


def training_arguments(model_file, data, output, *extra, sdxl: bool = False) -> TrainingOptions:
    """The typed options of `training_flags`, as the scripts build them."""
    return training_options(training_flags(model_file, data, output, *extra, sdxl=sdxl), sdxl)
