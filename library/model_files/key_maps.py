"""Key conversion between diffusers/transformers state dicts and single-file (LDM/SGM) checkpoints.

Each model tensor is linked to the file tensor it comes from, with the reshaping in between
(specs/checkpoints.md sections 3-5). The same links serve loading and saving, so the two can never disagree.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from library.model_files.family import UNET_PREFIX, VAE_PREFIX


class Reshape(enum.Enum):
    SAME = "same"
    CONV_1X1 = "conv_1x1"  # the file stores a Linear weight as a 1x1 convolution [out, in, 1, 1]
    TRANSPOSE = "transpose"  # OpenCLIP's text_projection is used as x @ P; a Linear computes x @ W.T
    QKV = "qkv"  # OpenCLIP fuses q, k, v into one in_proj tensor, in that order


@dataclass(frozen=True)
class KeyLink:
    file_key: str
    reshape: Reshape = Reshape.SAME
    part: int = 0  # q, k or v (0, 1, 2) for Reshape.QKV


def to_model_tensor(file_tensor: torch.Tensor, link: KeyLink) -> torch.Tensor:
    if link.reshape is Reshape.CONV_1X1:
        return file_tensor.reshape(file_tensor.shape[:2])
    if link.reshape is Reshape.TRANSPOSE:
        return file_tensor.T
    if link.reshape is Reshape.QKV:
        return file_tensor.chunk(3, dim=0)[link.part]
    return file_tensor


def to_file_tensor(model_tensors: Sequence[torch.Tensor], reshape: Reshape) -> torch.Tensor:
    """The file tensor made from the model tensors linked to it (three for QKV, in q, k, v order; else one)."""
    if reshape is Reshape.QKV:
        return torch.cat(list(model_tensors), dim=0)
    (tensor,) = model_tensors
    if reshape is Reshape.CONV_1X1:
        return tensor[:, :, None, None]
    if reshape is Reshape.TRANSPOSE:
        return tensor.T
    return tensor


def file_shape(model_shape: tuple[int, ...], reshape: Reshape) -> tuple[int, ...]:
    if reshape is Reshape.CONV_1X1:
        return model_shape + (1, 1)
    if reshape is Reshape.TRANSPOSE:
        return tuple(reversed(model_shape))
    if reshape is Reshape.QKV:
        return (3 * model_shape[0],) + model_shape[1:]
    return model_shape


# ---------------------------------------------------------------- U-Net

_UNET_RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_prefixes(config: Mapping) -> dict[str, str]:
    per_block = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for level in range(levels):
        for j in range(per_block):
            block = 1 + level * (per_block + 1) + j
            resnets[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            prefixes[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
        for j in range(per_block + 1):
            block = level * (per_block + 1) + j
            resnets[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            prefixes[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = (
                f"input_blocks.{(level + 1) * (per_block + 1)}.0.op."
            )
            upsampler_slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            prefixes[f"up_blocks.{level}.upsamplers.0."] = (
                f"output_blocks.{level * (per_block + 1) + per_block}.{upsampler_slot}."
            )
    for ours, theirs in resnets.items():
        for part, their_part in _UNET_RESNET_PARTS.items():
            prefixes[ours + part] = theirs + their_part
    return prefixes


def unet_ldm_names(model_keys: Iterable[str], config: Mapping) -> dict[str, str]:
    """Diffusers U-Net tensor name -> its LDM/SGM name (`input_blocks.4.1.proj_in.weight`), without the file prefix."""
    prefixes = _unet_prefixes(config)
    return {key: _replace_prefix(key, prefixes) for key in model_keys}


def unet_links(model_keys: Iterable[str], config: Mapping) -> dict[str, KeyLink]:
    return {key: KeyLink(UNET_PREFIX + name) for key, name in unet_ldm_names(model_keys, config).items()}


# ---------------------------------------------------------------- VAE

_VAE_ATTENTION_PARTS = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _vae_prefixes(config: Mapping) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for unchanged in (
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
        "quant_conv.",
        "post_quant_conv.",
    ):
        prefixes[unchanged] = unchanged
    resnets = {}
    for side in ("encoder", "decoder"):
        for k in range(2):
            resnets[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
        for part, their_part in _VAE_ATTENTION_PARTS.items():
            prefixes[f"{side}.mid_block.attentions.0.{part}"] = f"{side}.mid.attn_1.{their_part}"
    for level in range(levels):
        for j in range(per_block):
            resnets[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
        for j in range(per_block + 1):
            resnets[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{levels - 1 - level}.block.{j}."
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = f"encoder.down.{level}.downsample.conv."
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - level}.upsample.conv."
    for ours, theirs in resnets.items():
        prefixes[ours] = theirs
        prefixes[ours + "conv_shortcut."] = theirs + "nin_shortcut."
    return prefixes


def vae_links(model_keys: Iterable[str], config: Mapping) -> dict[str, KeyLink]:
    prefixes = _vae_prefixes(config)
    links = {}
    for key in model_keys:
        is_attention_weight = ".mid_block.attentions.0.to_" in key and key.endswith(".weight")
        links[key] = KeyLink(
            VAE_PREFIX + _replace_prefix(key, prefixes), Reshape.CONV_1X1 if is_attention_weight else Reshape.SAME
        )
    return links


# ---------------------------------------------------------------- text encoders


def clip_links(model_keys: Iterable[str], file_prefix: str) -> dict[str, KeyLink]:
    """Hugging Face CLIP layout (SD1, SDXL encoder 1): the file keeps `text_model.`, flat models drop it."""
    return {
        key: KeyLink(file_prefix + (key if key.startswith("text_model.") else "text_model." + key))
        for key in model_keys
    }


_OPEN_CLIP_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
        (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
        (r"^final_layer_norm\.", "ln_final."),
    )
)
_OPEN_CLIP_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def open_clip_links(model_keys: Iterable[str], file_prefix: str) -> dict[str, KeyLink]:
    """OpenCLIP layout (SD2, SDXL encoder 2): renamed blocks, fused q/k/v, transposed projection."""
    links = {}
    for key in model_keys:
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            links[key] = KeyLink(file_prefix + "text_projection", Reshape.TRANSPOSE)
            continue
        fused = _OPEN_CLIP_QKV.match(name)
        if fused:
            layer, which, kind = fused.groups()
            links[key] = KeyLink(
                f"{file_prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}", Reshape.QKV, "qkv".index(which)
            )
            continue
        for pattern, replacement in _OPEN_CLIP_RULES:
            if pattern.search(name):
                links[key] = KeyLink(file_prefix + pattern.sub(replacement, name, count=1))
                break
        else:
            raise KeyError(f"no OpenCLIP name for text encoder tensor '{key}'")
    return links


def _replace_prefix(key: str, prefixes: Mapping[str, str]) -> str:
    """Replace the longest matching module prefix; names inside attention blocks are the same in both layouts."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end]) + "."
        if prefix in prefixes:
            return prefixes[prefix] + key[len(prefix) :]
    raise KeyError(f"no single-file name for model tensor '{key}'")
