"""LyCORIS modules in a LoRA file: LoCon with a Tucker core, LoHa, LoKr, and DoRA's `dora_scale` on any of them, read
into the weight change each one defines, so that the tools can merge them exactly and turn them into plain LoRAs.

The formulas are LyCORIS's (the `lycoris-lora` package, which the tests check them against); `scale` is alpha / rank
(1 when the file has no alpha):
* LoCon: up @ down * scale; with `lora_mid` (Tucker), the core contracted with up and down.
* LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * scale, the product taken element by element; with `hada_t1`/`hada_t2`,
  each factor is its Tucker rebuild.
* LoKr: kron(w1, w2) * scale, each side full or a product of two factors (w2 possibly with a Tucker core); when
  neither side is factorised the scale is 1, as LyCORIS saves it.
* DoRA (`dora_scale`, the magnitude m): the adapted weight is V * m / ||V|| with V = W + delta, the norm taken per
  output row (LyCORIS's default) or per input column, as the shape of m says. At strength s the weight is
  W + s * (that - W), as AUTOMATIC1111 and ComfyUI apply it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from library.errors import UserError

DORA_SCALE = "dora_scale"
ALPHA_KEY = "alpha"
LYCORIS_UNET_PREFIX = "lycoris_"  # SimpleTuner / LycorisNetwork files: U-Net modules named lycoris_<diffusers path>

_ALGORITHM_PARTS = {
    "LoCon": ({"lora_down.weight", "lora_up.weight"}, {"lora_mid.weight"}),
    "LoHa": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
    "LoKr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
}
_COMMON_PARTS = {ALPHA_KEY, DORA_SCALE}


def lycoris_algorithm(parts: set[str]) -> str | None:
    """The LyCORIS algorithm whose key grammar `parts` (the keys of one module after its name) follow, or None."""
    for algorithm, (required, optional) in _ALGORITHM_PARTS.items():
        if required <= parts and parts <= required | optional | _COMMON_PARTS and parts - _COMMON_PARTS:
            return algorithm
    return None


@dataclass(frozen=True)
class LycorisModule:
    """One LyCORIS module's tensors, with the weight shape of the layer it adapts once that is known (a LoHa on a
    conv layer stores its factors flattened, so only the layer tells its kernel)."""

    algorithm: str  # LoCon, LoHa or LoKr
    tensors: Mapping[str, torch.Tensor]  # the module's keys after its name, alpha and dora_scale included
    shape: tuple[int, ...] | None = None

    @classmethod
    def read(cls, name: str, algorithm: str, tensors: Mapping[str, torch.Tensor], source: str) -> LycorisModule:
        module = cls(algorithm, dict(tensors))
        if algorithm == "LoKr" and not (
            ({"lokr_w1"} <= tensors.keys() or {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys())
            and ({"lokr_w2"} <= tensors.keys() or {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys())
        ):
            raise UserError(
                f"{source}: LoKr module '{name}' lacks lokr_w1 or lokr_w2 (or their factors); the file is"
                " incomplete or damaged."
            )
        return replace(module, shape=module._shape_from_tensors())

    @property
    def description(self) -> str:
        tucker = any(key in self.tensors for key in ("lora_mid.weight", "hada_t1", "lokr_t2"))
        return self.algorithm + (" (Tucker)" if tucker else "") + (" with DoRA" if self.dora_scale is not None else "")

    @property
    def dora_scale(self) -> torch.Tensor | None:
        return self.tensors.get(DORA_SCALE)

    @property
    def out_features(self) -> int:
        return self._stored_shape()[0]

    @property
    def flat_in_features(self) -> int:
        """in * kh * kw of the layer: what the module's delta holds per output row."""
        return math.prod(self._stored_shape()[1:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape is None:
            raise ValueError("the layer shape of this LyCORIS module is not known yet")
        return self.shape

    @property
    def uses_conv_rank(self) -> bool:
        return len(self.weight_shape) == 4 and tuple(self.weight_shape[2:]) != (1, 1)

    def fits(self, shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether the module can adapt a layer whose weight has `shape`."""
        shape = tuple(shape)
        if self.shape is not None and len(self.shape) == 4 and len(shape) == 4:
            return self.shape == shape
        return self.out_features == shape[0] and self.flat_in_features == math.prod(shape[1:])

    def for_layer(self, shape: tuple[int, ...] | torch.Size) -> LycorisModule:
        """The module with the layer's weight shape, which `fits` must accept."""
        return replace(self, shape=tuple(shape))

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None for a LoKr with neither side factorised."""
        if self.algorithm == "LoKr":
            factor = self.tensors.get("lokr_w1_b", self.tensors.get("lokr_w2_b"))
            return None if factor is None else factor.shape[0]
        return self.tensors["lora_down.weight" if self.algorithm == "LoCon" else "hada_w1_b"].shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without alpha, and for a LoKr with neither side factorised (as LyCORIS saves it)."""
        alpha = self.tensors.get(ALPHA_KEY)
        alpha = float(alpha) if alpha is not None else 0.0
        return alpha / self.rank if alpha and self.rank else 1.0

    def change_norm(self) -> float:
        """The Frobenius norm of the change at strength 1 (without DoRA's rescaling); no layer shape needed."""
        return float(self._delta_unshaped().double().norm()) * abs(self.scale)

    def delta(self) -> torch.Tensor:
        """The weight change at strength 1 (without DoRA's rescaling), float32, shaped like the layer's weight."""
        return (self._delta_unshaped() * self.scale).reshape(self.weight_shape)

    def adapted(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The layer's weight with the module applied at `strength`, in float32."""
        weight = weight.float()
        delta = self.delta().to(weight.device)
        if self.dora_scale is None:
            return weight + strength * delta
        return weight + strength * (_weight_decomposed(weight + delta, self.dora_scale.to(weight.device)) - weight)

    def _part(self, key: str) -> torch.Tensor:
        return self.tensors[key].float()

    def _delta_unshaped(self) -> torch.Tensor:
        """The unscaled change, with the kernel axes where the tensors carry them, else flattened (out, in*k*k)."""
        if self.algorithm == "LoCon":
            up, down = self._part("lora_up.weight"), self._part("lora_down.weight")
            if "lora_mid.weight" in self.tensors:
                return _tucker(self._part("lora_mid.weight"), up.flatten(1).T, down.flatten(1))
            return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        if self.algorithm == "LoHa":
            return self._hadamard_factor(1) * self._hadamard_factor(2)
        return _kron(self._kron_side(1), self._kron_side(2))

    def _hadamard_factor(self, index: int) -> torch.Tensor:
        a, b = self._part(f"hada_w{index}_a"), self._part(f"hada_w{index}_b")
        core = self.tensors.get(f"hada_t{index}")
        return a @ b if core is None else _tucker(core.float(), a, b)

    def _kron_side(self, index: int) -> torch.Tensor:
        if f"lokr_w{index}" in self.tensors:
            return self._part(f"lokr_w{index}")
        a, b = self._part(f"lokr_w{index}_a"), self._part(f"lokr_w{index}_b")
        core = self.tensors.get(f"lokr_t{index}")
        if core is not None:
            return _tucker(core.float(), a, b)
        return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])

    def _stored_shape(self) -> tuple[int, ...]:
        """The shape of `_delta_unshaped`, from the tensors' shapes alone."""
        if self.algorithm == "LoCon":
            down = self._dims("lora_down.weight")
            kernel = self._dims("lora_mid.weight")[2:] if "lora_mid.weight" in self.tensors else down[2:]
            return (self._dims("lora_up.weight")[0], down[1], *kernel)
        if self.algorithm == "LoHa":
            if "hada_t1" in self.tensors:
                return (self._dims("hada_w1_a")[1], self._dims("hada_w1_b")[1], *self._dims("hada_t1")[2:])
            return (self._dims("hada_w1_a")[0], self._dims("hada_w1_b")[1])
        sides = []
        for index in (1, 2):
            if f"lokr_w{index}" in self.tensors:
                sides.append(self._dims(f"lokr_w{index}"))
            elif f"lokr_t{index}" in self.tensors:
                core = self._dims(f"lokr_t{index}")
                sides.append((self._dims(f"lokr_w{index}_a")[1], self._dims(f"lokr_w{index}_b")[1], *core[2:]))
            else:
                sides.append((self._dims(f"lokr_w{index}_a")[0], *self._dims(f"lokr_w{index}_b")[1:]))
        first, second = sides
        first = first + (1,) * (len(second) - len(first))
        return tuple(a * b for a, b in zip(first, second))

    def _dims(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def _shape_from_tensors(self) -> tuple[int, ...] | None:
        """The layer's weight shape where the tensors tell it: a conv when they carry kernel axes; a Linear for 2-D
        LoCon factors; unknown for 2-D LoHa and LoKr factors, which a conv's come flattened to as well, unless a 2-D
        DoRA magnitude says Linear."""
        stored = self._stored_shape()
        if len(stored) == 4 or self.algorithm == "LoCon":
            return stored
        if self.dora_scale is not None and self.dora_scale.dim() == 2:
            return stored
        return None


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild: core (r, r, k, k) contracted with a (r, out) and b (r, in) to (out, in, k, k)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, a, b.flatten(1))


def _kron(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2), w1 given trailing unit axes to match a conv's w2 (which carries the kernel)."""
    first = first.reshape(*first.shape, *([1] * (second.dim() - first.dim())))
    return torch.kron(first, second)


def _weight_decomposed(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: `weight` rescaled to the magnitude per output row ((out, 1, ...) magnitudes) or per input column."""
    units = [1] * (weight.dim() - 2)
    if magnitude.shape[0] == weight.shape[0] and magnitude[0].numel() == 1:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1)
        axes = (weight.shape[0], 1, *units)
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        axes = (1, weight.shape[1], *units)
    ratio = magnitude.float().reshape(-1) / (norm + torch.finfo(weight.dtype).eps)
    return weight * ratio.reshape(axes)
