"""Before sharing a LoRA: which applications apply all of it. Replays each consumer's key rules and reports, per
consumer, how many modules it applies and which it skips, and why.

    python tools/verify_lora.py my_lora.safetensors
    python tools/verify_lora.py my_lora.safetensors --model model.safetensors --against a1111 comfyui

* diffusers: its own converter is called (`_maybe_map_sgm_blocks_to_diffusers`, `_convert_non_diffusers_lora_to_
  diffusers`, then the PEFT key conversion of `load_lora_weights`), and each resulting module must exist in the
  family's diffusers model.
* sd-scripts (`networks.lora`), AUTOMATIC1111 (v1.10 `extensions-builtin/Lora`), ComfyUI and InvokeAI: the rules they
  document and implement, as docs/lora_tools.md lists them: which names they map, which key grammars they read,
  what makes them skip a module or refuse a whole file.

Every consumer also needs each module's factors to make a rank-r pair and an alpha (without one, each applies
scale 1, which is right only if the file was trained so). With `--model` the file's family must be the model's and
every module must fit its layer. The exit status is 0 only when every named consumer applies every module.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError, run_cli
from library.lora.files import lora_family, read_lora_file
from library.lora.lycoris import DORA_SCALE, LYCORIS_UNET_PREFIX, lycoris_algorithm
from library.lora.naming import (
    ALPHA,
    DOWN,
    LORA_PARTS,
    UP,
    adaptable_layers,
    text_encoder_targets,
    unet_targets,
)
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import local_model_family, open_single_file_model, released_model

NAMES = {  # consumer -> the application's name in the report
    "a1111": "AUTOMATIC1111",
    "comfyui": "ComfyUI",
    "diffusers": "diffusers",
    "invokeai": "InvokeAI",
    "sd-scripts": "sd-scripts",
}
CONSUMERS = tuple(NAMES)
KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
OPEN_CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class Verdict:
    """What one consumer does with the file."""

    consumer: str
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why
    refused: str | None = None  # why the whole file fails to load

    @property
    def complete(self) -> bool:
        return self.refused is None and not self.skipped

    def lines(self) -> list[str]:
        name = NAMES[self.consumer]
        if self.refused:
            return [f"{name}: applies nothing: {self.refused}"]
        total = len(self.applied) + len(self.skipped)
        lines = [f"{name}: applies {len(self.applied)} of {total} modules"]
        reasons = collections.defaultdict(list)
        for module, why in self.skipped.items():
            reasons[why].append(module)
        for why, modules in reasons.items():
            lines.append(f"  skips {len(modules)} ({why}), first: '{modules[0]}'")
        return lines


@dataclass(frozen=True)
class LoraFile:
    """A file's modules as consumers see them: the key parts of each module name, its tensors, its family."""

    path: Path
    modules: dict[str, dict[str, torch.Tensor]]  # module name -> key suffix -> tensor
    family: ModelFamily

    @classmethod
    def read(cls, path: str | Path, model_family: ModelFamily | None) -> LoraFile:
        weights, metadata = read_lora_file(path)
        modules: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        for key, tensor in weights.items():
            name, _, part = key.partition(".")
            modules[name][part] = tensor
        family = lora_family(modules, metadata)
        if model_family is not None and family is not None and family is not model_family:
            raise UserError(
                f"{path} is an {family.label} LoRA but --model is an {model_family.label} model; no application"
                " applies a LoRA to another family's model."
            )
        return cls(Path(path), dict(modules), family or model_family or ModelFamily.SD1)

    def kind(self, name: str) -> str | None:
        """`lora`, or the LyCORIS algorithm's name, or None for keys no consumer reads as a LoRA."""
        parts = set(self.modules[name])
        if parts <= set(LORA_PARTS) and {DOWN, UP} <= parts:
            return "lora"
        return lycoris_algorithm(parts)


def problems_everywhere(lora: LoraFile) -> dict[str, str]:
    """Module -> what every consumer gets wrong in it: factors that are no rank-r pair, keys no consumer reads,
    a missing alpha."""
    problems = {}
    for name, parts in lora.modules.items():
        kind = lora.kind(name)
        if kind is None:
            problems[name] = f"keys no application reads as a LoRA module: {', '.join(sorted(parts))}"
        elif kind == "lora" and parts[UP].shape[1] != parts[DOWN].shape[0]:
            problems[name] = "lora_up and lora_down do not make a rank-r pair (transposed or damaged)"
        elif ALPHA not in parts:
            problems[name] = "no alpha: applied with scale 1, right only if it was trained with alpha = rank"
    return problems


