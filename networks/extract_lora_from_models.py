"""Make a LoRA from the difference of two Stable Diffusion models, an original and a fine-tuned one, as sd-scripts'
extract_lora_from_models.py does.

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \
        --save_to diff.safetensors --dim 8

Every layer that networks.lora adapts (LoRA-LierLa; with --conv_dim also the 3x3 convs, LoRA-C3Lier) gets the best
rank-`dim` approximation of its weight difference tuned - original (truncated SVD, optionally clamped as
sd-scripts clamps it), stored with alpha = rank, so the file applied at multiplier 1 adds that approximation. Text
encoders that did not change are left out. Both models may be single files or Diffusers folders. See
docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from library.compute_options import PRECISION_CHOICES, parse_device, parse_precision
from library.errors import UserError, run_cli
from library.lora.factors import compose
from library.lora.files import check_lora_output, module_tensors, save_lora_file
from library.lora.low_rank import factors_from_delta
from library.lora.naming import TEXT_ENCODER_PREFIX
from library.metadata import common_value, lora_modelspec, lora_network_metadata
from library.model_files.family import ModelFamily, family_from_flags
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, place
from networks.lora import NETWORK_MODULE, create_network

DEFAULT_DIM = 4
DEFAULT_CLAMP_QUANTILE = 0.99
DEFAULT_MIN_DIFF = 0.01


@dataclass(frozen=True)
class ExtractOptions:
    """What the flags ask for, checked once."""

    dim: int = DEFAULT_DIM  # rank of Linear and 1x1 conv layers
    conv_dim: int | None = None  # rank of 3x3 convs; None: no 3x3 modules
    clamp_quantile: float | None = DEFAULT_CLAMP_QUANTILE  # None: no clamp
    min_diff: float = DEFAULT_MIN_DIFF  # text encoders whose weights differ by no more are left out
    family: ModelFamily | None = None  # from --v2 / --sdxl; both files must be of it
    v_parameterization: bool | None = None  # None: as the files are marked
    device: torch.device = torch.device("cpu")  # where the differences are taken and factorised
    original_device: torch.device = torch.device("cpu")  # where each model's weights are kept
    tuned_device: torch.device = torch.device("cpu")
    load_precision: torch.dtype = torch.float32
    save_precision: torch.dtype = torch.float32
    modelspec: bool = True  # --no_metadata leaves the ModelSpec out; the ss_* keys and hashes are always written
    progress: bool = True


class LayerPair(NamedTuple):
    """One adapted layer in both models."""

    name: str  # the LoRA module name
    original: torch.nn.Module
    tuned: torch.nn.Module
    rank: int  # the rank asked for: --dim, or --conv_dim for a 3x3 conv
    uses_conv_rank: bool

    @property
    def is_text_encoder(self) -> bool:
        return self.name.startswith(TEXT_ENCODER_PREFIX)


class ExtractedModule(NamedTuple):
    up: torch.Tensor
    down: torch.Tensor
    relative_error: float  # ||dW - up @ down||_F / ||dW||_F: the rank truncation's and the clamp's loss together

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_org", required=True, help="the original model: a .safetensors/.ckpt file or a Diffusers folder"
    )
    parser.add_argument(
        "--model_tuned", required=True, help="the fine-tuned model, of the same family and architecture"
    )
    parser.add_argument("--save_to", required=True, help="the LoRA file to write (.safetensors, .ckpt or .pt)")
    parser.add_argument("--v2", action="store_true", help="the models are SD2.x (checked against the files)")
    parser.add_argument("--sdxl", action="store_true", help="the models are SDXL (checked against the files)")
    parser.add_argument(
        "--v_parameterization",
        action="store_true",
        default=None,
        help=(
            "mark the LoRA as v-prediction (default: with --v2, as sd-scripts does, or when a file is marked as"
            " v-prediction)"
        ),
    )
    parser.add_argument(
        "--dim", type=int, default=DEFAULT_DIM, help=f"rank of Linear and 1x1 conv layers (default {DEFAULT_DIM})"
    )
    parser.add_argument(
        "--conv_dim", type=int, default=None, help="rank of the 3x3 convs (LoRA-C3Lier); without it they are left out"
    )
    parser.add_argument(
        "--clamp_quantile",
        type=float,
        default=DEFAULT_CLAMP_QUANTILE,
        help=(
            "clamp the factors' entries to this quantile of their values, as sd-scripts does"
            f" (default {DEFAULT_CLAMP_QUANTILE}); 1 = no clamp"
        ),
    )
    parser.add_argument(
        "--min_diff",
        type=float,
        default=DEFAULT_MIN_DIFF,
        help=(
            "text encoders whose weights differ by at most this much are taken as unchanged and left out"
            f" (default {DEFAULT_MIN_DIFF})"
        ),
    )
    parser.add_argument(
        "--device", default=None, help="device for the differences and SVDs, e.g. cuda (default: the CPU)"
    )
    parser.add_argument(
        "--load_precision", choices=PRECISION_CHOICES, default=None, help="dtype to load the models in (default float)"
    )
    parser.add_argument(
        "--save_precision", choices=PRECISION_CHOICES, default=None, help="dtype of the saved LoRA (default float)"
    )
    parser.add_argument(
        "--no_metadata",
        action="store_true",
        help="leave the ModelSpec (modelspec.*) out; the ss_* keys and hashes stay",
    )
    parser.add_argument(
        "--load_original_model_to", default=None, help="device to keep the original model's weights on (default cpu)"
    )
    parser.add_argument(
        "--load_tuned_model_to", default=None, help="device to keep the fine-tuned model's weights on (default cpu)"
    )
    return parser


def options_from_args(args: argparse.Namespace) -> ExtractOptions:
    return ExtractOptions(
        dim=_positive_rank("--dim", args.dim),
        conv_dim=None if args.conv_dim is None else _positive_rank("--conv_dim", args.conv_dim),
        clamp_quantile=_clamp_quantile(args.clamp_quantile),
        min_diff=args.min_diff,
        family=family_from_flags(v2=args.v2, sdxl=args.sdxl),
        v_parameterization=True if args.v_parameterization or args.v2 else None,  # sd-scripts: --v2 means v-prediction
        device=parse_device("--device", args.device),
        original_device=parse_device("--load_original_model_to", args.load_original_model_to),
        tuned_device=parse_device("--load_tuned_model_to", args.load_tuned_model_to),
        load_precision=parse_precision(args.load_precision, torch.float32),
        save_precision=parse_precision(args.save_precision, torch.float32),
        modelspec=not args.no_metadata,
    )


def _positive_rank(flag: str, rank: int) -> int:
    if rank < 1:
        raise UserError(f"{flag} {rank}: the rank must be at least 1.")
    return rank


def _clamp_quantile(quantile: float) -> float | None:
    """sd-scripts' --clamp_quantile; 1 (the largest value) means no clamp."""
    if not 0 < quantile <= 1:
        raise UserError(f"--clamp_quantile {quantile}: a quantile lies in (0, 1]; give e.g. 0.99, or 1 for no clamp.")
    return None if quantile == 1 else quantile


