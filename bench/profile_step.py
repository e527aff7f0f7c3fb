"""Where one optimizer step of this project's trainer spends its time (GitHub issue 16): the torch profiler around
step `--step` of a real training run, its operators' own times summed by what they belong to.

The run is bench/vs_sd_scripts.py's setting (real-size architecture with random weights, synthetic dataset, the
same flags). Forward time is attributed by the module the operator ran in (text encoder, U-Net; the LoRA modules
run inside the layers they adapt, so their time is their host's); the backward pass and the optimizer step are the
autograd engine's and the optimizer's ranges; the rest of the step (data, loss, noise, logging) is "other". The
largest operators of forward and backward are listed too. Nothing is recorded; the table is for bench/NOTES.md.

    python bench/profile_step.py [--model sd15|sdxl] [--resolution 128] [--batch_size 2] [--network_dim 4]
        [--conv_dim 4] [--mixed_precision no] [--step 3] [trainer flags ...]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import torch
from bench_train import make_dataset, model_file
from torch.profiler import ProfilerActivity, profile, record_function
from vs_sd_scripts import SCRIPTS, training_flags, write_tokenizers

BACKWARD = "autograd::engine::evaluate_function"
OPTIMIZER = "Optimizer.step"


def parse_arguments() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", choices=list(SCRIPTS), default="sd15")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--network_dim", type=int, default=4)
    parser.add_argument("--conv_dim", type=int, default=4)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--unet_only", action="store_true")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--step", type=int, default=3, help="the optimizer step to profile (after a warm-up)")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).with_name("runs"))
    return parser.parse_known_args()


class Attribution:
    """Forward hooks that open a profiler range named after the component a module belongs to."""

    def __init__(self):
        self.handles = []

    def label(self, module: torch.nn.Module, name: str) -> None:
        ranges = []

        def enter(*_):
            ranges.append(record_function(name))
            ranges[-1].__enter__()

        def leave(*_):
            ranges.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def install(attribution: Attribution) -> None:
    """Label the text encoders and the U-Net when the trainer loads them. The LoRA modules run inside the layers
    they adapt (called as the layer's forward, not as modules of their own), so their time is their host's."""
    import library.training.trainer as trainer

    load = trainer.load_training_family

    def labelled_load(*args, **kwargs):
        family = load(*args, **kwargs)
        for encoder in family.model.text_encoders:
            attribution.label(encoder, "text encoder forward")
        attribution.label(family.model.unet, "U-Net forward")
        return family

    trainer.load_training_family = labelled_load


def category(event, labels: dict) -> str:
    """The innermost labelled range (or backward / optimizer) an operator ran in."""
    parent = event
    while parent is not None:
        if parent.name in labels:
            return parent.name
        if parent.name.startswith(BACKWARD):
            return "backward"
        if parent.name.startswith(OPTIMIZER):
            return "optimizer step"
        parent = parent.cpu_parent
    return "other (data, noise, loss, logging)"


def main() -> None:
    args, extra = parse_arguments()
    import library.training.trainer as trainer
    from library.training.arguments import build_parser
    from library.training.options import training_options

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = model_file(args.work_dir, args.model)
    attribution = Attribution()
    install(attribution)
    profiler = profile(activities=[ProfilerActivity.CPU])

    def on_step(step: int) -> None:
        if step == args.step - 1:
            profiler.start()
        elif step == args.step:
            profiler.stop()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        make_dataset(folder / "data", args.images, 10, args.resolution)
        write_tokenizers(folder / "tokenizers", args.model)
        flags = training_flags(args, model, folder / "data", folder / "tokenizers", extra)
        flags += ["--max_train_steps", str(args.step), "--output_dir", str(folder / "out")]
        sdxl = args.model == "sdxl"
        trainer.train(training_options(build_parser(sdxl).parse_args(flags), sdxl), on_step=on_step)
    report(profiler)


def report(profiler) -> None:
    labels = {"text encoder forward", "U-Net forward"}
    events = [event for event in profiler.events() if event.device_type.name == "CPU"]
    totals, operators = collections.Counter(), collections.Counter()
    for event in events:
        if event.name.startswith("aten::") or event.name.startswith("mkldnn"):
            where = category(event, labels)
            totals[where] += event.self_cpu_time_total
            operators[(where, event.name)] += event.self_cpu_time_total
    step = sum(totals.values())
    print(f"operators' own time in one step: {step / 1e3:.0f} ms")
    for where, micros in totals.most_common():
        print(f"  {where:40s} {micros / 1e3:8.0f} ms  {micros / step:6.1%}")
    print("largest operators:")
    for (where, name), micros in operators.most_common(15):
        print(f"  {where:28s} {name:42s} {micros / 1e3:8.0f} ms")


if __name__ == "__main__":
    main()
