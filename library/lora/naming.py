"""Which layers of a model get a LoRA module, and the name each one has in a LoRA file (specs/lora_format.md
sections 1-2, 4.3).

A layer is targeted when its class is exactly `Linear` or `Conv2d` and it lies inside a container whose class
name is listed below. Its LoRA name is a prefix plus its path with dots turned into underscores: Hugging Face
CLIP paths for the text encoders, diffusers paths for the SD1/SD2 U-Net and LDM (SGM) paths for the SDXL U-Net,
which is how sd-scripts names them. The trainer, the merge and extract tools and the generator all use this table.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from library.model_files.family import ModelFamily
from library.model_files.key_maps import KeyLink, unet_ldm_names

if TYPE_CHECKING:
    from library.model_files.stable_diffusion import StableDiffusionModel

TEXT_ENCODER_CONTAINERS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
UNET_CONTAINERS = frozenset({"Transformer2DModel"})
UNET_CONV_CONTAINERS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})
TARGET_LAYER_CLASSES = frozenset({"Linear", "Conv2d"})

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
LORA_PARTS = (DOWN, UP, ALPHA)


@dataclass(frozen=True)
class BlockLayout:
    """The U-Net block slots of block-wise learning rates and ranks (specs/lora_format.md 4.1, 4.3): `edge` slots
    before the down side and after the up side (SDXL's time/label embedding and output layers, weight 1 in the
    learning-rate lists), then `down` IN blocks, `mid` middle parts and `up` OUT blocks."""

    down: int
    mid: int
    up: int
    edge: int

    @property
    def slots(self) -> int:
        return self.down + self.mid + self.up + 2 * self.edge

    def slot(self, group: str, index: int) -> int:
        """The slot of LDM block `group` ("input_blocks", "middle_block", "output_blocks") number `index`."""
        if group == "input_blocks":
            return self.edge + index
        if group == "middle_block":
            return self.edge + self.down + (index if self.mid > 1 else 0)
        return self.edge + self.down + self.mid + index

    def description(self) -> str:
        parts = (
            f"IN00-IN{self.down - 1:02d}, {'MID' if self.mid == 1 else f'MID0-MID{self.mid - 1}'},"
            f" OUT00-OUT{self.up - 1:02d}"
        )
        return f"time embedding, {parts}, output" if self.edge else parts


SD_BLOCKS = BlockLayout(down=12, mid=1, up=12, edge=0)  # 25 slots: IN00-IN11 = 0-11, MID = 12, OUT00-OUT11 = 13-24
SDXL_BLOCKS = BlockLayout(
    down=9, mid=3, up=9, edge=1
)  # 23 slots: 0, IN00-IN08 = 1-9, MID = 10-12, OUT00-OUT08 = 13-21, 22


def block_layout(sdxl: bool) -> BlockLayout:
    return SDXL_BLOCKS if sdxl else SD_BLOCKS


class LayerKind(enum.Enum):
    LINEAR = "Linear"
    CONV_1X1 = "1x1 conv"
    CONV = "3x3 conv"  # any kernel larger than 1x1; these use conv_dim / conv_alpha

    @property
    def uses_conv_rank(self) -> bool:
        return self is LayerKind.CONV


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """One layer that a LoRA module can adapt."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    layer: torch.nn.Module
    kind: LayerKind
    block: int | None = None  # U-Net block slot (see block_slot); None for text encoders
    alias: str | None = None  # the name other trainers give the same layer (diffusers names for the SDXL U-Net)

    @property
    def is_text_encoder(self) -> bool:
        return self.name.startswith(TEXT_ENCODER_PREFIX)


def module_name(key: str) -> str:
    """The LoRA module a file key belongs to: everything before the first dot."""
    return key.split(".", 1)[0]


def text_encoder_prefixes(count: int) -> list[str]:
    """`lora_te` for a single text encoder; `lora_te1`, `lora_te2`, ... when there are several (SDXL)."""
    return [TEXT_ENCODER_PREFIX] if count == 1 else [f"{TEXT_ENCODER_PREFIX}{i}" for i in range(1, count + 1)]