# ---------------------------------------------------------------- extracting


def extract_lora(
    model_org: str | Path, model_tuned: str | Path, save_to: str | Path, options: ExtractOptions = ExtractOptions()
) -> dict[str, ExtractedModule]:
    """Write the LoRA of tuned - original to `save_to` (atomically); returns what each module holds."""
    save_to = check_lora_output(save_to, [model_org, model_tuned])
    original = load_model(model_org, options.family, options.load_precision, options.original_device)
    tuned = load_model(model_tuned, options.family, options.load_precision, options.tuned_device)
    pairs = paired_layers(original, tuned, options)
    pairs = _without_unchanged_text_encoders(pairs, original.family, options)
    modules = extracted_modules(pairs, options)
    if not any(module.up.any() for module in modules.values()):
        raise UserError(
            f"{original.source} and {tuned.source} have the same weights in every layer a LoRA adapts, so there is"
            " nothing to extract; give the fine-tuned model as --model_tuned."
        )
    tensors = {}
    for name, module in modules.items():
        tensors.update(module_tensors(name, module.up, module.down, alpha=module.rank))
    metadata = extracted_metadata(
        pairs, modules, original.family, _v_prediction(options, original, tuned), options, save_to.stem
    )
    save_lora_file(save_to, tensors, metadata, options.save_precision)
    return modules


