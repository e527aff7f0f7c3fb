"""--fp8_base / --fp8_base_unet: the frozen base model's Linear and conv weights stored as float8_e4m3fn (half the
memory of bf16), each cast to the run's dtype when its layer runs. Biases, norms and embeddings keep the run's
dtype: they are small, and sd-scripts keeps its text encoders' embeddings out of fp8 too. The LoRA wraps the layer's
forward, so it adds its delta to the upcast layer's output as usual."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def store_weights_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Convert every plain Linear and Conv2d weight of `module` (frozen, already on its device) to FP8; returns
    how many layers were converted."""
    count = 0
    for layer in module.modules():
        if type(layer) in (torch.nn.Linear, torch.nn.Conv2d):
            layer.weight.data = layer.weight.data.to(FP8)
            layer.forward = _upcasting_forward(layer, compute_dtype)
            count += 1
    return count


def _upcasting_forward(layer: torch.nn.Module, dtype: torch.dtype):
    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight.to(dtype), _cast(layer.bias, dtype))

    def conv(x: torch.Tensor) -> torch.Tensor:
        return layer._conv_forward(x, layer.weight.to(dtype), _cast(layer.bias, dtype))

    return linear if isinstance(layer, torch.nn.Linear) else conv


def _cast(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype)
