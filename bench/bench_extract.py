"""Benchmark: networks/extract_lora_from_models.py on real-size SD1.5 weights (random values), on the CPU and on CUDA.

The base is the random-weight SD1.5 single file of bench_model_loading.py (fp16, about 2.1 GB; reused from
`--work_dir` when it is there); the tuned model is a copy with Gaussian noise (std `--noise`, default 0.005) added to
every weight, so every layer changes at full rank and the text encoder changes by more than --min_diff. Each device
gets one end-to-end extract as a user runs it (loading both models, the text-encoder check, the SVD of every
module's difference, saving), timed as a whole and in its two main phases: loading, and the difference + SVD loop
that --device moves to the GPU. With both devices the CUDA record has the CPU / CUDA speed ratios. The results are
printed and appended as JSON lines to bench/results.jsonl.

    python bench/bench_extract.py [--work_dir bench/runs] [--dim 4] [--conv_dim N] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_model_loading import write_random_sd15

from bench_common import device_name, record_result, synchronize


def write_tuned_copy(base: Path, path: Path, noise: float) -> None:
    """Stream base + N(0, noise^2) per floating-point weight into `path`, in the base's dtype, one tensor at a time."""
    from library.model_files.containers import open_checkpoint, write_safetensors

    checkpoint = open_checkpoint(base)
    generator = torch.Generator().manual_seed(1)

    def perturbed(key: str):
        def produce() -> torch.Tensor:
            tensor = checkpoint.read(key)
            if not tensor.is_floating_point():
                return tensor
            return (tensor.float() + torch.randn(tensor.shape, generator=generator) * noise).to(tensor.dtype)

        return produce

    write_safetensors(
        path, {key: (info, perturbed(key)) for key, info in checkpoint.info().items()}, dict(checkpoint.metadata)
    )


class PhaseTimer:
    """Seconds spent in the extract's loading (`load_model`) and in its difference + SVD loop (`extracted_modules`),
    measured inside one end-to-end run by wrapping those two module functions."""

    PHASES = {"load_model": "load_seconds", "extracted_modules": "difference_and_svd_seconds"}

    def __init__(self, device: torch.device):
        import networks.extract_lora_from_models as extract

        self.device, self.module, self.seconds = device, extract, dict.fromkeys(self.PHASES.values(), 0.0)
        for function, phase in self.PHASES.items():
            setattr(extract, function, self._timed(getattr(extract, function), phase))

    def _timed(self, function, phase: str):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - started
            return result

        timed.original = function
        return timed

    def restore(self) -> None:
        for function in self.PHASES:
            setattr(self.module, function, getattr(self.module, function).original)


def timed_extract(base: Path, tuned: Path, out: Path, options) -> dict[str, float]:
    """One end-to-end extract: its total seconds and those of its phases."""
    from networks.extract_lora_from_models import extract_lora

    timer = PhaseTimer(options.device)
    try:
        synchronize(options.device)
        started = time.perf_counter()
        extract_lora(base, tuned, out, options)
        synchronize(options.device)
        total = time.perf_counter() - started
    finally:
        timer.restore()
    return {"seconds": total, **timer.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default=str(Path(__file__).with_name("runs")))
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--conv_dim", type=int, default=None)
    parser.add_argument("--noise", type=float, default=0.005, help="std of the noise that makes the tuned copy")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--note", default="", help="recorded with the results (e.g. what else the machine was doing)")
    args = parser.parse_args()

    from library.lora.files import read_lora_file, split_modules
    from networks.extract_lora_from_models import ExtractOptions

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = work / "sd15-random-fp16.safetensors", work / f"sd15-random-fp16-tuned-{args.noise:g}.safetensors"
    if not base.exists():
        print(f"writing {base} (random weights, fp16) ...", flush=True)
        write_random_sd15(base)
    if not tuned.exists():
        print(f"writing {tuned} (the base plus noise of std {args.noise:g}) ...", flush=True)
        write_tuned_copy(base, tuned, args.noise)

    seconds = {}
    for name in args.devices:
        options = ExtractOptions(dim=args.dim, conv_dim=args.conv_dim, device=torch.device(name))
        out = work / f"extract-{name}.safetensors"
        seconds[name] = timed_extract(base, tuned, out, options)
        modules = split_modules(read_lora_file(out)[0], str(out))
        record = {
            "benchmark": "extract_lora_sd15",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device": device_name(options.device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "dim": args.dim,
            "conv_dim": args.conv_dim,
            "modules": len(modules),
            "text_encoder_modules": sum(module.startswith("lora_te") for module in modules),
            **{key: round(value, 1) for key, value in seconds[name].items()},
            "note": args.note,
        }
        if "cpu" in seconds and name != "cpu":
            for key in ("seconds", "difference_and_svd_seconds"):
                record[f"cpu_over_this_device_{key}"] = round(seconds["cpu"][key] / seconds[name][key], 2)
        record_result(record)


if __name__ == "__main__":
    main()
