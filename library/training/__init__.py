"""The LoRA training run: diffusion math, optimizers and schedules, saving, and the loop itself."""
