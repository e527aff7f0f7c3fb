"""Resize a LoRA to a lower rank by SVD, with the flags of sd-scripts' resize_lora.py.

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 8
    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 32 \
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module keeps the largest singular values of its delta up @ down: the resized module is the best approximation of
that rank (Eckart-Young), computed exactly from the factors, and it keeps the module's scale alpha / rank
(alpha' = scale * r'). A dynamic method picks each module's rank (at most --new_rank) as the smallest one that meets
its criterion. A LyCORIS file (LoCon, LoHa, LoKr) becomes a plain LoRA: each module the best approximation of the
new rank of the exact delta its algorithm defines, with alpha = rank; DoRA modules are refused, since their change
depends on the base model. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from library.compute_options import PRECISION_CHOICES, parse_device, parse_precision
from library.errors import UserError, run_cli
from library.lora.factors import lora_scale
from library.lora.files import (
    DORA_TO_LORA_FIX,
    AdapterModule,
    ModuleFactors,
    check_lora_output,
    module_tensors,
    read_lora_inputs,
    save_lora_file,
)
from library.lora.low_rank import (
    DYNAMIC_METHODS,
    NewRanks,
    Retained,
    Term,
    chosen_rank,
    numerical_rank,
    retained,
    svd_of_dense,
    svd_of_sum,
)
from library.lora.lycoris import LycorisModule
from library.metadata import common_value
from networks.lora import NETWORK_MODULE

DEFAULT_RANK = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the LoRA to resize (.safetensors, .ckpt or .pt)")
    parser.add_argument(
        "--save_to",
        required=True,
        help="the resized LoRA; the suffix picks the format (.safetensors, .ckpt, .pt, .pth)",
    )
    parser.add_argument(
        "--new_rank",
        type=int,
        default=DEFAULT_RANK,
        help="rank of the Linear and 1x1 conv modules; the largest rank with a dynamic method (default 4)",
    )
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="the same for the 3x3 conv modules (default: --new_rank)"
    )
    parser.add_argument(
        "--save_precision", choices=PRECISION_CHOICES, default=None, help="dtype of the saved tensors (default float)"
    )
    parser.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: the CPU)")
    parser.add_argument("--verbose", action="store_true", help="print what each module keeps")
    parser.add_argument(
        "--dynamic_method",
        choices=DYNAMIC_METHODS,
        default=None,
        help="choose each module's rank from its singular values",
    )
    parser.add_argument(
        "--dynamic_param",
        type=float,
        default=None,
        help="the target of the dynamic method (sv_ratio: >= 1; sv_fro, sv_cumulative: 0 to 1)",
    )
    parser.add_argument(
        "--svd_lowrank_niter",
        type=int,
        default=2,
        help="accepted for sd-scripts' command lines; the SVD here is exact and needs no iterations",
    )
    return parser


@dataclass(frozen=True)
class ResizeOptions:
    model: Path
    save_to: Path
    ranks: NewRanks = NewRanks(DEFAULT_RANK)
    save_precision: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    dynamic_method: str | None = None
    dynamic_param: float | None = None


def options_from_flags(args: argparse.Namespace) -> ResizeOptions:
    ranks = NewRanks(args.new_rank, args.new_conv_rank)
    ranks.check()
    _check_dynamic(args.dynamic_method, args.dynamic_param)
    return ResizeOptions(
        model=Path(args.model),
        save_to=check_lora_output(args.save_to, [args.model]),
        ranks=ranks,
        save_precision=parse_precision(args.save_precision, torch.float32),
        device=parse_device("--device", args.device),
        dynamic_method=args.dynamic_method,
        dynamic_param=args.dynamic_param,
    )


def _check_dynamic(method: str | None, parameter: float | None) -> None:
    if method is None:
        if parameter is not None:
            raise UserError(
                f"--dynamic_param {parameter} is given without --dynamic_method; add --dynamic_method sv_ratio, sv_fro"
                " or sv_cumulative, or drop it."
            )
        return
    if parameter is None:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param (its target).")
    if method == "sv_ratio" and parameter < 1:
        raise UserError(
            f"--dynamic_param {parameter}: sv_ratio keeps the singular values above S_max / p, so p must be at least 1"
            " (e.g. 8)."
        )
    if method != "sv_ratio" and not 0 < parameter <= 1:
        raise UserError(
            f"--dynamic_param {parameter}: {method} takes the share to keep, more than 0 and at most 1 (e.g. 0.9)."
        )


class ResizedModule(NamedTuple):
    old_rank: int
    rank: int
    alpha: float
    uses_conv_rank: bool  # a 3x3 conv, whose rank is --new_conv_rank
    kept: Retained


def resize(options: ResizeOptions, verbose: bool = False) -> dict[str, ResizedModule]:
    """Resize options.model into options.save_to; returns what each module became. `verbose` prints a line per
    module (--verbose)."""
    (lora,) = read_lora_inputs([options.model], [1.0])
    lora = lora.with_layer_shapes(DORA_TO_LORA_FIX)
    tensors, resized = {}, {}
    for name, module in tqdm(lora.modules.items(), "resizing", total=len(lora.modules), unit="module"):
        up, down, resized[name] = _resize_module(module, options)
        tensors.update(module_tensors(name, up, down, resized[name].alpha))
        if verbose:
            tqdm.write(report_line(name, resized[name], options.dynamic_method is not None), end="")
    converted = any(isinstance(module, LycorisModule) for module in lora.modules.values())
    metadata = _resized_metadata(lora.metadata, resized, options, converted)
    save_lora_file(options.save_to, tensors, metadata, options.save_precision)
    return resized


def _resize_module(module: AdapterModule, options: ResizeOptions) -> tuple[torch.Tensor, torch.Tensor, ResizedModule]:
    """A LoRA module's delta up @ down truncated to its new rank, with alpha' = scale * r' so the scale stays; a
    LyCORIS module's exact delta truncated, with alpha' = r' (scale 1)."""
    if isinstance(module, ModuleFactors):
        up, down = module.up.to(options.device, torch.float32), module.down.to(options.device, torch.float32)
        svd, scale, old_rank = (
            svd_of_sum([Term(up, down, 1.0)]),
            lora_scale(module.alpha_value, module.rank),
            module.rank,
        )
    else:
        svd, scale = svd_of_dense(module.delta().to(options.device)), 1.0
        old_rank = numerical_rank(svd.singular_values)
    rank = chosen_rank(
        svd.singular_values,
        options.ranks.for_module(module.uses_conv_rank),
        options.dynamic_method,
        options.dynamic_param,
    )
    low_rank = svd.truncated(rank, module.weight_shape)
    return (
        low_rank.up,
        low_rank.down,
        ResizedModule(old_rank, rank, scale * rank, module.uses_conv_rank, retained(svd.singular_values, rank)),
    )


