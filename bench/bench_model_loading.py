"""Benchmark: loading a real-size SD1.5 single file (random fp16 weights, about 2.1 GB) into diffusers modules.

Each loader runs in a fresh process that reports its seconds (load, then one read of every weight) and its peak
resident memory above what the imports left (ru_maxrss against the RSS just before loading). The
reference is diffusers' `StableDiffusionPipeline.from_single_file` with a local config folder (offline). The
results are printed and appended as JSON lines to bench/results.jsonl.

    python bench/bench_model_loading.py [--repeats 3] [--work_dir bench/runs]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from bench_common import device_name, record_result


def write_random_sd15(path: Path) -> None:
    """Stream a random-weight SD1.5 file in the original layout, one tensor at a time (no model in memory)."""
    from library.model_files.family import ModelFamily

    write_random_model(ModelFamily.SD1, path)


def write_random_model(family, path: Path) -> None:
    """Stream a random-weight file of the family's released architecture in its single-file layout (LDM, or SGM for
    SDXL), fp16, one tensor at a time (no model in memory)."""
    from library.metadata import modelspec_architecture
    from library.model_files.containers import TensorInfo, write_safetensors
    from library.model_files.stable_diffusion import empty_model, single_file_tensors

    generator = torch.Generator().manual_seed(0)
    entries = {
        key: (TensorInfo(info.shape, torch.float16), _random(info.shape, generator))
        for key, (info, _) in single_file_tensors(empty_model(family)).items()
    }
    write_safetensors(path, entries, {"modelspec.architecture": modelspec_architecture(family, False)})


def _random(shape, generator):
    return lambda: torch.randn(shape, generator=generator) * 0.02


def write_reference_config(folder: Path) -> None:
    """The local config folder diffusers needs to load a single file offline: configs, tokenizer, scheduler,
    model_index.json, and no weights."""
    from library.model_files.family import ModelFamily
    from library.model_files.stable_diffusion import (
        diffusers_model_index,
        diffusers_modules,
        empty_model,
        save_module_config,
    )

    model = empty_model(ModelFamily.SD1)
    for name, module in diffusers_modules(model).items():
        save_module_config(module, folder / name)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config()))
    model.tokenizers[0].save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(diffusers_model_index(model)))


def measure_in_this_process(loader: str, model_file: Path, config_folder: Path) -> dict:
    """Run one load here and return seconds, peak RSS and the size of the loaded weights."""
    import diffusers  # noqa: F401  (imports are not part of the load time)
    import transformers  # noqa: F401

    from library.model_files.stable_diffusion import load_stable_diffusion

    baseline = psutil.Process().memory_info().rss
    started = time.perf_counter()
    if loader == "ours":
        model = load_stable_diffusion(model_file, dtype=torch.float16)
        modules = (model.unet, model.vae, *model.text_encoders)
    else:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_single_file(
            str(model_file),
            config=str(config_folder),
            local_files_only=True,
            torch_dtype=torch.float16,
            safety_checker=None,
            feature_extractor=None,
        )
        modules = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
    tensors = [t for module in modules for t in module.state_dict().values()]
    # A memory-mapped load reads nothing until the weights are used: touch every tensor, as a first forward pass or
    # a move to the GPU would, so that both loaders are timed and measured with all weights really read.
    checksum = sum(float(t.sum(dtype=torch.float64)) for t in tensors)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "checksum": checksum,
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_before_load_bytes": baseline,
        "weights_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "largest_tensor_bytes": max(t.numel() * t.element_size() for t in tensors),
    }


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_child(loader: str, model_file: Path, config_folder: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        loader,
        "--model_file",
        str(model_file),
        "--config_folder",
        str(config_folder),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work_dir", default=str(Path(__file__).with_name("runs")))
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--model_file", help=argparse.SUPPRESS)
    parser.add_argument("--config_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_in_this_process(args.child, Path(args.model_file), Path(args.config_folder))))
        return

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_file, config_folder = work / "sd15-random-fp16.safetensors", work / "sd15-config"
    if not model_file.exists():
        print(f"writing {model_file} (random weights, fp16) ...", flush=True)
        write_random_sd15(model_file)
    write_reference_config(config_folder)

    runs = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for loader in runs:
            runs[loader].append(run_child(loader, model_file, config_folder))
    for loader, measurements in runs.items():
        record = summarise(loader, measurements, model_file)
        record_result(record)


def summarise(loader: str, measurements: list[dict], model_file: Path) -> dict:
    first = measurements[0]
    load_memory = statistics.median(m["peak_rss_bytes"] - m["rss_before_load_bytes"] for m in measurements)
    return {
        "benchmark": "load_sd15_single_file_fp16",
        "loader": loader,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": device_name(torch.device("cpu")) + " (loading runs on the CPU)",
        "torch": torch.__version__,
        "file_bytes": model_file.stat().st_size,
        "repeats": len(measurements),
        "seconds_median": round(statistics.median(m["seconds"] for m in measurements), 2),
        "peak_rss_gib_median": round(statistics.median(m["peak_rss_bytes"] for m in measurements) / 2**30, 3),
        "load_rss_gib_median": round(load_memory / 2**30, 3),
        "weights_gib": round(first["weights_bytes"] / 2**30, 3),
        "largest_tensor_mib": round(first["largest_tensor_bytes"] / 2**20, 1),
        "load_rss_over_weights_plus_one_tensor": round(
            load_memory / (first["weights_bytes"] + first["largest_tensor_bytes"]), 3
        ),
    }


if __name__ == "__main__":
    main()
