"""Stable Diffusion models as users have them: one `.safetensors`/`.ckpt` file, or a Diffusers folder.

Loading builds diffusers/transformers modules on the meta device and fills them from the file: tensors already in
the wanted dtype are views of the memory-mapped file, others are converted one at a time, so memory peaks at the
model plus one tensor. Saving writes the same file layout back, including the file
tensors the models do not use (SD2's last text layer, text projection and logit scale).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.errors import UserError
from library.file_io import atomic_folder
from library.metadata import checkpoint_modelspec
from library.model_files.architecture import (
    TEXT_ENCODER_FOLDERS,
    Architecture,
    architecture_from_shapes,
    scheduler_config,
    shipped_architecture,
)
from library.model_files.containers import (
    CHECKPOINT_SUFFIXES,
    CheckpointFile,
    TensorInfo,
    open_checkpoint,
    save_state_dict,
    write_safetensors,
)
from library.model_files.family import (
    TEXT_ENCODER_LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelFamily,
    TextEncoderLayout,
    check_family,
    detect_family,
    detect_v_prediction,
)
from library.model_files.key_maps import (
    KeyLink,
    Reshape,
    clip_links,
    file_shape,
    open_clip_links,
    to_file_tensor,
    to_model_tensor,
    unet_links,
    vae_links,
)
from library.model_files.tokenizer import load_tokenizers

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PIPELINE_CLASSES = {
    ModelFamily.SD1: "StableDiffusionPipeline",
    ModelFamily.SD2: "StableDiffusionPipeline",
    ModelFamily.SDXL: "StableDiffusionXLPipeline",
}


@dataclass
class StableDiffusionModel:
    family: ModelFamily
    v_prediction: bool
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoder]
    tokenizers: list[CLIPTokenizer]
    source: str
    prediction_reason: str = ""
    # File tensors that no module uses but other tools expect to find (file key -> tensor), written back on save.
    unused_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def scheduler_config(self) -> dict:
        return scheduler_config(self.family, self.v_prediction)

    def components(self) -> Iterator[tuple[torch.nn.Module, dict[str, KeyLink]]]:
        """Each module with the links from its state-dict keys to single-file keys."""
        yield self.unet, unet_links(self.unet.state_dict().keys(), self.unet.config)
        yield self.vae, vae_links(self.vae.state_dict().keys(), self.vae.config)
        for encoder, layout in zip(self.text_encoders, TEXT_ENCODER_LAYOUTS[self.family]):
            yield encoder, _text_encoder_links(encoder.state_dict().keys(), layout)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 8 for every released model, fewer for the tiny test and demo models."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`module.to(device, dtype)`, bypassing diffusers' override, which warns about every dtype cast (float32
    included) and points users at a from_pretrained argument they never call."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


# ---------------------------------------------------------------- loading


def load_stable_diffusion(
    path: str | os.PathLike,
    *,
    family: ModelFamily | None = None,
    v_parameterization: bool = False,
    dtype: torch.dtype = torch.float32,
    tokenizer_cache_dir: str | os.PathLike | None = None,
    vae_dtype: torch.dtype | None = None,
) -> StableDiffusionModel:
    """Load a single-file checkpoint or a Diffusers folder in `dtype` (the VAE in `vae_dtype`, default `dtype`). The
    family is detected; `family` (from `--v2`, `--sdxl`) must agree with it. v-prediction comes from
    `v_parameterization`, else from the file's own marks."""
    path = Path(path)
    if not path.exists() and HUB_ID.fullmatch(str(path)) and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        path = _download_from_hub(str(path))
    if path.is_dir():
        return _load_diffusers_folder(path, family, v_parameterization, dtype, vae_dtype or dtype, tokenizer_cache_dir)
    model, checkpoint, unused = _open_single_file(path, family, v_parameterization, tokenizer_cache_dir)
    for module, links in model.components():
        _fill_module(module, links, checkpoint, vae_dtype or dtype if module is model.vae else dtype)
    model.unused_tensors = {key: checkpoint.read(key).clone() for key in unused}  # no view keeps the file mapped
    return model


