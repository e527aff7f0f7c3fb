"""Benchmark: image generation with gen_img_diffusers.py (or sdxl_gen_img.py), images per second at each batch size
(GitHub issue 18), optionally beside sd-scripts' script with the same flags.

The real-size architecture with random weights is written once (bench/runs). For each batch size, each script runs
as a whole process at two image counts (`--images_per_prompt`, multiples of the batch size); the time per image is
the slope between the two wall times and the fixed cost (start-up, loading) the intercept. With `--sd_scripts`,
sd-scripts' script runs alternately with the same flags in its own Python; one unrecorded 1-image warm-up run of
each comes first, as in bench/vs_sd_scripts.py. The record names the device, the torch versions, the commits and
the flags, and is appended to bench/results.jsonl.

    python bench/bench_generation.py [--model sd15|sdxl] [--resolution 256] [--steps 4] [--batch_sizes 1 4]
        [--device cpu|cuda] [--precision fp32|fp16|bf16] [--sd_scripts ../sd-scripts] [--rounds 1] [--no_warm_up]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_train import model_file
from vs_sd_scripts import PROJECT, alternated_rounds, commit_of, fitted_rounds, run_once, write_tokenizers

from bench_common import device_name, record_result

SCRIPTS = {"sd15": "gen_img_diffusers.py", "sdxl": "sdxl_gen_img.py"}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", choices=list(SCRIPTS), default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batches", type=int, nargs=2, default=[1, 3], help="the two run lengths, in batches")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--sd_scripts", type=Path, help="a checkout of kohya-ss/sd-scripts to run beside this one")
    parser.add_argument("--sd_scripts_python", type=Path, help="its Python (default: <sd_scripts>/.venv/bin/python)")
    parser.add_argument("--python", type=Path, default=Path(sys.executable), help="this project's Python")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).with_name("runs"))
    parser.add_argument(
        "--no_warm_up", dest="warm_up", action="store_false", help="skip the warm-up runs (files already cached)"
    )
    parser.add_argument("--note", help="free text stored in the record")
    parser.add_argument("--no_record", action="store_true", help="print only; do not append to bench/results.jsonl")
    args = parser.parse_args()
    if args.sd_scripts is not None:
        args.sd_scripts = args.sd_scripts.resolve()
        args.sd_scripts_python = args.sd_scripts_python or args.sd_scripts / ".venv" / "bin" / "python"
    if args.batches[0] >= args.batches[1] or args.batches[0] < 1:
        parser.error("--batches: two batch counts, the first at least 1 and smaller than the second.")
    return args


def generation_flags(args: argparse.Namespace, model: Path, tokenizers: Path, batch_size: int) -> list[str]:
    """The flags both scripts get (without --images_per_prompt and --outdir, which differ per run)."""
    flags = ["--ckpt", str(model), "--prompt", "a photo of a red house by a lake, evening light --n blurry"]
    flags += ["--W", str(args.resolution), "--H", str(args.resolution), "--steps", str(args.steps)]
    flags += ["--sampler", args.sampler, "--seed", "1", "--batch_size", str(batch_size), "--sdpa"]
    flags += ["--tokenizer_cache_dir", str(tokenizers)]
    return flags + ({"fp16": ["--fp16"], "bf16": ["--bf16"]}.get(args.precision, []))


def main() -> None:
    args = parse_arguments()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = model_file(args.work_dir, args.model)
    scripts = {"this project": (args.python, PROJECT)}
    if args.sd_scripts is not None:
        scripts["sd-scripts"] = (args.sd_scripts_python, args.sd_scripts)
    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        write_tokenizers(temporary / "tokenizers", args.model)
        for batch_size in args.batch_sizes:
            flags = generation_flags(args, model, temporary / "tokenizers", batch_size)
            warm_up = args.warm_up and batch_size == args.batch_sizes[0]  # the files stay cached for the others
            results[f"batch_{batch_size}"] = measured(args, scripts, flags, batch_size, temporary, warm_up)
    record = {
        "benchmark": "generation",
        "device": device_label(args.device),
        "setting": {key: str(value) for key, value in vars(args).items() if key not in ("note", "no_record")},
        "commits": {name: commit_of(root) for name, (_, root) in scripts.items()},
        "results": results,
        "note": args.note,
    }
    if args.no_record:
        print(record)
    else:
        record_result(record)


def measured(
    args: argparse.Namespace, scripts: dict, flags: list[str], batch_size: int, temporary: Path, warm_up: bool
) -> dict:
    """Each script's images per second at this batch size: rounds of runs at the two lengths, alternated."""
    lengths = [batches * batch_size for batches in args.batches]

    def run(name: str, images: int, label: str) -> dict:
        python, root = scripts[name]
        output = temporary / f"out-{batch_size}-{label}-{images}-{list(scripts).index(name)}"
        run_flags = [*flags, "--images_per_prompt", str(images), "--outdir", str(output)]
        return run_once(python, root, SCRIPTS[args.model], run_flags, images, output, args.device == "cpu")

    print(f"batch size {batch_size}", flush=True)
    rounds = alternated_rounds(list(scripts), lengths, args.rounds, run, warm_up, "images")
    results = {}
    for name, per_round in rounds.items():
        fit = fitted_rounds(per_round, lengths)
        per_image = fit.pop("seconds_per_length")
        results[name] = {
            "images_per_second": round(1 / per_image, 3) if per_image > 0 else None,
            "seconds_per_image": round(per_image, 3),
            **fit,
        }
    return results


def device_label(device: str) -> str:
    import torch

    return device_name(torch.device(device))


if __name__ == "__main__":
    main()
