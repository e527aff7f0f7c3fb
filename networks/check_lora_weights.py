"""Check a LoRA file's weights, with sd-scripts' check_lora_weights.py command line.

    python networks/check_lora_weights.py file.safetensors          # one line per module, then a summary
    python networks/check_lora_weights.py file.safetensors -s       # also every key: shape, dtype, mean and min |x|

Per module: its kind (LoRA, or the LyCORIS algorithm), rank, alpha, scale alpha / rank, dtype, the Frobenius norms
of down, up and of the change it makes (scale * up @ down, computed from the factors; for LyCORIS modules the change
its algorithm defines, without DoRA's rescaling). Flagged: modules whose change is zero (an untrained module, whose
up is still zero, or an emptied one), that hold NaN or infinite values (a diverged run), or whose alpha exceeds
their rank (a scale above 1, usually an alpha meant for another rank). The summary counts modules per text encoder
and U-Net and per U-Net block, and the flags. The exit status is 1 when a module holds NaN or infinite values, else 0.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from library.errors import run_cli
from library.lora.files import (
    AdapterModule,
    ModuleFactors,
    lora_family,
    read_lora_file,
    read_lora_weights,
    read_modules,
)
from library.lora.low_rank import Term, norm_of_sum
from library.lora.naming import TEXT_ENCODER_PREFIX, UNET_PREFIX, ldm_block
from library.model_files.family import ModelFamily

NON_FINITE, ZERO_CHANGE, ALPHA_ABOVE_RANK = "NON-FINITE", "ZERO CHANGE", "ALPHA > RANK"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the LoRA file (.safetensors, .ckpt or .pt)")
    parser.add_argument(
        "-s", "--show_all_keys", action="store_true", help="also list every key with its shape, dtype, mean and min |x|"
    )
    return parser


class ModuleReport(NamedTuple):
    name: str
    kind: str
    rank: int | None  # None for LoKr, whose rank is not one number
    alpha: float | None
    scale: float
    dtype: str
    norms: tuple[float, ...]  # down, up, change (LoRA); change (LyCORIS)
    flags: tuple[str, ...]

    def line(self) -> str:
        alpha = "-" if self.alpha is None else f"{self.alpha:g}"
        rank = "-" if self.rank is None else str(self.rank)
        norms = (
            f"|down| {self.norms[0]:.4g}, |up| {self.norms[1]:.4g}, |change| {self.norms[2]:.4g}"
            if len(self.norms) == 3
            else f"|change| {self.norms[0]:.4g}"
        )
        flags = f"  <- {', '.join(self.flags)}" if self.flags else ""
        return (
            f"{self.name}: {self.kind}, rank {rank}, alpha {alpha}, scale {self.scale:g}, {self.dtype}, {norms}{flags}"
        )


def module_report(name: str, module: AdapterModule) -> ModuleReport:
    finite = all(bool(torch.isfinite(tensor).all()) for tensor in module.tensors.values())
    dtype = str(next(iter(module.tensors.values())).dtype).removeprefix("torch.")
    if isinstance(module, ModuleFactors):
        kind, rank, alpha = "LoRA", module.rank, module.alpha_value
        scale = alpha / rank
        change = norm_of_sum([Term(module.up, module.down, scale)]) if finite else math.nan
        norms = (_norm(module.down), _norm(module.up), change)
    else:
        kind, scale = f"LyCORIS {module.description}", module.scale
        rank = module.rank
        alpha = None if "alpha" not in module.tensors else float(module.tensors["alpha"])
        norms = (module.change_norm() if finite else math.nan,)
    flags = [] if finite else [NON_FINITE]
    if finite and norms[-1] == 0:
        flags.append(ZERO_CHANGE)
    if rank is not None and alpha is not None and alpha > rank:
        flags.append(ALPHA_ABOVE_RANK)
    return ModuleReport(name, kind, rank, alpha, scale, dtype, norms, tuple(flags))


def _norm(tensor: torch.Tensor) -> float:
    return float(tensor.double().norm())


def summary_lines(reports: list[ModuleReport], family: ModelFamily | None) -> list[str]:
    """Counts per text encoder and U-Net, per U-Net block, and of each flag."""
    parts = collections.Counter(_part(report.name) for report in reports)
    sdxl = family is ModelFamily.SDXL
    blocks = collections.Counter(_block(report.name, sdxl) for report in reports if report.name.startswith(UNET_PREFIX))
    flags = collections.Counter(flag for report in reports for flag in report.flags)
    lines = [
        f"{len(reports)} modules ({family.label if family else 'family not recorded'}): "
        + ", ".join(f"{part} {count}" for part, count in sorted(parts.items()))
    ]
    if blocks:
        lines.append("U-Net modules per block: " + ", ".join(f"{block} {count}" for block, count in blocks.items()))
    lines.append("flagged: " + (", ".join(f"{count} {flag}" for flag, count in flags.items()) if flags else "none"))
    return lines


def _part(name: str) -> str:
    """`te`, `te1`, `te2` or `unet`: what comes between `lora_` and the module path."""
    if name.startswith(TEXT_ENCODER_PREFIX):
        return name.removeprefix("lora_").split("_", 1)[0]
    return "unet" if name.startswith(UNET_PREFIX) else name.split("_", 1)[0]


def _block(name: str, sdxl: bool) -> str:
    found = ldm_block(name, sdxl)
    if found is None:
        return "other"
    group, index = found
    return {"input_blocks": f"IN{index:02d}", "middle_block": "MID", "output_blocks": f"OUT{index:02d}"}[group]


def key_lines(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """sd-scripts' listing, one line per key: name, shape, dtype, mean |x|, min |x|."""
    lines = []
    for key, tensor in weights.items():
        values = tensor.detach().float().abs()
        shape = "-".join(map(str, tensor.shape)) or "scalar"
        lines.append(f"{key},{shape},{str(tensor.dtype).removeprefix('torch.')},{values.mean():.6g},{values.min():.6g}")
    return lines


def check(path: str | Path, show_all_keys: bool = False) -> list[ModuleReport]:
    """Print the report of one file; returns the module reports."""
    weights, metadata = read_lora_weights(path)
    modules = read_modules(weights, str(path))
    print(f"loading: {path}")
    reports = [module_report(name, module) for name, module in modules.items()]
    for report in reports:
        print(report.line())
    if show_all_keys:
        stored, _ = read_lora_file(path)  # the file's own keys, also for a diffusers/PEFT file
        print(f"number of all keys: {len(stored)}")
        print("\n".join(key_lines(stored)))
    print("\n".join(summary_lines(reports, lora_family(modules, metadata))))
    return reports


def main() -> None:
    args = build_parser().parse_args()
    reports = check(args.file, args.show_all_keys)
    if any(NON_FINITE in report.flags for report in reports):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