OWN_MODULES = ("networks.lora", "networks.dylora")  # network modules that know this project's text encoders


class SdScriptsTextEncoder(torch.nn.Module):
    """A text encoder seen as sd-scripts' models are: transformers 5 builds CLIPTextModel without its `text_model`
    level, so a network module that names its modules by walking the tree (LyCORIS) would name them
    `lora_te_encoder_layers_...` instead of `lora_te_text_model_encoder_layers_...`, which other tools skip. The
    view adds the level back; the layers are the encoder's own, so patching them patches the encoder."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.text_model = encoder


def sd_scripts_view(text_encoder: torch.nn.Module | list[torch.nn.Module]):
    """The text encoder (or SDXL's list of two) as a third-party network module should see it."""
    if isinstance(text_encoder, list):
        return [sd_scripts_view(encoder) for encoder in text_encoder]
    return text_encoder if hasattr(text_encoder, "text_model") else SdScriptsTextEncoder(text_encoder)


def text_encoder_targets(text_encoders: Sequence[torch.nn.Module]) -> list[LoraTarget]:
    targets = []
    for prefix, encoder in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for path, layer in _layers_in_containers(encoder, TEXT_ENCODER_CONTAINERS):
            # transformers 5 drops the `text_model.` level in CLIPTextModel; file names always keep it
            path = "text_model." + path.removeprefix("text_model.")
            targets.append(LoraTarget(_lora_name(prefix, path), layer, _layer_kind(layer)))
    return targets


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def model_family(text_encoders: Sequence[torch.nn.Module], unet: torch.nn.Module) -> ModelFamily:
    """SDXL from the U-Net's added time conditioning; SD2 from its OpenCLIP text encoder (plain GELU where CLIP ViT-L
    uses quick GELU), or from the U-Net's linear projections when no text encoder is given."""
    if is_sdxl_unet(unet):
        return ModelFamily.SDXL
    if text_encoders:
        open_clip = text_encoders[0].config.hidden_act == "gelu"
    else:
        open_clip = bool(unet.config.use_linear_projection)
    return ModelFamily.SD2 if open_clip else ModelFamily.SD1


def unet_targets(unet: torch.nn.Module, with_conv_containers: bool) -> list[LoraTarget]:
    """The U-Net's targets: layers inside transformer blocks, and with `with_conv_containers` also those inside
    ResNet, down- and up-sampling blocks (C3Lier)."""
    containers = UNET_CONTAINERS | UNET_CONV_CONTAINERS if with_conv_containers else UNET_CONTAINERS
    layers = _layers_in_containers(unet, containers)
    ldm_paths = {
        key.removesuffix(".weight"): name.removesuffix(".weight")
        for key, name in unet_ldm_names([p + ".weight" for p, _ in layers], unet.config).items()
    }
    sdxl = is_sdxl_unet(unet)
    targets = []
    for path, layer in layers:
        ldm_path = ldm_paths[path]
        if sdxl:
            name, alias = _lora_name(UNET_PREFIX, ldm_path), _lora_name(UNET_PREFIX, path)
        else:
            name, alias = _lora_name(UNET_PREFIX, path), None
        targets.append(LoraTarget(name, layer, _layer_kind(layer), block_slot(ldm_path, sdxl), alias))
    return targets


_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


_LDM_BLOCK_NAME = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
_DIFFUSERS_BLOCK_NAME = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def block_slot(ldm_path: str, sdxl: bool) -> int:
    """The block slot of a U-Net layer from its LDM path, in the family's `BlockLayout`."""
    match = _LDM_BLOCK.match(ldm_path)
    if match is None:
        raise ValueError(f"'{ldm_path}' is not inside a U-Net block")
    return block_layout(sdxl).slot(match.group(1), int(match.group(2)))


def ldm_block(name: str, sdxl: bool) -> tuple[str, int] | None:
    """The LDM U-Net block (group, index) of a LoRA module name, for tools that see only names; None outside the
    blocks (text encoders, the input conv, the time embedding). SDXL's U-Net names are LDM paths already. SD1/SD2's
    diffusers names map as the checkpoint key map maps them: down block i's j-th resnet or attention is input block
    3i+j+1 and its downsampler 3i+3; up block i's j-th is output block 3i+j and its upsampler 3i+2."""
    if sdxl:
        match = _LDM_BLOCK_NAME.match(name)
        return None if match is None else (match.group(1), int(match.group(2)))
    match = _DIFFUSERS_BLOCK_NAME.search(name)
    if match is None:
        return ("middle_block", 0) if name.startswith(f"{UNET_PREFIX}_mid_block_") else None
    direction, block, kind, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
    if direction == "down":
        return "input_blocks", 3 * (block + 1) if kind == "downsamplers" else 3 * block + index + 1
    return "output_blocks", 3 * block + 2 if kind == "upsamplers" else 3 * block + index


class CheckpointWeight(NamedTuple):
    """Where the weight of a layer a LoRA adapts is stored in a single-file (LDM/SGM) checkpoint."""

    link: KeyLink  # the file tensor (current key names), with the reshape between it and the layer's weight
    shape: torch.Size  # the layer's weight shape


def checkpoint_weights(model: StableDiffusionModel) -> dict[str, CheckpointWeight]:
    """LoRA module name -> where its layer's weight lies in the model's single file, for every layer a LoRA can adapt
    (LierLa and C3Lier): a q/k/v module of an OpenCLIP encoder is a third of the fused `in_proj_weight`. The SDXL
    U-Net's layers are also found under their diffusers-style names. The model may be empty (meta device)."""
    weights = {}
    for module, links in model.components():
        for path, layer in module.named_modules():
            link = links.get(f"{path}.weight")
            if link is not None:
                weights[layer] = CheckpointWeight(link, layer.weight.shape)
    return {name: weights[layer] for name, layer in adaptable_layers(model.text_encoders, model.unet).items()}


def adaptable_layers(text_encoders: Sequence[torch.nn.Module], unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """LoRA module name -> layer, for every name a file may use: the targets of LoRA-LierLa/C3Lier (with the SDXL
    U-Net's diffusers-style aliases), and every other Linear and conv layer of the U-Net (the time embedding, the
    input and output convs, which LyCORIS's presets also adapt) under `lora_unet_` and its diffusers path, for SDXL
    also its LDM path, as a module that names layers by walking sd-scripts' model calls them."""
    named = {}
    for target in text_encoder_targets(text_encoders) + unet_targets(unet, with_conv_containers=True):
        for name in filter(None, (target.name, target.alias)):
            named[name] = target.layer
    layers = {path: layer for path, layer in unet.named_modules() if type(layer).__name__ in TARGET_LAYER_CLASSES}
    ldm_paths = unet_ldm_names([path + ".weight" for path in layers], unet.config) if is_sdxl_unet(unet) else {}
    for path, layer in layers.items():
        named.setdefault(_lora_name(UNET_PREFIX, path), layer)
        if ldm_paths:
            named.setdefault(_lora_name(UNET_PREFIX, ldm_paths[path + ".weight"].removesuffix(".weight")), layer)
    return named


def _layers_in_containers(root: torch.nn.Module, containers: frozenset[str]) -> list[tuple[str, torch.nn.Module]]:
    found: dict[str, torch.nn.Module] = {}
    for container_path, container in root.named_modules():
        if type(container).__name__ not in containers:
            continue
        for child_path, child in container.named_modules():
            if child_path and type(child).__name__ in TARGET_LAYER_CLASSES:
                found[f"{container_path}.{child_path}" if container_path else child_path] = child
    return list(found.items())


def _layer_kind(layer: torch.nn.Module) -> LayerKind:
    if isinstance(layer, torch.nn.Conv2d):
        return LayerKind.CONV_1X1 if tuple(layer.kernel_size) == (1, 1) else LayerKind.CONV
    return LayerKind.LINEAR


def _lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")
