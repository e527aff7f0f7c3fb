"""Train a LoRA for Stable Diffusion 1.x / 2.x with sd-scripts' command line:

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors --dataset_config data.toml \
        --output_dir out --output_name my_lora --network_module networks.lora --learning_rate 1e-4 --max_train_steps 400

`python train_network.py ...` works the same on one device. SDXL models train with sdxl_train_network.py. See
docs/training.md.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no collections while the imports build their objects; run_cli turns the collector back on

from library.errors import run_cli  # noqa: E402
from library.training.script import run_training_script  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: run_training_script(sdxl=False))
