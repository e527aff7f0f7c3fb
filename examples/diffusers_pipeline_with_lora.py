"""Generate an image with a Diffusers pipeline and several LoRA files, using only `networks/lora.py`.

This is the example from sd-scripts' train_network_README ("Generating with the Diffusers pipeline"), made
runnable: a `StableDiffusionPipeline` from a Diffusers folder, one network per LoRA file made with
`create_network_from_weights(multiplier, None, vae, text_encoder, unet, sd)`, then either
`apply_to` + `load_state_dict` (the multiplier can be changed later with `set_multiplier`) or, with `--merge`,
`merge_to` (the weights are added into the model; `set_multiplier` then has no effect).

    python examples/diffusers_pipeline_with_lora.py --model path/to/diffusers_folder \
        --loras lora1.safetensors lora2.safetensors lora3.safetensors --multipliers 0.5 0.7 0.5 \
        --prompt "masterpiece, best quality, 1girl, in white shirt, looking at viewer" --output by_diffusers.png

A single-file checkpoint (.ckpt/.safetensors) is converted to a Diffusers folder first with
`tools/convert_diffusers20_original_sd.py`. SD1.x and SD2.x models; SDXL needs `StableDiffusionXLPipeline`.

What differs from the README's code, and why (the README was written for Diffusers 0.10.2):
- `torch_dtype=` is `dtype=`: Diffusers deprecated `torch_dtype` and will remove it in 1.0.
- `revision="fp16"` is dropped: it only meant something for hub ids with an "fp16" branch, which Diffusers
  deprecated (and it is ignored for a local folder).
- float16 only on CUDA; on the CPU the pipeline runs in float32 (Diffusers refuses to run float16 on the CPU),
  and `torch.autocast("cuda")` is enabled only on CUDA.
- The paths, prompt, multipliers, device and step count come from flags; the three copied blocks are one loop;
  `--seed` gives a fixed `torch.Generator` so that runs can be compared; the unused `LoRAModule` import is gone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so that `networks` imports from a checkout
from networks.lora import create_network_from_weights  # noqa: E402


def create_pipe(model_id_or_dir: str, device: str) -> StableDiffusionPipeline:
    # if the ckpt is CompVis based, convert it to Diffusers beforehand with tools/convert_diffusers20_original_sd.py.
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    print(f"creating pipe from {model_id_or_dir}...")
    pipe = StableDiffusionPipeline.from_pretrained(model_id_or_dir, dtype=dtype)
    pipe = pipe.to(device)
    return pipe


def load_lora_networks(
    pipe: StableDiffusionPipeline, lora_paths: list[str], multipliers: list[float], device: str, merge: bool = False
) -> list:
    vae = pipe.vae
    text_encoder = pipe.text_encoder
    unet = pipe.unet

    print("loading lora networks...")
    networks = []
    for lora_path, multiplier in zip(lora_paths, multipliers, strict=True):
        sd = load_file(lora_path)  # If the file is .ckpt, use torch.load(lora_path, weights_only=True) instead.
        network, sd = create_network_from_weights(multiplier, None, vae, text_encoder, unet, sd)
        if merge:
            # merge the weights instead of apply_to + load_state_dict. network.set_multiplier does not work then
            network.merge_to(text_encoder, unet, sd)
        else:
            network.apply_to(text_encoder, unet)
            network.load_state_dict(sd)
            network.to(device, dtype=unet.dtype)
        networks.append(network)
    return networks


def generate(
    pipe: StableDiffusionPipeline,
    prompt: str,
    negative_prompt: str,
    device: str,
    steps: int = 50,
    seed: int | None = None,
    height=None,
    width=None,
):
    print("generating image...")
    generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
    with torch.autocast("cuda", enabled=device.startswith("cuda")):
        image = pipe(
            prompt,
            guidance_scale=7.5,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            generator=generator,
            height=height,
            width=width,
        ).images[0]
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Diffusers model folder (or a hub id, which is downloaded)")
    parser.add_argument("--loras", nargs="+", required=True, help="LoRA .safetensors files written by train_network.py")
    parser.add_argument("--multipliers", nargs="+", type=float, default=None, help="one per LoRA (default 1.0 each)")
    parser.add_argument("--prompt", default="masterpiece, best quality, 1girl, in white shirt, looking at viewer")
    parser.add_argument("--negative_prompt", default="bad quality, worst quality, bad anatomy, bad hands")
    parser.add_argument("--output", default="by_diffusers.png", help="the image file to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50, help="inference steps")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed, for reproducible images")
    parser.add_argument("--height", type=int, default=None, help="default: the model's own size")
    parser.add_argument("--width", type=int, default=None, help="default: the model's own size")
    parser.add_argument("--merge", action="store_true", help="merge_to the model instead of apply_to + load_state_dict")
    args = parser.parse_args(argv)
    multipliers = args.multipliers or [1.0] * len(args.loras)
    if len(multipliers) != len(args.loras):
        parser.error(f"--multipliers: give one per LoRA file ({len(args.loras)}), not {len(multipliers)}.")

    pipe = create_pipe(args.model, args.device)
    networks = load_lora_networks(pipe, args.loras, multipliers, args.device, merge=args.merge)
    print(f"{len(networks)} LoRA networks {'merged' if args.merge else 'applied'}")
    image = generate(
        pipe, args.prompt, args.negative_prompt, args.device, args.steps, args.seed, args.height, args.width
    )

    # if not merged, you can use set_multiplier
    # networks[0].set_multiplier(0.8)
    # and generate image again...

    image.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
