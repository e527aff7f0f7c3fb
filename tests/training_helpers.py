"""What the training tests share: train_network.py's arguments for a tiny model and dataset."""

from __future__ import annotations

from library.training.options import build_parser


def training_arguments(model_file, data, output, *extra):
    """Parsed train_network.py arguments: 64-pixel images, seed 3, no data-loader workers, plus `extra`."""
    return build_parser().parse_args([
        "--pretrained_model_name_or_path", str(model_file), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(output), "--network_module", "networks.lora", "--seed", "3", "--max_data_loader_n_workers", "0",
        *extra,
    ])
