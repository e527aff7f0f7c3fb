"""Sample images (specs/training.md section 8): prompt files, sampler names, drawing one image on a tiny model,
and the file name and PNG text it is saved with."""

from __future__ import annotations

import datetime
import importlib.util
import logging
import textwrap
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from library.errors import UserError
from library.model_files.family import ModelFamily
from library.sampling import (
    SAMPLER_NAMES,
    SamplePrompt,
    generate_image,
    make_scheduler,
    parse_prompt_line,
    read_sample_prompts,
    sample_file_name,
    save_sample_image,
)
from library.sampling.generate import _global_rng_kept, _prompt_embeddings
from library.tiny_models import make_tiny_model


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


# --- prompt files --------------------------------------------------------------------------------------------


def test_txt_prompts_with_comments_options_and_defaults(tmp_path):
    path = write(
        tmp_path / "prompts.txt",
        """
        # a comment line
        a red circle, best quality --n low quality, blurry hands --W 100 --h 70 --d 42 --l 5.5 --s 2000 --ss Euler_A

        a plain prompt
        d 1 is prompt text, not a seed --D 7 --S 0
          # an indented comment
        shp shape --cn control.png --g 3.5 --w 64
        """,
    )
    assert read_sample_prompts(path) == [
        SamplePrompt("a red circle, best quality", "low quality, blurry hands", 96, 64, 42, 5.5, 1000, "euler_a"),
        SamplePrompt("a plain prompt", None, 512, 512, None, 7.5, 30, None),
        SamplePrompt("d 1 is prompt text, not a seed", None, 512, 512, 7, 7.5, 1, None),
        SamplePrompt("shp shape", None, 64, 512, None, 7.5, 30, None),
    ]


def test_toml_subset_keys_override_prompt_table_keys(tmp_path):
    path = write(
        tmp_path / "prompts.toml",
        """
        [prompt]
        negative_prompt = "lowres"
        width = 640
        sample_steps = 20
        scale = 6

        [[prompt.subset]]
        prompt = "a cat"

        [[prompt.subset]]
        prompt = "a dog"
        width = 333
        height = 20
        seed = 5
        scale = 9.5
        sample_sampler = "DPM++_2M_karras"
        negative_prompt = "bad hands, extra fingers"
        """,
    )
    assert read_sample_prompts(path) == [
        SamplePrompt("a cat", "lowres", 640, 512, None, 6.0, 20, None),
        SamplePrompt("a dog", "bad hands, extra fingers", 328, 64, 5, 9.5, 20, "dpm++_2m_karras"),
    ]


def test_json_list_of_lines_and_objects(tmp_path):
    path = write(
        tmp_path / "prompts.json",
        """
        ["a cat --n ugly, bad --w 768 --d 3",
         {"prompt": "a dog", "width": 256, "height": 1000, "seed": 1, "scale": 4, "sample_steps": 0,
          "sample_sampler": "k_dpm_2_a"}]
        """,
    )
    assert read_sample_prompts(path) == [
        SamplePrompt("a cat", "ugly, bad", 768, 512, 3, 7.5, 30, None),
        SamplePrompt("a dog", None, 256, 1000, 1, 4.0, 1, "k_dpm_2_a"),
    ]


@pytest.mark.parametrize(("asked", "made"), [(0, 64), (63, 64), (71, 64), (72, 72), (519, 512), (1023, 1016)])
def test_sizes_round_down_to_multiples_of_8_and_at_least_64(asked, made):
    prompt = parse_prompt_line(f"x --w {asked} --h {asked}")
    assert (prompt.width, prompt.height) == (made, made)


@pytest.mark.parametrize(("asked", "made"), [(0, 1), (1, 1), (1000, 1000), (1001, 1000)])
def test_steps_are_clamped_to_1_through_1000(asked, made):
    assert parse_prompt_line(f"x --s {asked}").steps == made


PROMPT_FILE_ERRORS = [
    ("prompts.yaml", "a cat\n", "must be a .txt, .toml or .json"),
    ("prompts.txt", "# only a comment\n\n", "holds no prompt"),
    ("prompts.txt", "a cat\na dog --w abc\n", "line 2, --w: 'abc' is not a whole number"),
    ("prompts.txt", "a cat --w -8\n", "line 1, --w: '-8' is not a whole number"),
    ("prompts.txt", "a cat --l high\n", "line 1, --l: 'high' is not a number"),
    ("prompts.txt", "a cat --seed 4\n", "line 1: unknown option --seed"),
    ("prompts.txt", "a cat --n\n", "line 1: option --n has no value"),
    ("prompts.txt", "a cat --d 18446744073709551616\n", "line 1, --d: 18446744073709551616 is too large for a seed"),
    ("prompts.txt", "a cat --ss dpm_3\n", "line 1, --ss: unknown sampler 'dpm_3'; use one of ddim, pndm"),
    ("prompts.toml", "[prompt\n", "not valid TOML"),
    ("prompts.toml", "[prompt]\nwidth = 512\n", "holds no prompt"),
    ("prompts.toml", "[other]\nx = 1\n", "unknown top-level key 'other'"),
    (
        "prompts.toml",
        "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nsteps = 4\n",
        "[[prompt.subset]] number 1: unknown key 'steps'",
    ),
    (
        "prompts.toml",
        "[prompt]\nwidth = 'big'\n[[prompt.subset]]\nprompt = 'a'\n",
        "[prompt], width: 'big' is not a whole number",
    ),
    (
        "prompts.toml",
        "[prompt]\n[[prompt.subset]]\nprompt = 'a'\n[[prompt.subset]]\nprompt = 'b'\nscale = 'x'\n",
        "[[prompt.subset]] number 2, scale: 'x' is not a number",
    ),
    ("prompts.toml", "[prompt]\nsubset = 3\n", "'subset' must be an array of tables"),
    ("prompts.toml", "[prompt]\n[[prompt.subset]]\nseed = 1\n", "[[prompt.subset]] number 1: no 'prompt' key"),
    ("prompts.json", '["a cat", ', "not valid JSON"),
    ("prompts.json", '{"prompt": "a cat"}', "must hold a JSON list"),
    ("prompts.json", '["a cat", 5]', "item 2: a prompt must be a string or an object"),
    ("prompts.json", '["a cat", {"prompt": "a dog", "seed": 1.5}]', "item 2, seed: 1.5 is not a whole number"),
]


