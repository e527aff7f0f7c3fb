"""LoRA files: reading them into per-module factors with the key grammar checked, and saving them with the
`sshs_*` hashes computed over exactly the bytes that are written (specs/lora_format.md sections 2, 11.2, 14)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from library.errors import UserError
from library.file_io import atomic_output
from library.lora.naming import ALPHA, DOWN, LORA_PARTS, UP
from library.metadata import sshs_hashes
from library.model_files.containers import PICKLE_SUFFIXES, open_checkpoint, tensor_sources, write_safetensors

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")


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
    def alpha_value(self) -> float:
        """The alpha the scale uses: the stored value, or the rank when there is none (or it is 0)."""
        alpha = float(self.alpha) if self.alpha is not None else 0.0
        return alpha or float(self.rank)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a LoRA file (`.safetensors` or a torch pickle) and its metadata (empty for pickles)."""
    checkpoint = open_checkpoint(path)
    return {key: checkpoint.read(key) for key in checkpoint.keys()}, dict(checkpoint.metadata)


def split_modules(weights: Mapping[str, torch.Tensor], source: str) -> dict[str, ModuleFactors]:
    """Group `<module>.lora_down.weight`, `<module>.lora_up.weight` and `<module>.alpha` by module, checking the
    key grammar: other keys, a module without both factors or factors of different ranks are reported."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name, _, part = key.partition(".")
        if part not in LORA_PARTS:
            raise UserError(
                f"{source}: key '{key}' is not part of a LoRA-LierLa/C3Lier file (each module has only {', '.join(LORA_PARTS)});"
                " the file was made for another network type (LyCORIS, OFT, DoRA, PEFT names?), which networks.lora cannot load."
            )
        parts.setdefault(name, {})[part] = tensor
    modules = {}
    for name, tensors in parts.items():
        if DOWN not in tensors or UP not in tensors:
            missing = DOWN if DOWN not in tensors else UP
            raise UserError(f"{source}: module '{name}' has no {missing}; the file is incomplete or damaged.")
        factors = ModuleFactors(tensors[DOWN], tensors[UP], tensors.get(ALPHA))
        if factors.down.dim() < 2 or factors.up.dim() < 2 or factors.up.shape[1] != factors.rank:
            raise UserError(
                f"{source}: module '{name}' has lora_down of shape {tuple(factors.down.shape)} and lora_up of shape"
                f" {tuple(factors.up.shape)}, which do not make a rank-r pair; the file is damaged."
            )
        modules[name] = factors
    return modules


def save_lora_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], dtype: torch.dtype | None = None) -> None:
    """Save a LoRA atomically: every tensor (alpha included) cast to `dtype` when given; `.safetensors` gets the
    metadata plus the `sshs_*` hashes of the cast tensors, a torch pickle (`.ckpt`, `.pt`) the bare tensors."""
    path = Path(path)
    final = {key: tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous() for key, tensor in tensors.items()}
    if path.suffix.lower() == ".safetensors":
        write_safetensors(path, tensor_sources(final), {**metadata, **sshs_hashes(final, metadata)})
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        with atomic_output(path) as temporary:
            torch.save(final, temporary)
    else:
        raise UserError(f"{path}: unknown LoRA file type '{path.suffix}'; use one of {', '.join(LORA_SUFFIXES)}.")