def load_model(
    path: str | Path, family: ModelFamily | None, dtype: torch.dtype, device: torch.device
) -> StableDiffusionModel:
    """The model's text encoders and U-Net in `dtype` on `device` (its VAE is not needed)."""
    model = load_stable_diffusion(path, family=family, dtype=dtype)
    model.vae = None
    for module in (*model.text_encoders, model.unet):
        place(module, device)
    return model


def paired_layers(
    original: StableDiffusionModel, tuned: StableDiffusionModel, options: ExtractOptions
) -> list[LayerPair]:
    """The layers networks.lora adapts, matched by name; both models must have the same ones with the same shapes."""
    if original.family is not tuned.family:
        raise UserError(
            f"{original.source} is an {original.family.label} model but {tuned.source} is an {tuned.family.label}"
            " model; a LoRA can only be extracted between two models of the same family: give the model the second"
            " was fine-tuned from."
        )
    tuned_layers = {name: layer for name, layer, _, _ in _adapted_layers(tuned, options)}
    pairs = []
    for name, layer, rank, uses_conv_rank in _adapted_layers(original, options):
        other = tuned_layers.pop(name, None)
        if other is None or other.weight.shape != layer.weight.shape:
            _report_architectures(original, tuned, name, layer, other)
        pairs.append(LayerPair(name, layer, other, rank, uses_conv_rank))
    if tuned_layers:
        _report_architectures(original, tuned, next(iter(tuned_layers)), None, next(iter(tuned_layers.values())))
    return pairs


def _adapted_layers(
    model: StableDiffusionModel, options: ExtractOptions
) -> list[tuple[str, torch.nn.Module, int, bool]]:
    """(module name, layer, rank, uses conv rank) of every layer a networks.lora network of these ranks adapts."""
    conv_args = {"conv_dim": options.conv_dim, "conv_alpha": options.conv_dim} if options.conv_dim else {}
    network = create_network(1.0, 1, 1.0, None, model.text_encoders, model.unet, **conv_args)
    loras = network.text_encoder_loras + network.unet_loras
    return [
        (lora.lora_name, lora.org_module, options.conv_dim if lora.uses_conv_rank else options.dim, lora.uses_conv_rank)
        for lora in loras
    ]


def _report_architectures(original: StableDiffusionModel, tuned: StableDiffusionModel, name: str, layer, other) -> None:
    def shape(module) -> str:
        return "missing" if module is None else "x".join(map(str, module.weight.shape))

    raise UserError(
        f"{original.source} and {tuned.source} are {original.family.label} models of different architectures"
        f" (layer '{name}': {shape(layer)} in the first, {shape(other)} in the second); give the model the second"
        " was fine-tuned from as --model_org."
    )


def weight_delta(pair: LayerPair, device: torch.device) -> torch.Tensor:
    """tuned - original in float32 on `device`, shaped like the layer's weight."""
    return pair.tuned.weight.detach().to(device, torch.float32) - pair.original.weight.detach().to(
        device, torch.float32
    )


