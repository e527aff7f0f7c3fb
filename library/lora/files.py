"""LoRA files: reading them into per-module factors with the key grammar checked, and saving them with the
`sshs_*` hashes computed over exactly the bytes that are written (specs/lora_format.md sections 2, 11.2, 14)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from library.errors import UserError
from library.file_io import atomic_output, check_output_file
from library.lora.factors import added, compose, lora_scale
from library.lora.lycoris import LYCORIS_UNET_PREFIX, LycorisModule, lycoris_algorithm
from library.lora.naming import ALPHA, DOWN, LORA_PARTS, UNET_PREFIX, UP, adaptable_layers, text_encoder_prefixes
from library.lora.peft_format import is_peft_file, peft_to_kohya
from library.metadata import declared_base_model, sshs_hashes
from library.model_files.containers import PICKLE_SUFFIXES, open_checkpoint, tensor_sources, write_safetensors
from library.model_files.family import ModelFamily

if TYPE_CHECKING:
    from library.lora.block_weights import BlockWeights

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
DORA_TO_LORA_FIX = (
    "merge it into its checkpoint with merge_lora.py --sd_model, and extract a LoRA of the merged model with"
    " extract_lora_from_models.py."
)
LYCORIS_FIX = (
    "this works on LoRA-LierLa/C3Lier files only (networks.lora); merge a LyCORIS file into a checkpoint with"
    " merge_lora.py --sd_model, or turn it into a LoRA with resize_lora.py."
)


@dataclass(frozen=True)
class ModuleFactors:
    """The tensors of one LoRA module as stored in a file."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None  # absent in some files: alpha = rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors under their keys after the module name, as LycorisModule.tensors."""
        return {DOWN: self.down, UP: self.up, **({ALPHA: self.alpha} if self.alpha is not None else {})}

    @property
    def alpha_value(self) -> float:
        """The alpha the scale uses: the stored value, or the rank when there is none (or it is 0)."""
        alpha = float(self.alpha) if self.alpha is not None else 0.0
        return alpha or float(self.rank)

    @property
    def uses_conv_rank(self) -> bool:
        """A kxk conv module (k > 1), whose rank is conv_dim (--new_conv_rank in the tools)."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the delta up @ down in the file's form: (out, in), (out, in, 1, 1) or (out, in, k, k)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def fits(self, shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether the module can adapt a layer whose weight has `shape` (a 1x1 layer's factors come 2-D or 4-D)."""
        return self.up.shape[0] == shape[0] and self.down[0].numel() == math.prod(shape[1:])

    def for_layer(self, shape: tuple[int, ...] | torch.Size) -> ModuleFactors:
        return self

    def delta(self) -> torch.Tensor:
        """alpha / rank * up @ down in float32, shaped like `weight_shape`."""
        return lora_scale(self.alpha, self.rank) * compose(self.up, self.down, self.weight_shape)

    def adapted(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The layer's weight plus strength * alpha / rank * up @ down, in float32."""
        return added(weight, self.up, self.down, strength * lora_scale(self.alpha, self.rank))


AdapterModule = ModuleFactors | LycorisModule


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a LoRA file (`.safetensors` or a torch pickle) and its metadata (empty for pickles)."""
    checkpoint = open_checkpoint(path)
    return {key: checkpoint.read(key) for key in checkpoint.keys()}, dict(checkpoint.metadata)


def read_lora_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors under sd-scripts' names: a diffusers/PEFT file is converted on load
    (library/lora/peft_format.py)."""
    weights, metadata = read_lora_file(path)
    if is_peft_file(weights):
        weights = peft_to_kohya(weights, metadata, str(path))
    return weights, metadata


def read_modules(weights: Mapping[str, torch.Tensor], source: str) -> dict[str, AdapterModule]:
    """Group a file's keys by module, checking the key grammar: a module of only `lora_down.weight`,
    `lora_up.weight` and `alpha` is a LoRA (its factors); one that follows a LyCORIS algorithm's grammar (LoCon with
    a Tucker core, LoHa, LoKr, any of them with DoRA's `dora_scale`) is a LycorisModule. `lycoris_<path>` U-Net names
    become `lora_unet_<path>`. Other keys, a module without both factors or factors of different ranks are
    reported."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name, _, part = key.partition(".")
        if name.startswith(LYCORIS_UNET_PREFIX):
            name = f"{UNET_PREFIX}_{name.removeprefix(LYCORIS_UNET_PREFIX)}"
        parts.setdefault(name, {})[part] = tensor
    modules: dict[str, AdapterModule] = {}
    for name, tensors in parts.items():
        if tensors.keys() <= set(LORA_PARTS):
            modules[name] = _lora_factors(name, tensors, source)
        elif algorithm := lycoris_algorithm(set(tensors)):
            modules[name] = LycorisModule.read(name, algorithm, tensors, source)
        else:
            unknown = sorted(tensors.keys() - set(LORA_PARTS))[0]
            raise UserError(
                f"{source}: key '{name}.{unknown}' belongs to no network type the LoRA tools read (LoRA-LierLa/C3Lier,"
                " and LyCORIS's LoCon, LoHa, LoKr and DoRA); the file was made for another network type (IA3, OFT,"
                " GLoRA, full fine-tuning, PEFT names?) or is damaged."
            )
    return modules


def _lora_factors(name: str, tensors: Mapping[str, torch.Tensor], source: str) -> ModuleFactors:
    if DOWN not in tensors or UP not in tensors:
        missing = DOWN if DOWN not in tensors else UP
        raise UserError(f"{source}: module '{name}' has no {missing}; the file is incomplete or damaged.")
    factors = ModuleFactors(tensors[DOWN], tensors[UP], tensors.get(ALPHA))
    if factors.down.dim() < 2 or factors.up.dim() < 2 or factors.up.shape[1] != factors.rank:
        raise UserError(
            f"{source}: module '{name}' has lora_down of shape {tuple(factors.down.shape)} and lora_up of shape"
            f" {tuple(factors.up.shape)}, which do not make a rank-r pair; the file is damaged."
        )
    return factors


def split_modules(
    weights: Mapping[str, torch.Tensor], source: str, lycoris_fix: str = LYCORIS_FIX
) -> dict[str, ModuleFactors]:
    """The modules of a file that must be a plain LoRA (LoRA-LierLa/C3Lier): a LyCORIS module is refused in one
    sentence ending in `lycoris_fix`."""
    modules = read_modules(weights, source)
    return {name: plain_factors(name, module, source, lycoris_fix) for name, module in modules.items()}


def plain_factors(name: str, module: AdapterModule, source: str, lycoris_fix: str) -> ModuleFactors:
    if isinstance(module, LycorisModule):
        raise UserError(f"{source}: module '{name}' is a LyCORIS {module.description} module; {lycoris_fix}")
    return module


def module_tensors(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """The three file entries of one module; alpha as a 0-dim float32 tensor (sd-scripts' svd-merge writes int64)."""
    return {
        f"{name}.{DOWN}": down,
        f"{name}.{UP}": up,
        f"{name}.{ALPHA}": torch.tensor(float(alpha), dtype=torch.float32),
    }


_SDXL_NAMES = re.compile(
    rf"^({'|'.join(text_encoder_prefixes(2))}|{UNET_PREFIX}_(input_blocks|middle_block|output_blocks))_"
)


def lora_family(module_names: Iterable[str], metadata: Mapping[str, str]) -> ModelFamily | None:
    """The model family a LoRA is for: SDXL when its module names are SDXL's (`lora_te1_`, `lora_te2_`, SGM U-Net
    names), else what its `ss_base_model_version` says, else None (SD1 and SD2 files share their names)."""
    if any(_SDXL_NAMES.match(name) for name in module_names):
        return ModelFamily.SDXL
    declared = declared_base_model(metadata)
    return declared[0] if declared else None


class LoraInput(NamedTuple):
    """One of a merge tool's `--models`, read and checked."""

    path: Path
    ratio: float
    modules: dict[str, AdapterModule]
    metadata: dict[str, str]
    family: ModelFamily | None  # None: the file does not say whether it is for SD1.x or SD2.x

    def plain(self, lycoris_fix: str) -> LoraInput:
        """This input with every module a LoRA's factors; a LyCORIS module is refused, ending in `lycoris_fix`."""
        modules = {
            name: plain_factors(name, module, str(self.path), lycoris_fix) for name, module in self.modules.items()
        }
        return self._replace(modules=modules)

    def with_layer_shapes(self, lycoris_fix: str) -> LoraInput:
        """This input with the layer shape of every LyCORIS module known, where only the layer tells it (a LoHa's conv
        factors are flattened): the kernel of the layer of that name in the family's model (SD 1.x when the file does
        not say). A DoRA module is refused, ending in `lycoris_fix`: its weight depends on the base model's."""
        layers = None
        modules = {}
        for name, module in self.modules.items():
            if isinstance(module, LycorisModule) and module.dora_scale is not None:
                raise UserError(
                    f"{self.path}: module '{name}' is a LyCORIS {module.description} module, whose change rescales the"
                    f" base model's weight, which a LoRA file cannot hold; {lycoris_fix}"
                )
            if isinstance(module, LycorisModule) and module.shape is None:
                layers = layers or _released_layer_shapes(self.family or ModelFamily.SD1)
                module = _with_kernel_of(name, module, layers.get(name), self.path)
            modules[name] = module
        return self._replace(modules=modules)


def _released_layer_shapes(family: ModelFamily) -> dict[str, tuple[int, ...]]:
    """LoRA module name -> weight shape of that layer in the family's released model (built empty, no memory)."""
    from library.model_files.stable_diffusion import released_model  # loads diffusers: only when needed

    model = released_model(family)
    return {
        name: tuple(layer.weight.shape) for name, layer in adaptable_layers(model.text_encoders, model.unet).items()
    }


def _with_kernel_of(name: str, module: LycorisModule, layer: tuple[int, ...] | None, path: Path) -> LycorisModule:
    if layer is None or module.flat_in_features % math.prod(layer[2:]):
        raise UserError(
            f"{path}: the layer of LyCORIS module '{name}' ({module.description}) can be told neither from the file"
            " (its factors are flattened) nor from the model family's layers; merge the file into its checkpoint"
            " with merge_lora.py --sd_model, which knows the layer."
        )
    kernel = layer[2:]
    return module.for_layer((module.out_features, module.flat_in_features // math.prod(kernel), *kernel))


def read_lora_inputs(models: Sequence[str | os.PathLike], ratios: Sequence[float]) -> list[LoraInput]:
    """The `--models` files with their `--ratios`: one ratio per file, every file a LoRA (or LyCORIS) file, all of one
    model family (a mismatch names both files)."""
    if len(ratios) != len(models):
        raise UserError(
            f"--ratios gives {len(ratios)} value(s) but --models names {len(models)} file(s)"
            f" ({', '.join(map(str, models))}); give one ratio per model, in the same order."
        )
    inputs = []
    for path, ratio in zip(models, ratios):
        weights, metadata = read_lora_weights(path)
        modules = read_modules(weights, str(path))
        if not modules:
            raise UserError(f"{path}: the file holds no LoRA modules; give a LoRA file.")
        check_finite(modules, path)
        inputs.append(LoraInput(Path(path), ratio, modules, metadata, lora_family(modules, metadata)))
    known = [each for each in inputs if each.family is not None]
    for each in known[1:]:
        if each.family is not known[0].family:
            raise UserError(
                f"{known[0].path} is an {known[0].family.label} LoRA but {each.path} is an {each.family.label} LoRA;"
                " LoRAs for different model families cannot be merged, so give files made for the same model family."
            )
    return inputs


def check_finite(modules: Mapping[str, AdapterModule], path: str | os.PathLike) -> None:
    """Refuse a file with a NaN or infinite value, naming its first such tensor: merged or resized, it would spread
    into every weight it touches (a checkpoint full of NaN draws black images)."""
    for name, module in modules.items():
        for part, tensor in module.tensors.items():
            if not torch.isfinite(tensor).all():
                raise UserError(
                    f"{path}: module '{name}' holds NaN or infinite values (in {part}); the file is broken, most"
                    " likely by a training run that diverged: use an earlier save of it."
                )


def inputs_family(inputs: Sequence[LoraInput]) -> ModelFamily | None:
    """The inputs' family (read_lora_inputs has checked that they agree), or None if none of them says."""
    return next((each.family for each in inputs if each.family is not None), None)


class Member(NamedTuple):
    """One input's module, with the input's ratio (times the module's block weight with --lbws)."""

    path: Path
    module: AdapterModule
    ratio: float


def modules_by_name(inputs: Sequence[LoraInput], block_weights: Sequence[BlockWeights] = ()) -> dict[str, list[Member]]:
    """Every module name of any input, in order of appearance, with the inputs that have it (in --models order); one
    name must adapt the same layer shape in every file (a Linear and a 1x1 conv of the same widths count as the same
    layer: SD2's proj_in/proj_out come both ways)."""
    groups: dict[str, list[Member]] = {}
    for position, each in enumerate(inputs):
        for name, module in each.modules.items():
            members = groups.setdefault(name, [])
            if members and _layer_shape(members[0].module) != _layer_shape(module):
                raise UserError(
                    f"{members[0].path} and {each.path}: module '{name}' adapts a layer of shape"
                    f" {_describe(members[0].module)} in the first but {_describe(module)} in the second;"
                    " the files were made for different models, so merge LoRAs of one model."
                )
            block_weight = block_weights[position].for_module(name) if block_weights else 1.0
            members.append(Member(each.path, module, each.ratio * block_weight))
    return groups


def _layer_shape(module: AdapterModule) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of the layer a module adapts; a Linear counts as a 1x1 kernel."""
    shape = module.weight_shape
    return shape[0], shape[1], tuple(shape[2:]) or (1, 1)


def _describe(module: AdapterModule) -> str:
    out, into, kernel = _layer_shape(module)
    return f"{into} -> {out}" + (f" ({kernel[0]}x{kernel[1]} conv)" if kernel != (1, 1) else "")


def save_lora_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> None:
    """Save a LoRA atomically: every tensor (alpha included) cast to `dtype` when given; `.safetensors` gets the
    metadata plus the `sshs_*` hashes of the cast tensors, a torch pickle (`.ckpt`, `.pt`) the bare tensors."""
    path = _lora_suffix_checked(path)
    final = {
        key: tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        for key, tensor in tensors.items()
    }
    if path.suffix.lower() == ".safetensors":
        write_safetensors(path, tensor_sources(final), {**metadata, **sshs_hashes(final, metadata)})
    else:
        with atomic_output(path) as temporary:
            torch.save(final, temporary)


def check_lora_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), option: str = "--save_to"
) -> Path:
    """The output path of a LoRA file, refused before any work when its suffix names no format we write, when it
    cannot be written there or when it would replace one of the `inputs`."""
    return _lora_suffix_checked(check_output_file(path, option, inputs))


def _lora_suffix_checked(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in PICKLE_SUFFIXES:
        raise UserError(f"{path}: unknown LoRA file type '{path.suffix}'; use one of {', '.join(LORA_SUFFIXES)}.")
    return path
