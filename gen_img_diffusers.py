"""Generate images with a Stable Diffusion 1.x / 2.x / SDXL model and LoRA networks, with sd-scripts'
gen_img_diffusers.py flags:

    python gen_img_diffusers.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry" --steps 30 \
        --sampler k_euler_a --seed 1 --network_module networks.lora --network_weights my_lora.safetensors \
        --network_mul 0.8

SDXL models work here too; sdxl_gen_img.py is the same script for SDXL models only. See docs/generation.md.
"""

from __future__ import annotations

from library.errors import run_cli
from library.generation import run_generation_script

if __name__ == "__main__":
    run_cli(lambda: run_generation_script(sdxl=False))
