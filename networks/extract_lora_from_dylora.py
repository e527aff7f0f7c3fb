"""Cut a DyLoRA file into ordinary LoRA files, one per trained rank, as sd-scripts' extract_lora_from_dylora.py does.

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to split.safetensors --unit 4

writes split-4.safetensors, split-8.safetensors, ... up to the full rank. The rank-r file holds the first r ranks of
every module with the module's alpha: the scale alpha / r is the one networks.dylora computes with at rank r, so
the file applies exactly what the DyLoRA network applies at that rank. See docs/dylora.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from library.errors import UserError, run_cli
from library.lora.files import ModuleFactors, check_lora_output, read_lora_file, save_lora_file, split_modules
from library.lora.naming import ALPHA, DOWN, UP
from networks.dylora import DEFAULT_UNIT, NETWORK_MODULE, check_unit_divides, unit_from_metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the DyLoRA file (.safetensors, .ckpt or .pt)")
    parser.add_argument(
        "--save_to", required=True, help="base name of the output files; each gets -<rank> before its suffix"
    )
    parser.add_argument(
        "--unit",
        type=int,
        default=None,
        help="rank step of the output files (default: the unit the file was trained with)",
    )
    return parser


def extract_ranks(model: str | Path, save_to: str | Path, unit: int | None = None) -> list[Path]:
    """Write one LoRA per rank unit, 2*unit, ..., full rank; returns the files written."""
    model, save_to = Path(model), check_lora_output(save_to)
    weights, metadata = read_lora_file(model)
    unit = _checked_unit(model, metadata, unit)
    modules = split_modules(weights, str(model), "give a file that networks.dylora wrote.")
    full_rank = _full_rank(model, modules)
    check_unit_divides(full_rank, unit, f"{model}: its rank {full_rank}", f"give a --unit that divides {full_rank}")
    written = []
    for rank in range(unit, full_rank + 1, unit):
        path = save_to.with_name(f"{save_to.stem}-{rank:04d}{save_to.suffix}")  # sd-scripts' names
        save_lora_file(path, rank_slice(modules, rank), _slice_metadata(metadata, full_rank, rank, path.stem))
        written.append(path)
    return written


def rank_slice(modules: Mapping[str, ModuleFactors], rank: int) -> dict[str, torch.Tensor]:
    """The first `rank` ranks of every module, with its alpha (the rank when the file has none), so that the
    scale alpha / rank is networks.dylora's at that rank."""
    tensors = {}
    for name, factors in modules.items():
        tensors[f"{name}.{DOWN}"] = factors.down[:rank]
        tensors[f"{name}.{UP}"] = factors.up[:, :rank]
        tensors[f"{name}.{ALPHA}"] = (
            factors.alpha if factors.alpha is not None else torch.tensor(factors.alpha_value, dtype=factors.down.dtype)
        )
    return tensors


def _checked_unit(model: Path, metadata: Mapping[str, str], unit: int | None) -> int:
    """The unit to cut by: refused for a file that is not a DyLoRA, or that never trained the ranks it would give."""
    if unit is not None and unit < 1:
        raise UserError(f"--unit {unit}: the unit must be at least 1.")
    network_module = metadata.get("ss_network_module")
    if network_module is None and model.suffix.lower() == ".safetensors":
        raise UserError(
            f"{model}: the file has no ss_network_module metadata, so it is not a DyLoRA saved by train_network.py;"
            f" give a file trained with --network_module {NETWORK_MODULE}."
        )
    if network_module is not None and network_module != NETWORK_MODULE:
        raise UserError(
            f"{model}: the file was trained with {network_module}, not {NETWORK_MODULE}; only a DyLoRA has a good LoRA"
            " in every lower rank (use resize_lora.py to shrink an ordinary LoRA)."
        )
    # A DyLoRA's metadata lacks the unit when it was trained with sd-scripts' default of 1; a torch pickle has none.
    trained_unit = unit_from_metadata(metadata) or DEFAULT_UNIT if network_module == NETWORK_MODULE else None
    if unit is None and trained_unit is None:
        raise UserError(
            f"{model}: the file does not say which unit it was trained with ({model.suffix} files carry no metadata);"
            " give it with --unit."
        )
    if unit is not None and trained_unit is not None and unit % trained_unit:
        raise UserError(
            f"--unit {unit}: {model} was trained with unit={trained_unit}, so only ranks that are multiples of"
            f" {trained_unit} were trained; give --unit {trained_unit} or a multiple of it."
        )
    return unit or trained_unit


def _full_rank(model: Path, modules: Mapping[str, ModuleFactors]) -> int:
    ranks = sorted({factors.rank for factors in modules.values()})
    if len(ranks) != 1:
        found = f"modules of ranks {', '.join(map(str, ranks))}" if ranks else "no LoRA modules"
        raise UserError(
            f"{model}: it has {found}, but every module of a DyLoRA has the same rank; the file is not a DyLoRA."
        )
    return ranks[0]


def _slice_metadata(metadata: Mapping[str, str], full_rank: int, rank: int, title: str) -> dict[str, str]:
    """The source's metadata with the new rank and a note of where the file came from; the hashes are recomputed
    when the file is saved."""
    sliced = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    if not sliced:
        return {}
    comment = metadata.get("ss_training_comment")
    sliced["ss_training_comment"] = f"split from DyLoRA, rank {full_rank} to {rank}" + (
        f"; {comment}" if comment and comment != "None" else ""
    )
    sliced["ss_network_dim"] = str(rank)
    if "modelspec.title" in sliced:
        sliced["modelspec.title"] = title
    return sliced


def main() -> None:
    args = build_parser().parse_args()
    for path in extract_ranks(args.model, args.save_to, args.unit):
        print(f"saved {path}")


if __name__ == "__main__":
    run_cli(main)
