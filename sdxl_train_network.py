"""Train a LoRA for SDXL with sd-scripts' command line:

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors \
        --dataset_config data.toml --output_dir out --output_name my_lora --network_module networks.lora \
        --network_train_unet_only --cache_latents --cache_text_encoder_outputs --mixed_precision bf16 \
        --learning_rate 1e-4 --max_train_steps 1000

It takes every option of train_network.py, plus --cache_text_encoder_outputs(_to_disk) and
--disable_mmap_load_safetensors. See docs/training_sdxl.md.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no collections while the imports build their objects; run_cli turns the collector back on

from library.errors import run_cli  # noqa: E402
from library.training.script import run_training_script  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: run_training_script(sdxl=True))
