"""Merge LoRAs into a Stable Diffusion checkpoint, or several LoRAs into one, with sd-scripts' merge_lora.py flags.

    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 1 1 --concat

Into a checkpoint (`--sd_model`): each LoRA in turn adds ratio * alpha / rank * (up @ down) to the weight of the
layer each of its modules names (Linear, 1x1 and 3x3 conv; for the q, k, v of an OpenCLIP text encoder, a third of
the fused in_proj tensor); a LyCORIS module (LoCon with a Tucker core, LoHa, LoKr, DoRA) changes it as its
algorithm defines (library/lora/lycoris.py). The merge works on the file's own tensors, not on a loaded model: only
the tensors a LoRA touches are read, changed and written back in their own dtype; every other tensor (VAE, EMA
weights, keys no loader knows) is copied through bit for bit under its own name. A load -> merge -> save round trip
through model classes would drop or rename what the classes do not hold and cast everything to one dtype. The model
exists here only as empty modules, to know which layer a LoRA name means and where its weight lies in the file.

Several LoRAs into one (no `--sd_model`):
* default, sd-scripts' factor sum (specs/lora_format.md 7.2): up = sum |s_i| up_i, down = sum s_i down_i with
  s_i = sqrt(alpha_i / alpha_1) * ratio_i; ranks must be equal. This is not the sum of the deltas (ratios enter as
  ratio * |ratio| and factors of different files multiply each other); the tool measures by how much it differs
  from sum ratio_i * delta_i and says so, or says that it is exact.
* `--concat`: the factors are stacked along the rank (rank = sum of the ranks) and scaled so that the merged LoRA
  applies exactly sum ratio_i * alpha_i / rank_i * up_i @ down_i, keeping the first file's alpha / rank.
* `--shuffle`: one random permutation of each module's rank dimension; the product up @ down is unchanged.

`sdxl_merge_lora.py` is this tool for SDXL checkpoints. See docs/lora_tools.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from library.compute_options import PRECISION_CHOICES, parse_device, parse_precision
from library.errors import UserError, run_cli
from library.file_io import check_output_file
from library.lora.block_weights import BlockWeights, check_layout_family, parse_block_weights
from library.lora.factors import lora_scale
from library.lora.files import (
    AdapterModule,
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
from library.lora.low_rank import Term, norm_of_sum
from library.lora.lycoris import LycorisModule
from library.lora.naming import CheckpointWeight, checkpoint_weights
from library.metadata import (
    checkpoint_modelspec,
    common_value,
    declared_base_model,
    lora_modelspec,
    lora_network_metadata,
    merged_from,
)
from library.model_files.containers import CHECKPOINT_SUFFIXES, TensorInfo
from library.model_files.family import ModelFamily
from library.model_files.key_maps import to_model_tensor
from library.model_files.stable_diffusion import (
    AliasedCheckpoint,
    StableDiffusionModel,
    open_single_file_model,
    write_single_file,
)
from networks.lora import NETWORK_MODULE

logger = logging.getLogger(__name__)

LORA_PLUS_LORA_FIX = (
    "merging LoRAs into one adds or stacks their factors, which LyCORIS modules do not have: merge it into a"
    " checkpoint with --sd_model, or combine the files with svd_merge_lora.py, which writes a LoRA of the rank you"
    " choose."
)
EXACT = 1e-5  # a relative deviation from the sum of the deltas up to this is float32 rounding: the merge is exact


@dataclass(frozen=True)
class MergeOptions:
    """What the flags ask for, checked once."""

    sdxl: bool = False  # sdxl_merge_lora.py: merges into SDXL checkpoints; merge_lora.py into SD1.x/SD2.x ones
    v2: bool = False  # --v2: the checkpoint must be SD2.x; outputs without a prediction mark are marked v-prediction
    precision: torch.dtype = torch.float32  # the dtype the merged weights are computed in
    save_precision: torch.dtype | None = (
        None  # None: checkpoint tensors keep their file's dtype, a LoRA gets `precision`
    )
    device: torch.device = torch.device("cpu")
    concat: bool = False
    shuffle: bool = False
    block_weights: tuple[BlockWeights, ...] = ()  # --lbws (sdxl_merge_lora.py): one per model, or none
    modelspec: bool = True  # --no_metadata: no ModelSpec (a LoRA keeps its ss_* keys and hashes)
    progress: bool = True

    def ratio(self, lora: LoraInput, position: int, name: str) -> float:
        """The ratio of module `name` of the `position`-th LoRA: its --ratios value times its block's --lbws weight."""
        return lora.ratio * (self.block_weights[position].for_module(name) if self.block_weights else 1.0)


