"""Block-wise ratios (LBW, `--lbws`) of the merge tools, in the layouts of the LoRA Block Weight extension
(specs/lora_format.md section 8): one JSON list per model whose length picks the layout, 17 or 26 values for SD1/SD2
and 12 or 20 for SDXL, filling the "on" slots of a 26-slot template BASE (text encoders), IN00-IN11, MID,
OUT00-OUT11. A module's delta is multiplied by the value of its block's slot; slots a layout leaves out weigh 1."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from library.errors import UserError
from library.lora.naming import ldm_block
from library.model_files.family import ModelFamily

SLOT_NAMES = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
MID_SLOT, FIRST_OUT_SLOT = 13, 14


def _slots(*names: str) -> tuple[int, ...]:
    return tuple(SLOT_NAMES.index(name) for name in names)


# length -> (for SDXL, the slots its values fill, in order)
LAYOUTS = {
    17: (
        False,
        _slots("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))),
    ),
    26: (False, tuple(range(len(SLOT_NAMES)))),
    12: (True, _slots("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))),
    20: (True, _slots("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))),
}


class BlockWeights(NamedTuple):
    """One model's block-wise ratios, expanded to the 26 slots."""

    layout: int  # the length of the list given, a key of LAYOUTS
    weights: tuple[float, ...]

    @property
    def sdxl(self) -> bool:
        return LAYOUTS[self.layout][0]

    def for_module(self, name: str) -> float:
        slot = block_slot(name, self.sdxl)
        return 1.0 if slot is None else self.weights[slot]


def parse_block_weights(lbws: Sequence[str], models: Sequence[str | Path]) -> list[BlockWeights]:
    """`--lbws`: one JSON list of numbers per model, all of one length that names a layout."""
    if len(lbws) != len(models):
        raise UserError(
            f"--lbws gives {len(lbws)} list(s) for {len(models)} --models; give one list per model, in the same order."
        )
    lists = [_parsed(text) for text in lbws]
    lengths = {len(values) for values in lists}
    if len(lengths) > 1:
        raise UserError(
            f"--lbws: the lists have different lengths ({', '.join(map(str, sorted(lengths)))});"
            " give every model a list of one layout."
        )
    length = lengths.pop()
    if length not in LAYOUTS:
        raise UserError(
            f"--lbws: a list of {length} values names no layout; use 17 or 26 values for SD1/SD2, 12 or 20 for SDXL."
        )
    slots = LAYOUTS[length][1]
    expanded = []
    for values in lists:
        weights = [1.0] * len(SLOT_NAMES)
        for slot, value in zip(slots, values):
            weights[slot] = float(value)
        expanded.append(BlockWeights(length, tuple(weights)))
    return expanded


def _parsed(text: str) -> list[float]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not all(
        isinstance(value, (int, float)) and not isinstance(value, bool) for value in values
    ):
        raise UserError(
            f'--lbws {text}: each value must be a JSON list of numbers, such as "[1,1,0.5,0,1,1,1,1,1,1,1,1]".'
        )
    return values


def check_layout_family(block_weights: Sequence[BlockWeights], family: ModelFamily | None) -> None:
    """A layout of the other family would leave the U-Net's modules unweighted; refuse it."""
    if block_weights and family is not None and block_weights[0].sdxl != (family is ModelFamily.SDXL):
        wanted = "12 or 20" if family is ModelFamily.SDXL else "17 or 26"
        raise UserError(
            f"--lbws: lists of {block_weights[0].layout} values are a layout for another model family; these are"
            f" {family.label} LoRAs, so give {wanted} values."
        )


def block_slot(name: str, sdxl: bool) -> int | None:
    """The template slot of a LoRA module, as sd-scripts' svd_merge_lora.py computes it: 0 for a text encoder, then by
    its U-Net block (library.lora.naming.ldm_block); None for anything else."""
    if "text_model_encoder_" in name:
        return 0
    block = ldm_block(name, sdxl)
    if block is None:
        return None
    group, index = block
    return 1 + index if group == "input_blocks" else MID_SLOT if group == "middle_block" else FIRST_OUT_SLOT + index
