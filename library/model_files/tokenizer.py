"""The CLIP tokenizer, built offline from the BPE merges file that ships with the project.

The vocabulary is derived exactly as OpenAI's CLIP builds it (specs/checkpoints.md section 11): 256 byte symbols,
the same with `</w>`, one token per merge, then the two special tokens: 49408 ids in all. A user may still point to
a tokenizer folder of their own (sd-scripts' `--tokenizer_cache_dir` layout or a Diffusers model's `tokenizer/`).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

from library.model_files.family import ModelFamily

BPE_FILE = Path(__file__).parent / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2
MAX_LENGTH = 77
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"

# Padding differs by family and changes the text encoder's outputs at padded positions: SD1 and SDXL's first
# tokenizer pad with the end token (49407), SD2 and SDXL's second with "!" (id 0).
PAD_TOKENS: dict[ModelFamily, tuple[str, ...]] = {
    ModelFamily.SD1: (END_OF_TEXT,),
    ModelFamily.SD2: ("!",),
    ModelFamily.SDXL: (END_OF_TEXT, "!"),
}
# The folder names sd-scripts uses under --tokenizer_cache_dir (a hub id with '/' replaced by '_').
CACHE_FOLDER_NAMES: dict[ModelFamily, tuple[str, ...]] = {
    ModelFamily.SD1: ("openai_clip-vit-large-patch14",),
    ModelFamily.SD2: ("stabilityai_stable-diffusion-2",),
    ModelFamily.SDXL: ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"),
}


def _bytes_to_unicode() -> list[str]:
    """Printable bytes keep their code point; the 68 others map to 256, 257, ... in increasing byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


@functools.cache
def clip_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges) exactly as OpenAI's CLIP derives them from the BPE file."""
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    merges = tuple(lines[1 : 1 + MERGE_COUNT])
    symbols = _bytes_to_unicode()
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
    )
    return {token: index for index, token in enumerate(tokens)}, merges


def shipped_tokenizer(pad_token: str = END_OF_TEXT) -> CLIPTokenizer:
    vocabulary, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocabulary),
        merges=[tuple(merge.split(" ")) for merge in merges],
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


def load_tokenizers(
    family: ModelFamily, tokenizer_dirs: list[Path | None] | None = None, cache_dir: Path | None = None
) -> list[CLIPTokenizer]:
    """One tokenizer per text encoder: from the given folders where they exist, else the shipped one.

    `tokenizer_dirs` are a Diffusers model's `tokenizer`/`tokenizer_2` folders; `cache_dir` is sd-scripts'
    `--tokenizer_cache_dir`. The pad token always follows the family's rule.
    """
    tokenizers = []
    for index, pad_token in enumerate(PAD_TOKENS[family]):
        candidates = [tokenizer_dirs[index] if tokenizer_dirs and index < len(tokenizer_dirs) else None]
        if cache_dir is not None:
            candidates.append(Path(cache_dir) / CACHE_FOLDER_NAMES[family][index])
        folder = next((c for c in candidates if c is not None and _holds_tokenizer(c)), None)
        if folder is None:
            tokenizers.append(shipped_tokenizer(pad_token))
        else:
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, local_files_only=True))
    return tokenizers


def _holds_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
