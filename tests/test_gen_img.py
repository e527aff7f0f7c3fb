"""gen_img_diffusers.py on tiny models: LoRA strength 0, applying vs merging, several networks, wrong-family LoRAs,
seeds, PNG text, prompt files, long prompts and SDXL models with SDXL LoRAs."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import run_script
from generation_helpers import FAST, as_array, draw, draw_files, max_difference, random_lora_files
from PIL import Image
from sd_scripts_options import GEN_IMG_DIFFUSERS_OPTIONS, SDXL_GEN_IMG_EXTRA_OPTIONS

from library.cpu_layers import onednn_products_available
from library.errors import UserError
from library.generation import build_parser, generate, options_from_arguments, planned_images
from library.model_files.family import ModelFamily
from library.sampling import SamplePrompt, parse_prompt_line
from lora_helpers import fill_randomly
from networks.lora import create_network

SCRIPT = "gen_img_diffusers.py"


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SD1]


@pytest.fixture(scope="module")
def lora_files(sd1, tmp_path_factory):
    """Two SD1 LoRA files with random (non-zero) weights on both the text encoder and the U-Net."""
    return random_lora_files(sd1[0], tmp_path_factory.mktemp("loras"), ["lora1.safetensors", "lora2.safetensors"])


def test_multiplier_zero_gives_the_base_image_and_apply_equals_merge(sd1, lora_files, tmp_path):
    ckpt = sd1[1]
    flags = ["--prompt", "a cat", "--seed", "3", "--network_weights", lora_files[0]]
    [base] = draw(ckpt, tmp_path / "base", "--prompt", "a cat", "--seed", "3")
    [off] = draw(ckpt, tmp_path / "off", *flags, "--network_mul", "0")
    [applied] = draw(ckpt, tmp_path / "applied", *flags, "--network_module", "networks.lora")
    [merged] = draw(ckpt, tmp_path / "merged", *flags, "--network_merge")
    assert max_difference(base, off) <= 1
    assert max_difference(base, applied) > 10  # the LoRA changes the image
    assert max_difference(applied, merged) <= 2


@pytest.mark.skipif(not onednn_products_available(), reason="oneDNN's products are used on x86-64 only")
def test_the_generator_routes_the_frozen_layers_through_onednn_and_draws_the_default_kernels_image(
    sd1, lora_files, tmp_path, monkeypatch, routed_products
):
    from library import generation

    flags = ["--prompt", "a cat", "--seed", "3", "--network_weights", lora_files[0]]
    [fast] = draw(sd1[1], tmp_path / "fast", *flags)
    assert routed_products
    monkeypatch.setattr(generation, "use_fast_cpu_layers", lambda module: 0)
    [default] = draw(sd1[1], tmp_path / "default", *flags)
    assert max_difference(fast, default) <= 1


def test_two_networks_at_once_apply_and_merge_agree(sd1, lora_files, tmp_path):
    ckpt = sd1[1]
    flags = ["--prompt", "a dog", "--seed", "4", "--network_weights", *lora_files, "--network_mul", "0.7", "0.5"]
    [one] = draw(
        ckpt,
        tmp_path / "one",
        "--prompt",
        "a dog",
        "--seed",
        "4",
        "--network_weights",
        lora_files[0],
        "--network_mul",
        "0.7",
    )
    [applied] = draw(ckpt, tmp_path / "applied", *flags)
    [merged] = draw(ckpt, tmp_path / "merged", *flags, "--network_merge")
    assert max_difference(applied, merged) <= 2
    assert max_difference(one, applied) > 10  # the second network counts


def test_same_seed_same_image_and_seeds_count_up(sd1, tmp_path):
    first = draw(
        sd1[2],
        tmp_path / "a",
        "--prompt",
        "a tree",
        "--seed",
        "10",
        "--images_per_prompt",
        "2",
        "--sampler",
        "k_euler_a",
    )
    again = draw(
        sd1[2], tmp_path / "b", "--prompt", "a tree", "--seed", "11", "--sampler", "k_euler_a"
    )  # Diffusers folder too
    assert max_difference(first[0], first[1]) > 0
    assert np.array_equal(first[1], again[0])
    assert sorted(path.name.split("_")[-1] for path in (tmp_path / "a").iterdir()) == ["10.png", "11.png"]


def test_prompt_file_with_options_per_line(sd1, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\na red house --w 128 --h 64 --d 7 --s 3 --n blurry --ss euler\na blue car\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    args = build_parser().parse_args(
        ["--ckpt", str(sd1[1]), "--outdir", str(out), "--from_file", str(prompts), *FAST, "--seed", "100"]
    )
    files = generate(options_from_arguments(args, []))
    first, second = (Image.open(path) for path in files)
    assert first.size == (128, 64) and second.size == (64, 64)
    assert first.text["seed"] == "7" and first.text["steps"] == "3" and first.text["negative-prompt"] == "blurry"
    assert first.text["sampler"] == "euler" and second.text["sampler"] == "ddim"
    assert second.text["seed"] == "101" and second.text["steps"] == "2" and second.text["prompt"] == "a blue car"


def test_prompts_are_cut_after_75_tokens_unless_max_embeddings_multiples_allows_more(sd1, tmp_path):
    words = " ".join(f"word{index}" for index in range(40))  # about 115 tokens: two 75-token windows
    tail = words + ", and a very long tail of extra words at the end"
    [short, longer] = (
        draw(sd1[1], tmp_path / name, "--prompt", text, "--seed", "1")[0] for name, text in [("s", words), ("l", tail)]
    )
    assert max_difference(short, longer) == 0  # sd-scripts' default: one window
    windows = ["--max_embeddings_multiples", "3"]
    [short, longer] = (
        draw(sd1[1], tmp_path / name, "--prompt", text, "--seed", "1", *windows)[0]
        for name, text in [("s3", words), ("l3", tail)]
    )
    assert max_difference(short, longer) > 0
    assert Image.open(next((tmp_path / "l3").iterdir())).text["prompt"].endswith("at the end")


def test_script_writes_png_with_prompt_and_seed(sd1, lora_files, tmp_path):
    result = run_script(
        SCRIPT,
        "--ckpt",
        str(sd1[1]),
        "--outdir",
        str(tmp_path),
        *FAST,
        "--prompt",
        "a small boat --n fog",
        "--seed",
        "42",
        "--network_module",
        "networks.lora",
        "--network_weights",
        lora_files[0],
        "--network_mul",
        "0.8",
    )
    assert result.returncode == 0, result.stderr
    [path] = tmp_path.glob("im_*_000_42.png")
    text = Image.open(path).text
    assert (text["prompt"], text["negative-prompt"], text["seed"], text["steps"], text["scale"]) == (
        "a small boat",
        "fog",
        "42",
        "2",
        "7.5",
    )


def test_lora_for_another_family_is_one_sentence_and_writes_nothing(tiny_checkpoints, lora_files, tmp_path):
    sd2_file = tiny_checkpoints[ModelFamily.SD2][1]
    result = run_script(
        SCRIPT,
        "--ckpt",
        str(sd2_file),
        "--outdir",
        str(tmp_path / "out"),
        *FAST,
        "--prompt",
        "x",
        "--network_weights",
        lora_files[0],
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {lora_files[0]}:") and result.stderr.count("\n") == 1
    assert "use the model the LoRA was trained for" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sdxl(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SDXL]


@pytest.fixture(scope="module")
def sdxl_lora(sdxl, tmp_path_factory):
    """An SDXL LoRA (lora_te1_, lora_te2_ and lora_unet_ modules) with random (non-zero) weights."""
    model = sdxl[0]
    network = create_network(1.0, 4, 2, model.vae, model.text_encoders, model.unet)
    fill_randomly(network, seed=5)
    path = tmp_path_factory.mktemp("sdxl_lora") / "sdxl_lora.safetensors"
    network.save_weights(path)
    return str(path)


def test_sdxl_same_seed_same_image_of_the_requested_size(sdxl, tmp_path):
    [first, other] = draw(
        sdxl[1], tmp_path / "a", "--prompt", "a tree --n fog", "--seed", "10", "--images_per_prompt", "2", "--W", "96"
    )
    [again] = draw(
        sdxl[2], tmp_path / "b", "--prompt", "a tree --n fog", "--seed", "10", "--W", "96"
    )  # Diffusers folder too
    assert first.shape == (64, 96, 3)
    assert np.array_equal(first, again)
    assert max_difference(first, other) > 0


def test_sdxl_lora_changes_the_image_and_multiplier_zero_gives_the_base(sdxl, sdxl_lora, tmp_path):
    from safetensors import safe_open

    with safe_open(sdxl_lora, "pt") as file:
        prefixes = {key.split("_")[1] for key in file.keys()}
    assert prefixes == {"te1", "te2", "unet"}
    flags = ["--prompt", "a cat", "--seed", "3", "--network_weights", sdxl_lora]
    [base] = draw(sdxl[1], tmp_path / "base", "--prompt", "a cat", "--seed", "3")
    [off] = draw(sdxl[1], tmp_path / "off", *flags, "--network_mul", "0")
    [applied] = draw(sdxl[1], tmp_path / "applied", *flags)
    [merged] = draw(sdxl[1], tmp_path / "merged", *flags, "--network_merge")
    assert max_difference(base, off) <= 1
    assert max_difference(base, applied) > 10
    assert max_difference(applied, merged) <= 2


def test_sdxl_script_writes_png(sdxl, sdxl_lora, tmp_path):
    result = run_script(
        SCRIPT,
        "--ckpt",
        str(sdxl[1]),
        "--outdir",
        str(tmp_path),
        *FAST,
        "--prompt",
        "a small boat",
        "--seed",
        "42",
        "--network_weights",
        sdxl_lora,
        "--network_mul",
        "0.8",
    )
    assert result.returncode == 0, result.stderr
    [path] = tmp_path.glob("im_*_000_42.png")
    assert Image.open(path).size == (64, 64) and Image.open(path).text["prompt"] == "a small boat"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", "x", "--sampler", "k_nonsense"], "--sampler: unknown sampler 'k_nonsense'"),
        ([], "give the prompt with --prompt"),
        (["--from_file", "missing.txt"], "missing.txt: no such prompt file; check --from_file."),
        (["--prompt", "x", "--network_weights", "a.safetensors"], "a.safetensors: no such LoRA file"),
        (
            ["--prompt", "x", "--network_module", "networks.nothing", "--network_weights", __file__],
            "--network_module networks.nothing: no such module",
        ),
        (["--prompt", "x", "--images_per_prompt", "0"], "--images_per_prompt is 0"),
        (["--prompt", "x", "--highres_fix_scale", "1.5"], "--highres_fix_scale is 1.5; give the first pass's share"),
        (["--prompt", "x", "--image_path", "nothing.png"], "--image_path nothing.png: no such file or folder"),
        (["--prompt", "x", "--image_path", __file__], "test_gen_img.py: cannot be read as an image"),
        (["--prompt", "x", "--mask_path", __file__], "a mask needs the image it masks; give --image_path too."),
        (
            ["--prompt", "x", "--image_path", __file__, "--mask_path", __file__, "--network_weights", __file__],
            "with --network_weights: sd-scripts takes the mask as the networks' regions (regional LoRA)",
        ),
        (["--prompt", "x", "--guide_image_path", "hint.png"], "guide images (ControlNet hints, CLIP and VGG16"),
        (["--prompt", "x", "--strength", "1.5"], "--strength is 1.5; use a value above 0 and at most 1"),
        (["--prompt", "x", "--grid", "rows"], "--grid rows: use 'epochs'"),
        (["--prompt", "x --t 0"], "--prompt, --t: strength 0 is outside"),
        (["--prompt", "x --nl 2"], "--prompt: option --nl: sd-scripts' negative scale is not implemented here"),
        (["--prompt", "x", "--vae_batch_size", "0"], "--vae_batch_size is 0; use a count"),
        (["--prompt", "a (red:1,5) cat"], "prompt 'a (red:1,5) cat': the weight '1,5' in '(red:1,5)' is not a number"),
        (["--prompt", "x", "--negative_scale", "3"], "--negative_scale: sd-scripts' separate guidance scale"),
        (["--prompt", "x", "--clip_guidance_scale", "2"], "--clip_guidance_scale: CLIP and VGG16 guidance"),
        (["--prompt", "x", "--ds_depth_1", "3"], "--ds_depth_1: Deep Shrink is not implemented here"),
        (["--prompt", "x", "--max_embeddings_multiples", "0"], "--max_embeddings_multiples is 0; use 1 or more."),
        (
            ["--prompt", "x", "--network_weights", __file__, "--network_args", "rank"],
            "--network_args 'rank': 'rank' is not key=value",
        ),
    ],
)
def test_bad_flags_are_one_sentence(sd1, tmp_path, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        args = build_parser().parse_args(["--ckpt", str(sd1[1]), "--outdir", str(tmp_path), *flags])
        options = options_from_arguments(args, [])
        generate(options)


@pytest.mark.parametrize("extra", [[], SDXL_GEN_IMG_EXTRA_OPTIONS], ids=["gen_img_diffusers", "sdxl_gen_img"])
def test_every_option_of_sd_scripts_generation_scripts_is_known(extra):
    known = {flag for action in build_parser()._actions for flag in action.option_strings}
    assert [name for name in GEN_IMG_DIFFUSERS_OPTIONS + extra if f"--{name}" not in known] == []


def test_sd_scripts_defaults_of_refused_options_are_accepted_with_outputs_as_the_default_folder(sd1):
    flags = ["--highres_fix_steps", "28", "--ds_timesteps_1", "650", "--vgg16_guidance_layer", "20", "--no_preview"]
    args = build_parser().parse_args(["--ckpt", str(sd1[1]), "--prompt", "x", *flags])
    notes = []
    options = options_from_arguments(args, notes)
    assert options.outdir.name == "outputs" and notes == ["--no_preview: there is no preview window here."]


def test_n_iter_repeats_the_prompts_and_iter_same_seed_shares_one_seed_per_iteration():
    prompts = [SamplePrompt("a"), SamplePrompt("b"), SamplePrompt("c", seed=100)]
    counted = planned_images(prompts, 1, 7, iterations=2)
    assert [(p.prompt, p.seed) for p in counted] == [
        ("a", 7), ("b", 8), ("c", 100), ("a", 10), ("b", 11), ("c", 100),
    ]  # fmt: skip
    shared = planned_images(prompts, 2, 7, iterations=2, same_seed_per_iteration=True)
    assert [p.seed for p in shared] == [7, 7, 7, 7, 100, 101, 8, 8, 8, 8, 100, 101]


def test_a_prompt_line_seed_list_gives_its_images_those_seeds_then_counts_on():
    listed = parse_prompt_line("a cat --d 5,40,9", generation=True)
    assert listed.seeds == (5, 40, 9)
    assert [p.seed for p in planned_images([listed], 5, 7, same_seed_per_iteration=True)] == [5, 40, 9, 10, 11]
    assert [p.seed for p in planned_images([listed], 2, None)] == [5, 40]
    assert [p.seed for p in planned_images([parse_prompt_line("a --d 5", generation=True)], 3, 7)] == [5, 6, 7]
    with pytest.raises(UserError, match=re.escape("--d: '5,40' is not a whole number")):
        parse_prompt_line("a cat --d 5,40")  # the trainer's sample prompts take one seed, as sd-scripts' do


def test_sdxl_gen_img_draws_1024_by_default_and_refuses_other_models(sd1, sdxl, tmp_path):
    from library.generation import run_generation_script

    with pytest.raises(UserError, match="not an SDXL model; draw with it using gen_img_diffusers.py"):
        run_generation_script(sdxl=True, argv=["--ckpt", str(sd1[1]), "--prompt", "x", "--outdir", str(tmp_path)])
    [prompt] = options_from_arguments(build_parser().parse_args(["--ckpt", str(sdxl[1]), "--prompt", "x"]), []).prompts
    assert (prompt.width, prompt.height) == (1024, 1024)
    [prompt] = options_from_arguments(build_parser().parse_args(["--ckpt", str(sd1[1]), "--prompt", "x"]), []).prompts
    assert (prompt.width, prompt.height) == (512, 512)


def test_sequential_names_and_automatic1111_parameters_in_the_png(sd1, tmp_path):
    args = build_parser().parse_args(
        ["--ckpt", str(sd1[1]), "--outdir", str(tmp_path), *FAST, "--prompt", "a red cube --n blurry --l 6"]
        + ["--seed", "7", "--images_per_prompt", "2", "--sampler", "k_euler_a", "--sequential_file_name"]
    )
    files = generate(options_from_arguments(args, []))
    assert [path.name for path in files] == ["im_000001.png", "im_000002.png"]
    parameters = Image.open(files[1]).text["parameters"].splitlines()
    assert parameters == [
        "a red cube",
        "Negative prompt: blurry",
        "Steps: 2, Sampler: Euler a, CFG scale: 6, Seed: 8, Size: 64x64",
    ]


def test_interactive_mode_draws_each_typed_prompt_as_its_prompt_line_would(sd1, tmp_path, monkeypatch, capsys):
    typed = iter(["", "a cat --d 7 --s 3", "a dog --zz 1", "a dog --n noise"])

    def next_line():
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", next_line)
    files = draw_files(sd1[1], tmp_path / "typed", "--interactive", "--seed", "10")
    assert "error: the typed prompt" in capsys.readouterr().out  # the line that does not parse is asked again
    [cat] = draw(sd1[1], tmp_path / "cat", "--prompt", "a cat --d 7 --s 3")
    [dog] = draw(sd1[1], tmp_path / "dog", "--prompt", "a dog --n noise", "--seed", "11")  # the run's second image
    assert len(files) == 2
    assert max_difference(as_array(files[0]), cat) == 0 and max_difference(as_array(files[1]), dog) == 0
    with pytest.raises(UserError, match="--interactive reads the prompts as they are typed"):
        draw(sd1[1], tmp_path / "both", "--interactive", "--prompt", "a cat")