def build_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    what = "an SDXL checkpoint, or several SDXL LoRAs" if sdxl else "an SD1.x/SD2.x checkpoint, or several LoRAs"
    parser = argparse.ArgumentParser(description=f"Merge LoRAs into {what} into one, with sd-scripts' flags.")
    if not sdxl:
        parser.add_argument(
            "--v2",
            action="store_true",
            help="the checkpoint is SD2.x (checked against the file); marks outputs as v-prediction as sd-scripts does",
        )
    parser.add_argument(
        "--sd_model",
        default=None,
        help="the checkpoint to merge into (.safetensors or .ckpt); without it the LoRAs are merged into one LoRA",
    )
    parser.add_argument(
        "--save_to",
        required=True,
        help="the file to write: a checkpoint with --sd_model, else a LoRA (.safetensors, .ckpt or .pt)",
    )
    parser.add_argument("--models", nargs="+", required=True, help="the LoRA files, merged in this order")
    parser.add_argument("--ratios", type=float, nargs="*", default=[], help="one ratio (multiplier) per LoRA")
    if sdxl:
        parser.add_argument(
            "--lbws",
            nargs="*",
            default=None,
            help="block-wise ratios, one JSON list per model (12 or 20 values for SDXL, 17 or 26 for SD1/SD2)",
        )
    parser.add_argument(
        "--precision", choices=PRECISION_CHOICES, default=None, help="dtype the merge is computed in (default float)"
    )
    parser.add_argument(
        "--save_precision",
        choices=PRECISION_CHOICES,
        default=None,
        help=(
            "dtype of the saved tensors (default: --precision when given; otherwise a checkpoint's tensors keep their"
            " dtype and a LoRA is float)"
        ),
    )
    parser.add_argument("--device", default=None, help="device for the computation, e.g. cuda (default: the CPU)")
    parser.add_argument(
        "--no_metadata",
        action="store_true",
        help="write no ModelSpec (modelspec.*); a LoRA keeps its ss_* keys and hashes",
    )
    parser.add_argument(
        "--concat",
        action="store_true",
        help="LoRA + LoRA: stack the ranks, so the result applies exactly the sum of the ratio-weighted LoRAs",
    )
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="LoRA + LoRA: permute each module's rank dimension randomly (the product is unchanged)",
    )
    return parser


def options_from_args(args: argparse.Namespace, sdxl: bool) -> MergeOptions:
    precision = parse_precision(args.precision, torch.float32)
    if args.sd_model and (args.concat or args.shuffle):
        logger.warning(
            "--concat and --shuffle only apply when LoRAs are merged into one LoRA; with --sd_model they change nothing"
        )
    return MergeOptions(
        sdxl=sdxl,
        v2=getattr(args, "v2", False),
        precision=precision,
        save_precision=parse_precision(args.save_precision, precision if args.precision else None),
        device=parse_device("--device", args.device),
        concat=args.concat,
        shuffle=args.shuffle,
        block_weights=tuple(parse_block_weights(args.lbws, args.models)) if getattr(args, "lbws", None) else (),
        modelspec=not args.no_metadata,
    )


# ---------------------------------------------------------------- LoRAs into a checkpoint