def local_model_family(path: str | os.PathLike) -> ModelFamily | None:
    """The family of a local single file or Diffusers folder, from its keys or configs without reading weights;
    None for anything else (a hub id, a missing path), which the loader then reports."""
    path = Path(path)
    if path.is_dir() and (path / "text_encoder" / "config.json").is_file():
        return _folder_family(path)
    if path.is_file():
        return detect_family(AliasedCheckpoint(open_checkpoint(path)).shapes(), str(path))
    return None


def open_single_file_model(
    path: str | os.PathLike, *, family: ModelFamily | None = None, v_parameterization: bool = False
) -> tuple[StableDiffusionModel, AliasedCheckpoint]:
    """A single-file checkpoint checked as `load_stable_diffusion` checks it, without reading its weights: the model
    as empty (meta-device) modules of the file's architecture, and the file seen through current key names. For
    tools that work on the file's tensors themselves, such as merging a LoRA into a few of them."""
    model, checkpoint, _ = _open_single_file(Path(path), family, v_parameterization, None)
    return model, checkpoint


def _open_single_file(
    path: Path, family: ModelFamily | None, v_parameterization: bool, tokenizer_cache_dir
) -> tuple[StableDiffusionModel, AliasedCheckpoint, list[str]]:
    """The empty model, the aliased file and the file tensors no module uses; family and keys checked."""
    checkpoint = AliasedCheckpoint(open_checkpoint(path))
    shapes = checkpoint.shapes()
    detected = detect_family(shapes, str(path))
    check_family(detected, family, str(path))
    v_prediction, reason = detect_v_prediction(checkpoint.metadata, shapes, v_parameterization)
    model = empty_model(detected, _architecture(detected, shapes, path), v_prediction, str(path), tokenizer_cache_dir)
    model.prediction_reason = reason
    components = list(model.components())
    unused = _unused_keys(checkpoint, components, detected)
    _check_keys(checkpoint, components, detected, path, unused)
    return model, checkpoint, unused


def empty_model(
    family: ModelFamily,
    architecture: Architecture | None = None,
    v_prediction: bool = False,
    source: str = "",
    tokenizer_cache_dir: str | os.PathLike | None = None,
) -> StableDiffusionModel:
    """The modules on the meta device (no memory used), shaped as `architecture` says (default: the released
    model of the family), in eval mode. Weights are filled in by the loader."""
    architecture = architecture or shipped_architecture(family)
    with init_empty_weights():
        unet = UNet2DConditionModel(**_init_arguments(architecture.unet))
        vae = AutoencoderKL(**_init_arguments(architecture.vae))
        text_encoders = [
            text_encoder_class(layout)(CLIPTextConfig(**config))
            for config, layout in zip(architecture.text_encoders, TEXT_ENCODER_LAYOUTS[family])
        ]
    for module in (unet, vae, *text_encoders):
        module.eval()
    return StableDiffusionModel(
        family, v_prediction, unet, vae, text_encoders, load_tokenizers(family, cache_dir=tokenizer_cache_dir), source
    )


@functools.cache
def released_model(family: ModelFamily) -> StableDiffusionModel:
    """The family's released architecture, empty (meta device), built once per process: for the tools that only
    need its layer names and shapes. Callers must not change it."""
    return empty_model(family)


