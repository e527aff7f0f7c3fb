"""Benchmark: this project's trainer against sd-scripts', side by side, with identical flags (GitHub issue 16).

Given a checkout of kohya-ss/sd-scripts (`--sd_scripts`, with its own Python: `--sd_scripts_python`, by default its
`.venv`), the real-size architecture with random weights and a synthetic dataset are made once; then both
`train_network.py` (or `sdxl_train_network.py`) run as whole processes with the same flags, alternated (this
project first in odd rounds, sd-scripts first in even ones), at two lengths, after one unrecorded 1-step warm-up
run of each (so that no measured run reads the model from disk). Per round and trainer, the per-step time
is the slope between the two lengths' wall times and the fixed cost (start-up, loading, caching, saving) the
intercept; the medians over the rounds are reported with their ratios, with each process tree's peak host RSS
(sampled every 0.1 s) and peak CUDA memory (from inside the process, through bench/measured_run.py). The record
names the device, both torch versions, both commits and the exact flags, and is appended to bench/results.jsonl.

    python bench/vs_sd_scripts.py --sd_scripts ../sd-scripts [--model sd15|sdxl] [--resolution 128]
        [--batch_size 2] [--network_dim 4] [--conv_dim 4] [--mixed_precision no] [--device cpu|cuda]
        [--lengths 2 10] [--rounds 3] [--unet_only] [--no_warm_up] [trainer flags ...]

The defaults are the issue's CPU setting: SD1.5, 128 px, batch 2, C3Lier rank 4 / conv rank 4, the text encoder
trained, float32, AdamW, cached latents. Trainer flags this script does not know go to both trainers as given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from bench_train import TreeMemory, make_dataset, model_file

from bench_common import record_result

PROJECT = Path(__file__).resolve().parent.parent
MEASURED_RUN = Path(__file__).with_name("measured_run.py")
SCRIPTS = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}
TRAINERS = ("this project", "sd-scripts")


def parse_arguments() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--sd_scripts", type=Path, required=True, help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument("--sd_scripts_python", type=Path, help="its Python (default: <sd_scripts>/.venv/bin/python)")
    parser.add_argument("--python", type=Path, default=Path(sys.executable), help="this project's Python")
    parser.add_argument("--model", choices=list(SCRIPTS), default="sd15")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--network_dim", type=int, default=4)
    parser.add_argument("--conv_dim", type=int, default=4, help="rank of the 3x3 convs (C3Lier); 0: LierLa only")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--unet_only", action="store_true", help="train the U-Net's LoRA only (always for SDXL)")
    parser.add_argument("--lengths", type=int, nargs=2, default=[2, 10], help="the two run lengths, in steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="distinct images in the dataset")
    parser.add_argument("--workers", type=int, default=0, help="--max_data_loader_n_workers for both")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).with_name("runs"))
    parser.add_argument(
        "--no_warm_up", dest="warm_up", action="store_false", help="skip the warm-up runs (files already cached)"
    )
    parser.add_argument("--note", help="free text stored in the record")
    parser.add_argument("--no_record", action="store_true", help="print only; do not append to bench/results.jsonl")
    args, extra = parser.parse_known_args()
    args.sd_scripts = args.sd_scripts.resolve()
    args.sd_scripts_python = args.sd_scripts_python or args.sd_scripts / ".venv" / "bin" / "python"
    if not (args.sd_scripts / SCRIPTS[args.model]).is_file():
        parser.error(f"--sd_scripts {args.sd_scripts}: no {SCRIPTS[args.model]} there; give a sd-scripts checkout.")
    if not args.sd_scripts_python.exists():
        parser.error(f"{args.sd_scripts_python}: no such Python; give --sd_scripts_python (sd-scripts' own venv).")
    if args.lengths[0] >= args.lengths[1] or args.lengths[0] < 1:
        parser.error("--lengths: two step counts, the first at least 1 and smaller than the second.")
    return args, extra


def training_flags(args: argparse.Namespace, model: Path, data: Path, tokenizers: Path, extra: list[str]) -> list[str]:
    """The flags both trainers get (without --max_train_steps and --output_dir, which differ per run)."""
    flags = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data)]
    flags += ["--tokenizer_cache_dir", str(tokenizers), "--resolution", str(args.resolution)]
    flags += ["--train_batch_size", str(args.batch_size), "--caption_extension", ".txt"]
    flags += ["--network_module", "networks.lora", "--network_dim", str(args.network_dim)]
    flags += ["--network_alpha", str(args.network_dim), "--learning_rate", "1e-4", "--optimizer_type", "AdamW"]
    flags += ["--seed", "0", "--mixed_precision", args.mixed_precision, "--cache_latents", "--sdpa"]
    flags += ["--max_data_loader_n_workers", str(args.workers), "--save_model_as", "safetensors"]
    if args.conv_dim:
        flags += ["--network_args", f"conv_dim={args.conv_dim}", f"conv_alpha={args.conv_dim}"]
    if args.unet_only or args.model == "sdxl":
        flags.append("--network_train_unet_only")
    if args.model == "sdxl":
        flags.append("--cache_text_encoder_outputs")
    return flags + extra


def write_tokenizers(folder: Path, model: str) -> None:
    """The CLIP tokenizers in sd-scripts' --tokenizer_cache_dir layout, from the vocabulary this project ships (no
    download for either trainer)."""
    from library.model_files.family import ModelFamily
    from library.model_files.tokenizer import CACHE_FOLDER_NAMES, PAD_TOKENS, clip_vocabulary, shipped_tokenizer

    family = ModelFamily.SDXL if model == "sdxl" else ModelFamily.SD1
    vocabulary, merges = clip_vocabulary()
    for name, pad_token in zip(CACHE_FOLDER_NAMES[family], PAD_TOKENS[family]):
        shipped_tokenizer(pad_token).save_pretrained(folder / name)
        # the files an older transformers' (sd-scripts' pinned 4.x) slow CLIPTokenizer reads
        (folder / name / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
        (folder / name / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def run_once(python: Path, root: Path, script: str, flags: list[str], length: int, output: Path, cpu: bool) -> dict:
    """One whole process of `script` with `flags` (its length: training steps, images, ...): wall time, peak RSS of
    its process tree, and what measured_run.py reports. Its log is written to `output`."""
    report = output / "measured.json"
    output.mkdir(parents=True)
    command = [str(python), str(MEASURED_RUN), script, *flags]
    environment = {**os.environ, "MEASURED_RUN_OUT": str(report), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    if cpu:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    with open(output / "log.txt", "w", encoding="utf-8") as log:
        process = psutil.Popen(command, cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT)
        with TreeMemory(process) as tree:
            process.wait()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = (output / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{root / script} failed (exit {process.returncode}); the end of its log:\n{tail}")
    measured = json.loads(report.read_text(encoding="utf-8"))
    return {"length": length, "seconds": round(seconds, 2), "peak_rss_bytes": tree.peak, **measured}


def fitted(runs: list[dict], lengths: list[int]) -> tuple[float, float]:
    """(seconds per step (or image), fixed seconds) of one round: the line through its two lengths' wall times."""
    short, long = (next(run["seconds"] for run in runs if run["length"] == n) for n in lengths)
    per_step = (long - short) / (lengths[1] - lengths[0])
    return per_step, short - lengths[0] * per_step


