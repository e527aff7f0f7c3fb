"""Benchmark: the trainer of train_network.py and sdxl_train_network.py end to end (GitHub issues 5 and 14).

A model (the real-size SD1.5 or SDXL architecture with random weights, or the tiny test model) is written once as a
single .safetensors file under `--work_dir` and reused; a synthetic DreamBooth-style dataset of captioned PNGs at
`--resolution` is made in a temporary folder; then `library.training.trainer.train` runs `--warmup` + `--steps`
optimizer steps with sd-scripts' flags (AdamW, lr 1e-4, max_grad_norm 1, LoRA rank `--network_dim` / alpha 16 on
the U-Net and the text encoder, latents cached, persistent data-loader workers), and the trainer's `on_step`
callback timestamps every optimizer step (CUDA synchronised at the window's edges only, see Timings).

Recorded: steps/s (median of the per-step rates after the warm-up, with p10/p90), time to first step (from calling
train() to the end of optimizer step 1: model loading, latent caching and set-up included, with those two timed
apart by wrapping the trainer's own calls), latent-cache images/s (images encoded by the trainer's caching call over
its wall time), peak host RSS (ru_maxrss of this process, where nothing else of size runs; and, as the spec's
protocol has it, the peak sum of RSS over the process tree with the data-loader workers, sampled at 10 Hz, in which
each forked worker also counts the pages it shares with this process), peak CUDA memory (max_memory_allocated over
the run and over the measured steps; null on the CPU), and the device. sd-scripts figures quoted from
specs/performance.md are kept in a separate field: they were not measured here. Results are printed and appended as
JSON lines to bench/results.jsonl.

The defaults on CUDA are the issue's setting: SD1.5 at 512x512, batch 1, rank 32, bf16, cached latents, SDPA, 300
measured steps after 50 warm-up steps. On the CPU the default is the tiny model. `--model sdxl` runs
sdxl_train_network.py's trainer with the U-Net's LoRA only and cached text-encoder outputs (issue 14's setting: 1024
pixels on CUDA; 128 on the CPU). Options this script does not know are passed to the trainer as they are (e.g.
`--network_train_unet_only`, `--full_bf16`).

    python bench/bench_train.py [--model sd15|sdxl|tiny] [--steps N] [--warmup N] [--resolution 512] [--batch_size 1]
        [--network_dim 32] [--mixed_precision bf16|fp16|no] [--gradient_checkpointing] [--xformers]
        [--no_cache_latents] [--images N] [--work_dir bench/runs] [--no_record] [train_network.py options ...]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from bench_common import device_name, record_result, synchronize

ISSUE_SETTING = {
    "model": "sd15",
    "resolution": 512,
    "batch_size": 1,
    "network_dim": 32,
    "mixed_precision": "bf16",
    "cache_latents": True,
    "attention": "sdpa",
    "gradient_checkpointing": False,
}
ISSUE_SETTINGS = {
    "sd15": ISSUE_SETTING,
    "tiny": ISSUE_SETTING,
    "sdxl": {**ISSUE_SETTING, "model": "sdxl", "resolution": 1024},
}
MODEL_FILES = {
    "sd15": "sd15-random-fp16.safetensors",
    "sdxl": "sdxl-random-fp16.safetensors",
    "tiny": "tiny-sd1-seed0.safetensors",
}
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


def quoted_sd_scripts_reference(setting: dict, device: torch.device) -> dict | None:
    """What specs/performance.md (or the issue) says about sd-scripts for this setting: quoted, not measured here."""
    if (
        setting["model"] == "sdxl"
        and setting["resolution"] == 128
        and setting["batch_size"] == 2
        and device.type == "cpu"
    ):
        return {
            "quoted_not_measured": True,
            "source": "GitHub issue 14, item 9",
            "note": "sd-scripts' sdxl_train_network.py on this 2-core machine, real-size SDXL file, 128 px, batch 2, "
            "bf16 with --full_bf16, U-Net-only rank 4, cached latents and text-encoder outputs, 2 steps: 3.4 s per "
            "step, 40 s in all, 16.8 GB peak host memory. Target: at most half that memory and no slower.",
        }
    if setting["model"] != "sd15" or setting["resolution"] != 512 or device.type != "cuda":
        return None
    return {
        "quoted_not_measured": True,
        "source": "specs/performance.md",
        "same_gpu_steps_per_second": None,
        "note": "the spec has no published sd-scripts it/s for SD1.5 LoRA at 512x512 on A100/H100/H200 (its section 7 "
        "names this as the gap the benchmark should fill); nearest published: RTX 3090 ~1.7 it/s "
        "(maintainer test config, batch not stated, bmaltais/kohya_ss#1847), RTX 3070 Ti ~3 it/s (batch not "
        "stated, kohya-ss/sd-scripts#326); computed cap for eager batch-1 training on any GPU ~15-25 it/s; "
        "minimal VRAM ~3-4 GB with bf16/fp16 weights, SDPA, gradient checkpointing, cached latents "
        "(bmaltais/kohya_ss#2474). Targets: >= 1.5x sd-scripts' best-flag steps/s on the same GPU, <= its peak "
        "VRAM.",
    }


# ---------------------------------------------------------------- model and data


def model_file(work: Path, model: str) -> Path:
    """The benchmark model, written once (in a child process, so that this process's peak RSS is the training's)."""
    path = work / MODEL_FILES[model]
    if not path.exists():
        print(f"writing {path} (random weights) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--write_model", model, "--model_file", str(path)], check=True)
    return path


def write_model(model: str, path: Path) -> None:
    """Both writers are atomic: an interrupted run leaves no truncated model to be reused."""
    if model in ("sd15", "sdxl"):
        from bench_model_loading import write_random_model  # the released layout, random fp16 weights, streamed

        from library.model_files.family import ModelFamily

        write_random_model(ModelFamily.SDXL if model == "sdxl" else ModelFamily.SD1, path)
    else:
        from library.model_files.family import ModelFamily
        from library.model_files.stable_diffusion import save_stable_diffusion_checkpoint
        from library.tiny_models import make_tiny_model

        save_stable_diffusion_checkpoint(make_tiny_model(ModelFamily.SD1), path)


def make_dataset(folder: Path, images: int, repeats: int, resolution: int) -> None:
    """`<folder>/<repeats>_bench/`: square PNGs at the training resolution (one bucket), smooth random colour fields
    (so that PNG decoding costs about what a photo does), each with a comma-separated tag caption."""
    image_dir = folder / f"{repeats}_bench"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tags = random.Random(0)
    for index in range(images):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        coarse.resize((resolution, resolution), Image.BICUBIC).save(image_dir / f"{index:05d}.png")
        (image_dir / f"{index:05d}.txt").write_text("bench, " + ", ".join(tags.sample(TAGS, 6)), encoding="utf-8")


# ---------------------------------------------------------------- measuring


class Timings:
    """The trainer's phases, timed by wrapping the functions it calls (its module's own names) and by on_step.

    CUDA is synchronised only at the edges: after step 1 (time to first step), at the end of the warm-up and after
    the last step, as the spec's protocol says. A synchronize after every step would stop the CPU from queueing the
    next step's work while the GPU finishes this one, and so time a slower program than the trainer is. In between,
    the per-step times are wall-clock on the host; the trainer reads the loss (a sync) at every step, so the host
    never runs more than a step ahead, and the window's mean rate is exact."""

    def __init__(self, device: torch.device, warmup: int, total: int):
        self.device, self.warmup, self.total = device, warmup, total
        self.called = 0.0
        self.model_load_s = 0.0
        self.cache_s = 0.0
        self.images_encoded = 0
        self.step_ends: list[float] = []
        self.cuda_peak_before_reset = 0  # bytes allocated at most up to the end of the warm-up
        self.rss_at_first_step = 0

    def install(self) -> None:
        """Wrap the functions the trainer loads the model and caches the latents with."""
        import library.training.preparation as preparation
        import library.training.trainer as trainer

        load, cache = trainer.load_training_family, preparation.cache_latents

        def timed_load(*args, **kwargs):
            started = time.perf_counter()
            try:
                return load(*args, **kwargs)
            finally:
                self.model_load_s += time.perf_counter() - started

        def timed_cache(*args, **kwargs):
            started = time.perf_counter()
            result = cache(*args, **kwargs)
            synchronize(self.device)
            self.cache_s += time.perf_counter() - started
            self.images_encoded += result[1]  # (latents, images encoded, images reused from disk)
            return result

        trainer.load_training_family = timed_load
        preparation.cache_latents = timed_cache

    def on_step(self, step: int) -> None:
        if step in (1, self.warmup, self.total):
            synchronize(self.device)
        self.step_ends.append(time.perf_counter())
        if step == 1:
            self.rss_at_first_step = psutil.Process().memory_info().rss
        if step == self.warmup and self.device.type == "cuda":
            self.cuda_peak_before_reset = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # from here on: the measured steps' peak


