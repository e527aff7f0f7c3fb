"""Merge several LoRAs into one LoRA of a chosen rank, with the flags of sd-scripts' svd_merge_lora.py.

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.4 --new_rank 16 \
        --save_to merged.safetensors

Per module, the merged delta is the best rank-R approximation (Eckart-Young) of
sum_i ratio_i * alpha_i / rank_i * up_i @ down_i, computed exactly from the factors (thin QR of the stacked factors
and the SVD of a small core) without forming the dense deltas. With R at least the sum of the input ranks the merged
module is exactly that sum. A module that only some inputs have is the sum over those. `--lbws` multiplies each
input's ratio by the weight of the module's block. Every module gets alpha = its rank (scale 1), stored as a float.

A LyCORIS file (LoCon, LoHa, LoKr) is merged through the exact delta its algorithm defines, so one LyCORIS file
with a single ratio of 1 becomes the best plain LoRA of the chosen rank; DoRA modules are refused, since their
change depends on the base model. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from library.compute_options import PRECISION_CHOICES, parse_device, parse_precision
from library.errors import run_cli
from library.lora.block_weights import BlockWeights, check_layout_family, parse_block_weights
from library.lora.factors import lora_scale
from library.lora.files import (
    DORA_TO_LORA_FIX,
    LoraInput,
    Member,
    ModuleFactors,
    check_lora_output,
    inputs_family,
    module_tensors,
    modules_by_name,
    read_lora_inputs,
    save_lora_file,
)
from library.lora.low_rank import NewRanks, Term, ThinSVD, retained, svd_of_dense, svd_of_sum
from library.metadata import common_value, declared_base_model, lora_modelspec, lora_network_metadata, merged_from
from networks.lora import NETWORK_MODULE

DEFAULT_RANK = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", required=True, help="the LoRA files to merge (.safetensors, .ckpt or .pt)"
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", required=True, help="one ratio per model (the weight of its delta)"
    )
    parser.add_argument(
        "--lbws",
        nargs="*",
        default=None,
        help="block-wise ratios, one JSON list per model (17 or 26 values for SD1/SD2, 12 or 20 for SDXL)",
    )
    parser.add_argument(
        "--save_to", required=True, help="the merged LoRA; the suffix picks the format (.safetensors, .ckpt, .pt)"
    )
    parser.add_argument(
        "--new_rank", type=int, default=DEFAULT_RANK, help="rank of the merged Linear and 1x1 conv modules (default 4)"
    )
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank of the merged 3x3 conv modules (default: --new_rank)"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="float",
        help="dtype the inputs are read in (default float); the SVD runs in float32",
    )
    parser.add_argument(
        "--save_precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="dtype of the saved tensors (default: --precision)",
    )
    parser.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: the CPU)")
    parser.add_argument("--no_metadata", action="store_true", help="leave out the SAI ModelSpec (modelspec.*) keys")
    return parser


@dataclass(frozen=True)
class SvdMergeOptions:
    models: tuple[Path, ...]
    ratios: tuple[float, ...]
    save_to: Path
    ranks: NewRanks = NewRanks(DEFAULT_RANK)
    block_weights: tuple[BlockWeights, ...] = ()  # one per model, or none
    precision: torch.dtype = torch.float32
    save_precision: torch.dtype | None = None  # None: precision
    device: torch.device = torch.device("cpu")
    modelspec: bool = True


def options_from_flags(args: argparse.Namespace) -> SvdMergeOptions:
    ranks = NewRanks(args.new_rank, args.new_conv_rank)
    ranks.check()
    precision = parse_precision(args.precision)
    return SvdMergeOptions(
        models=tuple(Path(model) for model in args.models),
        ratios=tuple(args.ratios),
        save_to=check_lora_output(args.save_to, args.models),
        ranks=ranks,
        block_weights=tuple(parse_block_weights(args.lbws, args.models)) if args.lbws else (),
        precision=precision,
        save_precision=parse_precision(args.save_precision, precision),
        device=parse_device("--device", args.device),
        modelspec=not args.no_metadata,
    )


class MergedModule(NamedTuple):
    rank: int
    uses_conv_rank: bool  # a 3x3 conv, whose rank is --new_conv_rank
    frobenius_share: float  # of the exact sum's Frobenius norm that the merged module keeps
    exact: bool  # every singular value of the sum was kept


def svd_merge(options: SvdMergeOptions) -> dict[str, MergedModule]:
    """Merge the models into options.save_to; returns what each module kept."""
    inputs = [each.with_layer_shapes(DORA_TO_LORA_FIX) for each in read_lora_inputs(options.models, options.ratios)]
    check_layout_family(options.block_weights, inputs_family(inputs))
    groups = modules_by_name(inputs, options.block_weights)
    tensors, merged = {}, {}
    for name, members in tqdm(groups.items(), "merging", total=len(groups), unit="module"):
        up, down, merged[name] = _merge_module(members, options)
        tensors.update(module_tensors(name, up, down, alpha=merged[name].rank))
    metadata = _merged_metadata(options, inputs, merged)
    save_lora_file(options.save_to, tensors, metadata, options.save_precision)
    return merged


def _merge_module(
    members: Sequence[Member], options: SvdMergeOptions
) -> tuple[torch.Tensor, torch.Tensor, MergedModule]:
    """The best factors of the module's new rank for sum_i ratio_i * delta_i, shaped like the first input's tensors:
    from the factors when every input is a LoRA, else from the dense sum (a LyCORIS module's delta is not low-rank)."""
    first = members[0].module
    if all(isinstance(member.module, ModuleFactors) for member in members):
        svd = svd_of_sum([_term(member, options) for member in members])
    else:
        svd = _dense_svd(members, options)
    low_rank = svd.truncated(options.ranks.for_module(first.uses_conv_rank), first.weight_shape)
    rank = low_rank.down.shape[0]
    kept = MergedModule(
        rank,
        first.uses_conv_rank,
        retained(svd.singular_values, rank).frobenius_share,
        rank == svd.singular_values.shape[0],
    )
    return low_rank.up, low_rank.down, kept


def _term(member: Member, options: SvdMergeOptions) -> Term:
    factors = member.module
    return Term(
        factors.up.to(options.device, options.precision),
        factors.down.to(options.device, options.precision),
        member.ratio * lora_scale(factors.alpha_value, factors.rank),
    )


def _dense_svd(members: Sequence[Member], options: SvdMergeOptions) -> ThinSVD:
    shape = members[0].module.weight_shape
    total = sum(member.ratio * member.module.delta().reshape(shape) for member in members)
    return svd_of_dense(total.to(options.device))


def _merged_metadata(
    options: SvdMergeOptions, inputs: Sequence[LoraInput], merged: dict[str, MergedModule]
) -> dict[str, str]:
    """The minimum `ss_*` keys with the merged ranks (alpha = rank), the family of the inputs, and unless
    --no_metadata the ModelSpec with the inputs' titles as `merged_from`."""
    base_ranks = [str(module.rank) for module in merged.values() if not module.uses_conv_rank]
    conv_ranks = [str(module.rank) for module in merged.values() if module.uses_conv_rank]
    dim = common_value(base_ranks, str(options.ranks.new_rank))
    conv_args = (
        {"conv_dim": common_value(conv_ranks, ""), "conv_alpha": _as_alpha(common_value(conv_ranks, ""))}
        if conv_ranks
        else None
    )
    family = inputs_family(inputs)
    v_prediction = any(declared[1] for each in inputs if (declared := declared_base_model(each.metadata)))
    metadata = lora_network_metadata(NETWORK_MODULE, dim, _as_alpha(dim), conv_args, family, v_prediction)
    if options.modelspec and family is not None:
        metadata.update(lora_modelspec(family, v_prediction, options.save_to.stem))
        metadata.update(merged_from([(each.path, each.metadata) for each in inputs]))
    return metadata


def _as_alpha(rank: str) -> str:
    """The alpha of modules whose alpha is their rank, written as trained files write alphas ("16.0")."""
    return str(float(rank)) if rank.isdigit() else rank


def summary(merged: dict[str, MergedModule]) -> str:
    """One line on how close the merge is to the exact sum."""
    if all(module.exact for module in merged.values()):
        return f"{len(merged)} modules, each the exact sum of its inputs (no singular value was cut)"
    worst = min(merged, key=lambda name: merged[name].frobenius_share)
    mean = sum(module.frobenius_share for module in merged.values()) / len(merged)
    return (
        f"{len(merged)} modules; the best rank-limited approximations keep {mean:.1%} of the exact sum's Frobenius"
        f" norm on average, {merged[worst].frobenius_share:.1%} at worst ({worst})"
    )


def main() -> None:
    options = options_from_flags(build_parser().parse_args())
    merged = svd_merge(options)
    print(f"saved {options.save_to}: {summary(merged)}")


if __name__ == "__main__":
    run_cli(main)