def _download_from_hub(repo_id: str) -> Path:
    """The one place that may use the network: the user named a Hugging Face Hub model id."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*", "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many kinds (offline, not found, gated, network)
        raise UserError(
            f"{repo_id}: no such local file or folder, and fetching it from the Hugging Face Hub failed"
            f" ({type(error).__name__}); give the path of a local .safetensors/.ckpt file or Diffusers folder."
        ) from None


class AliasedCheckpoint:
    """A checkpoint seen through the names current tools use: legacy SD1 text keys gain `text_model.`, stray
    `position_ids` disappear, Playground's doubled `text_projection.weight.weight` loses its extra `.weight`.
    `file_key` gives a name's key in the file itself."""

    _LEGACY_CLIP = re.compile(
        r"^cond_stage_model\.transformer\.(?!text_model\.)(embeddings|encoder|final_layer_norm)\."
    )

    def __init__(self, checkpoint: CheckpointFile):
        self.checkpoint = checkpoint
        self.metadata = checkpoint.metadata
        self._names = {}
        for key in checkpoint.keys():
            if key.endswith("position_ids"):
                continue
            name = self._LEGACY_CLIP.sub(r"cond_stage_model.transformer.text_model.\1.", key)
            self._names[name.replace("text_projection.weight.weight", "text_projection.weight")] = key
        info = checkpoint.info()
        self._shapes = {name: info[key].shape for name, key in self._names.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def read(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(self._names[name])

    def release(self, name: str) -> None:
        self.checkpoint.release(self._names[name])

    def file_key(self, name: str) -> str:
        return self._names[name]


def _architecture(family: ModelFamily, shapes, path: Path):
    try:
        return architecture_from_shapes(family, shapes)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"{path}: the {family.label} weights are incomplete ({error} is missing or malformed);"
            " the file is damaged or not a full model."
        ) from None


def _init_arguments(config: Mapping) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def text_encoder_class(layout: TextEncoderLayout) -> type[TextEncoder]:
    return CLIPTextModelWithProjection if layout.with_projection else CLIPTextModel


def _text_encoder_links(model_keys, layout: TextEncoderLayout) -> dict[str, KeyLink]:
    return (open_clip_links if layout.open_clip else clip_links)(model_keys, layout.prefix)


def _component_prefixes(family: ModelFamily) -> tuple[str, ...]:
    return (UNET_PREFIX, VAE_PREFIX, *(layout.prefix for layout in TEXT_ENCODER_LAYOUTS[family]))


def _unused_keys(checkpoint: AliasedCheckpoint, components, family: ModelFamily) -> list[str]:
    """OpenCLIP tensors the converted text model leaves out: layers past the ones used, projection, logit scale."""
    linked = {link.file_key for _, links in components for link in links.values()}
    unused = []
    for layout in TEXT_ENCODER_LAYOUTS[family]:
        if layout.open_clip:
            unused += [key for key in checkpoint.shapes() if key.startswith(layout.prefix) and key not in linked]
    return unused


def _check_keys(checkpoint: AliasedCheckpoint, components, family: ModelFamily, path: Path, unused: list[str]) -> None:
    shapes = checkpoint.shapes()
    missing, wrong_shape = [], []
    for module, links in components:
        model_shapes = {key: tuple(t.shape) for key, t in module.state_dict().items()}
        for key, link in links.items():
            expected = file_shape(model_shapes[key], link.reshape)
            if link.file_key not in shapes:
                missing.append(link.file_key)
            elif shapes[link.file_key] != expected:
                wrong_shape.append(f"{link.file_key} {shapes[link.file_key]} instead of {expected}")
    known = {link.file_key for _, links in components for link in links.values()} | set(unused)
    unexpected = [key for key in shapes if key.startswith(_component_prefixes(family)) and key not in known]
    problems = [(missing, "missing"), (wrong_shape, "with a wrong shape"), (unexpected, "unexpected")]
    report = "; ".join(f"{len(keys)} {what} (first: {', '.join(sorted(keys)[:3])})" for keys, what in problems if keys)
    if report:
        raise UserError(
            f"{path}: not a complete {family.label} checkpoint, its tensors do not match the model: {report}."
            " The file is damaged, or a merge left it incomplete."
        )


def _fill_module(
    module: torch.nn.Module, links: dict[str, KeyLink], checkpoint: AliasedCheckpoint, dtype: torch.dtype
) -> None:
    for key, link in links.items():
        file_tensor = checkpoint.read(link.file_key)
        tensor = to_model_tensor(file_tensor, link)
        kept = _assign(module, key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        if kept.untyped_storage().data_ptr() != file_tensor.untyped_storage().data_ptr():
            checkpoint.release(link.file_key)


def _assign(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Put the tensor into the module under `key`; returns what the module now holds."""
    owner_path, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_path)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(
            tensor.contiguous(), requires_grad=owner._parameters[name].requires_grad
        )
        return owner._parameters[name]
    owner._buffers[name] = tensor.contiguous()
    return owner._buffers[name]


def _load_diffusers_folder(
    folder: Path,
    expected: ModelFamily | None,
    v_parameterization: bool,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    tokenizer_cache_dir,
) -> StableDiffusionModel:
    for needed in ("unet", "vae", "text_encoder"):
        if not (folder / needed / "config.json").is_file():
            raise UserError(
                f"{folder}: not a Diffusers model folder ({needed}/config.json is missing);"
                " give a model folder or a single .safetensors/.ckpt file."
            )
    family = _folder_family(folder)
    check_family(family, expected, str(folder))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype, local_files_only=True)
    text_encoders = [
        text_encoder_class(layout).from_pretrained(folder / name, dtype=dtype, local_files_only=True)
        for name, layout in zip(TEXT_ENCODER_FOLDERS, TEXT_ENCODER_LAYOUTS[family])
    ]
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    folder_v = (
        scheduler_file.is_file() and json.loads(scheduler_file.read_text()).get("prediction_type") == "v_prediction"
    )
    v_prediction = v_parameterization or folder_v
    reason = (
        "--v_parameterization"
        if v_parameterization
        else "the folder's scheduler config"
        if folder_v
        else "default (no --v_parameterization)"
    )
    tokenizer_dirs = [folder / name for name in TOKENIZER_FOLDERS]
    tokenizers = load_tokenizers(family, tokenizer_dirs, cache_dir=tokenizer_cache_dir)
    model = StableDiffusionModel(family, v_prediction, unet, vae, text_encoders, tokenizers, str(folder), reason)
    for module in (unet, vae, *text_encoders):
        module.eval()
    return model


def _folder_family(folder: Path) -> ModelFamily:
    """SDXL has a second text encoder; SD2's OpenCLIP tower uses GELU where SD1's CLIP-L uses QuickGELU."""
    if (folder / "text_encoder_2" / "config.json").is_file():
        return ModelFamily.SDXL
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    return ModelFamily.SD2 if text_config.get("hidden_act") == "gelu" else ModelFamily.SD1


# ---------------------------------------------------------------- saving


def single_file_tensors(
    model: StableDiffusionModel, dtype: torch.dtype | None = None
) -> dict[str, tuple[TensorInfo, Callable[[], torch.Tensor]]]:
    """Every tensor of the single file, in LDM/SGM names, each produced on demand (key -> (info, producer))."""
    entries = {}
    for module, links in model.components():
        state = module.state_dict()
        for file_key, (reshape, keys) in _group_links(links).items():
            tensors = [state[key] for key in keys]
            info = TensorInfo(file_shape(tuple(tensors[0].shape), reshape), _save_dtype(tensors[0], dtype))
            entries[file_key] = (info, _producer(tensors, reshape))
    for key, tensor in _unused_or_fabricated(model).items():
        entries[key] = (TensorInfo(tuple(tensor.shape), _save_dtype(tensor, dtype)), _producer([tensor], Reshape.SAME))
    return entries


def save_stable_diffusion_checkpoint(
    model: StableDiffusionModel,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    title: str | None = None,
    epoch: int = 0,
    global_step: int = 0,
) -> None:
    """Write a single-file checkpoint, atomically: `.safetensors` with modelspec metadata, or a `.ckpt` holding
    `state_dict`, `epoch` and `global_step`. `dtype` casts every floating tensor (None keeps the model's)."""
    path = Path(path)
    metadata = checkpoint_modelspec(model.family, model.v_prediction, title or path.stem)
    write_single_file(path, single_file_tensors(model, dtype), metadata, epoch, global_step)


def write_single_file(
    path: str | os.PathLike,
    entries: Mapping[str, tuple[TensorInfo, Callable[[], torch.Tensor]]],
    metadata: Mapping[str, str] | None,
    epoch: int = 0,
    global_step: int = 0,
) -> None:
    """Write single-file tensors (key -> (info, producer)), each in its info's dtype, atomically: `.safetensors`
    with `metadata` (streamed, one tensor at a time), or a `.ckpt` holding `state_dict`, `epoch` and `global_step`."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        write_safetensors(path, entries, metadata)
    else:
        tensors = {key: source().to(info.dtype) for key, (info, source) in entries.items()}
        save_state_dict(path, tensors, epoch=epoch, global_step=global_step)


def save_diffusers_folder(
    model: StableDiffusionModel, folder: str | os.PathLike, dtype: torch.dtype | None = None
) -> None:
    """Write a Diffusers model folder (unet, vae, text encoders, tokenizers, scheduler, model_index.json)."""
    with atomic_folder(folder) as staging:
        for name, module in diffusers_modules(model).items():
            _save_module(module, staging / name, dtype)
        for name, tokenizer in zip(TOKENIZER_FOLDERS, model.tokenizers):
            tokenizer.save_pretrained(staging / name)
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config(), indent=2))
        (staging / "model_index.json").write_text(json.dumps(diffusers_model_index(model), indent=2))


def diffusers_modules(model: StableDiffusionModel) -> dict[str, torch.nn.Module]:
    """The model's modules under their Diffusers folder names."""
    return {"unet": model.unet, "vae": model.vae, **dict(zip(TEXT_ENCODER_FOLDERS, model.text_encoders))}


def _save_module(module: torch.nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    """config.json and the weights, cast on the way out (the model in memory keeps its dtype)."""
    weights_name = save_module_config(module, folder)
    tensors = {
        key: (TensorInfo(tuple(t.shape), _save_dtype(t, dtype)), _producer([t], Reshape.SAME))
        for key, t in module.state_dict().items()
    }
    write_safetensors(folder / weights_name, tensors, {"format": "pt"})


def save_module_config(module: torch.nn.Module, folder: Path) -> str:
    """Write a module's config.json into `folder`; returns the weights file name its from_pretrained looks for."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(module, ModelMixin):
        module.save_config(folder)
        return "diffusion_pytorch_model.safetensors"
    module.config.save_pretrained(folder)
    return "model.safetensors"


def diffusers_model_index(model: StableDiffusionModel) -> dict:
    """The `model_index.json` of a Diffusers folder holding this model."""
    index = {"_class_name": PIPELINE_CLASSES[model.family], "_diffusers_version": diffusers.__version__}
    for name, module in diffusers_modules(model).items():
        index[name] = ["diffusers" if isinstance(module, ModelMixin) else "transformers", type(module).__name__]
    for name in TOKENIZER_FOLDERS[: len(model.tokenizers)]:
        index[name] = ["transformers", "CLIPTokenizer"]
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    if model.family is ModelFamily.SDXL:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(
            safety_checker=[None, None],
            feature_extractor=[None, None],
            image_encoder=[None, None],
            requires_safety_checker=False,
        )
    return index


def _unused_or_fabricated(model: StableDiffusionModel) -> dict[str, torch.Tensor]:
    """The OpenCLIP tensors a reader of the original layout expects: those remembered at load, else made up."""
    fabricated = {}
    for encoder, layout in zip(model.text_encoders, TEXT_ENCODER_LAYOUTS[model.family]):
        if layout.open_clip:
            fabricated.update(_fabricated_open_clip_tensors(encoder, layout))
    return {**fabricated, **model.unused_tensors}


def _fabricated_open_clip_tensors(encoder: TextEncoder, layout: TextEncoderLayout) -> dict[str, torch.Tensor]:
    """As sd-scripts makes them: logit scale 1; for SD2 also a projection of ones and a copy of the last layer as
    the unused 24th."""
    p = layout.prefix
    tensors = {p + "logit_scale": torch.ones((), dtype=encoder.dtype)}
    if layout.with_projection:
        return tensors
    hidden, last = encoder.config.hidden_size, encoder.config.num_hidden_layers - 1
    tensors[p + "text_projection"] = torch.ones(hidden, hidden, dtype=encoder.dtype)
    state = encoder.state_dict()
    last_layer_links = open_clip_links([key for key in state if f"layers.{last}." in key], p)
    for file_key, (reshape, keys) in _group_links(last_layer_links).items():
        copied_key = file_key.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")
        tensors[copied_key] = to_file_tensor([state[key] for key in keys], reshape)
    return tensors


def _group_links(links: Mapping[str, KeyLink]) -> dict[str, tuple[Reshape, list[str]]]:
    """file key -> (reshape, the model keys that make it, in q, k, v order where fused)."""
    grouped: dict[str, tuple[Reshape, list[str]]] = {}
    for key, link in sorted(links.items(), key=lambda item: item[1].part):
        grouped.setdefault(link.file_key, (link.reshape, []))[1].append(key)
    return grouped


def _save_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def _producer(tensors: list[torch.Tensor], reshape: Reshape):
    return lambda: to_file_tensor(tensors, reshape)
