"""Generate images with a Stable Diffusion 1.x / 2.x / SDXL model and LoRA networks, with sd-scripts'
gen_img_diffusers.py flags:

    python gen_img_diffusers.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry" --steps 30 \
        --sampler k_euler_a --seed 1 --network_module networks.lora --network_weights my_lora.safetensors \
        --network_mul 0.8

See docs/generation.md.
"""

from __future__ import annotations

from library.errors import run_cli
from library.generation import build_parser, generate, options_from_arguments


def main() -> None:
    args = build_parser().parse_args()
    notes: list[str] = []
    options = options_from_arguments(args, notes)
    for note in notes:
        print(note)
    generate(options)


if __name__ == "__main__":
    run_cli(main)