def verify(lora: LoraFile, consumers: tuple[str, ...]) -> list[Verdict]:
    everywhere = problems_everywhere(lora)
    verdicts = []
    for consumer in consumers:
        verdict = Verdict(consumer)
        refused = FILE_RULES[consumer](lora)
        if refused:
            verdict.refused = refused
        else:
            for name in lora.modules:
                why = everywhere.get(name) or MODULE_RULES[consumer](lora, name)
                if why:
                    verdict.skipped[name] = why
                else:
                    verdict.applied.append(name)
        verdicts.append(verdict)
    return verdicts


# ---------------------------------------------------------------- the names each consumer maps


@functools.cache
def sd_scripts_names(family: ModelFamily) -> set[str]:
    """networks.lora's targets (text encoders' attention and MLP, the U-Net's transformer blocks and ResNet/sampler
    convs); for SDXL also the diffusers-style U-Net names it renames."""
    model = released_model(family)
    targets = text_encoder_targets(model.text_encoders) + unet_targets(model.unet, with_conv_containers=True)
    return {name for target in targets for name in (target.name, target.alias) if name}


@functools.cache
def every_layer_name(family: ModelFamily) -> set[str]:
    """Every Linear and conv layer under the names files use (what AUTOMATIC1111's and ComfyUI's maps reach)."""
    model = released_model(family)
    return set(adaptable_layers(model.text_encoders, model.unet))


def _is_open_clip(name: str, family: ModelFamily) -> bool:
    return name.startswith("lora_te2_") or (family is ModelFamily.SD2 and name.startswith("lora_te_"))


# ---------------------------------------------------------------- sd-scripts


def sd_scripts_module(lora: LoraFile, name: str) -> str | None:
    if lora.kind(name) != "lora" or DORA_SCALE in lora.modules[name]:
        return "networks.lora reads lora_down, lora_up and alpha only (a LyCORIS file: --network_module lycoris.kohya)"
    if name not in sd_scripts_names(lora.family):
        return f"names no layer networks.lora adapts in an {lora.family.label} model"
    return None


# ---------------------------------------------------------------- AUTOMATIC1111


def a1111_module(lora: LoraFile, name: str) -> str | None:
    parts = lora.modules[name]
    if name.startswith(LYCORIS_UNET_PREFIX) or name not in every_layer_name(lora.family):
        return "names no module of the model; skipped without a message"
    if DORA_SCALE in parts and parts[DORA_SCALE].shape[0] != 1:
        return "DoRA magnitudes per output row, which AUTOMATIC1111 applies per input column"
    if _is_open_clip(name, lora.family) and name.endswith(OPEN_CLIP_ATTENTION):
        layer = name.rsplit("_", 2)[0]
        if not all(f"{layer}_{projection}" in lora.modules for projection in OPEN_CLIP_ATTENTION):
            return "an OpenCLIP attention layer without all of q, k, v and out_proj; skipped without a message"
    return None


# ---------------------------------------------------------------- ComfyUI


def comfyui_module(lora: LoraFile, name: str) -> str | None:
    known = every_layer_name(lora.family)
    unet_name = "lora_unet_" + name.removeprefix(LYCORIS_UNET_PREFIX) if name.startswith(LYCORIS_UNET_PREFIX) else name
    if unet_name not in known:
        return "'lora key not loaded'"
    return None


# ---------------------------------------------------------------- InvokeAI


def invokeai_file(lora: LoraFile) -> str | None:
    unsupported = next((name for name in lora.modules if lora.kind(name) is None), None)
    if unsupported:
        return f"module '{unsupported}' has no format InvokeAI reads (an unsupported-format error)"
    if lora.family is ModelFamily.SDXL:
        other = next(
            (name for name in lora.modules if not name.startswith(("lora_unet_", "lora_te1_", "lora_te2_"))), None
        )
        if other:
            return f"key '{other}' has no SDXL prefix it knows ('Unrecognized SDXL LoRA key prefix')"
        names = sd_scripts_names(lora.family)
        sgm = {target.name for target in unet_targets(released_model(lora.family).unet, with_conv_containers=True)}
        unet = [name for name in lora.modules if name.startswith("lora_unet_") and name in names]
        diffusers_named = [name for name in unet if name not in sgm]
        if diffusers_named:
            return f"U-Net module '{diffusers_named[0]}' is not in sd-scripts' SGM form, which InvokeAI converts"
    return None


def invokeai_module(lora: LoraFile, name: str) -> str | None:
    if name not in every_layer_name(lora.family):
        return "'Failed to find module for LoRA layer key'"
    return None


# ---------------------------------------------------------------- diffusers


