"""Datasets: folders and TOML configs, captions, buckets, images and latent caches."""
