"""Benchmark: is the data loader a bottleneck when the latents are cached?

A folder of `--images` captioned PNGs of mixed sizes is made and planned with bucketing at 512x512; their latents
are real-shaped random tensors held in memory as `--cache_latents` holds them (the loader only copies them, so
their values do not matter). Then training steps of the real-size SD1.5 U-Net with a LoRA (rank 32, random
weights) run on the loader's batches, and the time the loop waits for each batch is recorded.

The spec's target: data time under 5% of step time over an epoch, worker start-up included. `--steps` limits the
measured part of the epoch (CPU steps take seconds each); `data_only_ms_per_batch` is the loader running with
nothing else to do, for an epoch's worth of batches. Results are printed and appended to bench/results.jsonl.

    python bench/bench_loader.py [--images 200] [--batch_size 4] [--steps 20] [--workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from bench_common import build_sd15_unet, device_name, record_result, synchronize
from library.dataset.latent_cache import LATENT_CHANNELS, SD_VAE_SCALE, CachedLatents
from library.dataset.loader import BatchSettings, EpochBatches, TrainingBatches, make_data_loader, worker_count
from library.dataset.plan import prepare_datasets
from library.model_files.tokenizer import shipped_tokenizer
from networks.lora import create_network

IMAGE_SIZES = ((512, 512), (768, 512), (512, 768), (640, 448))
TAGS = (
    "1girl",
    "solo",
    "smile",
    "outdoors",
    "blue sky",
    "long hair",
    "looking at viewer",
    "red dress",
    "tree",
    "flowers",
)


def make_images(folder: Path, count: int) -> None:
    rng = random.Random(0)
    for index in range(count):
        size = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(folder / f"{index:05d}.png")
        caption = ", ".join(rng.sample(TAGS, 6))
        (folder / f"{index:05d}.txt").write_text(caption, encoding="utf-8")


def cached_latents(plans) -> dict[Path, CachedLatents]:
    latents = {}
    for sample in plans[0].samples:
        width, height = sample.placement.bucket
        shape = (LATENT_CHANNELS, height // SD_VAE_SCALE, width // SD_VAE_SCALE)
        latents[sample.image.path] = CachedLatents(torch.randn(shape), torch.randn(shape), None)
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps to measure (default: the whole epoch on CUDA, 6 on the CPU)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data loader workers (default: the training default with cached latents)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="the U-Net's dtype on CUDA")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if device.type == "cuda" else torch.float32
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as folder:
        image_dir = Path(folder) / "1_bench"
        image_dir.mkdir()
        make_images(image_dir, args.images)
        options = {
            "resolution": "512",
            "enable_bucket": True,
            "train_batch_size": args.batch_size,
            "caption_extension": ".txt",
            "flip_aug": True,
            "shuffle_caption": True,
        }
        plans, _ = prepare_datasets(None, options, train_data_dir=folder, cache_latents=True)
        latents = cached_latents(plans)
        workers = worker_count(args.workers, latents_cached=True)
        batches = TrainingBatches(plans, shipped_tokenizer(), BatchSettings(seed=0), latents)
        sampler = EpochBatches(plans, seed=0)

        started = time.perf_counter()
        for _ in make_data_loader(batches, sampler, workers, persistent_workers=False):
            pass
        data_only = (time.perf_counter() - started) / len(sampler)

        unet = build_sd15_unet(device, dtype)
        network = create_network(1.0, 32, 16, None, None, unet)
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        network.to(device)
        network.prepare_grad_etc()
        context = torch.randn(args.batch_size, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)

        def step(batch: dict) -> None:
            inputs = batch["latents"].to(device, dtype, non_blocking=True)
            count = inputs.shape[0]
            timesteps = torch.randint(0, 1000, (count,), device=device)
            with autocast:
                loss = unet(inputs, timesteps, context[:count]).sample.float().square().mean()
            loss.backward()
            synchronize(device)

        step(next(iter(make_data_loader(batches, sampler, 0, False))))  # warm-up, not measured
        steps = args.steps or (len(sampler) if device.type == "cuda" else 6)
        waited, stepped = 0.0, 0.0
        loader = make_data_loader(batches, sampler, workers, persistent_workers=False, pin_memory=device.type == "cuda")
        mark = time.perf_counter()
        for number, batch in enumerate(loader, start=1):
            got = time.perf_counter()
            waited += got - mark
            step(batch)
            mark = time.perf_counter()
            stepped += mark - got
            if number == steps:
                break

    record_result(
        {
            "benchmark": "data_loader_cached_latents_sd15",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device": device_name(device),
            "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "images": args.images,
            "batch_size": args.batch_size,
            "workers": workers,
            "batches_per_epoch": len(sampler),
            "steps_measured": number,
            "data_ms_per_step": round(1000 * waited / number, 2),
            "step_ms": round(1000 * stepped / number, 2),
            "data_percent_of_step": round(100 * waited / stepped, 2),
            "data_only_ms_per_batch": round(1000 * data_only, 3),
        }
    )


if __name__ == "__main__":
    main()