def diffusers_file(lora: LoraFile) -> str | None:
    other = next((name for name in lora.modules if not name.startswith(KOHYA_PREFIXES)), None)
    if other:
        return f"module '{other}' has no lora_te/lora_unet prefix, so load_lora_weights converts nothing"
    unread = next((name for name, parts in lora.modules.items() if set(parts) - {*LORA_PARTS, DORA_SCALE}), None)
    if unread:
        return f"its converter raises ValueError on {lora.kind(unread)} keys (module '{unread}')"
    unet = [name for name in lora.modules if name.startswith("lora_unet_")]
    sgm = [name for name in unet if any(part in name for part in ("input_blocks", "middle_block", "output_blocks"))]
    if sgm and len(sgm) < len(unet):
        return f"SGM and diffusers U-Net names mixed: its converter drops every SGM-named module (first: '{sgm[0]}')"
    return None


def diffusers_module(lora: LoraFile, name: str) -> str | None:
    """The module through diffusers' own key conversion; the layer it ends at must exist in the pipeline's model."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    parts = lora.modules[name]
    if DORA_SCALE in parts:
        return "load_lora_weights drops dora_scale (a DoRA checkpoint 'not compatible in Diffusers')"
    model = released_model(lora.family)
    state = {f"{name}.{part}": tensor for part, tensor in parts.items() if part != DORA_SCALE}
    try:
        state = _maybe_map_sgm_blocks_to_diffusers(state, _Config(model.unet.config))
        converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    except (ValueError, KeyError) as error:
        return f"its converter fails: {str(error).splitlines()[0][:120]}"
    component = next(iter(converted)).partition(".")[0]
    keys = {key.partition(".")[2]: tensor for key, tensor in converted.items()}
    if component == "unet":
        peft_keys = convert_unet_state_dict_to_peft(keys)
        modules = dict(model.unet.named_modules())
    else:
        kind = (
            StateDictType.DIFFUSERS if any("lora_linear_layer" in key for key in keys) else StateDictType.DIFFUSERS_OLD
        )
        peft_keys = convert_state_dict_to_peft(keys, original_type=kind)
        encoder = model.text_encoders[1 if component == "text_encoder_2" else 0]
        modules = {path.removeprefix("text_model."): layer for path, layer in encoder.named_modules()}
    path = next(iter(peft_keys)).split(".lora_")[0].removeprefix("text_model.")
    if path not in modules:
        return f"converted to '{component}.{path}', which the pipeline's model does not have"
    return None


class _Config(dict):
    """A U-Net config read as attributes, as diffusers' SGM remap reads it."""

    __getattr__ = dict.get


FILE_RULES: dict[str, Callable[[LoraFile], str | None]] = {
    "a1111": lambda lora: None,
    "comfyui": lambda lora: None,
    "diffusers": diffusers_file,
    "invokeai": invokeai_file,
    "sd-scripts": lambda lora: None,
}
MODULE_RULES: dict[str, Callable[[LoraFile, str], str | None]] = {
    "a1111": a1111_module,
    "comfyui": comfyui_module,
    "diffusers": diffusers_module,
    "invokeai": invokeai_module,
    "sd-scripts": sd_scripts_module,
}


# ---------------------------------------------------------------- --model


def model_fit_problems(lora: LoraFile, checkpoint: str) -> dict[str, str]:
    """Module -> why it does not fit the checkpoint's layer of its name."""
    from library.lora.files import read_modules
    from library.lora.naming import checkpoint_weights

    model, _ = open_single_file_model(checkpoint)
    weights = checkpoint_weights(model)
    problems = {}
    for name, parts in lora.modules.items():
        if name not in weights or lora.kind(name) is None:
            continue
        try:
            (module,) = read_modules({f"{name}.{part}": tensor for part, tensor in parts.items()}, name).values()
        except UserError:  # factors that make no rank-r pair: reported for every consumer
            continue
        if not module.fits(weights[name].shape):
            problems[name] = f"made for another layer shape than {tuple(weights[name].shape)} in {checkpoint}"
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the LoRA file")
    parser.add_argument("--model", help="the checkpoint it is for: its family and every layer shape are checked too")
    parser.add_argument("--against", nargs="+", choices=CONSUMERS, default=list(CONSUMERS), help="the consumers")
    return parser


def check(path: str | Path, consumers: Sequence[str] = CONSUMERS, model: str | None = None) -> bool:
    """Print the report; True when every consumer applies every module (and every module fits the model)."""
    lora = LoraFile.read(path, local_model_family(model) if model else None)
    misfits = model_fit_problems(lora, model) if model else {}
    verdicts = verify(lora, tuple(consumers))
    print(f"{path}: {len(lora.modules)} modules, {lora.family.label}")
    for verdict in verdicts:
        print("\n".join(verdict.lines()))
    for name, why in list(misfits.items())[:5]:
        print(f"--model: module '{name}' is {why}")
    complete = all(verdict.complete for verdict in verdicts) and not misfits
    print("every application named applies every module" if complete else "not every module is applied everywhere")
    return complete


def main() -> None:
    args = build_parser().parse_args()
    if not check(args.file, args.against, args.model):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