def merge_into_checkpoint(
    sd_model: str | os.PathLike,
    save_to: str | os.PathLike,
    loras: Sequence[LoraInput],
    options: MergeOptions = MergeOptions(),
) -> Path:
    """Write `sd_model` with each LoRA's ratio-weighted delta added, in order, to `save_to` (atomically)."""
    save_to = check_output_file(save_to, "--save_to", [sd_model, *(lora.path for lora in loras)])
    if save_to.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise UserError(
            f"--save_to {save_to}: unknown checkpoint file type '{save_to.suffix}'; use .safetensors or .ckpt."
        )
    if Path(sd_model).is_dir():
        raise UserError(
            f"--sd_model {sd_model}: a Diffusers folder; LoRAs are merged into a single .safetensors/.ckpt checkpoint"
            " (write one with tools/convert_diffusers20_original_sd.py)."
        )
    model, checkpoint = open_single_file_model(sd_model, family=ModelFamily.SD2 if options.v2 else None)
    _check_script_family(model, options)
    check_layout_family(options.block_weights, model.family)
    weights = checkpoint_weights(model)
    matched = [_modules_in_checkpoint(lora, weights, model) for lora in loras]
    merged: dict[str, torch.Tensor] = {}  # file tensor (current key name) -> its merged value, in --precision
    for position, (lora, modules) in enumerate(zip(loras, matched)):
        for name, module in tqdm(
            modules.items(), desc=f"merging {lora.path.name}", unit="module", disable=not options.progress
        ):
            link = weights[name].link
            if link.file_key not in merged:
                merged[link.file_key] = checkpoint.read(link.file_key).to(options.device, options.precision, copy=True)
            layer_weight = to_model_tensor(merged[link.file_key], link)  # a view: writing it changes the file tensor
            layer_weight.copy_(module.adapted(layer_weight, options.ratio(lora, position, name)).to(layer_weight.dtype))
    metadata = None
    if options.modelspec:
        sources = [(Path(sd_model), checkpoint.metadata)] + [(lora.path, lora.metadata) for lora in loras]
        metadata = {
            **checkpoint_modelspec(model.family, model.v_prediction or options.v2, save_to.stem),
            **merged_from(sources),
        }
    write_single_file(save_to, _checkpoint_entries(checkpoint, merged, options.save_precision), metadata)
    print(f"saved {save_to}: {len(merged)} tensors changed by {sum(len(modules) for modules in matched)} LoRA modules")
    return save_to


def _check_script_family(model: StableDiffusionModel, options: MergeOptions) -> None:
    if options.sdxl != (model.family is ModelFamily.SDXL):
        other = "networks/merge_lora.py" if options.sdxl else "networks/sdxl_merge_lora.py"
        raise UserError(f"{model.source}: the file is an {model.family.label} checkpoint; merge into it with {other}.")


def _modules_in_checkpoint(
    lora: LoraInput, weights: Mapping[str, CheckpointWeight], model: StableDiffusionModel
) -> dict[str, AdapterModule]:
    """The LoRA's modules that name a layer of the checkpoint, checked against the layer's shape. Modules naming no
    layer are skipped with a warning, as sd-scripts skips them; a LoRA of another family, or one none of whose modules
    fits, is refused."""
    if lora.family is not None and lora.family is not model.family:
        raise UserError(
            f"{lora.path} is an {lora.family.label} LoRA but {model.source} is an {model.family.label} checkpoint;"
            " merge it into a checkpoint of the family it was trained for."
        )
    unknown = [name for name in lora.modules if name not in weights]
    if len(unknown) == len(lora.modules):
        raise UserError(
            f"{lora.path}: none of its {len(unknown)} modules names a layer of the {model.family.label} checkpoint"
            f" {model.source} (first: '{unknown[0]}'); the LoRA was made for another model."
        )
    if unknown:
        logger.warning(
            "%s: %d of its %d modules name no layer of %s and are skipped, as sd-scripts skips them (first: '%s')",
            lora.path,
            len(unknown),
            len(lora.modules),
            model.source,
            unknown[0],
        )
    matched = {}
    for name, module in lora.modules.items():
        if name not in weights:
            continue
        shape = weights[name].shape
        if not module.fits(shape):
            raise UserError(
                f"{lora.path}: module '{name}' is made for a {_layer_text(module)} layer, but that layer of"
                f" {model.source} is {shape[1]} -> {shape[0]}; the LoRA was trained for another model (SD1.x and SD2.x"
                " LoRAs share their names)."
            )
        matched[name] = module.for_layer(shape)
    return matched


def _layer_text(module: AdapterModule) -> str:
    """'in -> out' of the layer a module is made for (in x kernel when the file does not tell the kernel)."""
    if isinstance(module, LycorisModule) and module.shape is None:
        return f"{module.flat_in_features} (in x kernel) -> {module.out_features}"
    return f"{module.weight_shape[1]} -> {module.weight_shape[0]}"


def _checkpoint_entries(checkpoint: AliasedCheckpoint, merged: Mapping[str, torch.Tensor], dtype: torch.dtype | None):
    """Every tensor of the input file under its own key: merged ones from `merged`, the others read as they are;
    floating-point tensors cast to `dtype` when given, else kept in the file's dtype."""
    file = checkpoint.checkpoint
    changed = {checkpoint.file_key(name): tensor for name, tensor in merged.items()}
    entries = {}
    for key, info in file.info().items():
        saved_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        source = (lambda tensor=changed[key]: tensor) if key in changed else (lambda key=key: file.read(key))
        entries[key] = (TensorInfo(info.shape, saved_dtype), source)
    return entries


