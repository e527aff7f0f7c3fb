"""The generation scripts' networks: each --network_weights file created by its module and checked against the
model before the first image, then applied (run beside the layers, strengths changeable per prompt) or merged into
the weights. A LyCORIS file given to this project's modules is merged with the exact weight its algorithm defines."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from library.errors import UserError
from library.generation.options import NetworkChoice
from library.lora.files import AdapterModule, read_lora_file, read_modules
from library.lora.lycoris import LycorisModule
from library.lora.naming import OWN_MODULES, adaptable_layers, sd_scripts_view
from library.metadata import trained_for_note
from library.model_files.stable_diffusion import StableDiffusionModel


class _LoadedNetwork(NamedTuple):
    network: torch.nn.Module
    weights: dict[str, torch.Tensor]
    text_encoder: torch.nn.Module | list[torch.nn.Module]  # as the network's module sees it


class _WeightPatches(NamedTuple):
    """A LyCORIS file's modules with the layers they adapt, merged into the weights (there is no network to run)."""

    patches: list[tuple[torch.nn.Module, AdapterModule]]

    def merge(self, multiplier: float) -> None:
        for layer, module in self.patches:
            layer.weight.data = module.adapted(layer.weight, multiplier).to(layer.weight.dtype)


class AttachedNetworks(NamedTuple):
    """The applied networks (whose strengths can change between batches), one per file or None where the file was
    merged into the weights."""

    applied: list[torch.nn.Module | None]
    defaults: tuple[float, ...]  # each file's --network_mul
    current: list[float]  # each network's strength now

    def set_multipliers(self, multipliers: Sequence[float] | None, where: str = "") -> None:
        """Each applied network at its strength: `multipliers` (a prompt's --am; the last value repeats for the
        files after it), or the files' --network_mul."""
        if multipliers is None:
            multipliers = self.defaults
        elif len(multipliers) > len(self.defaults):
            raise UserError(
                f"{where}: --am gives {len(multipliers)} strengths for {len(self.defaults)} --network_weights files;"
                " give at most one per file."
            )
        if multipliers:
            multipliers = [*multipliers, *[multipliers[-1]] * (len(self.defaults) - len(multipliers))]
        for index, (network, multiplier) in enumerate(zip(self.applied, multipliers)):
            if multiplier == self.current[index]:
                continue
            if network is None:
                raise UserError(
                    f"{where}: a merged network's strength cannot change per prompt; leave out --network_merge and"
                    " --network_pre_calc (a LyCORIS file needs --network_module lycoris.kohya for this)."
                )
            if not hasattr(network, "set_multiplier"):
                raise UserError(f"{where}: {type(network).__name__} has no set_multiplier; its strength cannot change.")
            network.set_multiplier(multiplier)
            self.current[index] = multiplier


def attach_networks(model: StableDiffusionModel, choices: list[NetworkChoice], merge: bool) -> AttachedNetworks:
    """Create each network from its file (checked against the model) and apply it, or merge it into the weights.
    A third-party module (lycoris.kohya) sees the text encoders as sd-scripts' models look. All files are checked
    before any is merged, so a bad file leaves the model untouched."""
    loaded = [(_lycoris_patches(model, choice) or _loaded_network(model, choice), choice) for choice in choices]
    applied = []
    for attached, choice in loaded:
        if isinstance(attached, _WeightPatches):
            attached.merge(choice.multiplier)
            applied.append(None)
        elif merge:
            attached.network.merge_to(attached.text_encoder, model.unet, attached.weights)
            applied.append(None)
        else:
            attached.network.apply_to(attached.text_encoder, model.unet, True, True)  # LyCORIS builds its modules here
            attached.network.load_state_dict(attached.weights)
            attached.network.eval()
            applied.append(attached.network)
        how = "applied" if applied[-1] is not None else "merged"
        print(f"{how} {choice.weights} ({choice.module}) with multiplier {choice.multiplier:g}")
    multipliers = [choice.multiplier for choice in choices]
    return AttachedNetworks(applied, tuple(multipliers), multipliers)


def _loaded_network(model: StableDiffusionModel, choice: NetworkChoice) -> _LoadedNetwork:
    text_encoder = _network_text_encoder(model)
    if choice.module not in OWN_MODULES:
        text_encoder = sd_scripts_view(text_encoder)
    network, weights = _network_module(choice).create_network_from_weights(
        choice.multiplier, str(choice.weights), model.vae, text_encoder, model.unet, **choice.arguments
    )
    return _LoadedNetwork(network, weights, text_encoder)


def _lycoris_patches(model: StableDiffusionModel, choice: NetworkChoice) -> _WeightPatches | None:
    """For a LyCORIS file given to this project's modules, its modules checked against the model's layers; None
    for any other file or module."""
    if choice.module not in OWN_MODULES:
        return None
    weights, metadata = read_lora_file(choice.weights)
    modules = read_modules(weights, str(choice.weights))
    if not any(isinstance(module, LycorisModule) for module in modules.values()):
        return None
    layers = adaptable_layers(model.text_encoders, model.unet)
    patches = []
    for name, module in modules.items():
        layer = layers.get(name)
        if layer is None or not module.fits(layer.weight.shape):
            problem = "names no layer of" if layer is None else "does not fit the shape of its layer in"
            raise UserError(
                f"{choice.weights}: module '{name}' {problem} this {model.family.label} model"
                f"{trained_for_note(metadata)}; use the model the LyCORIS file was trained for."
            )
        patches.append((layer, module.for_layer(layer.weight.shape)))
    return _WeightPatches(patches)


def _network_text_encoder(model: StableDiffusionModel):
    """What networks take as `text_encoder`: the one encoder of SD 1.x/2.x, the list of both for SDXL (whose LoRA
    files name them lora_te1_ and lora_te2_)."""
    return list(model.text_encoders) if len(model.text_encoders) > 1 else model.text_encoders[0]


def _network_module(choice: NetworkChoice):
    try:
        module = importlib.import_module(choice.module)
    except ModuleNotFoundError:
        raise UserError(
            f"--network_module {choice.module}: no such module;"
            " use networks.lora, networks.dylora or an importable module."
        ) from None
    if not hasattr(module, "create_network_from_weights"):
        raise UserError(
            f"--network_module {choice.module}: the module has no create_network_from_weights;"
            " use networks.lora or networks.dylora."
        )
    return module