def alternated_rounds(
    names: list[str], lengths: list[int], rounds: int, run: Callable[[str, int, str], dict], warm_up: bool, unit: str
) -> dict[str, list[list[dict]]]:
    """Each name's runs per round, at each length, the names alternating which runs first; before them (`warm_up`)
    one unrecorded run of length 1 each, so that no measured run reads the model or its code from disk.
    `run(name, length, label)` runs one whole process (run_once)."""
    for name in names if warm_up else ():
        print(f"warm-up, {name}: {run(name, 1, 'warm-up')['seconds']} s", flush=True)
    per_name: dict[str, list[list[dict]]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for length in lengths:
            for name in order:
                runs[name].append(run(name, length, str(round_index)))
                print(f"round {round_index + 1}, {name}, {length} {unit}: {runs[name][-1]['seconds']} s", flush=True)
        for name in names:
            per_name[name].append(runs[name])
    return per_name


def fitted_rounds(per_round: list[list[dict]], lengths: list[int]) -> dict:
    """One name's rounds: the medians of the per-length time (slope) and the fixed cost (intercept), each round's
    pair, and the peaks over every run."""
    fits = [fitted(runs, lengths) for runs in per_round]
    every = [run for runs in per_round for run in runs]
    cuda = [run["cuda_peak_bytes"] for run in every if run["cuda_peak_bytes"] is not None]
    return {
        "seconds_per_length": statistics.median(fit[0] for fit in fits),
        "fixed_seconds": round(statistics.median(fit[1] for fit in fits), 2),
        "per_round": [[round(value, 3) for value in fit] for fit in fits],
        "peak_rss_gb": round(max(run["peak_rss_bytes"] for run in every) / 1e9, 2),
        "peak_cuda_gb": round(max(cuda) / 1e9, 2) if cuda else None,
        "torch": every[0]["torch"],
    }


def summary(rounds: dict[str, list[list[dict]]], lengths: list[int]) -> dict:
    result = {}
    for trainer, per_round in rounds.items():
        fit = fitted_rounds(per_round, lengths)
        result[trainer] = {"seconds_per_step": round(fit.pop("seconds_per_length"), 3), **fit}
    ours, theirs = result[TRAINERS[0]], result[TRAINERS[1]]
    result["speed_ratio"] = round(theirs["seconds_per_step"] / ours["seconds_per_step"], 2)
    result["fixed_cost_ratio"] = round(ours["fixed_seconds"] / theirs["fixed_seconds"], 2)
    result["peak_rss_ratio"] = round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 2)
    if ours["peak_cuda_gb"] and theirs["peak_cuda_gb"]:
        result["peak_cuda_ratio"] = round(ours["peak_cuda_gb"] / theirs["peak_cuda_gb"], 2)
    return result