def report_line(name: str, module: ResizedModule, dynamic: bool) -> str:
    """sd-scripts' --verbose line: what the module keeps, and with a dynamic method its new rank and alpha."""
    kept = module.kept
    line = (
        f"{name:75} | sum(S) retained: {kept.sum_share:.1%}, fro retained: {kept.frobenius_share:.1%},"
        f" max(S) ratio: {kept.max_ratio:0.1f}"
    )
    return line + (f", dynamic | dim: {module.rank}, alpha: {module.alpha}" if dynamic else "") + "\n"


def summary(resized: Mapping[str, ResizedModule]) -> str:
    shares = [module.kept.frobenius_share for module in resized.values()]
    spread = statistics.pstdev(shares) if len(shares) > 1 else 0.0
    return f"Average Frobenius norm retention: {statistics.fmean(shares):.2%} | std: {spread:0.3f}"


def _resized_metadata(
    metadata: Mapping[str, str], resized: Mapping[str, ResizedModule], options: ResizeOptions, converted: bool
) -> dict[str, str]:
    """The input's metadata with the new ranks and alphas (the values all modules share, or `Dynamic`), a note in
    `ss_training_comment`, the conv rank in `ss_network_args` and the new title; the hashes are recomputed on save.
    A `converted` LyCORIS file becomes a networks.lora file, its LyCORIS network arguments left out."""
    updated = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    if converted:
        updated["ss_network_module"] = NETWORK_MODULE
        updated.pop("ss_network_args", None)
    base = [module for module in resized.values() if not module.uses_conv_rank]
    convs = [module for module in resized.values() if module.uses_conv_rank]
    updated["ss_training_comment"] = _comment(metadata.get("ss_training_comment", ""), resized, options)
    updated["ss_network_dim"] = common_value([str(module.rank) for module in base], str(options.ranks.new_rank))
    updated["ss_network_alpha"] = common_value(
        [str(module.alpha) for module in base], str(float(options.ranks.new_rank))
    )
    if convs and converted:
        updated["ss_network_args"] = json.dumps(_conv_args(convs))
    elif convs and "ss_network_args" in updated:
        updated["ss_network_args"] = _with_conv_rank(updated["ss_network_args"], convs)
    if "modelspec.title" in updated:
        updated["modelspec.title"] = options.save_to.stem
    return updated


def _comment(old: str, resized: Mapping[str, ResizedModule], options: ResizeOptions) -> str:
    """sd-scripts' note of the resize, in front of the old comment (if there was one)."""
    old_rank = max(module.old_rank for module in resized.values())
    if options.dynamic_method:
        note = f"Dynamic resize with {options.dynamic_method}: {options.dynamic_param} from {old_rank}"
    else:
        new_rank, conv_rank = options.ranks.new_rank, options.ranks.for_module(uses_conv_rank=True)
        note = f"dimension is resized from {old_rank} to {new_rank}" + (
            "" if conv_rank == new_rank else f" (conv: {conv_rank})"
        )
    return note + (f"; {old}" if old and old != "None" else "")


def _with_conv_rank(network_args: str, convs: list[ResizedModule]) -> str:
    """`ss_network_args` with conv_dim / conv_alpha of the resized 3x3 convs (sd-scripts leaves them stale)."""
    try:
        parsed = json.loads(network_args)
    except json.JSONDecodeError:
        return network_args
    if not isinstance(parsed, dict) or "conv_dim" not in parsed:
        return network_args
    return json.dumps({**parsed, **_conv_args(convs)})


def _conv_args(convs: list[ResizedModule]) -> dict[str, str]:
    return {
        "conv_dim": common_value([str(module.rank) for module in convs], ""),
        "conv_alpha": common_value([str(module.alpha) for module in convs], ""),
    }


def main() -> None:
    args = build_parser().parse_args()
    options = options_from_flags(args)
    resized = resize(options, args.verbose)
    print(summary(resized))
    print(f"saved {options.save_to}")


if __name__ == "__main__":
    run_cli(main)