class TreeMemory:
    """Peak of the summed RSS of a process (by default this one) and its children (data-loader workers), sampled
    every 0.1 s. Pages that forked workers share with their parent are counted once per process, as psutil reports
    them."""

    def __init__(self, root: psutil.Process | None = None):
        self.root = root or psutil.Process()
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.stopped.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:  # the root has ended
                processes = []
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stopped.wait(0.1)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# ---------------------------------------------------------------- main


def parse_arguments() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Other options go to train_network.py as given.",
    )
    parser.add_argument(
        "--model",
        choices=list(MODEL_FILES),
        help=(
            "sd15 / sdxl: the real-size architecture, random weights (sd15 is the default on CUDA); tiny: the test"
            " model (default on the CPU)"
        ),
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="measured optimizer steps after the warm-up (default: 300 on CUDA; on the CPU 30 tiny, 3 sd15, 2 sdxl)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="optimizer steps not measured (default: 50 on CUDA; on the CPU 5 tiny, 1 sd15 or sdxl)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        help="square training resolution (default 512 for sd15, 1024 for sdxl (128 on the CPU), 64 for tiny)",
    )
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--network_dim", type=int, default=32)
    parser.add_argument("--network_alpha", type=float, default=16)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default bf16 on CUDA, no on the CPU")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--xformers", action="store_true", help="xformers attention instead of PyTorch SDPA")
    parser.add_argument(
        "--no_cache_latents",
        dest="cache_latents",
        action="store_false",
        help="run the VAE at every step (latents are cached by default)",
    )
    parser.add_argument(
        "--vae_batch_size", type=int, default=1, help="images per VAE batch while caching (default 1, as sd-scripts)"
    )
    parser.add_argument(
        "--images", type=int, help="distinct images in the dataset (default 64 on CUDA, 8 tiny / 4 sd15 on the CPU)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="data-loader workers, persistent (default 2, sd-scripts' best flags in the spec)",
    )
    parser.add_argument(
        "--work_dir", default=str(Path(__file__).with_name("runs")), help="where the model file is kept between runs"
    )
    parser.add_argument("--note", help="free text stored in the record (e.g. what was reduced and why)")
    parser.add_argument(
        "--no_record", action="store_true", help="print the result only; do not append it to bench/results.jsonl"
    )
    parser.add_argument("--write_model", choices=list(MODEL_FILES), help=argparse.SUPPRESS)
    parser.add_argument("--model_file", help=argparse.SUPPRESS)
    return parser.parse_known_args()


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    args.model = args.model or ("sd15" if cuda else "tiny")
    small = args.model != "tiny" and not cuda  # seconds per step
    args.steps = (
        args.steps if args.steps is not None else 300 if cuda else 2 if args.model == "sdxl" else 3 if small else 30
    )
    args.warmup = args.warmup if args.warmup is not None else 50 if cuda else 1 if small else 5
    args.resolution = args.resolution or {"sd15": 512, "sdxl": 1024 if cuda else 128, "tiny": 64}[args.model]
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    args.images = args.images or (64 if cuda else 4 if small else 8)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be 1 or more (a step is timed from the end of the one before).")


def trainer_arguments(args: argparse.Namespace, model: Path, data: Path, output: Path, extra: list[str]) -> list[str]:
    total = args.warmup + args.steps
    command = [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(output),
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.batch_size),
        "--caption_extension",
        ".txt",
        "--network_module",
        "networks.lora",
        "--network_dim",
        str(args.network_dim),
        "--network_alpha",
        str(args.network_alpha),
        "--learning_rate",
        "1e-4",
        "--optimizer_type",
        "AdamW",
        "--max_train_steps",
        str(total),
        "--seed",
        "0",
        "--mixed_precision",
        args.mixed_precision,
        "--vae_batch_size",
        str(args.vae_batch_size),
        "--max_data_loader_n_workers",
        str(args.workers),
        "--save_model_as",
        "safetensors",
    ]
    if args.workers:
        command.append("--persistent_data_loader_workers")
    command.append("--xformers" if args.xformers else "--sdpa")
    if args.cache_latents:
        command.append("--cache_latents")
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    if args.model == "sdxl":
        command += ["--network_train_unet_only", "--cache_text_encoder_outputs"]
    return command + extra


