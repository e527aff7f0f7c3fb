"""Merge LoRAs into an SDXL checkpoint, or several SDXL LoRAs into one, with sd-scripts' sdxl_merge_lora.py flags.

    python networks/sdxl_merge_lora.py --sd_model sdxl.safetensors --save_to merged.safetensors \
        --models a.safetensors --ratios 0.8
    python networks/sdxl_merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors \
        --ratios 1 1 --concat

The same tool as networks/merge_lora.py (read its description), for SDXL: the LoRA modules are named `lora_te1_`
(CLIP ViT-L), `lora_te2_` (OpenCLIP bigG, whose q, k, v are thirds of the file's fused in_proj tensors) and
`lora_unet_` with SGM U-Net names (diffusers-style U-Net names are found too). There is no --v2; `--lbws` gives
block-wise ratios (one JSON list per model, 12 or 20 values: library/lora/block_weights.py): a module's ratio is its
model's ratio times its block's weight, in every mode (the default LoRA + LoRA factor sum squares it with the ratio,
as sd-scripts does). See docs/lora_tools.md.
"""

from __future__ import annotations

from library.errors import run_cli
from networks.merge_lora import main

if __name__ == "__main__":
    run_cli(lambda: main(sdxl=True))
