"""LoRA files in diffusers/PEFT form and their conversion to and from sd-scripts' (kohya) form.

A diffusers/PEFT file names each module by its component and dotted path: `unet.<diffusers path>`,
`text_encoder.<CLIP path>` and, for SDXL, `text_encoder_2.<CLIP path>`, with `lora_A.weight` / `lora_B.weight` (PEFT),
`lora.down.weight` / `lora.up.weight` or `lora_linear_layer.down.weight` / `.up.weight` (older diffusers) for down and
up. The factors are the same tensors as kohya's `lora_down` / `lora_up`. alpha is where the writer put it: PEFT's
`lora_alpha`, `alpha_pattern`, `r` and `rank_pattern` in the `lora_adapter_metadata` JSON (what diffusers'
`save_lora_weights` writes), or `.alpha` tensors; without either, alpha = rank (PEFT's scale 1).

The two namings meet through the naming table on an empty model of the family: the layer a kohya name targets is
found by its path in the diffusers modules. CLIP paths are written with `text_model.` (as diffusers' own converter
writes them) and read with or without it (transformers 5's CLIP text model has no such level).
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Mapping
from typing import NamedTuple

import torch

from library.errors import UserError
from library.lora.naming import ALPHA, DOWN, UP, text_encoder_targets, unet_targets
from library.model_files.family import ModelFamily

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FACTOR_SUFFIXES = {  # PEFT / older diffusers key endings -> kohya's
    ".lora_A.weight": DOWN,
    ".lora_B.weight": UP,
    ".lora.down.weight": DOWN,
    ".lora.up.weight": UP,
    ".lora_linear_layer.down.weight": DOWN,
    ".lora_linear_layer.up.weight": UP,
}
PEFT_DOWN, PEFT_UP = ".lora_A.weight", ".lora_B.weight"
TEXT_MODEL = "text_model."


def is_peft_file(keys) -> bool:
    """Whether a file's keys are diffusers/PEFT names (every key under a component, some with a PEFT factor ending)."""
    keys = list(keys)
    return (
        bool(keys)
        and all(key.split(".", 1)[0] in COMPONENTS for key in keys)
        and any(key.endswith(tuple(FACTOR_SUFFIXES)) for key in keys)
    )


class LayerPaths(NamedTuple):
    """kohya module name -> `<component>.<dotted path>` (CLIP paths without `text_model.`) for every layer a LoRA
    targets: under sd-scripts' names, and under the other names files use (diffusers names for the SDXL U-Net)."""

    names: dict[str, str]
    aliases: dict[str, str]


@functools.cache
def layer_paths(family: ModelFamily) -> LayerPaths:
    """The paths of the family's released model (built empty). SD 1.x and 2.x share their paths."""
    from library.model_files.stable_diffusion import released_model  # loads diffusers: only when a file needs it

    model = released_model(family)
    where = {}
    for index, encoder in enumerate(model.text_encoders):
        for path, layer in encoder.named_modules():
            where[layer] = f"{COMPONENTS[1 + index]}.{path.removeprefix(TEXT_MODEL)}"
    where.update({layer: f"unet.{path}" for path, layer in model.unet.named_modules()})
    targets = text_encoder_targets(model.text_encoders) + unet_targets(model.unet, with_conv_containers=True)
    names = {target.name: where[target.layer] for target in targets}
    aliases = {target.alias: where[target.layer] for target in targets if target.alias}
    return LayerPaths(names, aliases)


