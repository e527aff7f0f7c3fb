"""--weighted_captions: AUTOMATIC1111's emphasis syntax parsed as sd-scripts parses it, the weights lined up with the
tokens (in 75-token windows too), the context multiplied by them, and the conflicts named."""

from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.tokenizer import load_tokenizers
from library.text_encoding import tokenize
from library.tiny_models import make_tiny_dataset
from library.training.trainer import train
from library.weighted_captions import parse_weights, tokenize_weighted
from training_helpers import training_arguments


@pytest.mark.parametrize(
    ("caption", "runs"),
    [
        ("a (cat) on a mat", [("a ", 1.0), ("cat", 1.1), (" on a mat", 1.0)]),
        ("a [dog]", [("a ", 1.0), ("dog", 1 / 1.1)]),
        ("(bird:1.5), sky", [("bird", 1.5), (", sky", 1.0)]),
        ("((fish))", [("fish", 1.1 * 1.1)]),
        ("(a [b] c:2)", [("a ", 2.0), ("b", 2 / 1.1), (" c", 2.0)]),
        ("(open to the end", [("open to the end", 1.1)]),
        (r"\(literal\) and (x:0.5)", [("(literal) and ", 1.0), ("x", 0.5)]),
        ("ratio 16:9 (wide:1.2)", [("ratio 16:9 ", 1.0), ("wide", 1.2)]),
        ("plain", [("plain", 1.0)]),
    ],
)
def test_emphasis_is_parsed_as_automatic1111_writes_it(caption, runs):
    parsed = parse_weights(caption)
    assert [text for text, _ in parsed] == [text for text, _ in runs]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in runs])


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SD2], ids=lambda family: family.value)
def test_weights_line_up_with_the_tokens_of_the_plain_caption(family):
    (tokenizer,) = load_tokenizers(family)
    ids, weights = tokenize_weighted(tokenizer, ["a (red:1.5) circle on a [white] background"], None)
    assert torch.equal(ids, tokenize(tokenizer, ["a red circle on a white background"], None))
    expected = [1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1 / 1.1, 1.0] + [1.0] * 69  # BOS a red circle on a white background EOS
    assert weights[0, 0].tolist() == pytest.approx(expected)


def test_long_captions_split_their_weights_into_the_same_windows():
    (tokenizer,) = load_tokenizers(ModelFamily.SD2)
    plain = ", ".join(f"tag{index}" for index in range(40))
    weighted = plain.replace("tag30", "(tag30:2)")
    ids, weights = tokenize_weighted(tokenizer, [weighted], 150)
    assert ids.shape == weights.shape == (1, 2, 77)
    assert torch.equal(ids, tokenize(tokenizer, [plain], 150))
    heavy = (weights == 2.0).nonzero().tolist()
    assert heavy and all(window == 1 for _, window, _ in heavy)  # tag30 lies past the first 75 tokens


@pytest.mark.slow
def test_a_run_with_weighted_captions_trains_and_a_zero_weight_is_named(tiny_sd1, tmp_path):
    image_dir = make_tiny_dataset(tmp_path / "data", images=2, repeats=1)
    caption = next(image_dir.glob("*.txt"))
    caption.write_text("shp shape, a (red:1.3) circle, [background]", encoding="utf-8")
    train(
        training_arguments(
            tiny_sd1, tmp_path / "data", tmp_path / "out", "--max_train_steps", "2", "--weighted_captions"
        )
    )
    caption.write_text("shp shape, (red:0)", encoding="utf-8")
    with pytest.raises(UserError, match=r"\.png: the caption weight in 'shp shape, \(red:0\)' comes to 0"):
        train(
            training_arguments(
                tiny_sd1, tmp_path / "data", tmp_path / "out", "--max_train_steps", "1", "--weighted_captions"
            )
        )


def test_cached_text_encoder_outputs_and_weighted_captions_are_named_together(tiny_checkpoints, tmp_path):
    flags = ["--weighted_captions", "--cache_text_encoder_outputs", "--network_train_unet_only"]
    with pytest.raises(UserError, match="cannot be combined with --weighted_captions"):
        training_arguments(tiny_checkpoints[ModelFamily.SDXL][1], tmp_path, tmp_path, *flags, sdxl=True)


def test_the_context_is_the_plain_captions_states_times_the_weights(tiny_sd1, tmp_path, monkeypatch):
    from library.text_encoding import encode_tokens
    from library.training.families.sd import StableDiffusionTraining

    image_dir = make_tiny_dataset(tmp_path / "data", images=1, repeats=1)
    next(image_dir.glob("*.txt")).write_text("a (red:1.5) circle", encoding="utf-8")
    seen = []
    predict = StableDiffusionTraining.predict

    def recording(self, noisy, timesteps, text, batch):
        seen.append((self, text[0].detach().clone()))
        return predict(self, noisy, timesteps, text, batch)

    monkeypatch.setattr(StableDiffusionTraining, "predict", recording)
    flags = ["--max_train_steps", "1", "--weighted_captions", "--network_train_unet_only"]
    train(training_arguments(tiny_sd1, tmp_path / "data", tmp_path / "out", *flags))
    family, context = seen[0]
    tokenizer, encoder = family.model.tokenizers[0], family.model.text_encoders[0]
    with torch.no_grad():
        plain = encode_tokens(encoder, tokenize(tokenizer, ["a red circle"], None), None)
    weights = torch.ones(77)
    weights[2] = 1.5  # BOS a red ...
    torch.testing.assert_close(context, plain * weights[None, :, None], rtol=1e-4, atol=1e-5)
