"""Generate images with an SDXL model and LoRA networks, with sd-scripts' sdxl_gen_img.py flags (the same generator
as gen_img_diffusers.py; width and height default to 1024):

    python sdxl_gen_img.py --ckpt sdxl.safetensors --outdir out --prompt "a cat --n blurry" --steps 30 \
        --network_module networks.lora --network_weights my_sdxl_lora.safetensors --network_mul 0.8

See docs/generation.md.
"""

from __future__ import annotations

from library.errors import run_cli
from library.generation import run_generation_script

if __name__ == "__main__":
    run_cli(lambda: run_generation_script(sdxl=True))