def peft_to_kohya(weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> dict:
    """A diffusers/PEFT file's tensors under kohya's names, with each module's alpha as a tensor."""
    factors: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    alphas: dict[str, float] = {}
    for key, tensor in weights.items():
        suffix = next((suffix for suffix in FACTOR_SUFFIXES if key.endswith(suffix)), None)
        if suffix is not None:
            factors[_normal_path(key.removesuffix(suffix))][FACTOR_SUFFIXES[suffix]] = tensor
        elif key.endswith(".alpha"):
            alphas[_normal_path(key.removesuffix(".alpha"))] = float(tensor)
        else:
            raise UserError(f"{source}: key '{key}' is no LoRA factor or alpha of a diffusers/PEFT file.")
    configured = _configured_alphas(metadata, factors)
    names = _kohya_names(list(factors), source)
    converted = {}
    for path, parts in factors.items():
        if DOWN not in parts or UP not in parts:
            raise UserError(f"{source}: module '{path}' lacks its {'lora_A' if DOWN not in parts else 'lora_B'}.")
        rank = parts[DOWN].shape[0]
        alpha = alphas.get(path, configured.get(path, rank))
        converted.update({f"{names[path]}.{DOWN}": parts[DOWN], f"{names[path]}.{UP}": parts[UP]})
        converted[f"{names[path]}.{ALPHA}"] = torch.tensor(float(alpha))
    return converted


def kohya_to_peft(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], family: ModelFamily | None, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a PEFT file from kohya modules (name -> (down, up, alpha)): `lora_A` / `lora_B` keys,
    and per component the LoraConfig values diffusers reads (`r`, `lora_alpha` and the patterns of the modules that
    differ from them, `target_modules`) in the `lora_adapter_metadata` JSON."""
    known = layer_paths(family or ModelFamily.SD1)
    paths = {**known.aliases, **known.names}
    unknown = [name for name in modules if name not in paths]
    if unknown:
        raise UserError(
            f"{source}: module '{unknown[0]}' names no layer a LoRA adapts in {(family or ModelFamily.SD1).label}"
            f" ({len(unknown)} such modules); only LoRAs of the naming table's layers can be converted."
        )
    tensors, per_component = {}, collections.defaultdict(dict)
    for name, (down, up, alpha) in modules.items():
        component, path = paths[name].split(".", 1)
        written = f"{component}.{TEXT_MODEL}{path}" if component != "unet" else paths[name]
        tensors[written + PEFT_DOWN], tensors[written + PEFT_UP] = down, up
        per_component[component][path] = (down.shape[0], alpha)
    config = {}
    for component, ranks_and_alphas in per_component.items():
        config.update({f"{component}.{key}": value for key, value in _lora_config(ranks_and_alphas).items()})
    return tensors, {METADATA_KEY: json.dumps(config, sort_keys=True)}


def _lora_config(ranks_and_alphas: Mapping[str, tuple[int, float]]) -> dict:
    """PEFT's LoraConfig values for modules path -> (rank, alpha): the most common rank and alpha, and patterns
    for the modules that differ (full paths, which PEFT matches as suffixes of its module names)."""
    r = collections.Counter(rank for rank, _ in ranks_and_alphas.values()).most_common(1)[0][0]
    alpha = collections.Counter(alpha for _, alpha in ranks_and_alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {path: rank for path, (rank, _) in ranks_and_alphas.items() if rank != r},
        "alpha_pattern": {path: value for path, (_, value) in ranks_and_alphas.items() if value != alpha},
        "target_modules": sorted(ranks_and_alphas),
    }


def _configured_alphas(metadata: Mapping[str, str], factors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """path -> alpha from the `lora_adapter_metadata` JSON, as PEFT reads it: the component's `alpha_pattern` entry
    whose key names the path (or a suffix of it), else the component's `lora_alpha` (also for modules whose rank
    comes from `rank_pattern`: PEFT's scale is alpha / that rank)."""
    if METADATA_KEY not in metadata:
        return {}
    config = json.loads(metadata[METADATA_KEY])
    alphas = {}
    for path in factors:
        component = path.split(".", 1)[0]
        inner = path.split(".", 1)[1]
        pattern = config.get(f"{component}.alpha_pattern") or {}
        match = next((value for key, value in pattern.items() if _matches(key, inner)), None)
        default = config.get(f"{component}.lora_alpha")
        if match is not None or default is not None:
            alphas[path] = match if match is not None else default
    return alphas


def _matches(pattern: str, path: str) -> bool:
    """PEFT's rule: the pattern names the module or a suffix of its path (`^` anchors it at the start)."""
    pattern = pattern.removeprefix(TEXT_MODEL)
    if pattern.startswith("^"):
        return path == pattern[1:]
    return path == pattern or path.endswith("." + pattern)


def _normal_path(path: str) -> str:
    """`<component>.<path>` with the CLIP `text_model.` level taken out."""
    component, _, inner = path.partition(".")
    return f"{component}.{inner.removeprefix(TEXT_MODEL)}"


def _kohya_names(paths: list[str], source: str) -> dict[str, str]:
    """path -> sd-scripts' module name, from SD 1.x's table (SD 2.x has the same paths), else SDXL's."""
    for family in (ModelFamily.SD1, ModelFamily.SDXL):
        names = {path: name for name, path in layer_paths(family).names.items()}
        if all(path in names for path in paths):
            return {path: names[path] for path in paths}
    missing = next(path for path in paths if path not in names)
    raise UserError(f"{source}: module '{missing}' is no layer a LoRA adapts in SD 1.x, 2.x or SDXL.")
