"""Metadata written into saved `.safetensors` files: the SAI ModelSpec (`modelspec.*`) keys."""

from __future__ import annotations

import datetime

from library.model_files.family import ModelFamily

MODELSPEC_VERSION = "1.0.1"
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
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family, v_prediction),
        "modelspec.implementation": GENERATIVE_MODELS_URL,
        "modelspec.title": title,
        "modelspec.resolution": default_resolution(family, v_prediction),
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
