"""Caption files and per-use caption processing (specs/training.md sections 2.1 and 2.2)."""

from __future__ import annotations

import random

import pytest

from library.dataset.captions import CaptionSettings, caption_file_for, process_caption, read_caption, tag_frequency
from library.errors import UserError


def process(caption: str, seed: int = 0, epoch: int = 1, step: int = 0, max_steps: int = 100, **settings) -> str:
    return process_caption(caption, CaptionSettings(**settings), random.Random(seed), epoch, step, max_steps)


def tags(caption: str) -> list[str]:
    return caption.split(", ")


# --- reading caption files -------------------------------------------------------------------------------------


def test_caption_file_next_to_the_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat.txt").write_text("a cat", encoding="utf-8")
    assert caption_file_for(folder / "cat.png", ".txt") == folder / "cat.txt"
    assert caption_file_for(folder / "cat.png", ".caption") is None
    assert caption_file_for(folder / "dog.png", ".txt") is None


def test_face_crop_images_fall_back_to_the_original_caption(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat.txt").write_text("a cat", encoding="utf-8")
    assert caption_file_for(folder / "cat_120_80_64_64.png", ".txt") == folder / "cat.txt"
    # the crop's own caption wins
    (folder / "cat_120_80_64_64.txt").write_text("a cat's face", encoding="utf-8")
    assert caption_file_for(folder / "cat_120_80_64_64.png", ".txt") == folder / "cat_120_80_64_64.txt"
    # three `_` fields are not a face-crop name
    assert caption_file_for(folder / "cat_120_80_64.png", ".txt") is None


def test_only_the_first_line_is_read(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("  cat, sitting  \nsecond line\n", encoding="utf-8")
    assert read_caption(path, enable_wildcard=False) == "cat, sitting"
    path.write_text("\n\n  dog  \nbird\n", encoding="utf-8")
    assert read_caption(path, enable_wildcard=False) == "dog"


def test_wildcards_keep_every_non_empty_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a cat\n\n   \n  a {red|blue} dog \r\nbird\n", encoding="utf-8")
    assert read_caption(path, enable_wildcard=True) == "a cat\na {red|blue} dog\nbird"


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfcat, dog\n")
    assert read_caption(path, enable_wildcard=False) == "cat, dog"


@pytest.mark.parametrize(
    ("data", "enable_wildcard", "fix"),
    [
        ("猫, 犬".encode("cp932"), False, "save it as UTF-8"),
        ("café".encode("latin-1"), False, "save it as UTF-8"),
        (b"", True, "write a caption or delete the file"),
        (b"\xef\xbb\xbf", True, "write a caption or delete the file"),
    ],
    ids=["cp932", "latin-1", "empty", "only-bom"],
)
def test_an_unusable_caption_file_is_named_with_the_fix(tmp_path, data, enable_wildcard, fix):
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    with pytest.raises(UserError, match=fix) as error:
        read_caption(path, enable_wildcard=enable_wildcard)
    assert str(path) in str(error.value)


# --- per-use processing ------------------------------------------------------------------------------------------


def test_without_settings_the_caption_is_used_verbatim():
    assert process("a  cat ,dog,, bird") == "a  cat ,dog,, bird"


def test_prefix_and_suffix_are_joined_with_a_space():
    assert process("cat, dog", caption_prefix="masterpiece,", caption_suffix=", best") == "masterpiece, cat, dog , best"


def test_keep_tokens_fixes_the_head_and_shuffles_the_rest():
    caption = "sks, girl, red hair, smile, hat, outdoors, sky"
    for seed in range(5):
        result = tags(process(caption, seed=seed, shuffle_caption=True, keep_tokens=2))
        expected_rest = ["red hair", "smile", "hat", "outdoors", "sky"]
        random.Random(seed).shuffle(expected_rest)
        assert result == ["sks", "girl", *expected_rest]


def test_shuffling_joins_with_comma_space_and_keeps_empty_tags():
    result = process(" a,b ,,c ", shuffle_caption=True, keep_tokens=4)
    assert result == "a, b, , c"


def test_keep_tokens_separator_fixes_head_and_tail():
    caption = "sks, girl ||| red hair, smile, , hat ||| best quality, detailed"
    seen = set()
    for seed in range(20):
        result = tags(process(caption, seed=seed, shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||"))
        assert result[:2] == ["sks", "girl"] and result[-2:] == ["best quality", "detailed"]
        assert sorted(result[2:-2]) == ["hat", "red hair", "smile"]  # empty items are dropped in this form
        seen.add(tuple(result[2:-2]))
    assert len(seen) > 1


def test_keep_tokens_separator_without_a_tail():
    result = process("sks ||| a, b", shuffle_caption=True, keep_tokens_separator="|||")
    assert tags(result)[0] == "sks" and sorted(tags(result)[1:]) == ["a", "b"]


def test_without_shuffle_warmup_or_tag_dropout_keep_tokens_does_nothing():
    # sd-scripts quirk: the separator stays in the text that is tokenised
    caption = "sks, girl ||| red hair,smile"
    assert process(caption, keep_tokens=1, keep_tokens_separator="|||") == caption


def test_caption_dropout_rate_one_drops_everything():
    assert process("cat, dog", caption_dropout_rate=1.0, caption_prefix="pre") == ""


def test_caption_dropout_every_n_epochs():
    def at(epoch):
        return process("cat, dog", epoch=epoch, caption_dropout_every_n_epochs=3)

    assert [at(epoch) for epoch in (1, 2, 3, 4, 5, 6, 7)] == [
        "cat, dog",
        "cat, dog",
        "",
        "cat, dog",
        "cat, dog",
        "",
        "cat, dog",
    ]


def test_tag_dropout_rate_one_keeps_only_fixed_tags():
    assert process("sks, girl, smile, hat", keep_tokens=2, caption_tag_dropout_rate=1.0) == "sks, girl"
    assert (
        process("sks ||| smile, hat ||| detailed", keep_tokens_separator="|||", caption_tag_dropout_rate=1.0)
        == "sks, detailed"
    )


TEN_TAGS = ", ".join(f"t{i}" for i in range(10))


@pytest.mark.parametrize(
    "step, count",
    [
        (0, 1),  # floor(0 * 9/4) + 1
        (1, 3),  # floor(1 * 9/4) + 1 = 2 + 1
        (3, 7),  # floor(3 * 9/4) + 1 = 6 + 1
        (4, 10),  # warmup over
    ],
)
def test_token_warmup_truncates_in_order(step, count):
    expected = ", ".join(f"t{i}" for i in range(count))
    assert process(TEN_TAGS, step=step, token_warmup_step=4) == expected
    # a fraction of the training steps: floor(0.5 * 9) = 4 steps
    assert process(TEN_TAGS, step=step, max_steps=9, token_warmup_step=0.5) == expected


def test_token_warmup_minimum_and_kept_tags():
    # keep 1, flexible 9, minimum 3: floor(2 * (9 - 3) / 5) + 3 = 2 + 3
    assert process(TEN_TAGS, step=2, keep_tokens=1, token_warmup_min=3, token_warmup_step=5) == "t0, t1, t2, t3, t4, t5"


def test_wildcards_pick_one_line_and_one_alternative():
    results = {process("a {red|blue} cat\na dog", seed=seed, enable_wildcard=True) for seed in range(40)}
    assert results == {"a red cat", "a blue cat", "a dog"}


def test_wildcard_double_braces_are_literal():
    assert process("{{literal}} {x}", enable_wildcard=True) == "{literal} x"


def test_without_wildcards_only_the_first_line_is_used():
    assert process("a {red|blue} cat\na dog") == "a {red|blue} cat"


def test_secondary_separator_keeps_a_group_together_then_becomes_the_separator():
    assert process("a;;;b, c") == "a;;;b, c"
    assert process("a;;;b, c", secondary_separator=";;;") == "a,b, c"
    results = {process("a;;;b, c", seed=seed, secondary_separator=";;;", shuffle_caption=True) for seed in range(20)}
    assert results == {"a,b, c", "c, a,b"}


def test_tag_frequency_is_lower_cased_and_skips_empty_tags():
    assert tag_frequency(["Cat, dog", "cat,  , Dog, bird", ""]) == {"cat": 2, "dog": 2, "bird": 1}