# ---------------------------------------------------------------- LoRA + LoRA


def merge_loras(save_to: str | os.PathLike, loras: Sequence[LoraInput], options: MergeOptions = MergeOptions()) -> Path:
    """Merge the LoRAs into one and write it to `save_to` (atomically); modules missing from a file count as zero
    there."""
    save_to = check_lora_output(save_to, [lora.path for lora in loras])
    loras = [lora.plain(LORA_PLUS_LORA_FIX) for lora in loras]
    check_layout_family(options.block_weights, inputs_family(loras))
    groups = modules_by_name(loras, options.block_weights)
    _note_missing_modules(loras, list(groups))
    merged, deviations = {}, {}
    for name, members in tqdm(groups.items(), desc="merging", unit="module", disable=not options.progress):
        module = concatenated(members, options) if options.concat else factor_sum(name, members, options)
        if options.shuffle:
            module = shuffled(module)
        if not options.concat:
            deviations[name] = deviation_from_sum(module, members)
        merged[name] = module
    if deviations:
        _report_factor_sum(deviations, loras)
    dtype = options.save_precision or options.precision
    tensors = {}
    for name, module in merged.items():  # alpha stays a 0-dim float32 whatever the save dtype
        tensors.update(
            module_tensors(name, module.up.to("cpu", dtype), module.down.to("cpu", dtype), module.alpha_value)
        )
    save_lora_file(save_to, tensors, _lora_metadata(merged, loras, options, save_to.stem))
    ranks = sorted({module.rank for module in merged.values()})
    print(f"saved {save_to}: {len(merged)} modules of rank {', '.join(map(str, ranks))}")
    return save_to


def _note_missing_modules(loras: Sequence[LoraInput], names: Sequence[str]) -> None:
    for lora in loras:
        missing = [name for name in names if name not in lora.modules]
        if missing:
            print(
                f"{lora.path} has no module for {len(missing)} of the {len(names)} modules (first: '{missing[0]}');"
                " it adds nothing there"
            )


