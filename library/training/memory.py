"""Peak CUDA memory: the start-up estimate (weights, LoRA and optimizer, activations), and the options that would
reduce it, said when a run runs out of memory.

The activation figures are the computed memory model of specs/performance.md section 1.3: the tensors autograd keeps
for the backward pass with SDPA attention, per sample, for SD1.5 at 512x512 and SDXL at 1024x1024, here scaled by the
largest bucket's pixel count (SDPA keeps nothing quadratic in it)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from library.model_files.family import ModelFamily
from library.training.options import TrainingOptions

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and the allocator's slack (0.3-0.6 GB in the spec)
# GiB of saved activations of one sample of (pixels): without and with gradient checkpointing
ACTIVATIONS = {
    ModelFamily.SD1: (512 * 512, (0.90, 0.15)),
    ModelFamily.SD2: (512 * 512, (0.90, 0.15)),
    ModelFamily.SDXL: (1024 * 1024, (6.54, 0.54)),
}
# bytes of optimizer state per trained parameter (AdamW: two float32 moments)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "pagedadamw8bit": 2, "lion": 4, "lion8bit": 1, "sgdnesterov": 4}
DEFAULT_STATE_BYTES = 8


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # GiB of frozen weights on the device
    training: float  # the LoRA's weights, gradients and optimizer state
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.training + self.activations + CUDA_CONTEXT_GIB

    def line(self) -> str:
        return (
            f"estimated peak memory on a CUDA device: about {self.total:.1f} GiB (base weights {self.weights:.1f}, "
            f"LoRA and optimizer {self.training:.1f}, activations {self.activations:.1f}, "
            f"CUDA context {CUDA_CONTEXT_GIB})"
        )


def measured_peak_line(device: torch.device) -> str:
    """The peak memory measured so far: the CUDA allocator's on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return (
            f"measured after the first step: peak CUDA memory {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return f"measured after the first step: peak host memory {peak / GIB:.1f} GiB (this process)"


def estimate_peak_memory(
    options: TrainingOptions,
    family: ModelFamily,
    device_modules: list[torch.nn.Module],
    network: torch.nn.Module,
    largest_bucket: tuple[int, int],
    batch_size: int,
) -> MemoryEstimate:
    """The estimate for the modules that sit on the device during training, the network and the largest batch."""
    weights = sum(_bytes(parameter) for module in device_modules for parameter in module.parameters())
    trained = sum(parameter.numel() for parameter in network.parameters() if parameter.requires_grad)
    element = torch.finfo(options.model.network_dtype).bits // 8
    state = OPTIMIZER_STATE_BYTES.get(options.optimizer.name.lower(), DEFAULT_STATE_BYTES)
    reference_pixels, per_sample = ACTIVATIONS[family]
    activations = (
        per_sample[options.model.gradient_checkpointing] * largest_bucket[0] * largest_bucket[1] / reference_pixels
    )
    return MemoryEstimate(weights / GIB, trained * (2 * element + state) / GIB, activations * batch_size)


def _bytes(parameter: torch.Tensor) -> int:
    return parameter.numel() * parameter.element_size()


def out_of_memory_advice(options: TrainingOptions, batch_size: int) -> str:
    """The options that would lower the peak, from those this run does not use yet, as one sentence."""
    model, network, ideas = options.model, options.network, []
    if not model.gradient_checkpointing:
        ideas.append("--gradient_checkpointing")
    if not options.dataset.cache_latents:
        ideas.append("--cache_latents")
    if options.sdxl and not options.text_encoder_caching.in_memory:
        ideas.append("--network_train_unet_only with --cache_text_encoder_outputs")
    elif network.train_text_encoder:
        ideas.append("--network_train_unet_only")
    if options.optimizer.name.lower() == "adamw":
        ideas.append("--optimizer_type AdamW8bit")
    if model.mixed_precision == "no":
        ideas.append("--mixed_precision bf16")
    elif not model.fp8_base and not model.fp8_base_unet:
        ideas.append("--fp8_base")
    if batch_size > 1:
        ideas.append(f"a batch size below {batch_size}")
    if (network.network_dim or 4) > 32:
        ideas.append(f"a --network_dim below {network.network_dim}")
    ideas.append("a lower resolution")
    return "; ".join(ideas)