@pytest.mark.parametrize(("name", "text", "fragment"), PROMPT_FILE_ERRORS)
def test_a_bad_prompt_file_is_one_sentence_naming_the_file_and_place(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_sample_prompts(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_a_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(UserError, match="no such sample prompt file"):
        read_sample_prompts(tmp_path / "absent.txt")


# --- samplers ------------------------------------------------------------------------------------------------

EXPECTED_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": EulerDiscreteScheduler,
    "k_euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "k_euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm_2": KDPM2DiscreteScheduler,
    "k_dpm_2": KDPM2DiscreteScheduler,
    "dpm_2_a": KDPM2AncestralDiscreteScheduler,
    "k_dpm_2_a": KDPM2AncestralDiscreteScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "dpm++_2m": DPMSolverMultistepScheduler,
    "dpm++_2m_karras": DPMSolverMultistepScheduler,
    "dpmsingle": DPMSolverSinglestepScheduler,
}
SCIPY = importlib.util.find_spec("scipy") is not None


def test_every_sampler_name_is_known():
    assert set(SAMPLER_NAMES) == set(EXPECTED_SCHEDULERS)


@pytest.mark.parametrize("v_prediction", [False, True])
@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEDULERS))
def test_each_sampler_builds_its_scheduler_with_the_training_schedule(name, v_prediction):
    expected = EXPECTED_SCHEDULERS[name]
    if isinstance(expected, str) and not SCIPY:
        with pytest.raises(
            UserError, match=f"sampler '{name}' needs the scipy package; install it with `pip install scipy`"
        ):
            make_scheduler(name, v_prediction)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        scheduler = make_scheduler(name, v_prediction)
    assert type(scheduler).__name__ == (expected if isinstance(expected, str) else expected.__name__)
    config = scheduler.config
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
        1000,
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert config.prediction_type == ("v_prediction" if v_prediction else "epsilon")
    assert config.get("clip_sample") == (True if name in ("ddim", "heun") else None)
    if name in ("dpmsolver", "dpmsolver++", "dpm++_2m", "dpm++_2m_karras"):
        assert config.algorithm_type == ("dpmsolver" if name == "dpmsolver" else "dpmsolver++")
        assert config.use_karras_sigmas == (name == "dpm++_2m_karras")
    scheduler.set_timesteps(4)


def test_sampler_names_ignore_case_and_an_unknown_one_lists_the_names():
    assert isinstance(make_scheduler(" DDIM ", False), DDIMScheduler)
    with pytest.raises(UserError, match="unknown sampler 'k_ddim'; use one of ddim, pndm, lms"):
        make_scheduler("k_ddim", False)


# --- drawing an image ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd1():
    return make_tiny_model(ModelFamily.SD1, seed=3)


def draw(model, prompt, clip_skip=None):
    return generate_image(
        model.unet,
        model.text_encoders,
        model.tokenizers,
        model.vae,
        prompt,
        v_prediction=False,
        clip_skip=clip_skip,
        default_sampler="Euler_A",
        device="cpu",
        dtype=torch.float32,
    )


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def drawn(tiny_sd1):
    """Images of one prompt: a drawn seed, that seed again, the next seed, and that seed with clip_skip 2; plus
    what the first call left behind (global RNG state, train/eval modes)."""
    model = tiny_sd1
    model.unet.train()
    model.unet.conv_in.eval()  # a submodule whose mode differs from its parent's must keep it too
    prompt = SamplePrompt(
        "shp shape, a red circle", negative_prompt="blurry, low quality", width=64, height=80, steps=1
    )
    rng_before = torch.get_rng_state()
    logged = ListHandler()
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = draw(model, prompt)
    finally:
        for name in ("transformers", "diffusers"):
            logging.getLogger(name).removeHandler(logged)
    result = {
        "first": first,
        "rng_kept": torch.equal(rng_before, torch.get_rng_state()),
        "warnings": [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)],
        "log_warnings": [record.getMessage() for record in logged.records if record.levelno >= logging.WARNING],
        "unet_training": model.unet.training,
        "conv_in_training": model.unet.conv_in.training,
        "text_encoder_training": model.text_encoders[0].training,
    }
    model.unet.eval()
    seeded = SamplePrompt(prompt.prompt, prompt.negative_prompt, 64, 80, seed=first.seed, steps=1)
    result["again"] = draw(model, seeded)
    result["next_seed"] = draw(
        model, SamplePrompt(prompt.prompt, prompt.negative_prompt, 64, 80, seed=first.seed + 1, steps=1)
    )
    result["clip_skip_2"] = draw(model, seeded, clip_skip=2)
    return result


