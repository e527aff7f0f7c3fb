"""DyLoRA-LierLa and DyLoRA-C3Lier: train once, choose the rank afterwards (DyLoRA, arXiv 2210.07558), with the API
of sd-scripts' networks/dylora.py and networks/lora.py.

The layers adapted, the file names, shapes and metadata are networks.lora's, so a DyLoRA file is an ordinary LoRA
file that loads everywhere. Each module keeps its factors in units of `unit` ranks. At every optimizer step the
trainer calls `on_step_start()`, which draws one rank b from unit, 2*unit, ..., network_dim for the whole network;
during that step every module computes

    org(x) + multiplier * alpha / b * up[:, :b] @ down[:b] x

and only the last unit of those b ranks learns (the paper's truncation, scale and frozen lower ranks). Outside
training the module uses the full rank, or the rank given to `set_rank(r)`. A rank-r slice of the file with the same
alpha therefore applies exactly what the network applies at rank r: networks/extract_lora_from_dylora.py writes
those slices. See docs/dylora.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import torch

from library.errors import UserError
from library.lora.adapter import LayerAdapter
from library.lora.factors import lora_scale
from library.lora.naming import DOWN, UP, LoraTarget, is_sdxl_unet
from library.lora.network_args import KNOWN_KEYS as LORA_KEYS
from library.lora.network_args import LORAPLUS_KEYS, LoRAArgs, parse_network_args, parse_number
from networks.lora import DEFAULT_ALPHA, DEFAULT_DIM, LoRANetwork, dim_and_alpha, read_weights_for_model

NETWORK_MODULE = "networks.dylora"
MAX_NORM_REFUSAL = (
    "--scale_weight_norms is not available with networks.dylora (sd-scripts' DyLoRA has none either): capping the"
    " full-rank norm would rescale every lower rank too; remove the option or train networks.lora."
)
DEFAULT_UNIT = 1
KNOWN_KEYS = ("unit", "conv_dim", "conv_alpha", *LORAPLUS_KEYS)
UNIT_PARTS = ((DOWN, "lora_down_units", 0), (UP, "lora_up_units", 1))  # file key, parameter list, rank axis


@dataclasses.dataclass(frozen=True)
class DyLoRAArgs(LoRAArgs):
    unit: int = DEFAULT_UNIT  # ranks are drawn, trained and extracted in steps of this many


class DyLoRAModule(LayerAdapter):
    """A LoRA module whose rank can be cut. Its factors are kept as one parameter per unit of ranks, so that a
    training step can leave every unit but one untouched (not even moved by the optimizer's momentum); its state
    dict is a LoRA module's: `lora_down.weight` [R, in(, k, k)], `lora_up.weight` [out, R(, 1, 1)] and `alpha`."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        unit: int = DEFAULT_UNIT,
        block: int | None = None,
    ):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, block)
        down, up = _initial_factors(org_module, lora_dim)
        self.unit = unit
        self.lora_down_units = torch.nn.ParameterList(
            chunk.clone(memory_format=torch.contiguous_format) for chunk in down.split(unit, 0)
        )
        self.lora_up_units = torch.nn.ParameterList(
            chunk.clone(memory_format=torch.contiguous_format) for chunk in up.split(unit, 1)
        )
        self.alpha_value = float(self.alpha)
        self.rank: int | None = None  # the rank used outside training (set_rank); None: the full rank
        self.step_rank: int | None = None  # the rank drawn for the current training step (on_step_start)
        self.register_state_dict_post_hook(_units_as_lora_factors)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(up, down, scale) at the chosen rank (the full rank unless `rank` is set)."""
        return self.factors_at(self.rank or self.lora_dim)

    def factors_at(self, rank: int, train_last_unit_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The first `rank` ranks and their scale alpha / rank: what a LoRA file of that rank with this alpha
        applies. With `train_last_unit_only` the lower units are detached, so that only the last one learns."""
        count = rank // self.unit
        downs, ups = list(self.lora_down_units)[:count], list(self.lora_up_units)[:count]
        if train_last_unit_only:
            downs[:-1] = [down.detach() for down in downs[:-1]]
            ups[:-1] = [up.detach() for up in ups[:-1]]
        return torch.cat(ups, 1), torch.cat(downs, 0), lora_scale(self.alpha_value, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.org_forward(x)
        if not self.enabled:
            return y
        up, down, scale = self._training_factors() if self.training else self.factors()
        return self.add_up(y, self.project_down(x, down), up, self.multiplier * scale)

    def _training_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.step_rank is None:
            raise UserError(
                f"networks.dylora: module {self.lora_name} runs in training mode but no rank was drawn; call"
                " network.on_step_start() before each optimizer step (train_network.py does), or network.eval() for"
                " inference."
            )
        return self.factors_at(self.step_rank, train_last_unit_only=True)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Take a LoRA module's `lora_down.weight` and `lora_up.weight` and split them into the units."""
        for key, units_name, axis in UNIT_PARTS:
            full = state_dict.pop(prefix + key, None)
            if full is None:
                continue  # reported as missing units
            units = getattr(self, units_name)
            expected = _concatenated_shape(units, axis)
            if full.shape != expected:
                error_msgs.append(
                    f"size mismatch for {prefix}{key}: the file's shape is {tuple(full.shape)}, this network's"
                    f" {tuple(expected)}."
                )
                continue
            for index, chunk in enumerate(full.split(self.unit, axis)):
                state_dict[f"{prefix}{units_name}.{index}"] = chunk
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.alpha_value = float(self.alpha)


def _initial_factors(layer: torch.nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Down and up as networks.lora initialises them: Kaiming-uniform(a=sqrt(5)) down, zero up (delta W = 0)."""
    if isinstance(layer, torch.nn.Conv2d):
        down = torch.empty(rank, layer.in_channels, *layer.kernel_size)
        up = torch.zeros(layer.out_channels, rank, 1, 1)
    else:
        down = torch.empty(rank, layer.in_features)
        up = torch.zeros(layer.out_features, rank)
    torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    return down, up


def _concatenated_shape(units: torch.nn.ParameterList, axis: int) -> torch.Size:
    shape = list(units[0].shape)
    shape[axis] = sum(unit.shape[axis] for unit in units)
    return torch.Size(shape)


def _units_as_lora_factors(module: DyLoRAModule, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the units' entries become one `lora_down.weight` and one `lora_up.weight`."""
    for key, units_name, axis in UNIT_PARTS:
        count = len(getattr(module, units_name))
        state_dict[prefix + key] = torch.cat(
            [state_dict.pop(f"{prefix}{units_name}.{index}") for index in range(count)], axis
        )


class DyLoRANetwork(LoRANetwork):
    """DyLoRA modules for the text encoder(s) and U-Net of one model, all of one rank, registered under their file
    names. Everything but the modules, the rank choice and `ss_network_args` is networks.lora's."""

    network_module = NETWORK_MODULE

    def __init__(
        self,
        text_encoder,
        unet: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        args: DyLoRAArgs = DyLoRAArgs(),
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        network_args: Mapping[str, str] | None = None,
    ):
        super().__init__(
            text_encoder, unet, multiplier, lora_dim, alpha, None, args, modules_dim, modules_alpha, network_args
        )
        self.unit = args.unit
        self.rank: int | None = None
        self.step_rank: int | None = None

    def _new_module(self, target: LoraTarget, rank: int, alpha: float | None) -> DyLoRAModule:
        return DyLoRAModule(target.name, target.layer, self.multiplier, rank, alpha, self.args.unit, target.block)

    @property
    def ranks(self) -> list[int]:
        """The ranks the network trains and can be cut to: unit, 2*unit, ..., the full rank."""
        return list(range(self.unit, self.lora_dim + 1, self.unit))

    def on_step_start(self) -> None:
        """Draw the rank of this optimizer step, uniformly from `ranks`, for every module (torch's global RNG)."""
        self.step_rank = self.unit * int(torch.randint(1, self.lora_dim // self.unit + 1, ()))
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.step_rank = self.step_rank

    def set_rank(self, rank: int | None) -> None:
        """Compute with the first `rank` ranks outside training (None: the full rank), as the rank-`rank` file
        extracted from this network would."""
        if rank is not None and rank not in self.ranks:
            raise UserError(
                f"networks.dylora: rank {rank} is not one this network trains (rank {self.lora_dim} in units of"
                f" {self.unit});"
                f" choose one of {', '.join(map(str, self.ranks))}, or None for the full rank."
            )
        self.rank = rank
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.rank = rank

    def _metadata_network_args(self) -> dict[str, str]:
        return {**super()._metadata_network_args(), "unit": str(self.unit)}

    def apply_max_norm_regularization(self, max_norm_value: float, device=None):
        raise UserError(MAX_NORM_REFUSAL)


# ---------------------------------------------------------------- --network_args


def parse_dylora_args(
    kwargs: Mapping[str, object], network_dim: int, network_alpha: float | None, sdxl: bool
) -> DyLoRAArgs:
    """`unit` (default 1), `conv_dim` (must equal network_dim; turns DyLoRA-C3Lier on), `conv_alpha` (default:
    network_alpha) and the LoRA+ ratios."""
    unknown = sorted(set(kwargs) - set(KNOWN_KEYS))
    if unknown and unknown[0] in LORA_KEYS:
        raise UserError(
            f"--network_args: '{unknown[0]}' is an option of networks.lora that networks.dylora does not have (one rank"
            " is drawn per step for the whole network, so there are no block-wise ranks or learning rates and no"
            " dropouts); remove it."
        )
    if unknown:
        raise UserError(
            f"--network_args: unknown argument '{unknown[0]}' for networks.dylora; the known ones are"
            f" {', '.join(KNOWN_KEYS)}."
        )
    given = {key: value for key, value in kwargs.items() if value is not None and str(value).strip() != ""}
    unit = parse_number("unit", given["unit"], int) if "unit" in given else DEFAULT_UNIT
    if unit < 1:
        raise UserError(f"--network_args: unit={unit} must be at least 1.")
    lora_args = parse_network_args({key: value for key, value in given.items() if key != "unit"}, sdxl)
    if lora_args.conv_dim and lora_args.conv_dim != network_dim:
        raise UserError(
            f"--network_args: conv_dim={lora_args.conv_dim} must equal --network_dim {network_dim} for networks.dylora"
            f" (one rank is drawn for all modules); write conv_dim={network_dim}."
        )
    conv_alpha = lora_args.conv_alpha if "conv_alpha" in given or not lora_args.conv_dim else network_alpha
    return DyLoRAArgs(**{**vars(lora_args), "conv_alpha": conv_alpha, "unit": unit})


def check_unit_divides(rank: int, unit: int, what: str, fix: str) -> None:
    """`what` names the rank (`--network_dim 10`, `FILE: its rank 10`), `fix` says what to change."""
    if rank % unit:
        raise UserError(
            f"{what} is not a multiple of unit={unit}; DyLoRA's ranks are unit, 2*unit, ... up to the full rank, so"
            f" {fix}."
        )


def unit_from_metadata(metadata: Mapping[str, str]) -> int | None:
    """The `unit` recorded in a file's `ss_network_args`, if any."""
    try:
        network_args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return None
    unit = network_args.get("unit") if isinstance(network_args, dict) else None
    return parse_number("unit", unit, int) if unit not in (None, "") else None


# ---------------------------------------------------------------- the module-level API sd-scripts users call


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> DyLoRANetwork:
    """A new DyLoRA network from `--network_dim`, `--network_alpha` and `--network_args` (unit, conv_dim,
    conv_alpha, loraplus_*). `vae` is not adapted; it is taken for sd-scripts' signature."""
    if neuron_dropout is not None:
        raise UserError(
            f"--network_dropout {neuron_dropout}: networks.dylora has no dropout (nor has sd-scripts' DyLoRA);"
            " remove it."
        )
    lora_dim, alpha = dim_and_alpha(network_dim, network_alpha)
    args = parse_dylora_args(kwargs, lora_dim, alpha, is_sdxl_unet(unet))
    nearest = f"{lora_dim // args.unit * args.unit or args.unit} or {(lora_dim // args.unit + 1) * args.unit}"
    check_unit_divides(
        lora_dim,
        args.unit,
        f"--network_dim {lora_dim}",
        f"use a rank such as {nearest}, or a unit that divides {lora_dim}",
    )
    network_args = {**{key: str(value) for key, value in kwargs.items()}, "unit": str(args.unit)}
    return DyLoRANetwork(text_encoder, unet, multiplier, lora_dim, alpha, args, network_args=network_args)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae,
    text_encoder,
    unet,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs,
) -> tuple[DyLoRANetwork, dict[str, torch.Tensor]]:
    """A DyLoRA network with exactly the modules of a LoRA file (all of one rank), with the file's alphas and the
    `unit` given here, else the file's, else 1. Returns the network and the state dict to load into it (see
    networks.lora.create_network_from_weights); the weights are not loaded."""
    loaded = read_weights_for_model(file, text_encoder, unet, weights_sd)
    ranks = sorted(set(loaded.ranks().values()))
    if len(ranks) != 1:
        found = f"modules of ranks {', '.join(map(str, ranks))}" if ranks else "no LoRA modules"
        raise UserError(
            f"{loaded.source}: it has {found}; a DyLoRA network needs one rank for all modules, so load it with"
            " networks.lora."
        )
    unit = kwargs.pop("unit", None) or unit_from_metadata(loaded.metadata) or DEFAULT_UNIT
    args = parse_dylora_args({**kwargs, "unit": unit}, ranks[0], None, is_sdxl_unet(unet))
    check_unit_divides(
        ranks[0], args.unit, f"{loaded.source}: its rank {ranks[0]}", f"give a unit that divides {ranks[0]}"
    )
    network = DyLoRANetwork(
        loaded.text_encoders,
        unet,
        multiplier,
        ranks[0],
        None,
        args,
        modules_dim=loaded.ranks(),
        modules_alpha=loaded.alphas(),
    )
    return network, loaded.weights


__all__ = ["DyLoRAModule", "DyLoRANetwork", "create_network", "create_network_from_weights", "NETWORK_MODULE"]
