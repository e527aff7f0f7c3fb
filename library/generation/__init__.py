"""gen_img_diffusers.py and sdxl_gen_img.py: images from an SD 1.x / 2.x / SDXL model with zero or more LoRA networks
(docs/generation.md).

The flags are sd-scripts' (`options`); they become a `GenerationOptions` once, at the edge. Networks are loaded and
checked against the model before the first image (`networks`), so a LoRA for another model stops the run with one
sentence and no output. Images are planned, batched and drawn (`drawing`) by `library.sampling.generate_images`,
the trainer's sample-image path, so prompts, samplers and seeds behave as in the trainer's sample images; `--grid`
lays them out as one contact sheet (`grid`).
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import NamedTuple

import torch

from library.cpu_layers import use_fast_cpu_layers
from library.errors import UserError
from library.file_io import check_output_folder
from library.generation.drawing import (
    ImageWriter,
    PlannedImage,
    batches,
    draw_batch,
    image_file_name,
    plan,
    planned_images,
)
from library.generation.embeddings import add_embeddings
from library.generation.grid import draw_grid
from library.generation.networks import AttachedNetworks, attach_networks
from library.generation.options import GenerationOptions, build_parser, options_from_arguments, typed_prompt
from library.lora.files import read_lora_file
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import StableDiffusionModel, load_stable_diffusion, local_model_family, place
from library.model_files.vae import load_vae_weights
from library.sampling import SamplePrompt
from library.sampling.generate import DrawingSetup

__all__ = [
    "build_parser",
    "generate",
    "image_file_name",
    "options_from_arguments",
    "planned_images",
    "run_generation_script",
]


def generate(options: GenerationOptions, now: datetime.datetime | None = None) -> list[Path]:
    """Load the model and networks, draw every image, save each as PNG; returns the files in order."""
    check_output_folder(options.outdir, "--outdir")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(options)
    if options.show_network_metadata:
        for choice in options.networks:
            print(f"{choice.weights}:")
            print("\n".join(f"  {key}: {value}" for key, value in sorted(read_lora_file(choice.weights)[1].items())))
    if device.type == "cpu" and options.dtype == torch.float32:
        for module in (model.unet, *model.text_encoders):
            use_fast_cpu_layers(module)  # before the networks wrap the layers
    expansions = add_embeddings(model, options.embeddings)
    networks = attach_networks(model, options.networks, options.merge_networks)
    _place(model, networks, device, options.dtype, options.xformers)
    setup = DrawingSetup(
        model.v_prediction,
        options.clip_skip,
        options.sampler,
        device,
        options.dtype,
        options.max_windows,
        options.vae_batch_size,
        expansions,
    )
    if options.grid is not None:
        return [draw_grid(model, networks, options, plan(options), setup, now)]
    draw = Drawing(model, networks, setup, options, ImageWriter(options, now))
    if options.interactive:
        _draw_typed_prompts(draw)
    else:
        draw(plan(options))
    return draw.writer.files


class Drawing(NamedTuple):
    model: StableDiffusionModel
    networks: AttachedNetworks
    setup: DrawingSetup
    options: GenerationOptions
    writer: ImageWriter

    def __call__(self, planned: list[PlannedImage]) -> None:
        """Draw and save the images, in batches of the same settings and network strengths."""
        for batch in batches(planned, self.options.batch_size, self.options.sampler):
            self.networks.set_multipliers(batch[0].prompt.network_multipliers, f"prompt '{batch[0].prompt.prompt}'")
            self.writer.save(batch, draw_batch(self.model, batch, self.setup, self.options))


def _draw_typed_prompts(draw: Drawing) -> None:
    """--interactive: each prompt drawn as it is typed; the run's seeds count on across prompts."""
    drawn, seed = 0, draw.options.seed
    while (prompt := _typed_prompt(draw.options.line_defaults)) is not None:
        planned = plan(dataclasses.replace(draw.options, prompts=[prompt], seed=None if seed is None else seed + drawn))
        draw(planned)
        drawn += len(planned)


def _typed_prompt(defaults: dict[str, object]) -> SamplePrompt | None:
    """The next prompt typed (a prompt-file line); None at the end of the input (Ctrl+D). A line without a prompt
    is asked again; a line that does not parse is named and asked again."""
    while True:
        print("Type a prompt (options such as --n, --d, --s may follow; Ctrl+D to end):")
        try:
            line = input()
        except EOFError:
            return None
        if not line.split(" --")[0].strip():
            continue
        try:
            return typed_prompt(line, defaults)
        except UserError as error:
            print(f"error: {error}")


def load_model(options: GenerationOptions) -> StableDiffusionModel:
    """The model in float32 on the CPU (networks are merged in float32), with the --vae weights if given."""
    model = load_stable_diffusion(
        options.ckpt,
        family=options.family,
        v_parameterization=options.v_parameterization,
        tokenizer_cache_dir=options.tokenizer_cache_dir,
    )
    if options.vae is not None:
        load_vae_weights(model.vae, options.vae)
    return model


def _place(
    model: StableDiffusionModel,
    networks: AttachedNetworks,
    device: torch.device,
    dtype: torch.dtype,
    xformers: bool,
) -> None:
    """U-Net and text encoders in `dtype`; the VAE and the applied networks stay float32 (autocast mixes them)."""
    place(model.unet, device, dtype)
    for text_encoder in model.text_encoders:
        place(text_encoder, device, dtype)
    place(model.vae, device)
    for network in networks.applied:
        if network is not None:
            network.to(device)
    if xformers:
        try:
            model.unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as error:
            print(f"--xformers: not usable here ({error}); using PyTorch's scaled-dot-product attention.")


def run_generation_script(sdxl: bool = False, argv: list[str] | None = None) -> list[Path]:
    """gen_img_diffusers.py (every family) and sdxl_gen_img.py (SDXL models only): flags to images."""
    args = build_parser().parse_args(argv)
    if sdxl and local_model_family(args.ckpt) not in (ModelFamily.SDXL, None):
        raise UserError(f"--ckpt {args.ckpt}: not an SDXL model; draw with it using gen_img_diffusers.py.")
    notes: list[str] = []
    options = options_from_arguments(args, notes)
    for note in notes:
        print(note)
    return generate(options)
