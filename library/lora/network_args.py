"""`--network_args` of `networks.lora`, parsed once into a typed object (specs/lora_format.md section 4).

Values arrive as strings from the command line or a TOML file, or as numbers from Python code. Every mistake
(an unknown key, a non-number, a wrong count of block values) is one UserError that names the argument. Block-wise
values follow the family's block layout (library.lora.naming.BlockLayout): 25 slots for SD1/SD2, 23 for SDXL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from library.errors import UserError
from library.lora.naming import BlockLayout, block_layout

LR_WEIGHT_PRESETS: dict[str, Callable[[int, int], float]] = {
    "sine": lambda i, n: math.sin(math.pi / 2 * i / (n - 1)),
    "cosine": lambda i, n: math.sin(math.pi / 2 * (n - 1 - i) / (n - 1)),
    "linear": lambda i, n: i / (n - 1),
    "reverse_linear": lambda i, n: (n - 1 - i) / (n - 1),
    "zeros": lambda i, n: 0.0,
}
BLOCK_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
BLOCK_RANK_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
DROPOUT_KEYS = ("dropout", "rank_dropout", "module_dropout")
KNOWN_KEYS = ("conv_dim", "conv_alpha", *DROPOUT_KEYS, *BLOCK_LR_KEYS, *BLOCK_RANK_KEYS, *LORAPLUS_KEYS)
NON_NEGATIVE_KEYS = ("conv_dim", "conv_alpha", *BLOCK_RANK_KEYS, *LORAPLUS_KEYS)

Number = TypeVar("Number", int, float)


@dataclass(frozen=True)
class LoRAArgs:
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    block_lr_weights: tuple[float, ...] | None = None  # one per U-Net block slot (25, or 23 for SDXL)
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    @property
    def with_conv(self) -> bool:
        """C3Lier: the 3x3 convs (and the other layers of ResNet and sampling blocks) get modules."""
        return bool(self.conv_dim or self.conv_block_dims)


def parse_network_args(kwargs: Mapping[str, object], sdxl: bool) -> LoRAArgs:
    unknown = sorted(set(kwargs) - set(KNOWN_KEYS))
    if unknown:
        raise UserError(
            f"--network_args: unknown argument '{unknown[0]}' for networks.lora;"
            f" the known ones are {', '.join(KNOWN_KEYS)}."
        )
    given = {key: value for key, value in kwargs.items() if value is not None and str(value).strip() != ""}
    layout = block_layout(sdxl)
    conv_dim = _optional(given, "conv_dim", int)
    conv_alpha = _optional(given, "conv_alpha", float)
    loraplus = _optional(given, "loraplus_lr_ratio", float)
    return LoRAArgs(
        conv_dim=conv_dim,
        conv_alpha=conv_alpha if conv_alpha is not None else (1.0 if conv_dim or "conv_block_dims" in given else None),
        dropout=_optional(given, "dropout", float),
        rank_dropout=_optional(given, "rank_dropout", float),
        module_dropout=_optional(given, "module_dropout", float),
        block_lr_weights=_block_lr_weights(given, layout),
        block_dims=_block_values(given, "block_dims", int, layout),
        block_alphas=_block_values(given, "block_alphas", float, layout),
        conv_block_dims=_block_values(given, "conv_block_dims", int, layout),
        conv_block_alphas=_block_values(given, "conv_block_alphas", float, layout),
        # A ratio of 0 means "not set", as in sd-scripts, where the part's ratio is `part or global`.
        loraplus_unet_lr_ratio=_optional(given, "loraplus_unet_lr_ratio", float) or loraplus,
        loraplus_text_encoder_lr_ratio=_optional(given, "loraplus_text_encoder_lr_ratio", float) or loraplus,
    )


def _optional(given: Mapping[str, object], key: str, kind: type[Number]) -> Number | None:
    return parse_number(key, given[key], kind) if key in given else None


def parse_number(key: str, value: object, kind: type[Number]) -> Number:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise UserError(f"--network_args: {key}={value} is not a number.") from None
    if not math.isfinite(number):
        raise UserError(f"--network_args: {key}={value} is not a finite number.")
    if key in DROPOUT_KEYS:
        check_probability(f"--network_args {key}", number)
    if key in NON_NEGATIVE_KEYS and number < 0:
        raise UserError(f"--network_args: {key}={value} must not be negative.")
    if kind is int:
        if number != int(number):
            raise UserError(f"--network_args: {key}={value} must be a whole number.")
        return int(number)
    return number


def check_probability(label: str, value: float | None) -> None:
    """A dropout rate: at least 0 and below 1 (at 1 nothing would be left to rescale)."""
    if value is not None and not 0 <= value < 1:
        raise UserError(f"{label}={value} is a dropout probability; it must be at least 0 and below 1.")


def _number_list(key: str, value: object, kind: type[Number], count: int, what: str) -> tuple[Number, ...]:
    items = str(value).split(",")
    if len(items) != count:
        raise UserError(f"--network_args: {key} has {len(items)} values; it takes {count}, one per {what}.")
    # An empty item counts as 0, as in sd-scripts ("1,,1" switches the middle block off).
    return tuple(parse_number(key, item, kind) if item.strip() else kind(0) for item in items)


def _block_values(
    given: Mapping[str, object], key: str, kind: type[Number], layout: BlockLayout
) -> tuple[Number, ...] | None:
    if key not in given:
        return None
    return _number_list(key, given[key], kind, layout.slots, f"U-Net block ({layout.description()})")


def _block_lr_weights(given: Mapping[str, object], layout: BlockLayout) -> tuple[float, ...] | None:
    """One learning-rate weight per block slot (down, mid and up parts; SDXL's edge slots keep 1.0): unspecified
    parts are 1.0, and every given weight at or below block_lr_zero_threshold becomes 0, which removes that block's
    modules."""
    if not any(key in given for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        return None
    threshold = _optional(given, "block_lr_zero_threshold", float) or 0.0
    parts = [1.0] * layout.edge
    for key, count in (("down_lr_weight", layout.down), ("mid_lr_weight", layout.mid), ("up_lr_weight", layout.up)):
        if key not in given:
            parts.extend([1.0] * count)
            continue
        weights = _part_weights(key, given[key], count)
        parts.extend(0.0 if weight <= threshold else weight for weight in weights)
    return tuple(parts + [1.0] * layout.edge)


def _part_weights(key: str, value: object, count: int) -> tuple[float, ...]:
    """A comma list of `count` weights, one number for all of them, or (for the down and up sides) a preset with an
    optional offset (`cosine+.25`)."""
    text = str(value).strip()
    what = "middle part" if key == "mid_lr_weight" else "block"
    if "," in text:
        return _number_list(key, text, float, count, what)
    if key == "mid_lr_weight":
        return (parse_number(key, text, float),) * count
    name, _, offset_text = text.partition("+")
    if name in LR_WEIGHT_PRESETS:
        offset = parse_number(key, offset_text, float) if offset_text else 0.0
        return tuple(LR_WEIGHT_PRESETS[name](i, count) + offset for i in range(count))
    try:
        return (float(text),) * count
    except ValueError:
        raise UserError(
            f"--network_args: {key}={value} is neither a number, a list of {count} numbers nor a preset"
            f" ({', '.join(LR_WEIGHT_PRESETS)}, optionally with +offset)."
        ) from None
