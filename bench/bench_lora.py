"""Benchmark: what networks.lora costs on the real-size SD1.5 U-Net (random weights) at 512x512 (64x64 latents).

Measured, each as the median of `--repeats` timed runs after warm-up:
- the forward with no LoRA, and with a LoRA-LierLa network applied (rank `--network_dim`, U-Net modules only);
- a training step's LoRA overhead: forward + backward with the LoRA trained, against forward + backward of the
  plain U-Net with gradients flowing only to the input (the frozen layers' input gradients, which a LoRA step
  needs anyway);
- merging the network into the U-Net's weights once.
On CUDA the U-Net runs in `--dtype` (bf16 by default) under autocast with the LoRA weights in float32, as in
training; on the CPU everything is float32. Results are printed and appended as JSON lines to bench/results.jsonl.

    python bench/bench_lora.py [--batch_size 1] [--network_dim 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench_common import build_sd15_unet, device_name, record_result, synchronize


def timed_pair(plain, with_lora, repeats: int, device: torch.device, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of each function, called alternately so that drifting machine speed affects both alike;
    CUDA work is synchronised only at the edges of each call."""
    for _ in range(warmup):
        plain()
        with_lora()
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, record in zip((plain, with_lora), seconds):
            synchronize(device)
            started = time.perf_counter()
            function()
            synchronize(device)
            record.append(time.perf_counter() - started)
    return statistics.median(seconds[0]), statistics.median(seconds[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--latent_size", type=int, default=64, help="64 = 512x512 images")
    parser.add_argument("--network_dim", type=int, default=32)
    parser.add_argument("--network_alpha", type=float, default=16)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="the U-Net's dtype on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from networks.lora import create_network

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if device.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    plain_unet, lora_unet = build_sd15_unet(device, dtype), build_sd15_unet(device, dtype)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(
        args.batch_size, 4, args.latent_size, args.latent_size, device=device, dtype=dtype, generator=generator
    )
    context = torch.randn(
        args.batch_size, 77, plain_unet.config.cross_attention_dim, device=device, dtype=dtype, generator=generator
    )
    timesteps = torch.full((args.batch_size,), 500, device=device)

    network = create_network(1.0, args.network_dim, args.network_alpha, None, None, lora_unet)
    network.apply_to(None, lora_unet, apply_text_encoder=False, apply_unet=True)
    network.to(device)  # float32 LoRA weights; autocast runs the LoRA path in the U-Net's dtype
    network.prepare_grad_etc()
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(0, 0.01)

    def forward(unet):
        with torch.no_grad(), autocast:
            unet(latents, timesteps, context)

    def step(unet, inputs: torch.Tensor):
        with autocast:
            loss = unet(inputs, timesteps, context).sample.float().square().mean()
        loss.backward()

    # The plain step lets gradients flow to the input only: the frozen layers' input gradients, which a LoRA
    # step computes too.
    input_with_grad = latents.detach().requires_grad_(True)
    plain_forward, lora_forward = timed_pair(
        lambda: forward(plain_unet), lambda: forward(lora_unet), args.repeats, device
    )
    plain_step, lora_step = timed_pair(
        lambda: step(plain_unet, input_with_grad), lambda: step(lora_unet, latents), args.repeats, device
    )

    started = time.perf_counter()
    network.merge_to(None, lora_unet)
    synchronize(device)
    merge_seconds = time.perf_counter() - started

    record = {
        "benchmark": "lora_overhead_sd15_unet",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "latent_size": args.latent_size,
        "network_dim": args.network_dim,
        "unet_modules": len(network.unet_loras),
        "repeats": args.repeats,
        "forward_plain_ms": round(plain_forward * 1000, 2),
        "forward_lora_ms": round(lora_forward * 1000, 2),
        "forward_overhead_percent": round(100 * (lora_forward / plain_forward - 1), 1),
        "step_plain_input_grad_ms": round(plain_step * 1000, 2),
        "step_lora_ms": round(lora_step * 1000, 2),
        "step_overhead_percent": round(100 * (lora_step / plain_step - 1), 1),
        "merge_seconds": round(merge_seconds, 3),
    }
    record_result(record)


if __name__ == "__main__":
    main()
