"""Model families (SD1.x, SD2.x, SDXL base), recognised from a checkpoint's keys and shapes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from library.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class ModelFamily(enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[self.value]


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where one text encoder lives in a single file and how it is stored there."""

    prefix: str
    open_clip: bool  # OpenCLIP names (resblocks, fused in_proj) instead of Hugging Face CLIP names
    with_projection: bool  # the model keeps `text_projection` (SDXL's second encoder)


TEXT_ENCODER_LAYOUTS: dict[ModelFamily, tuple[TextEncoderLayout, ...]] = {
    ModelFamily.SD1: (TextEncoderLayout("cond_stage_model.transformer.", open_clip=False, with_projection=False),),
    ModelFamily.SD2: (TextEncoderLayout("cond_stage_model.model.", open_clip=True, with_projection=False),),
    ModelFamily.SDXL: (
        TextEncoderLayout("conditioner.embedders.0.transformer.", open_clip=False, with_projection=False),
        TextEncoderLayout("conditioner.embedders.1.model.", open_clip=True, with_projection=True),
    ),
}

# Folder names of the shipped configs for each family.
CONFIG_NAMES = {ModelFamily.SD1: "sd15", ModelFamily.SD2: "sd21v", ModelFamily.SDXL: "sdxl"}


def detect_family(shapes: Mapping[str, tuple[int, ...]], source: str) -> ModelFamily:
    """Tell SD1.x, SD2.x and SDXL base apart by their text encoders, as in specs/checkpoints.md section 2.2."""
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise UserError(
            f"{source}: no U-Net weights (keys under '{UNET_PREFIX}'); this is not a Stable Diffusion checkpoint"
            " (a LoRA, a VAE or an embedding?). Pass a full SD1.x, SD2.x or SDXL model."
        )
    if any(key.startswith("conditioner.embedders.1.model.") for key in shapes):
        return ModelFamily.SDXL
    if any(key.startswith("conditioner.embedders.0.model.") for key in shapes):
        raise UserError(
            f"{source}: this is an SDXL refiner checkpoint, which is not supported; use an SDXL base model."
        )
    if any(key.startswith("cond_stage_model.model.") for key in shapes):
        return ModelFamily.SD2
    if any(key.startswith("cond_stage_model.transformer.") for key in shapes):
        return ModelFamily.SD1
    raise UserError(
        f"{source}: the text encoder weights are missing (no 'cond_stage_model.' or 'conditioner.' keys);"
        " the file is incomplete."
    )


FAMILY_FLAGS = {ModelFamily.SD1: "--v1", ModelFamily.SD2: "--v2", ModelFamily.SDXL: "--sdxl"}


def family_from_flags(v1: bool = False, v2: bool = False, sdxl: bool = False) -> ModelFamily | None:
    """The family that `--v1`/`--v2`/`--sdxl` ask for, or None when no flag is given."""
    wanted = [
        family for family, given in ((ModelFamily.SD1, v1), (ModelFamily.SD2, v2), (ModelFamily.SDXL, sdxl)) if given
    ]
    if len(wanted) > 1:
        raise UserError(
            f"{' and '.join(FAMILY_FLAGS[f] for f in wanted)} name different model families; give at most one."
        )
    return wanted[0] if wanted else None


def check_family(detected: ModelFamily, expected: ModelFamily | None, source: str) -> None:
    """A family flag confirms what the weights say; a contradiction is reported instead of a failed load."""
    if expected is not None and expected != detected:
        flag = FAMILY_FLAGS[expected]
        raise UserError(
            f"{source}: {flag} was given, but the file is an {detected.label} model;"
            f" remove {flag} or pick the right file."
        )


def detect_v_prediction(metadata: Mapping[str, str], keys, v_parameterization_flag: bool) -> tuple[bool, str]:
    """v-prediction cannot be seen in the weights: the flag decides, else the file's own marks. Returns (v, why)."""
    if v_parameterization_flag:
        return True, "--v_parameterization"
    if metadata.get("modelspec.prediction_type") == "v" or metadata.get("modelspec.architecture", "").endswith("-v"):
        return True, "the file's modelspec metadata"
    if "v_pred" in keys:
        return True, "the file's 'v_pred' marker"
    return False, "default (no --v_parameterization)"