def pixels(generated):
    return np.asarray(generated.image)


def test_a_drawn_seed_is_reported_and_the_same_seed_draws_the_same_image(drawn):
    first, again = drawn["first"], drawn["again"]
    assert first.prompt.seed is None and 0 <= first.seed < 2**32
    assert again.seed == first.seed
    assert np.array_equal(pixels(first), pixels(again))
    assert pixels(first).std() > 0


def test_another_seed_draws_another_image(drawn):
    assert not np.array_equal(pixels(drawn["first"]), pixels(drawn["next_seed"]))


def test_the_image_has_the_requested_size_and_the_default_sampler(drawn):
    first = drawn["first"]
    assert isinstance(first.image, Image.Image) and first.image.mode == "RGB"
    assert first.image.size == (64, 80)
    assert first.sampler == "euler_a"


def test_clip_skip_changes_the_image(drawn):
    assert not np.array_equal(pixels(drawn["again"]), pixels(drawn["clip_skip_2"]))


def test_drawing_leaves_rng_and_modes_as_they_were_and_warns_nothing(drawn, tiny_sd1):
    assert drawn["rng_kept"]
    assert (drawn["unet_training"], drawn["conv_in_training"], drawn["text_encoder_training"]) == (True, False, False)
    assert all(parameter.device.type == "cpu" for parameter in tiny_sd1.unet.parameters())
    assert drawn["warnings"] == [] and drawn["log_warnings"] == []


def test_the_global_rng_state_is_restored_whatever_draws_from_it_during_generation():
    before = torch.get_rng_state()
    with _global_rng_kept():
        torch.rand(100)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    ("words", "negative_words", "length"),
    [(3, 0, 77), (60, 0, 77), (100, 0, 152), (3, 100, 152), (160, 10, 227), (400, 0, 227)],
)
def test_prompt_embeddings_use_as_many_75_token_windows_as_the_longer_text_needs(
    tiny_sd1, words, negative_words, length
):
    prompt = SamplePrompt(" ".join(["cat"] * words), " ".join(["dog"] * negative_words) or None)
    with torch.no_grad():
        positive, negative = _prompt_embeddings(
            tiny_sd1.text_encoders[0], tiny_sd1.tokenizers[0], prompt, clip_skip=None
        )
    assert positive.shape == negative.shape == (1, length, tiny_sd1.text_encoders[0].config.hidden_size)


# --- saving --------------------------------------------------------------------------------------------------


def test_saved_png_holds_the_prompt_and_settings_as_text(drawn, tmp_path):
    first = drawn["first"]
    path = save_sample_image(first, tmp_path / "sample" / "x.png")
    with Image.open(path) as image:
        assert image.size == (64, 80)
        assert image.text == {
            "prompt": "shp shape, a red circle",
            "seed": str(first.seed),
            "sampler": "euler_a",
            "steps": "1",
            "scale": "7.5",
            "negative-prompt": "blurry, low quality",
            "parameters": "shp shape, a red circle\nNegative prompt: blurry, low quality\n"
            f"Steps: 1, Sampler: Euler a, CFG scale: 7.5, Seed: {first.seed}, Size: 64x80",
        }
    assert [file.name for file in path.parent.iterdir()] == ["x.png"]


def test_sample_file_names_follow_sd_scripts(tmp_path):
    noon = datetime.datetime(2025, 1, 1, 12, 0, 0)
    one_pm = datetime.datetime(2025, 1, 1, 13, 0, 0)
    assert (
        sample_file_name(tmp_path, "mylora", step=500, index=0, seed=42, now=noon)
        == tmp_path / "sample" / "mylora_000500_00_20250101120000_42.png"
    )
    assert (
        sample_file_name(tmp_path, "mylora", epoch=3, index=1, seed=None, now=one_pm)
        == tmp_path / "sample" / "mylora_e000003_01_20250101130000.png"
    )
    assert (
        sample_file_name(tmp_path, None, epoch=0, index=12, seed=None, now=noon).name == "e000000_12_20250101120000.png"
    )
    with pytest.raises(ValueError):
        sample_file_name(tmp_path, None, epoch=1, step=1, index=0, seed=None, now=noon)


def test_an_option_may_be_separated_from_its_value_by_a_tab():
    assert parse_prompt_line("x --w\t128 --N  ugly  ").width == 128
    assert parse_prompt_line("x --w\t128 --N  ugly  ").negative_prompt == "ugly"
