"""What differs between model families in training, behind one small interface (`TrainingFamily`) with one
implementation per family: SD 1.x / 2.x (`sd.py`, train_network.py) and SDXL (`sdxl.py`, sdxl_train_network.py).
The loop, saving, resuming, several processes and logging are written once, for both."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from library.model_files.stable_diffusion import StableDiffusionModel
from library.training.options import ModelOptions

TextOutputs = tuple[torch.Tensor, ...]  # the text encoders' outputs of a batch, as the family's U-Net call takes them


class TrainingFamily(ABC):
    """One model family's way of loading its base model, turning a batch's captions into the U-Net's conditioning
    and calling the U-Net."""

    latent_cache_suffix: str  # sd-scripts' suffix of the latent cache files

    def __init__(self, model: StableDiffusionModel, options: ModelOptions):
        self.model = model
        self.options = options
        self.compiled_unet: torch.nn.Module | None = None

    @property
    def unet(self) -> torch.nn.Module:
        """What the training step calls: the U-Net, compiled with --torch_compile (sample images use the model's)."""
        return self.model.unet if self.compiled_unet is None else self.compiled_unet

    def compile_unet(self, backend: str) -> None:
        """--torch_compile: compiled once, with the network already in it; the first steps take the compiling."""
        self.compiled_unet = torch.compile(self.model.unet, backend=backend)

    @classmethod
    @abstractmethod
    def load(cls, options: ModelOptions) -> StableDiffusionModel:
        """The base model, refused in one sentence when it belongs to the other script's family."""

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE runs in the mixed-precision dtype, or in float32 with --no_half_vae."""
        return torch.float32 if self.options.no_half_vae else self.options.weight_dtype

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.model.text_encoders

    def network_text_encoder(self) -> torch.nn.Module | list[torch.nn.Module]:
        """What a network module's create_network takes as `text_encoder`: the one model, or the list (SDXL)."""
        encoders = self.model.text_encoders
        return encoders[0] if len(encoders) == 1 else list(encoders)

    @staticmethod
    def token_ids(batch: dict) -> list[torch.Tensor]:
        """The batch's token ids, one (B, n, 77) tensor per tokenizer."""
        return [batch[key] for key in ("input_ids", "input_ids2") if batch.get(key) is not None]

    @abstractmethod
    def encode_text(self, token_ids: list[torch.Tensor]) -> TextOutputs:
        """The text encoders' outputs for token ids on the encoders' device."""

    @abstractmethod
    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextOutputs, batch: dict
    ) -> torch.Tensor:
        """The U-Net's prediction for the noisy latents, conditioned on the text outputs (and, for SDXL, the batch's
        sizes and crops)."""


def family_class(sdxl: bool) -> type[TrainingFamily]:
    from library.training.families.sd import StableDiffusionTraining
    from library.training.families.sdxl import SDXLTraining

    return SDXLTraining if sdxl else StableDiffusionTraining


def load_training_family(options: ModelOptions, sdxl: bool) -> TrainingFamily:
    """The base model of the script's family, loaded, with its family's way of training."""
    cls = family_class(sdxl)
    return cls(cls.load(options), options)