def _prepared(factors: ModuleFactors, like: ModuleFactors, options: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in --precision on --device, in the layout of `like` (a 1x1 layer's factors come 2-D or 4-D)."""
    up = factors.up.to(options.device, options.precision).reshape(like.up.shape[0], factors.rank, *like.up.shape[2:])
    down = factors.down.to(options.device, options.precision).reshape(factors.rank, *like.down.shape[1:])
    return up, down


def _merged(up: torch.Tensor, down: torch.Tensor, alpha: float) -> ModuleFactors:
    return ModuleFactors(down, up, torch.tensor(alpha, dtype=torch.float32))


def factor_sum(name: str, members: Sequence[Member], options: MergeOptions) -> ModuleFactors:
    """sd-scripts' default merge (spec 7.2): with s_i = sqrt(alpha_i / alpha_1) * ratio_i, up = sum |s_i| up_i and
    down = sum s_i down_i, alpha = alpha_1. Ranks must be equal."""
    first = members[0]
    base_alpha = first.module.alpha_value
    up = down = 0
    for member in members:
        if member.module.rank != first.module.rank:
            raise UserError(
                f"{member.path}: module '{name}' has rank {member.module.rank}, but in {first.path} it has rank"
                f" {first.module.rank}; the default merge adds the factors themselves, which needs equal ranks: use"
                " --concat (exact, the ranks add up) or svd_merge_lora.py (a rank you choose)."
            )
        s = math.sqrt(member.module.alpha_value / base_alpha) * member.ratio
        member_up, member_down = _prepared(member.module, first.module, options)
        up, down = up + abs(s) * member_up, down + s * member_down
    return _merged(up, down, base_alpha)


def concatenated(members: Sequence[Member], options: MergeOptions) -> ModuleFactors:
    """The factors stacked along the rank, so that the module applies exactly sum ratio_i * scale_i * up_i @ down_i.
    The first file's scale alpha / rank is kept (alpha = scale_1 * total rank); file i's factors are multiplied by
    sqrt(|c_i|) each (the sign on down), c_i = ratio_i * scale_i / scale_1."""
    first = members[0].module
    scale = lora_scale(first.alpha, first.rank)
    ups, downs = [], []
    for member in members:
        weight = member.ratio * lora_scale(member.module.alpha, member.module.rank) / scale
        member_up, member_down = _prepared(member.module, first, options)
        ups.append(math.sqrt(abs(weight)) * member_up)
        downs.append(math.copysign(math.sqrt(abs(weight)), weight) * member_down)
    rank = sum(member.module.rank for member in members)
    return _merged(torch.cat(ups, dim=1), torch.cat(downs, dim=0), scale * rank)


def shuffled(module: ModuleFactors) -> ModuleFactors:
    """One random permutation of the rank dimension of up and down: up @ down is the same sum in another order."""
    order = torch.randperm(module.rank, device=module.down.device)
    return ModuleFactors(module.down[order], module.up[:, order], module.alpha)


def deviation_from_sum(module: ModuleFactors, members: Sequence[Member]) -> float:
    """|| merged delta - sum ratio_i * scale_i * up_i @ down_i ||_F / || the sum ||_F, from the factors (float64)."""
    exact = [
        Term(member.module.up, member.module.down, member.ratio * lora_scale(member.module.alpha, member.module.rank))
        for member in members
    ]
    target = norm_of_sum(exact)
    merged = Term(module.up, module.down, lora_scale(module.alpha, module.rank))
    difference = norm_of_sum([merged] + [term._replace(coefficient=-term.coefficient) for term in exact])
    return difference / target if target else (0.0 if difference == 0 else math.inf)


def _report_factor_sum(deviations: Mapping[str, float], loras: Sequence[LoraInput]) -> None:
    """Say whether the factor sum applied what the ratios ask for: sum ratio_i * delta_i."""
    wanted = " ".join(
        f"{'-' if lora.ratio < 0 else '+' if index else ''} {abs(lora.ratio):g} x {lora.path.name}"
        for index, lora in enumerate(loras)
    ).strip()
    worst = max(deviations, key=deviations.get)
    if deviations[worst] <= EXACT:
        print(
            f"the factor sum is exact here: the merged LoRA applies {wanted} (largest relative deviation"
            f" {deviations[worst]:.1e})"
        )
        return
    why = "each ratio enters as ratio*|ratio|" + (
        " and factors of different files multiply each other" if len(loras) > 1 else ""
    )
    logger.warning(
        "the default merge adds the LoRAs' factors (sd-scripts' formula), which is not the sum of their deltas: the"
        " merged LoRA differs from %s by up to %.1f%% (module '%s'), as %s; use --concat for the exact sum, or"
        " svd_merge_lora.py for a rank you choose",
        wanted,
        100 * deviations[worst],
        worst,
        why,
    )


def _lora_metadata(
    merged: Mapping[str, ModuleFactors], loras: Sequence[LoraInput], options: MergeOptions, title: str
) -> dict[str, str]:
    """The minimum ss_* keys with the merged ranks and alphas (`Dynamic` when modules differ; kxk convs as conv_dim /
    conv_alpha in ss_network_args), the family of the inputs (else the script's: SDXL, or SD2 with --v2), and the
    ModelSpec unless --no_metadata or the family is unknown."""
    family = inputs_family(loras) or (ModelFamily.SDXL if options.sdxl else ModelFamily.SD2 if options.v2 else None)
    declared = [found for lora in loras if (found := declared_base_model(lora.metadata))]
    v_prediction = any(v for _, v in declared) if declared else options.v2
    base = [module for module in merged.values() if not module.uses_conv_rank]
    convs = [module for module in merged.values() if module.uses_conv_rank]
    dim = common_value([str(module.rank) for module in base], "None")
    alpha = common_value([str(module.alpha_value) for module in base], "None")
    network_args = None
    if convs:
        network_args = {
            "conv_dim": common_value([str(m.rank) for m in convs], ""),
            "conv_alpha": common_value([str(m.alpha_value) for m in convs], ""),
        }
    metadata = lora_network_metadata(NETWORK_MODULE, dim, alpha, network_args, family, v_prediction)
    if options.modelspec and family is not None:
        metadata.update(lora_modelspec(family, v_prediction, title))
        metadata.update(merged_from([(lora.path, lora.metadata) for lora in loras]))
    return metadata


# ---------------------------------------------------------------- the script


def main(sdxl: bool = False) -> None:
    args = build_parser(sdxl).parse_args()
    options = options_from_args(args, sdxl)
    loras = read_lora_inputs(args.models, args.ratios)
    if args.sd_model:
        merge_into_checkpoint(args.sd_model, args.save_to, loras, options)
    else:
        merge_loras(args.save_to, loras, options)


if __name__ == "__main__":
    run_cli(main)
