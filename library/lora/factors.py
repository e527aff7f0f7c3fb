"""LoRA math: the scale alpha / rank and the weight delta up @ down for Linear, 1x1 and kxk conv layers
(specs/lora_format.md section 3, invariant 7)."""

from __future__ import annotations

import torch


def lora_scale(alpha: float | torch.Tensor | None, rank: int) -> float:
    """alpha / rank; a missing or zero alpha means alpha = rank, so the scale is 1."""
    alpha = float(alpha) if alpha is not None else 0.0
    return (alpha if alpha else rank) / rank


def compose(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The weight delta up @ down in float32, shaped like the target weight.

    down is [r, in] or [r, in, k, k] and up is [out, r] or [out, r, 1, 1]; for a conv the product
    up[out, r] @ down[r, in*k*k] is the kernel [out, in, k, k]. Either factor may carry a 1x1 layer's weight in
    2-D or 4-D form (SD2's proj_in/proj_out come both ways)."""
    rank = down.shape[0]
    delta = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
    return delta.reshape(weight_shape)


def added(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, coefficient: float) -> torch.Tensor:
    """W + coefficient * (up @ down) in float32."""
    return weight.float() + coefficient * compose(up.to(weight.device), down.to(weight.device), weight.shape)


def merge_into(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, multiplier_times_scale: float) -> None:
    """W <- W + multiplier * scale * (up @ down), added in float32 and stored back in W's dtype, in place."""
    weight.copy_(added(weight, up, down, multiplier_times_scale).to(weight.dtype))