def _without_unchanged_text_encoders(
    pairs: list[LayerPair], family: ModelFamily, options: ExtractOptions
) -> list[LayerPair]:
    """All pairs, or only the U-Net's when no text-encoder weight changed by more than --min_diff (all text encoders
    are judged together, as sd-scripts does)."""
    text_encoder_pairs = [pair for pair in pairs if pair.is_text_encoder]
    largest = max((weight_delta(pair, options.device).abs().max().item() for pair in text_encoder_pairs), default=0.0)
    if largest > options.min_diff:
        return pairs
    encoders = "text encoders" if family is ModelFamily.SDXL else "text encoder"
    print(
        f"the {encoders} did not change (largest weight difference {largest:.3g}, not above --min_diff"
        f" {options.min_diff}): no text-encoder modules are written, only the U-Net's"
    )
    return [pair for pair in pairs if not pair.is_text_encoder]


def extracted_modules(pairs: list[LayerPair], options: ExtractOptions) -> dict[str, ExtractedModule]:
    """Each pair's factors (on the CPU) and how far they are from the difference they approximate."""
    modules = {}
    for pair in tqdm(pairs, desc="extracting", unit="module", disable=not options.progress):
        delta = weight_delta(pair, options.device)
        factors = factors_from_delta(delta, pair.rank, options.clamp_quantile)
        modules[pair.name] = ExtractedModule(
            factors.up.cpu(), factors.down.cpu(), _relative_error(delta, factors.up, factors.down)
        )
    return modules


def _relative_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||delta - up @ down||_F / ||delta||_F (0 for a zero delta)."""
    norm = delta.norm()
    return float((delta - compose(up, down, delta.shape)).norm() / norm) if norm > 0 else 0.0


def summary(modules: dict[str, ExtractedModule]) -> str:
    """One line on how closely the modules reproduce the weight differences."""
    worst = max(modules, key=lambda name: modules[name].relative_error)
    mean = sum(module.relative_error for module in modules.values()) / len(modules)
    text_encoder = sum(name.startswith(TEXT_ENCODER_PREFIX) for name in modules)
    return (
        f"{len(modules)} modules ({text_encoder} text encoder, {len(modules) - text_encoder} U-Net); relative error"
        f" ||dW - up @ down|| / ||dW||: {mean:.1%} on average, {modules[worst].relative_error:.1%} at worst ({worst})"
    )


def _v_prediction(options: ExtractOptions, original: StableDiffusionModel, tuned: StableDiffusionModel) -> bool:
    """--v_parameterization (or --v2) when given, else whether either file is marked as v-prediction."""
    if options.v_parameterization is not None:
        return options.v_parameterization
    return original.v_prediction or tuned.v_prediction


def extracted_metadata(
    pairs: list[LayerPair],
    modules: dict[str, ExtractedModule],
    family: ModelFamily,
    v_prediction: bool,
    options: ExtractOptions,
    title: str,
) -> dict[str, str]:
    """sd-scripts' keys of an extracted LoRA: ranks and alphas as the modules have them (`Dynamic` when a layer is
    narrower than the rank asked for), `ss_network_args` always (`{}` without --conv_dim), and the ModelSpec
    unless --no_metadata; the hashes are added when the file is saved."""
    ranks = {pair.name: modules[pair.name].rank for pair in pairs}
    base = [str(ranks[pair.name]) for pair in pairs if not pair.uses_conv_rank]
    dim = common_value(base, str(options.dim))
    alpha = common_value([str(float(rank)) for rank in base], str(float(options.dim)))
    network_args = {}
    if options.conv_dim:
        conv = [str(ranks[pair.name]) for pair in pairs if pair.uses_conv_rank]
        network_args = {
            "conv_dim": common_value(conv, str(options.conv_dim)),
            "conv_alpha": common_value([str(float(r)) for r in conv], str(float(options.conv_dim))),
        }
    metadata = lora_network_metadata(NETWORK_MODULE, dim, alpha, network_args, family, v_prediction)
    metadata["ss_network_args"] = json.dumps(network_args)
    if options.modelspec:
        metadata.update(lora_modelspec(family, v_prediction, title))
    return metadata


def main() -> None:
    args = build_parser().parse_args()
    modules = extract_lora(args.model_org, args.model_tuned, args.save_to, options_from_args(args))
    print(f"saved {args.save_to}: {summary(modules)}")


if __name__ == "__main__":
    run_cli(main)
