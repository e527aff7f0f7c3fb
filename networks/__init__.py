"""LoRA network modules (`--network_module networks.lora`, `networks.dylora`) and the LoRA tools, run as
`python networks/<tool>.py`."""
