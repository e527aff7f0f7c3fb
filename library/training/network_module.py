"""The --network_module: this project's (networks.lora, networks.dylora) or any module with sd-scripts' API
(`create_network`, `create_network_from_weights`, and a network with `apply_to`, `prepare_optimizer_params`,
`save_weights`, ...), such as LyCORIS's `lycoris.kohya`.

A third-party module sees the models as sd-scripts' models look, so the names it gives its modules are the ones
AUTOMATIC1111, ComfyUI and sd-scripts read (library.lora.naming.sd_scripts_view); a module that is missing or fails
while building its network is one sentence naming the package, its version and what to do."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

import torch

from library.errors import UserError
from library.lora.naming import OWN_MODULES, sd_scripts_view
from library.training.families import TrainingFamily
from library.training.options import NetworkOptions

KNOWN_PACKAGES = {"lycoris": "lycoris-lora"}  # import name -> pip name, for the install hint


def import_network_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        package = KNOWN_PACKAGES.get(name.split(".")[0], name.split(".")[0])
        raise UserError(
            f"--network_module {name}: it cannot be imported ({error}); run: pip install {package}"
        ) from None


def build_network(options: NetworkOptions, family: TrainingFamily) -> torch.nn.Module:
    """The network, applied to the model (the parts that do not train left out), with --network_weights loaded."""
    module, model = import_network_module(options.network_module), family.model
    third_party = options.network_module not in OWN_MODULES
    text_encoder = family.network_text_encoder()
    if third_party:
        text_encoder = sd_scripts_view(text_encoder)
    try:
        if options.dim_from_weights:
            network, weights = module.create_network_from_weights(
                1.0, options.network_weights, model.vae, text_encoder, model.unet
            )
            network.load_state_dict(weights)
        else:
            network = module.create_network(
                1.0,
                options.network_dim,
                options.network_alpha,
                model.vae,
                text_encoder,
                model.unet,
                neuron_dropout=options.network_dropout,
                **options.keyword_args(),
            )
        network.apply_to(text_encoder, model.unet, options.train_text_encoder, options.train_unet)
    except UserError:
        raise
    except Exception as error:  # another package's code: whatever it raises, say what failed and where
        if not third_party:
            raise
        raise UserError(_failure(options.network_module, error)) from error
    if options.scale_weight_norms and not callable(getattr(network, "apply_max_norm_regularization", None)):
        raise UserError(
            f"--scale_weight_norms: the network of {options.network_module} has no apply_max_norm_regularization;"
            " remove the option."
        )
    if options.network_weights and not options.dim_from_weights:
        loaded = network.load_weights(options.network_weights)
        missing, unexpected = (getattr(loaded, name, []) for name in ("missing_keys", "unexpected_keys"))
        print(_continuation_line(options.network_weights, network, missing, unexpected))
    return network


def _continuation_line(file: str, network: torch.nn.Module, missing_keys: list[str], unexpected_keys: list[str]) -> str:
    """What continuing from `file` keeps and leaves out, refused when it keeps nothing (a LoRA of another model)."""
    modules = {key.split(".")[0] for key in network.state_dict()}
    missing = {key.split(".")[0] for key in missing_keys}
    dropped = {key.split(".")[0] for key in unexpected_keys}
    if modules and missing >= modules:
        raise UserError(
            f"--network_weights {file}: none of this network's {len(modules)} modules is in the file, so nothing would"
            " continue from it; give a LoRA trained for this model and these layers, or leave out --network_weights."
        )
    notes = []
    if missing:
        notes.append(f"{len(missing)} of the network's {len(modules)} modules are not in the file and start fresh")
    if dropped:
        notes.append(
            f"{len(dropped)} of the file's modules are not in this network and are left out (first: {min(dropped)};"
            " conv modules need conv_dim in --network_args, text-encoder modules need the text encoder trained)"
        )
    return f"continuing from {file}" + (f" ({'; '.join(notes)})" if notes else "")


def _failure(name: str, error: Exception) -> str:
    top = name.split(".")[0]
    distribution = importlib.metadata.packages_distributions().get(top, [KNOWN_PACKAGES.get(top, top)])[0]
    try:
        meta = importlib.metadata.metadata(distribution)
        distribution, version = re.sub(r"[-_.]+", "-", meta["Name"]).lower(), meta["Version"]  # pip's spelling
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version"
    advice = "check its --network_args, or try another version of the package"
    if "duplicated lora name" in str(error):
        advice = (
            "this LyCORIS version builds duplicate modules for the U-Net with its default preset (sd-scripts fails the"
            ' same way); add --network_args "preset=attn-mlp" (or another preset), or pip install "lycoris-lora<4"'
        )
    return f"--network_module {name} ({distribution} {version}) could not build the network: {error}; {advice}."
