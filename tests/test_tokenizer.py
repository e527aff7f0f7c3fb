"""The shipped CLIP tokenizer against known ids (specs/checkpoints.md section 11)."""

from __future__ import annotations

import hashlib
import json

import pytest

from library.model_files.family import ModelFamily
from library.model_files.tokenizer import BPE_FILE, clip_vocabulary, load_tokenizers, shipped_tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bpe_file_is_the_published_one():
    assert (
        hashlib.sha256(BPE_FILE.read_bytes()).hexdigest()
        == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    )


def test_vocabulary_and_merges_match_the_published_files():
    vocabulary, merges = clip_vocabulary()
    assert len(vocabulary) == 49408 and len(merges) == 48894
    assert vocabulary["!"] == 0 and vocabulary["<|startoftext|>"] == 49406 and vocabulary["<|endoftext|>"] == 49407
    # sizes and sha256 prefixes of openai/clip-vit-large-patch14's vocab.json and merges.txt, as the spec records them
    vocab_json = json.dumps(vocabulary, ensure_ascii=False).encode("utf-8")
    merges_txt = "\n".join(["#version: 0.2", *merges]).encode("utf-8") + b"\n"
    assert len(vocab_json) == 961_143 and hashlib.sha256(vocab_json).hexdigest().startswith("3f0c4f7d")
    assert len(merges_txt) == 524_619 and hashlib.sha256(merges_txt).hexdigest().startswith("9fd691f7")


@pytest.mark.parametrize(
    "prompt, ids",
    [
        ("a photo of a cat", CAT_IDS),
        ("A Photo  of a CAT", CAT_IDS),
        ("Hello, WORLD!", [49406, 3306, 267, 1002, 256, 49407]),
    ],
)
def test_known_prompts(prompt, ids):
    assert shipped_tokenizer()(prompt).input_ids == ids


@pytest.mark.parametrize(
    "family, pads", [(ModelFamily.SD1, [49407]), (ModelFamily.SD2, [0]), (ModelFamily.SDXL, [49407, 0])]
)
def test_padding_follows_the_family(family, pads):
    tokenizers = load_tokenizers(family)
    assert [t.pad_token_id for t in tokenizers] == pads
    for tokenizer, pad in zip(tokenizers, pads):
        ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and ids[:7] == CAT_IDS and set(ids[7:]) == {pad}


def test_truncation_keeps_start_and_end_tokens():
    ids = shipped_tokenizer()(" ".join(["cat"] * 100), truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and set(ids[1:-1]) == {2368}


def test_a_user_tokenizer_folder_is_used(tmp_path):
    custom = shipped_tokenizer()
    custom.add_tokens(["<my-token>"])
    custom.save_pretrained(tmp_path / "openai_clip-vit-large-patch14")
    (tokenizer,) = load_tokenizers(ModelFamily.SD1, cache_dir=tmp_path)
    assert tokenizer("<my-token>").input_ids == [49406, 49408, 49407]
