"""LoRA-LierLa and LoRA-C3Lier for Stable Diffusion 1.x, 2.x and SDXL, with the API of sd-scripts' networks/lora.py.

LierLa adapts the Linear and 1x1 conv layers of the text encoders' attention and MLP blocks and of the U-Net's
transformer blocks; C3Lier (`conv_dim`) adds the layers of the U-Net's ResNet, down- and up-sampling blocks, the
3x3 convs with their own rank. Each adapted layer keeps its weights; its forward becomes
`org(x) + up(down(x)) * multiplier * alpha / rank`. Files use sd-scripts' names and shapes, so they load in
sd-scripts, AUTOMATIC1111, ComfyUI and diffusers (specs/lora_format.md).

From a Diffusers pipeline:

    network, weights = create_network_from_weights(0.8, "my_lora.safetensors", pipe.vae, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet)
    network.load_state_dict(weights)
    network.to(pipe.device, dtype=pipe.unet.dtype)

or `network.merge_to(pipe.text_encoder, pipe.unet, weights)` to add the deltas into the weights instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from library.errors import UserError
from library.lora.adapter import LayerAdapter
from library.lora.factors import lora_scale
from library.lora.files import ModuleFactors, read_lora_file, save_lora_file, split_modules
from library.lora.naming import (
    ALPHA,
    DOWN,
    TEXT_ENCODER_PREFIX,
    UP,
    LoraTarget,
    is_sdxl_unet,
    model_family,
    module_name,
    text_encoder_prefixes,
    text_encoder_targets,
    unet_targets,
)
from library.lora.network_args import LoRAArgs, check_probability, parse_network_args
from library.metadata import common_value, lora_modelspec, lora_network_metadata, trained_for_note

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"
LYCORIS_MODULE_FIX = (
    "networks.lora builds LoRA-LierLa/C3Lier modules only: load the file with --network_module lycoris.kohya"
    " (pip install lycoris-lora), or merge it into its checkpoint with networks/merge_lora.py."
)
DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0
DEFAULT_ARGS = LoRAArgs()


class LoRAModule(LayerAdapter):
    """A low-rank adapter for one Linear or Conv2d layer. The layer itself is not a submodule, so the network's
    state dict holds exactly `lora_down.weight`, `lora_up.weight` and `alpha` per module."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        block: int | None = None,
    ):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, block)
        if isinstance(org_module, torch.nn.Conv2d):
            self.lora_down = torch.nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                bias=False,
            )
            self.lora_up = torch.nn.Conv2d(lora_dim, org_module.out_channels, 1, bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(lora_dim, org_module.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)  # the adapter starts as the identity: delta W = 0
        self.scale = lora_scale(alpha, lora_dim)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_up.weight, self.lora_down.weight, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.org_forward(x)
        if not self.enabled or (self.training and self.module_dropout and torch.rand(()) < self.module_dropout):
            return y
        scale = self.multiplier * self.scale
        h = self.project_down(x, self.lora_down.weight)
        if self.training:
            if self.dropout:
                h = F.dropout(h, self.dropout)
            if self.rank_dropout:
                h = h * self._rank_mask(h)
                scale /= 1.0 - self.rank_dropout
        return self.add_up(y, h, self.lora_up.weight, scale)

    def _rank_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Keep each rank of each sample with probability 1 - rank_dropout."""
        mask = torch.rand((h.shape[0], self.lora_dim), device=h.device) > self.rank_dropout
        if h.dim() == 3:  # tokens: [batch, length, rank]
            mask = mask[:, None, :]
        elif h.dim() == 4:  # conv: [batch, rank, height, width]
            mask = mask[:, :, None, None]
        return mask.to(h.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The scale follows the loaded alpha, so a resumed run trains with the scale its file will be saved with.
        self.scale = lora_scale(self.alpha.item(), self.lora_dim)


class LoRANetwork(torch.nn.Module):
    """LoRA modules for the text encoder(s) and U-Net of one model, each registered under its file name."""

    network_module = NETWORK_MODULE  # `ss_network_module` of the saved files

    def __init__(
        self,
        text_encoder: torch.nn.Module | Sequence[torch.nn.Module] | None,
        unet: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float | None = None,
        args: LoRAArgs = DEFAULT_ARGS,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        network_args: Mapping[str, str] | None = None,
    ):
        super().__init__()
        text_encoders = _as_list(text_encoder)
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.args = args
        self.network_args = dict(network_args or {})
        self.family = model_family(text_encoders, unet)
        # The weights cannot tell epsilon from v-prediction: files say epsilon unless the caller knows better (the
        # trainer writes what its run trained over these keys, a tool may set this).
        self.v_prediction = False
        self._modules_dim, self._modules_alpha = modules_dim, modules_alpha
        self._dropout = dropout
        self._aliases: dict[str, str] = {}  # other names of the modules' layers (diffusers names, SDXL U-Net)
        with_conv = args.with_conv or modules_dim is not None
        self.text_encoder_loras = self._create_modules(text_encoder_targets(text_encoders))
        self.unet_loras = self._create_modules(unet_targets(unet, with_conv))
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)

    def _create_modules(self, targets: list[LoraTarget]) -> list[LoRAModule]:
        modules = []
        for target in targets:
            rank_alpha = self._rank_and_alpha(target)
            if rank_alpha is None:
                continue
            rank, alpha = rank_alpha
            if target.alias:
                self._aliases[target.alias] = target.name
            modules.append(self._new_module(target, rank, alpha))
        return modules

    def _new_module(self, target: LoraTarget, rank: int, alpha: float | None) -> LoRAModule:
        return LoRAModule(
            target.name,
            target.layer,
            self.multiplier,
            rank,
            alpha,
            self._dropout,
            self.args.rank_dropout,
            self.args.module_dropout,
            target.block,
        )

    def _rank_and_alpha(self, target: LoraTarget) -> tuple[int, float] | None:
        """The module's rank and alpha, or None when the layer gets no module: a file that lacks it, a 3x3 conv
        without conv_dim, a block of rank 0 or of learning-rate weight 0."""
        if self._modules_dim is not None:
            if target.name not in self._modules_dim:
                return None
            return self._modules_dim[target.name], self._modules_alpha[target.name]
        args, slot = self.args, target.block
        if target.kind.uses_conv_rank:
            if args.conv_block_dims:
                alphas = args.conv_block_alphas or (args.conv_alpha,) * len(args.conv_block_dims)
                rank, alpha = args.conv_block_dims[slot], alphas[slot]
            elif args.conv_dim:
                rank, alpha = args.conv_dim, args.conv_alpha
            else:
                return None
        else:
            blockwise = slot is not None
            rank = args.block_dims[slot] if blockwise and args.block_dims else self.lora_dim
            alpha = args.block_alphas[slot] if blockwise and args.block_alphas else self.alpha
        if rank == 0 or (slot is not None and args.block_lr_weights and args.block_lr_weights[slot] == 0):
            return None
        return rank, alpha

    # ---------------------------------------------------------------- applying and merging

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Patch the targeted layers (the models given at construction). A side that is off loses its modules,
        so it is neither run, trained nor saved."""
        for off, loras in ((not apply_text_encoder, self.text_encoder_loras), (not apply_unet, self.unet_loras)):
            if off:
                for lora in loras:
                    delattr(self, lora.lora_name)
                loras.clear()
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def is_mergeable(self) -> bool:
        return True

    def merge_to(
        self,
        text_encoder=None,
        unet=None,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype=None,
        device=None,
    ) -> None:
        """Add each module's delta into its layer's weight, from `weights_sd` (a LoRA state dict, with its own
        ranks and alphas) or, when it is None, from the network's own weights. Modules the state dict does not
        mention are left alone; a module the network lacks, or factors of the wrong shape, are an error."""
        loras = {lora.lora_name: lora for lora in self.text_encoder_loras + self.unet_loras}
        if weights_sd is None:
            for lora in loras.values():
                lora.merge_to(None, dtype, device)
            return
        modules = split_modules(_canonical_names(weights_sd, self._aliases), "the weights to merge", LYCORIS_MODULE_FIX)
        _check_modules_fit(
            modules, {name: lora.org_module for name, lora in loras.items()}, "the weights to merge", {}, "this network"
        )
        for name, factors in modules.items():
            sd = {DOWN: factors.down, UP: factors.up}
            if factors.alpha is not None:
                sd[ALPHA] = factors.alpha
            loras[name].merge_to(sd, dtype, device)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.enabled = enabled

    # ---------------------------------------------------------------- loading

    def load_weights(self, file: str | os.PathLike) -> torch.nn.modules.module._IncompatibleKeys:
        """Load a LoRA file into the existing modules; keys of modules this network lacks, or modules the file
        lacks, are tolerated (as when resuming with other network_args), but a rank that differs is an error."""
        weights, _ = read_lora_file(file)
        fitted = self._fit_shapes(weights)
        own_state = self.state_dict(keep_vars=True)
        for key, tensor in fitted.items():
            own = own_state.get(key)
            if own is not None and own.shape != tensor.shape:
                raise UserError(
                    f"{file}: '{key}' has shape {tuple(tensor.shape)} but this network's has {tuple(own.shape)}; the"
                    " file was trained with another rank or for another model (use --dim_from_weights to take its"
                    " ranks)."
                )
        return super().load_state_dict(fitted, strict=False)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        return super().load_state_dict(self._fit_shapes(state_dict), strict=strict, assign=assign)

    def _fit_shapes(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Take a 1x1 layer's factors in 2-D or 4-D form (SD2 proj_in/proj_out exist both ways) and a shape-[1]
        alpha, by reshaping to this network's shapes when the element counts agree."""
        own = {key: value.shape for key, value in self.state_dict(keep_vars=True).items()}
        fitted = {}
        for key, tensor in state_dict.items():
            shape = own.get(key)
            if shape is not None and tensor.shape != shape and tensor.numel() == math.prod(shape):
                tensor = tensor.reshape(shape)
            fitted[key] = tensor
        return fitted

    # ---------------------------------------------------------------- training

    def prepare_optimizer_params(
        self, text_encoder_lr=None, unet_lr=None, default_lr=None
    ) -> tuple[list[dict], list[str]]:
        """Optimizer parameter groups and their descriptions (`textencoder`, or `textencoder1` and `textencoder2`
        when SDXL's encoders get a rate each, `unet`, `unet_block{i}`, each with a ` plus` part for LoRA+'s lora_up
        weights). A group whose learning rate is 0 or None is left out. `text_encoder_lr` is one rate or a list (the
        --text_encoder_lr values): with two text encoders a second value is the second encoder's rate; otherwise the
        first value serves all, as in sd-scripts."""
        unet_lr = default_lr if unet_lr is None else unet_lr
        groups: list[tuple[dict, str]] = []
        for loras, lr, description in self._text_encoder_parts(text_encoder_lr, default_lr):
            groups += _param_groups(loras, lr, self.args.loraplus_text_encoder_lr_ratio, description)
        if self.args.block_lr_weights:
            for slot, weight in enumerate(self.args.block_lr_weights):
                loras = [lora for lora in self.unet_loras if lora.block == slot]
                groups += _param_groups(
                    loras,
                    unet_lr * weight if unet_lr else unet_lr,
                    self.args.loraplus_unet_lr_ratio,
                    f"unet_block{slot}",
                )
        else:
            groups += _param_groups(self.unet_loras, unet_lr, self.args.loraplus_unet_lr_ratio, "unet")
        kept = [(group, description) for group, description in groups if group["lr"]]
        return [group for group, _ in kept], [description for _, description in kept]

    def _text_encoder_parts(self, text_encoder_lr, default_lr) -> list[tuple[list[LoRAModule], float | None, str]]:
        rates = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        rates = [default_lr if rate is None else rate for rate in rates] or [default_lr]
        if len(rates) > 2:
            raise UserError(
                f"--text_encoder_lr has {len(rates)} values; give one, or one per text encoder (two for SDXL)."
            )
        prefixes = text_encoder_prefixes(2)
        per_encoder = [
            [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(p + "_")] for p in prefixes
        ]
        if len(rates) == 1 or not all(per_encoder):
            return [(self.text_encoder_loras, rates[0], "textencoder")]
        return [(loras, rate, f"textencoder{index}") for index, (loras, rate) in enumerate(zip(per_encoder, rates), 1)]

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: each LoRA forward runs inside its layer, so it is recomputed with the U-Net's and text
        encoders' own checkpointed blocks."""

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`--scale_weight_norms`: scale up and down of every module whose ||scale * up @ down||_F exceeds the
        maximum so that it equals it. Returns (modules scaled, mean norm, largest norm) after the scaling, as
        tensors, so that no host sync happens unless they are printed. The norm comes from the rank x rank Gram matrices
        (||UD||^2 = sum((U^T U) * (D D^T))), never from the full delta."""
        loras = self.text_encoder_loras + self.unet_loras
        norms = torch.stack([_delta_norm(lora) for lora in loras])
        factors = torch.where(norms > max_norm_value, (max_norm_value / norms).sqrt(), torch.ones_like(norms))
        for lora, factor in zip(loras, factors):
            lora.lora_down.weight.mul_(factor.to(lora.lora_down.weight.dtype))
            lora.lora_up.weight.mul_(factor.to(lora.lora_up.weight.dtype))
        capped = norms.clamp(max=max_norm_value)
        return (norms > max_norm_value).sum(), capped.mean(), capped.max()

    # ---------------------------------------------------------------- saving

    def metadata(self, title: str) -> dict[str, str]:
        """The `ss_*` keys the network knows itself and its ModelSpec."""
        base = [lora for lora in self.text_encoder_loras + self.unet_loras if not lora.uses_conv_rank]
        dim = common_value([str(lora.lora_dim) for lora in base], str(self.lora_dim))
        alpha = common_value([str(float(lora.alpha)) for lora in base], str(float(self.alpha or self.lora_dim)))
        metadata = lora_network_metadata(
            self.network_module, dim, alpha, self._metadata_network_args(), self.family, self.v_prediction
        )
        metadata["ss_output_name"] = title
        return {**metadata, **lora_modelspec(self.family, self.v_prediction, title)}

    def _metadata_network_args(self) -> dict[str, str]:
        """`ss_network_args`: the arguments the network was made with, or for one built from weights its conv rank."""
        return self.network_args or self._conv_args()

    def _conv_args(self) -> dict[str, str]:
        """conv_dim / conv_alpha of a network built from weights, for `ss_network_args`."""
        convs = [lora for lora in self.unet_loras if lora.uses_conv_rank]
        if not convs:
            return {}
        return {
            "conv_dim": common_value([str(lora.lora_dim) for lora in convs], ""),
            "conv_alpha": common_value([str(float(lora.alpha)) for lora in convs], ""),
        }

    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Save the LoRA weights (cast to `dtype` when given) with the network's metadata, updated by `metadata`
        (the trainer's `ss_*` keys), and the `sshs_*` hashes; written atomically."""
        metadata = dict(metadata or {})
        full = {**self.metadata(metadata.get("ss_output_name") or Path(file).stem), **metadata}
        save_lora_file(file, self.state_dict(), full, dtype)


def _param_groups(
    loras: list[LoRAModule], lr: float | None, plus_ratio: float | None, description: str
) -> list[tuple[dict, str]]:
    plain, plus = [], []
    for lora in loras:
        for name, parameter in lora.named_parameters():
            (plus if plus_ratio and name.startswith("lora_up") else plain).append(parameter)
    groups = []
    if plain:
        groups.append(({"params": plain, "lr": lr}, description))
    if plus:
        groups.append(({"params": plus, "lr": lr * plus_ratio if lr else lr}, description + " plus"))
    return groups


def _delta_norm(lora: LoRAModule) -> torch.Tensor:
    up = lora.lora_up.weight.float().reshape(lora.lora_up.weight.shape[0], lora.lora_dim)
    down = lora.lora_down.weight.float().reshape(lora.lora_dim, -1)
    return ((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt() * lora.scale


def _as_list(text_encoder) -> list[torch.nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


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
) -> LoRANetwork:
    """A new network from `--network_dim`, `--network_alpha`, `--network_dropout` and `--network_args` (the
    keyword arguments, as strings or numbers). `vae` is not adapted; it is taken for sd-scripts' signature."""
    args = parse_network_args(kwargs, is_sdxl_unet(unet))
    lora_dim, alpha = dim_and_alpha(network_dim, network_alpha)
    check_probability("--network_dropout", neuron_dropout)
    if neuron_dropout is not None and args.dropout is not None and neuron_dropout != args.dropout:
        raise UserError(
            f"--network_dropout {neuron_dropout} and --network_args dropout={args.dropout} disagree; give the neuron"
            " dropout once."
        )
    return LoRANetwork(
        text_encoder,
        unet,
        multiplier,
        lora_dim=lora_dim,
        alpha=alpha,
        dropout=neuron_dropout if neuron_dropout is not None else args.dropout,
        args=args,
        network_args={key: str(value) for key, value in kwargs.items()},
    )


def dim_and_alpha(network_dim: int | None, network_alpha: float | None) -> tuple[int, float]:
    """`--network_dim` and `--network_alpha` with sd-scripts' defaults (4 and 1) for values not given."""
    if network_dim is not None and int(network_dim) < 1:
        raise UserError(f"--network_dim {network_dim}: the rank must be at least 1.")
    return (DEFAULT_DIM if network_dim is None else int(network_dim)), (
        DEFAULT_ALPHA if network_alpha is None else float(network_alpha)
    )


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae,
    text_encoder,
    unet,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network with exactly the modules of a LoRA file, each with the file's rank and alpha (a missing alpha
    means alpha = rank). Returns the network and the state dict to load into it: SDXL files with diffusers-style
    U-Net names are renamed to sd-scripts' names, and a missing alpha is filled in. The weights are not loaded. Every
    module can be merged, so `for_inference` changes nothing; it is taken for sd-scripts' signature, as is `vae`."""
    loaded = read_weights_for_model(file, text_encoder, unet, weights_sd)
    network = LoRANetwork(
        loaded.text_encoders,
        unet,
        multiplier,
        args=parse_network_args(kwargs, is_sdxl_unet(unet)),
        modules_dim=loaded.ranks(),
        modules_alpha=loaded.alphas(),
    )
    return network, loaded.weights


class WeightsForModel(NamedTuple):
    """A LoRA state dict checked against a model, ready for `load_state_dict`."""

    source: str  # the file, for messages
    weights: dict[str, torch.Tensor]  # canonical module names, alpha filled in where the file has none
    modules: dict[str, ModuleFactors]
    metadata: dict[str, str]  # empty for a state dict or a torch pickle
    text_encoders: list[torch.nn.Module]

    def ranks(self) -> dict[str, int]:
        return {name: factors.rank for name, factors in self.modules.items()}

    def alphas(self) -> dict[str, float]:
        return {name: factors.alpha_value for name, factors in self.modules.items()}


def read_weights_for_model(
    file: str | os.PathLike | None, text_encoder, unet, weights_sd: Mapping[str, torch.Tensor] | None = None
) -> WeightsForModel:
    """Read a LoRA file (unless `weights_sd` is given) and check it against the model: SDXL files with
    diffusers-style U-Net names are renamed to sd-scripts' names, text-encoder modules are dropped when there is no
    text encoder, and every module must name a layer of the model and fit its shape."""
    source = str(file) if file is not None else "the LoRA weights"
    metadata: dict[str, str] = {}
    if weights_sd is None:
        if file is None:
            raise UserError("create_network_from_weights needs a file or weights_sd.")
        weights_sd, metadata = read_lora_file(file)
    text_encoders = _as_list(text_encoder)
    targets = text_encoder_targets(text_encoders) + unet_targets(unet, with_conv_containers=True)
    weights_sd = _canonical_names(weights_sd, {target.alias: target.name for target in targets if target.alias})
    if not text_encoders:
        weights_sd = _without_text_encoder_modules(weights_sd, source)
    modules = split_modules(weights_sd, source, LYCORIS_MODULE_FIX)
    layers = {target.name: target.layer for target in targets}
    _check_modules_fit(modules, layers, source, metadata, f"this {model_family(text_encoders, unet).label} model")
    for name, factors in modules.items():
        if factors.alpha is None:  # so that a strict load_state_dict of the returned weights succeeds
            weights_sd[f"{name}.{ALPHA}"] = torch.tensor(factors.alpha_value)
    return WeightsForModel(source, weights_sd, modules, metadata, text_encoders)


def _canonical_names(weights: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename modules that use a layer's other name (diffusers U-Net names in an SDXL file) to sd-scripts' name."""
    renamed = {}
    for key, tensor in weights.items():
        name = module_name(key)
        renamed[aliases[name] + key[len(name) :] if name in aliases else key] = tensor
    return renamed


def _without_text_encoder_modules(weights: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    kept = {key: tensor for key, tensor in weights.items() if not key.startswith(TEXT_ENCODER_PREFIX)}
    if len(kept) < len(weights):
        logger.warning("%s: no text encoder was given, so the file's text-encoder modules are not used", source)
    return kept


def _check_modules_fit(
    modules: Mapping[str, ModuleFactors],
    layers: Mapping[str, torch.nn.Module],
    source: str,
    metadata: Mapping[str, str],
    owner: str,
) -> None:
    """Every module must name one of `layers` and have factors of that layer's shape."""
    unknown = [name for name in modules if name not in layers]
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} of its {len(modules)} modules name layers {owner} does not have (first:"
            f" '{unknown[0]}'){trained_for_note(metadata)}; use the model the LoRA was trained for."
        )
    for name, factors in modules.items():
        weight_shape = layers[name].weight.shape
        if factors.up.shape[0] != weight_shape[0] or factors.down[0].numel() != math.prod(weight_shape[1:]):
            raise UserError(
                f"{source}: module '{name}' has factors for a {factors.down.shape[1]} -> {factors.up.shape[0]} layer"
                f" but {owner}'s layer is {weight_shape[1]} -> {weight_shape[0]}{trained_for_note(metadata)};"
                " use the model the LoRA was trained for."
            )


__all__ = ["LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights", "NETWORK_MODULE"]