def commit_of(folder: Path) -> str:
    found = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    if found.returncode == 0:
        return found.stdout.strip()
    marker = folder / "COMMIT"  # a checkout made with `git archive` records its commit here
    return marker.read_text(encoding="utf-8").strip() if marker.exists() else "unknown"


def main() -> None:
    args, extra = parse_arguments()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = model_file(args.work_dir, args.model)
    roots = {TRAINERS[0]: PROJECT, TRAINERS[1]: args.sd_scripts}
    pythons = {TRAINERS[0]: args.python, TRAINERS[1]: args.sd_scripts_python}
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        make_dataset(temporary / "data", args.images, 10, args.resolution)
        write_tokenizers(temporary / "tokenizers", args.model)
        flags = training_flags(args, model, temporary / "data", temporary / "tokenizers", extra)

        def run(trainer: str, steps: int, name: str) -> dict:
            output = temporary / f"out-{name}-{steps}-{TRAINERS.index(trainer)}"
            arguments = [*flags, "--max_train_steps", str(steps), "--output_dir", str(output)]
            return run_once(
                pythons[trainer], roots[trainer], SCRIPTS[args.model], arguments, steps, output, args.device == "cpu"
            )

        rounds = alternated_rounds(list(TRAINERS), args.lengths, args.rounds, run, args.warm_up, "steps")
    result = summary(rounds, args.lengths)
    record = {
        "benchmark": "vs_sd_scripts",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": _device(args.device),
        "setting": {key: value for key, value in vars(args).items() if key not in ("note", "no_record")},
        "flags": flags,
        "commits": {TRAINERS[0]: commit_of(PROJECT), TRAINERS[1]: commit_of(args.sd_scripts)},
        "result": result,
        "runs": rounds,
        "note": args.note,
    }
    print(json.dumps(result, indent=2))
    if not args.no_record:
        record_result(json.loads(json.dumps(record, default=str)))


def _device(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU: {os.uname().machine}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
