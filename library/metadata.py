"""Metadata written into saved `.safetensors` files: the SAI ModelSpec (`modelspec.*`) keys, sd-scripts' `ss_*`
keys of a LoRA and its `sshs_*` hashes (specs/lora_format.md section 11)."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from library.model_files.containers import safetensors_chunks, tensor_sources
from library.model_files.family import ModelFamily

MODELSPEC_VERSION = "1.0.1"
DISTRIBUTION = "sd-lora-suite"
GENERATIVE_MODELS_URL = "https://github.com/Stability-AI/generative-models"


def modelspec_architecture(family: ModelFamily, v_prediction: bool, lora: bool = False) -> str:
    base = {
        ModelFamily.SD1: "stable-diffusion-v1",
        ModelFamily.SD2: "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512",
        ModelFamily.SDXL: "stable-diffusion-xl-v1-base",
    }[family]
    return f"{base}/lora" if lora else base


def default_resolution(family: ModelFamily, v_prediction: bool) -> str:
    side = 1024 if family is ModelFamily.SDXL else 768 if family is ModelFamily.SD2 and v_prediction else 512
    return f"{side}x{side}"


def checkpoint_modelspec(family: ModelFamily, v_prediction: bool, title: str) -> dict[str, str]:
    """ModelSpec of a full (merged or converted) checkpoint."""
    return _modelspec(family, v_prediction, title, lora=False, resolution=None)


def lora_modelspec(
    family: ModelFamily, v_prediction: bool, title: str, resolution: str | None = None
) -> dict[str, str]:
    """ModelSpec of a LoRA; sd-scripts names the implementation `diffusers` for SD1/SD2 LoRAs."""
    return _modelspec(family, v_prediction, title, lora=True, resolution=resolution)


def _modelspec(
    family: ModelFamily, v_prediction: bool, title: str, lora: bool, resolution: str | None
) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family, v_prediction, lora),
        "modelspec.implementation": "diffusers" if lora and family is not ModelFamily.SDXL else GENERATIVE_MODELS_URL,
        "modelspec.title": title,
        "modelspec.resolution": resolution or default_resolution(family, v_prediction),
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": f"{DISTRIBUTION}/{_installed_version()}",
    }


def merged_from(sources: Sequence[tuple[Path, Mapping[str, str]]]) -> dict[str, str]:
    """`modelspec.merged_from` of a merged file: the inputs' titles (`modelspec.title`, else the file name without its
    suffix), joined by ", ", as sd-scripts writes it."""
    titles = [metadata.get("modelspec.title") or Path(path).stem for path, metadata in sources]
    return {"modelspec.merged_from": ", ".join(titles)}


def _installed_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- sd-scripts keys of a LoRA

DYNAMIC = "Dynamic"  # ss_network_dim / ss_network_alpha when modules differ


def base_model_version(family: ModelFamily, v_prediction: bool) -> str:
    """`ss_base_model_version`: sd_v1, sd_v2, sd_v1_v, sd_v2_v or sdxl_base_v1-0."""
    if family is ModelFamily.SDXL:
        return "sdxl_base_v1-0"
    return f"sd_v{1 if family is ModelFamily.SD1 else 2}" + ("_v" if v_prediction else "")


def declared_base_model(metadata: Mapping[str, str]) -> tuple[ModelFamily, bool] | None:
    """The (family, v-prediction) a LoRA's `ss_base_model_version` names, or None when it names none."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return ModelFamily.SDXL, False
    for family in (ModelFamily.SD1, ModelFamily.SD2):
        for v_prediction in (False, True):
            if version == base_model_version(family, v_prediction):
                return family, v_prediction
    return None


def trained_for_note(metadata: Mapping[str, str]) -> str:
    """' (the file says it was trained for <ss_base_model_version>)', or '' when the file does not say."""
    version = metadata.get("ss_base_model_version")
    return f" (the file says it was trained for {version})" if version else ""


def common_value(values: list[str], fallback: str) -> str:
    """The one value all modules share, `Dynamic` when they differ, `fallback` when there are none."""
    distinct = set(values)
    return fallback if not distinct else values[0] if len(distinct) == 1 else DYNAMIC


def lora_network_metadata(
    network_module: str,
    dim: str,
    alpha: str,
    network_args: Mapping[str, str] | None,
    family: ModelFamily | None,
    v_prediction: bool,
) -> dict[str, str]:
    """The minimum `ss_*` keys every LoRA file carries (what `--no_metadata` keeps); without a family (a tool's
    inputs did not tell it) `ss_v2` and `ss_base_model_version` are left out."""
    metadata = {"ss_network_module": network_module, "ss_network_dim": dim, "ss_network_alpha": alpha}
    if family is not None:
        metadata["ss_v2"] = str(family is ModelFamily.SD2)
        metadata["ss_base_model_version"] = base_model_version(family, v_prediction)
    if network_args:
        metadata["ss_network_args"] = json.dumps(dict(network_args))
    return metadata


# ---------------------------------------------------------------- sshs_* hashes

LEGACY_HASH_WINDOW = (0x100000, 0x110000)  # the 64 KiB at offset 1 MiB of the serialized file


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` of the tensors as they will be saved (after any dtype cast),
    serialized as safetensors with only the `ss_*` metadata: the model hash is the sha256 of the tensor data (what
    AUTOMATIC1111 computes from the file), the legacy hash the first 8 hex digits of the sha256 of the window."""
    hashed_metadata = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    model_hash, window, position = hashlib.sha256(), bytearray(), 0
    begin, end = LEGACY_HASH_WINDOW
    for index, chunk in enumerate(safetensors_chunks(tensor_sources(tensors), hashed_metadata)):
        chunk = memoryview(chunk).cast("B")
        if index:  # the first chunk is the header
            model_hash.update(chunk)
        window += chunk[max(begin - position, 0) : max(end - position, 0)]
        position += len(chunk)
    return {"sshs_model_hash": model_hash.hexdigest(), "sshs_legacy_hash": hashlib.sha256(window).hexdigest()[:8]}
