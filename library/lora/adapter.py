"""What every LoRA-style module shares (networks.lora's and networks.dylora's): it adapts one Linear or Conv2d layer,
routes the layer's forward through itself, and adds multiplier * alpha / rank * (up @ down) to the layer's output
or, merged, to its weight (specs/lora_format.md section 3). The subclasses say which factors are in use."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from library.lora.factors import compose, lora_scale, merge_into
from library.lora.naming import ALPHA, DOWN, UP


class LayerAdapter(torch.nn.Module):
    """The layer is a plain attribute, not a registered submodule, so a network's state dict holds only the
    adapters' tensors. Subclasses register their factors and implement `factors()`."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float,
        lora_dim: int,
        alpha: float | None,
        block: int | None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.block = block
        self.register_buffer(ALPHA, torch.tensor(float(alpha or lora_dim)))
        self.multiplier = multiplier
        self.enabled = True
        object.__setattr__(self, "org_module", org_module)  # a plain attribute, not a registered submodule
        self.org_forward = None

    @property
    def uses_conv_rank(self) -> bool:
        """A kxk conv (k > 1), whose rank and alpha come from conv_dim / conv_alpha."""
        return isinstance(self.org_module, torch.nn.Conv2d) and tuple(self.org_module.kernel_size) != (1, 1)

    def apply_to(self) -> None:
        """Route the layer's forward through this module; the layer keeps its weights."""
        if self.org_forward is None:
            self.org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(up, down, scale): the delta the module adds at multiplier 1 is scale * (up @ down)."""
        raise NotImplementedError

    # The LoRA path is written with functional calls and fused operations because at small batches the step is
    # bound by the host's kernel launches: a Linear adds two kernels (down, then up + scale + add in one addmm),
    # a conv three. The down projection of a conv has the layer's stride and padding, the up projection is 1x1.
    def project_down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if isinstance(self.org_module, torch.nn.Conv2d):
            return F.conv2d(x, down, None, self.org_module.stride, self.org_module.padding)
        return F.linear(x, down)

    def add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
        """y + scale * up(h)."""
        if isinstance(self.org_module, torch.nn.Conv2d):
            return torch.add(y, F.conv2d(h, up), alpha=scale)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(), alpha=scale)
        return flat.view(y.shape)

    def get_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The weight delta multiplier * scale * (up @ down), shaped like the layer's weight (float32)."""
        multiplier = self.multiplier if multiplier is None else multiplier
        up, down, scale = self.factors()
        return compose(up, down, self.org_module.weight.shape) * (multiplier * scale)

    @torch.no_grad()
    def merge_to(
        self,
        sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Add multiplier * alpha / rank * (up @ down) into the layer's weight, from `sd` (this module's keys
        without the name; no alpha means alpha = rank) or from the module's own factors. The delta is computed on
        `device` (default: where the weight is) and added in float32; the weight keeps its dtype. `dtype` is accepted
        for sd-scripts' signature."""
        if sd:
            up, down, scale = sd[UP], sd[DOWN], lora_scale(sd.get(ALPHA), sd[DOWN].shape[0])
        else:
            up, down, scale = self.factors()
        weight = self.org_module.weight
        if device is None or torch.device(device) == weight.device:
            merge_into(weight, up, down, self.multiplier * scale)
            return
        merged = weight.to(device)
        merge_into(merged, up, down, self.multiplier * scale)
        weight.copy_(merged)
