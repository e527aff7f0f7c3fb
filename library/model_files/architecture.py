"""Model configs: the shipped configs of each family, adjusted to what a checkpoint's tensor shapes say.

Everything that changes a tensor's shape (channels, levels, depths, widths, in-channels of inpainting models) is
read from the file; what shapes cannot tell (head counts, activation, scaling factor) follows the family's rule.
Real SD1.5, SD2.1 and SDXL files therefore get exactly the shipped configs, and small test models load the same way.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from library.model_files.family import (
    CONFIG_NAMES,
    TEXT_ENCODER_LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelFamily,
    TextEncoderLayout,
)

CONFIG_ROOT = Path(__file__).parent / "configs"
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")
ATTENTION_HEAD_WIDTH = 64  # SD2/SDXL U-Nets and every CLIP text tower use 64-wide heads; SD1's U-Net uses 8 heads

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class Architecture:
    unet: dict
    vae: dict
    text_encoders: list[dict]


@functools.cache
def _read_shipped(family: ModelFamily, relative_path: str) -> dict:
    return json.loads((CONFIG_ROOT / CONFIG_NAMES[family] / relative_path).read_text())


def shipped_config(family: ModelFamily, component: str) -> dict:
    """A fresh copy of a shipped config: 'unet', 'vae', 'text_encoder', 'text_encoder_2' or 'scheduler'."""
    relative_path = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    return copy.deepcopy(_read_shipped(family, relative_path))


def scheduler_config(family: ModelFamily, v_prediction: bool) -> dict:
    config = shipped_config(family, "scheduler")
    config["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    return config


def shipped_architecture(family: ModelFamily) -> Architecture:
    """The released model of the family: SD1.5, SD2.1-768-v or SDXL base 1.0."""
    folders = TEXT_ENCODER_FOLDERS[: len(TEXT_ENCODER_LAYOUTS[family])]
    return Architecture(
        shipped_config(family, "unet"),
        shipped_config(family, "vae"),
        [shipped_config(family, folder) for folder in folders],
    )


def architecture_from_shapes(family: ModelFamily, shapes: Shapes) -> Architecture:
    return Architecture(
        unet=_unet_config(family, shapes),
        vae=_vae_config(family, shapes),
        text_encoders=[
            _text_encoder_config(family, folder, layout, shapes)
            for folder, layout in zip(TEXT_ENCODER_FOLDERS, TEXT_ENCODER_LAYOUTS[family])
        ],
    )


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The distinct integers captured by `pattern` (one group) over all keys, sorted."""
    compiled = re.compile(pattern)
    return sorted({int(match.group(1)) for key in shapes if (match := compiled.match(key))})


def _unet_config(family: ModelFamily, shapes: Shapes) -> dict:
    config = shipped_config(family, "unet")
    p = re.escape(UNET_PREFIX)
    downsamplers = _indices(shapes, p + r"input_blocks\.(\d+)\.0\.op\.weight$")
    per_block = downsamplers[0] - 1 if downsamplers else config["layers_per_block"]
    levels = len(downsamplers) + 1
    first_blocks = [1 + level * (per_block + 1) for level in range(levels)]
    channels = [shapes[f"{UNET_PREFIX}input_blocks.{block}.0.out_layers.3.weight"][0] for block in first_blocks]
    depths = [
        len(_indices(shapes, p + rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.")) for block in first_blocks
    ]
    with_attention = [depth > 0 for depth in depths]
    config.update(
        in_channels=shapes[UNET_PREFIX + "input_blocks.0.0.weight"][1],
        out_channels=shapes[UNET_PREFIX + "out.2.weight"][0],
        layers_per_block=per_block,
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        transformer_layers_per_block=[max(depth, 1) for depth in depths] if max(depths) > 1 else 1,
    )
    attention_block = first_blocks[with_attention.index(True)]
    config["cross_attention_dim"] = shapes[
        f"{UNET_PREFIX}input_blocks.{attention_block}.1.transformer_blocks.0.attn2.to_k.weight"
    ][1]
    config["use_linear_projection"] = len(shapes[f"{UNET_PREFIX}input_blocks.{attention_block}.1.proj_in.weight"]) == 2
    if family is not ModelFamily.SD1:
        config["attention_head_dim"] = [max(c // ATTENTION_HEAD_WIDTH, 1) for c in channels]
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        config["projection_class_embeddings_input_dim"] = shapes[UNET_PREFIX + "label_emb.0.0.weight"][1]
    return config


def _vae_config(family: ModelFamily, shapes: Shapes) -> dict:
    config = shipped_config(family, "vae")
    p = re.escape(VAE_PREFIX)
    levels = _indices(shapes, p + r"encoder\.down\.(\d+)\.")
    config.update(
        in_channels=shapes[VAE_PREFIX + "encoder.conv_in.weight"][1],
        out_channels=shapes[VAE_PREFIX + "decoder.conv_out.weight"][0],
        latent_channels=shapes[VAE_PREFIX + "post_quant_conv.weight"][0],
        layers_per_block=len(_indices(shapes, p + r"encoder\.down\.0\.block\.(\d+)\.")),
        block_out_channels=[shapes[f"{VAE_PREFIX}encoder.down.{level}.block.0.conv1.weight"][0] for level in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
    )
    return config


def _text_encoder_config(family: ModelFamily, folder: str, layout: TextEncoderLayout, shapes: Shapes) -> dict:
    config = shipped_config(family, folder)
    p = layout.prefix
    if layout.open_clip:
        vocab, hidden = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        layers = len(_indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\."))
        intermediate = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        if layout.with_projection:
            config["projection_dim"] = shapes[p + "text_projection"][1]
        else:
            layers -= 1  # SD2 conditions on the penultimate layer: the file's last layer is kept but not used
    else:
        q = p + "text_model."
        vocab, hidden = shapes[q + "embeddings.token_embedding.weight"]
        positions = shapes[q + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, re.escape(q) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[q + "encoder.layers.0.mlp.fc1.weight"][0]
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=positions,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=max(hidden // ATTENTION_HEAD_WIDTH, 1),
    )
    return config
