"""LoRA naming, math, files, metadata and block-wise settings shared by the networks and the tools."""