def setting_of(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "network_dim": args.network_dim,
        "mixed_precision": args.mixed_precision,
        "cache_latents": args.cache_latents,
        "attention": "xformers" if args.xformers else "sdpa",
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def main() -> None:
    args, extra = parse_arguments()
    if args.write_model:
        write_model(args.write_model, Path(args.model_file))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fill_defaults(args, device)

    import library.training.trainer as trainer
    from library.training.arguments import build_parser
    from library.training.options import training_options

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = model_file(work, args.model)
    timings = Timings(device, args.warmup, args.warmup + args.steps)
    timings.install()
    with tempfile.TemporaryDirectory(dir=work, prefix="train-") as folder:
        data = Path(folder) / "data"
        sdxl = args.model == "sdxl"
        options = training_options(
            build_parser(sdxl).parse_args(trainer_arguments(args, model, data, Path(folder) / "output", extra)), sdxl
        )
        batches = (args.warmup + args.steps) * options.length.gradient_accumulation_steps
        make_dataset(
            data, args.images, math.ceil(batches * args.batch_size / args.images), args.resolution
        )  # one epoch
        if device.type == "cuda" and torch.cuda.is_initialized():  # else nothing was allocated yet
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = psutil.Process().memory_info().rss
        with TreeMemory() as tree:
            timings.called = time.perf_counter()
            trainer.train(options, on_step=timings.on_step)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    ends = [timings.called, *timings.step_ends]
    durations = [after - before for before, after in zip(ends, ends[1:])][args.warmup :]
    if len(durations) != args.steps:
        raise SystemExit(f"the trainer ran {len(timings.step_ends)} optimizer steps, not {args.warmup + args.steps}.")
    rates = [1 / seconds for seconds in durations]
    steps_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    setting = setting_of(args)
    cuda = device.type == "cuda"
    record = {
        "benchmark": "train_network_steps",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": device_name(device),
        "torch": torch.__version__,
        **(
            {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
            if cuda
            else {"torch_threads": torch.get_num_threads()}
        ),
        **setting,
        "network_alpha": args.network_alpha,
        "images": args.images,
        "vae_batch_size": args.vae_batch_size,
        "workers": args.workers,
        "extra_train_args": extra,
        "differs_from_issue_setting": {
            key: value for key, value in setting.items() if ISSUE_SETTINGS[args.model][key] != value
        },
        "warmup_steps": args.warmup,
        "steps_measured": args.steps,
        "steps_per_second": round(statistics.median(rates), 4),
        "steps_per_second_window_mean": round(args.steps / (ends[-1] - ends[args.warmup]), 4),
        "steps_per_second_p10": round(percentile(rates, 0.1), 4),
        "steps_per_second_p90": round(percentile(rates, 0.9), 4),
        "images_per_second": round(statistics.median(rates) * args.batch_size, 4),
        "time_to_first_step_s": round(timings.step_ends[0] - timings.called, 2),
        "model_load_s": round(timings.model_load_s, 2),
        "latent_cache_s": round(timings.cache_s, 2) if args.cache_latents else None,
        "latent_cache_images": timings.images_encoded if args.cache_latents else None,
        "latent_cache_images_per_s": round(timings.images_encoded / timings.cache_s, 3)
        if args.cache_latents and timings.cache_s
        else None,
        "setup_and_first_step_s": round(
            timings.step_ends[0] - timings.called - timings.model_load_s - timings.cache_s, 2
        ),
        "rss_before_train_mb": round(rss_before / 2**20),
        "rss_at_first_step_mb": round(timings.rss_at_first_step / 2**20),
        "peak_host_rss_mb": round(peak_rss / 2**20),  # this process, exact (ru_maxrss); it runs only the training
        "peak_host_rss_tree_mb": round(
            tree.peak / 2**20
        ),  # + data-loader workers, each counting the pages it shares with this one
        "peak_cuda_mb": round(max(timings.cuda_peak_before_reset, steps_peak) / 2**20)
        if cuda
        else None,  # the whole run
        "peak_cuda_measured_steps_mb": round(steps_peak / 2**20) if cuda else None,
        "sd_scripts_reference_quoted": quoted_sd_scripts_reference(setting, device),
    }
    if args.note:
        record["note"] = args.note
    if args.no_record:
        print(json.dumps(record))
    else:
        record_result(record)


if __name__ == "__main__":
    main()
