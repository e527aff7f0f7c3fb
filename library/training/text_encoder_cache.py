"""--cache_text_encoder_outputs and --cache_text_encoder_outputs_to_disk (specs/training.md 4.3): every caption is
encoded once before training by the frozen text encoders, which then leave the device; with the disk option the
outputs are kept beside each image in sd-scripts' `<image>_te_outputs.npz` files for the next run.

The files hold sd-scripts' keys (`hidden_state1`, `hidden_state2`, `pool2`) and two of ours, `caption` and
`text_encoders`, so that a file is used only for the caption it was made from (after prefix, suffix and secondary
separator, which sd-scripts leaves out of its cache) and for the same text encoders, token length and dtype; sd-scripts
keeps using stale files after a caption or model change. Files without our keys are encoded again."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.dataset.captions import CaptionSettings, process_caption
from library.dataset.plan import DatasetPlan
from library.errors import UserError
from library.file_io import atomic_output
from library.model_files.stable_diffusion import place
from library.text_encoding import CaptionStates, tokenize
from library.training.families import TrainingFamily

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"
ENCODE_BATCH = 16
OWN_KEYS = ("caption", "text_encoders")


def check_captions_fixed(plans: list[DatasetPlan], flag: str) -> None:
    """Cached outputs need captions that come out the same at every use; the first subset that varies them is
    refused, naming the setting and the fix (sd-scripts asserts without saying which)."""
    for plan in plans:
        for subset in plan.config.subsets:
            settings = CaptionSettings.of(subset)
            if not settings.varies_per_use:
                continue
            varying = [
                name
                for name, on in (
                    ("shuffle_caption", settings.shuffle_caption),
                    ("caption_tag_dropout_rate", settings.caption_tag_dropout_rate > 0),
                    ("token_warmup_step", settings.token_warmup_step > 0),
                    ("enable_wildcard", settings.enable_wildcard),
                )
                if on
            ]
            where = subset.image_dir or subset.metadata_file
            raise UserError(
                f"{flag}: the subset {where} sets {varying[0]}, which changes its captions from use to use, so they "
                "cannot be encoded "
                f"once; turn {varying[0]} off for it, or drop {flag}."
            )


def outputs_file(image_path: Path) -> Path:
    """sd-scripts' name: `<image path without extension>_te_outputs.npz`."""
    return image_path.with_name(image_path.stem + TE_OUTPUTS_SUFFIX)


def cache_text_encoder_outputs(
    family: TrainingFamily,
    plans: list[DatasetPlan],
    max_token_length: int | None,
    to_disk: bool,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> tuple[CaptionStates, int, int]:
    """The outputs of every caption the datasets use (the empty caption too when captions are dropped), kept on the
    CPU; returns them with the counts of captions encoded and of files reused. The text encoders end on the CPU."""
    captions = _fixed_captions(plans)
    states = CaptionStates()
    fingerprint = _encoders_fingerprint(family, max_token_length, dtype)
    to_encode = []
    for caption, image_paths in captions.items():
        key_ids = _token_ids(family, [caption], max_token_length)
        loaded = _read_valid(family, image_paths, caption, fingerprint) if to_disk else None
        if loaded is None:
            to_encode.append((caption, image_paths, key_ids))
        else:
            states.put(key_ids, loaded)
    encoders = family.text_encoders
    for encoder in encoders:
        place(encoder, device, dtype)
    with tqdm(total=len(to_encode), unit="caption", desc="caching text encoder outputs", disable=not progress) as bar:
        for start in range(0, len(to_encode), ENCODE_BATCH):
            chunk = to_encode[start : start + ENCODE_BATCH]
            ids = _token_ids(family, [caption for caption, _, _ in chunk], max_token_length)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                outputs = tuple(
                    output.float().cpu() for output in family.encode_text([part.to(device) for part in ids])
                )
            for row, (caption, image_paths, key_ids) in enumerate(chunk):
                entry = tuple(output[row] for output in outputs)
                states.put(key_ids, entry)
                if to_disk:
                    for image_path in image_paths:
                        _write(family, outputs_file(image_path), entry, caption, fingerprint)
            bar.update(len(chunk))
    for encoder in encoders:
        place(encoder, "cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return states, len(to_encode), len(captions) - len(to_encode)


def _fixed_captions(plans: list[DatasetPlan]) -> dict[str, list[Path]]:
    """Each caption as training will use it, with the images whose files hold it; "" (no image file) when a subset
    drops captions."""
    captions: dict[str, list[Path]] = {}
    for plan in plans:
        for sample in plan.samples:
            settings = replace(
                CaptionSettings.of(sample.subset), caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0
            )
            caption = process_caption(
                sample.image.caption, settings, random.Random(0), epoch=1, global_step=0, max_train_steps=1
            )
            paths = captions.setdefault(caption, [])
            if sample.image.path not in paths:
                paths.append(sample.image.path)
        if any(subset.caption_dropout_rate or subset.caption_dropout_every_n_epochs for subset in plan.config.subsets):
            captions.setdefault("", [])
    return captions


def _token_ids(family: TrainingFamily, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
    return [tokenize(tokenizer, captions, max_token_length) for tokenizer in family.model.tokenizers]


def _encoders_fingerprint(family: TrainingFamily, max_token_length: int | None, dtype: torch.dtype) -> str:
    """A short hash of a strided sample of every text-encoder weight, with the token length and dtype: it changes
    with the model, and costs milliseconds."""
    digest = hashlib.sha256(f"{max_token_length}/{dtype}".encode())
    for encoder in family.text_encoders:
        for name, parameter in encoder.state_dict().items():
            flat = parameter.detach().reshape(-1)
            digest.update(name.encode())
            digest.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_valid(family: TrainingFamily, image_paths: list[Path], caption: str, fingerprint: str):
    """The outputs in the first image's file when it was made for this caption and these encoders, else None."""
    if not image_paths:
        return None
    try:
        with np.load(outputs_file(image_paths[0])) as npz:
            if str(npz["caption"]) != caption or str(npz["text_encoders"]) != fingerprint:
                return None
            return family.text_outputs_from_arrays(npz)
    except Exception:  # missing, truncated, sd-scripts' own (no caption key) or of another shape: encode again
        return None


def _write(family: TrainingFamily, path: Path, entry: tuple[torch.Tensor, ...], caption: str, fingerprint: str) -> None:
    arrays = {
        **family.text_outputs_to_arrays(entry),
        "caption": np.array(caption),
        "text_encoders": np.array(fingerprint),
    }
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, **arrays)
