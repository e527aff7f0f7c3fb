"""--textual_inversion_embeddings: AUTOMATIC1111 / sd-scripts embedding files, as sd-scripts' generation scripts use
them. The file's name (without its suffix) becomes a word of the prompts; an embedding of n vectors adds the tokens
`name`, `name1`, ... `name{n-1}` to each tokenizer, with its vectors as their input embeddings, and `name` in a
prompt stands for all n. SD 1.x/2.x files hold one tensor (`string_to_param` / `*` in A1111's .pt files,
`emb_params` in safetensors); SDXL files hold `clip_l` and `clip_g`, one per text encoder."""

from __future__ import annotations

from pathlib import Path

import torch

from library.errors import UserError
from library.model_files.containers import load_pickle_dict, open_checkpoint
from library.model_files.stable_diffusion import StableDiffusionModel

SDXL_KEYS = ("clip_l", "clip_g")

TokenExpansions = tuple[dict[int, list[int]], ...]  # per tokenizer: the id of `name` -> the ids of all its tokens


def add_embeddings(model: StableDiffusionModel, files: list[Path]) -> TokenExpansions:
    """Add every file's tokens to the model's tokenizers and text encoders (in memory, after every file is checked);
    returns how each embedding's first token expands in the prompts."""
    loaded = []
    for file in files:
        vectors = _vectors(file, len(model.text_encoders))
        words = [file.stem] + [f"{file.stem}{index}" for index in range(1, len(vectors[0]))]
        for tokenizer, text_encoder, embedding in zip(model.tokenizers, model.text_encoders, vectors):
            _check_width(file, embedding, text_encoder)
            known = [word for word in words if word in tokenizer.get_vocab()]
            if known or any(words[0] == other[0] for _, other, _ in loaded):
                raise UserError(
                    f"{file}: the tokenizer already knows the word '{(known or words)[0]}'; rename the file, since"
                    " its name is the word that calls it."
                )
        loaded.append((file, words, vectors))
    expansions: TokenExpansions = tuple({} for _ in model.tokenizers)
    for file, words, vectors in loaded:
        for tokenizer, text_encoder, embedding, expansion in zip(
            model.tokenizers, model.text_encoders, vectors, expansions
        ):
            tokenizer.add_tokens(words)
            ids = tokenizer.convert_tokens_to_ids(words)
            text_encoder.resize_token_embeddings(len(tokenizer))
            weight = text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = embedding.to(weight.dtype)
            expansion[ids[0]] = ids
        print(f"textual inversion: '{words[0]}' ({len(words)} vectors) from {file}")
    return expansions


def _vectors(file: Path, encoders: int) -> list[torch.Tensor]:
    """The embedding's vectors (n, width) for each text encoder."""
    data = _read(file)
    if encoders == 2:
        missing = [key for key in SDXL_KEYS if key not in data]
        if missing:
            raise UserError(
                f"{file}: not an SDXL embedding (no {' or '.join(missing)}; it holds {', '.join(data) or 'nothing'});"
                " use an embedding made for SDXL."
            )
        vectors = [data[key] for key in SDXL_KEYS]
    else:
        if "clip_l" in data and "clip_g" in data:
            raise UserError(f"{file}: an SDXL embedding (clip_l, clip_g); use an embedding made for this model.")
        tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
        if not tensors:
            raise UserError(f"{file}: holds no embedding vectors; use an A1111 or sd-scripts embedding file.")
        vectors = [tensors[0]]
    return [vector.reshape(-1, vector.shape[-1]).float() for vector in vectors]


def _read(file: Path) -> dict:
    if not file.is_file():
        raise UserError(f"{file}: no such embedding file; check --textual_inversion_embeddings.")
    if file.suffix.lower() == ".safetensors":
        checkpoint = open_checkpoint(file)
        return {key: checkpoint.read(key) for key in checkpoint.keys()}
    data = load_pickle_dict(file)
    return data.get("string_to_param", data)


def _check_width(file: Path, embedding: torch.Tensor, text_encoder: torch.nn.Module) -> None:
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if embedding.shape[1] != width:
        raise UserError(
            f"{file}: its vectors are {embedding.shape[1]} wide but this model's text encoder takes {width};"
            " use an embedding made for this model family."
        )
