"""Tokenisation with `--max_token_length` windows and text encoding with `--clip_skip` (specs/training.md 2.3)."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.model_files.family import ModelFamily
from library.text_encoding import CaptionStates, encode_tokens, token_length, tokenize
from library.tiny_models import make_tiny_model

BOS, EOS = 49406, 49407
CAT = 2368  # "cat" is one token
CAPTIONS = ["a photo of a cat", " ".join(["cat"] * 100)]


@pytest.fixture(scope="module")
def sd1():
    return make_tiny_model(ModelFamily.SD1)


@pytest.fixture(scope="module")
def sd2():
    return make_tiny_model(ModelFamily.SD2)


def final_layer_norm(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def window_states(text_encoder, window_ids, clip_skip):
    """The hidden states of one 77-token window, straight from the model."""
    if clip_skip is None:
        return text_encoder(window_ids).last_hidden_state
    return final_layer_norm(text_encoder)(text_encoder(window_ids, output_hidden_states=True).hidden_states[-clip_skip])


@pytest.mark.parametrize("max_token_length, total", [(None, 77), (75, 77), (150, 152), (225, 227)])
def test_token_length(max_token_length, total):
    assert token_length(max_token_length) == total


@pytest.mark.parametrize("wrong", [100, 300, 0])
def test_a_wrong_max_token_length_names_the_flag_and_the_choices(wrong):
    with pytest.raises(UserError, match=r"--max_token_length is .*75, 150 or 225"):
        token_length(wrong)


def test_77_tokens_are_the_tokenizers_own_padded_ids(sd1, sd2):
    for tokenizer in (sd1.tokenizers[0], sd2.tokenizers[0]):
        ids = tokenize(tokenizer, CAPTIONS, None)
        assert ids.shape == (2, 1, 77) and ids.dtype == torch.long
        for row, caption in zip(ids, CAPTIONS):
            assert row[0].tolist() == tokenizer(caption, padding="max_length", truncation=True, max_length=77).input_ids


@pytest.mark.parametrize("max_token_length, windows", [(150, 2), (225, 3)])
def test_sd1_windows_start_with_bos_end_with_eos_and_hold_the_full_tokenisation(sd1, max_token_length, windows):
    tokenizer = sd1.tokenizers[0]
    captions = [*CAPTIONS, " ".join(f"cat dog {n}" for n in range(80))]  # the last one is overlong
    ids = tokenize(tokenizer, captions, max_token_length)
    assert ids.shape == (3, windows, 77)
    assert (ids[:, :, 0] == BOS).all() and (ids[:, :, -1] == EOS).all()
    total = max_token_length + 2
    for row, caption in zip(ids, captions):
        full = tokenizer(caption, padding="max_length", truncation=True, max_length=total).input_ids
        assert len(full) == total
        for k in range(windows):
            assert row[k, 1:76].tolist() == full[1 + 75 * k : 76 + 75 * k]
    # 100 cats: 75 in the first window, 25 then EOS and padding (EOS) in the second, the third is empty
    assert ids[1, 0, 1:76].tolist() == [CAT] * 75
    assert ids[1, 1, 1:].tolist() == [CAT] * 25 + [EOS] * 51


def test_sd2_windows_follow_the_pad_rules(sd2):
    tokenizer = sd2.tokenizers[0]
    assert tokenizer.pad_token_id == 0 and tokenizer.convert_ids_to_tokens(0) == "!"
    ids = tokenize(tokenizer, [" ".join(["cat"] * 100), " ".join(["cat"] * 300)], 225)
    assert ids.shape == (2, 3, 77)
    hundred, overlong = ids
    # cut inside the text: the window's last id is forced to EOS
    assert hundred[0].tolist() == [BOS] + [CAT] * 75 + [EOS]
    # the text ends inside the window: EOS then "!" padding, also in the last place
    assert hundred[1].tolist() == [BOS] + [CAT] * 25 + [EOS] + [0] * 50
    # an empty window: EOS right after BOS
    assert hundred[2].tolist() == [BOS, EOS] + [0] * 75
    # an overlong caption is cut: every window is full and ends with EOS
    for window in overlong:
        assert window.tolist() == [BOS] + [CAT] * 75 + [EOS]


def test_sd2_content_ids_equal_the_full_tokenisation(sd2):
    tokenizer = sd2.tokenizers[0]
    caption = " ".join(f"cat dog {n}" for n in range(30))
    ids = tokenize(tokenizer, [caption], 150)[0]
    full = tokenizer(caption, padding="max_length", truncation=True, max_length=152).input_ids
    assert full[76] not in (0, EOS)  # the second window is not empty, so its ids are copied unchanged
    assert ids[0, 1:76].tolist() == full[1:76] and ids[1, 1:76].tolist() == full[76:151]


def test_one_window_is_the_models_last_hidden_state(sd1):
    text_encoder = sd1.text_encoders[0]
    ids = tokenize(sd1.tokenizers[0], CAPTIONS, None)
    with torch.no_grad():
        expected = text_encoder(ids[:, 0]).last_hidden_state
        assert torch.allclose(encode_tokens(text_encoder, ids, None), expected, atol=1e-6)
        assert torch.allclose(encode_tokens(text_encoder, ids, 1), expected, atol=1e-6)


def test_clip_skip_two_is_the_normalised_penultimate_layer(sd1):
    text_encoder = sd1.text_encoders[0]
    ids = tokenize(sd1.tokenizers[0], CAPTIONS, None)
    with torch.no_grad():
        penultimate = text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
        expected = final_layer_norm(text_encoder)(penultimate)
        result = encode_tokens(text_encoder, ids, 2)
    assert result.shape == (2, 77, text_encoder.config.hidden_size)
    assert torch.allclose(result, expected, atol=1e-6)
    assert not torch.allclose(result, text_encoder(ids[:, 0]).last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("family, clip_skip", [(ModelFamily.SD1, None), (ModelFamily.SD1, 2), (ModelFamily.SD2, None)])
def test_two_windows_are_stitched_into_152_states(sd1, sd2, family, clip_skip):
    model = sd1 if family is ModelFamily.SD1 else sd2
    text_encoder = model.text_encoders[0]
    ids = tokenize(model.tokenizers[0], CAPTIONS, 150)
    with torch.no_grad():
        result = encode_tokens(text_encoder, ids, clip_skip)
        first, second = (window_states(text_encoder, ids[:, k], clip_skip) for k in range(2))
    assert result.shape == (2, 152, text_encoder.config.hidden_size)
    assert torch.allclose(result[:, 0], first[:, 0], atol=1e-5)
    assert torch.allclose(result[:, 1:76], first[:, 1:76], atol=1e-5)
    assert torch.allclose(result[:, 76:151], second[:, 1:76], atol=1e-5)
    assert torch.allclose(result[:, 151], second[:, 76], atol=1e-5)


def test_caption_states_encode_each_caption_once_and_equal_the_encoder(sd1):
    tokenizer, encoder = sd1.tokenizers[0], sd1.text_encoders[0]
    ids = tokenize(tokenizer, ["a cat", "a dog", "a cat"], None)
    calls = []

    def encode(input_ids):
        calls.append(input_ids[0].shape[0])
        return (encode_tokens(encoder, input_ids[0], 2),)

    cache = CaptionStates()
    (first,) = cache.encode(encode, [ids])
    (again,) = cache.encode(encode, [tokenize(tokenizer, ["a dog", "a bird"], None)])
    assert calls == [2, 1]  # "a cat" and "a dog" once, then only "a bird"
    torch.testing.assert_close(first, encode_tokens(encoder, ids, 2))
    torch.testing.assert_close(again[0], first[1])
