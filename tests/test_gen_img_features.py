"""gen_img_diffusers.py's batching, prompt emphasis and windows, SDXL size conditioning, img2img, inpainting, the
highres fix, --vae, per-prompt network strengths and --grid, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generation_helpers import as_array, draw, draw_files, max_difference, random_lora_files
from PIL import Image

import library.sampling.generate as sampling_generate
from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import save_stable_diffusion_checkpoint
from library.sampling.generate import emphasised
from library.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def sd1(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SD1]


@pytest.fixture(scope="module")
def sdxl(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SDXL]


@pytest.fixture(scope="module")
def loras(sd1, tmp_path_factory):
    """Two SD1 LoRA files with random (non-zero) weights, named like two epochs of one training."""
    names = [f"shapes-{epoch:06d}.safetensors" for epoch in (1, 2)]
    return random_lora_files(sd1[0], tmp_path_factory.mktemp("epochs"), names)


@pytest.fixture
def calls(monkeypatch):
    """The number of images of each pipeline call."""
    sizes = []
    original = sampling_generate._draw

    def counted(pipeline, prompt, conditionings, seeds, starts):
        sizes.append(len(seeds))
        return original(pipeline, prompt, conditionings, seeds, starts)

    monkeypatch.setattr(sampling_generate, "_draw", counted)
    return sizes


def prompt_file(folder, *lines: str):
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- batching --------------------------------------------------------------------------------------------------


def test_a_batch_gives_the_images_of_single_draws_in_one_call_and_names_them_per_batch(sd1, tmp_path, calls):
    prompts = prompt_file(
        tmp_path, "a red circle --n blurry", "a (blue:1.4) square", "a green [triangle]", "a star --w 96"
    )
    flags = ["--from_file", prompts, "--seed", "5", "--sampler", "k_euler_a"]
    single = draw(sd1[1], tmp_path / "one", *flags)
    assert calls == [1, 1, 1, 1]
    calls.clear()
    files = draw_files(sd1[1], tmp_path / "batch", *flags, "--batch_size", "4", "--vae_batch_size", "0.5")
    assert calls == [3, 1]  # the 96-pixel-wide prompt starts a batch of its own, as in sd-scripts
    assert [max_difference(a, as_array(b)) for a, b in zip(single, files)] <= [1] * 4
    stamps, positions, seeds = zip(*(path.stem.split("_")[1:] for path in files))
    assert positions == ("000", "001", "002", "000") and seeds == ("5", "6", "7", "8")
    assert len(set(stamps[:3])) == 1


def test_an_sdxl_batch_gives_the_images_of_single_draws(sdxl, tmp_path, calls):
    prompts = prompt_file(tmp_path, "a red circle --n blurry", "a (blue:1.4) square")
    single = draw(sdxl[1], tmp_path / "one", "--from_file", prompts, "--seed", "3")
    batch = draw(sdxl[1], tmp_path / "batch", "--from_file", prompts, "--seed", "3", "--batch_size", "2")
    assert calls == [1, 1, 2]
    assert max_difference(single[0], batch[0]) <= 1 and max_difference(single[1], batch[1]) <= 1


# --- prompts ---------------------------------------------------------------------------------------------------


def test_emphasis_multiplies_each_state_by_its_weight_and_restores_the_mean():
    states = torch.arange(2 * 77 * 3, dtype=torch.float32).reshape(2, 77, 3) / 100 + 1
    weights = torch.ones(2, 1, 77)
    weights[0, 0, 1:3] = torch.tensor([1.5, 0.5])
    weights[0, 0, 5] = 2.0
    result = emphasised(states, weights)
    scaled = states[0] * weights[0, 0, :, None]
    expected = scaled * states[0].mean() / scaled.mean()
    assert torch.allclose(result[0], expected) and torch.equal(result[1], states[1])
    assert torch.equal(emphasised(states, torch.ones(2, 1, 77)), states)


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_emphasis_syntax_changes_the_image_and_a_weight_of_1_does_not(model, request, tmp_path):
    ckpt = request.getfixturevalue(model)[1]
    [plain, one, strong] = (
        draw(ckpt, tmp_path / str(index), "--prompt", text, "--seed", "2")[0]
        for index, text in enumerate(["a red cat", "a (red:1.0) cat", "a (red:1.6) cat"])
    )
    assert np.array_equal(plain, one)
    assert max_difference(plain, strong) > 0


def test_sdxl_prompts_beyond_75_tokens_count_with_max_embeddings_multiples(sdxl, tmp_path):
    words = " ".join(f"word{index}" for index in range(40))  # about 115 tokens
    tail = words + ", and a tail at the end"
    cut = [
        draw(sdxl[1], tmp_path / f"c{i}", "--prompt", text, "--seed", "1")[0] for i, text in enumerate([words, tail])
    ]
    assert max_difference(*cut) == 0
    windows = ["--max_embeddings_multiples", "2"]
    kept = [
        draw(sdxl[1], tmp_path / f"k{i}", "--prompt", text, "--seed", "1", *windows)[0]
        for i, text in enumerate([words, tail])
    ]
    assert max_difference(*kept) > 0


def test_sdxl_size_conditioning_flags_and_prompt_options(sdxl, tmp_path):
    base = draw(sdxl[1], tmp_path / "base", "--prompt", "a tree", "--seed", "4")[0]
    same = draw(sdxl[1], tmp_path / "same", "--prompt", "a tree", "--seed", "4", "--original_width", "64")[0]
    assert np.array_equal(base, same)  # the default original size is the image's
    wide = draw(sdxl[1], tmp_path / "wide", "--prompt", "a tree", "--seed", "4", "--original_width", "2048")[0]
    per_line = draw(sdxl[1], tmp_path / "line", "--prompt", "a tree --ow 2048", "--seed", "4")[0]
    cropped = draw(sdxl[1], tmp_path / "crop", "--prompt", "a tree --ct 256 --cl 128", "--seed", "4")[0]
    assert np.array_equal(wide, per_line)
    assert max_difference(base, wide) > 0 and max_difference(base, cropped) > 0


def test_generation_only_prompt_options_are_refused_in_training_prompt_files(tmp_path):
    from library.sampling import read_sample_prompts

    with pytest.raises(UserError, match="option --t is for gen_img_diffusers.py only"):
        read_sample_prompts(prompt_file(tmp_path, "a cat --t 0.5"))


# --- img2img, inpainting, highres fix --------------------------------------------------------------------------


@pytest.fixture
def start_image(tmp_path):
    """A 100x70 picture with a prompt in its PNG text, as this generator writes them."""
    from PIL.PngImagePlugin import PngInfo

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8))
    info = PngInfo()
    info.add_text("prompt", "a photo of a lake")
    path = tmp_path / "lake.png"
    picture.save(path, pnginfo=info)
    return path


def test_img2img_draws_at_the_start_images_size_rounded_to_32_and_strength_counts(sd1, start_image, tmp_path):
    flags = ["--prompt", "a lake", "--seed", "3", "--image_path", str(start_image), "--steps", "4"]
    low = draw(sd1[1], tmp_path / "low", *flags, "--strength", "0.3", sized=False)[0]
    per_line = draw(sd1[1], tmp_path / "line", "--prompt", "a lake --t 0.3", *flags[2:], sized=False)[0]
    high = draw(sd1[1], tmp_path / "high", *flags, sized=False)[0]  # sd-scripts' default strength 0.8
    assert low.shape == (64, 96, 3)
    assert np.array_equal(low, per_line)
    assert max_difference(low, high) > 0
    batch = draw(sd1[1], tmp_path / "b", *flags, "--images_per_prompt", "2", "--batch_size", "2", sized=False)
    assert max_difference(batch[0], high) <= 1
    assert draw(sd1[1], tmp_path / "sized", *flags)[0].shape == (64, 64, 3)  # --W and --H: resized to them


def test_img2img_takes_the_prompts_and_names_of_its_images(sd1, start_image, tmp_path):
    files = draw_files(sd1[1], tmp_path / "out", "--image_path", str(start_image.parent), "--use_original_file_name")
    assert [path.name for path in files] == ["lake.png"]
    assert Image.open(files[0]).text["prompt"] == "a photo of a lake"


def test_inpainting_keeps_the_black_part_of_the_mask(sd1, start_image, tmp_path):
    mask = tmp_path / "masks" / "keep.png"
    mask.parent.mkdir()
    Image.new("L", (100, 70), 0).save(mask)
    flags = ["--seed", "3", "--image_path", str(start_image), "--mask_path", str(mask), "--strength", "1"]
    kept = [draw(sd1[1], tmp_path / f"k{i}", "--prompt", text, *flags)[0] for i, text in enumerate(["a cat", "a dog"])]
    assert np.array_equal(*kept)  # nothing is drawn anew: the prompt cannot matter
    Image.new("L", (100, 70), 255).save(mask)
    drawn = [draw(sd1[1], tmp_path / f"d{i}", "--prompt", text, *flags)[0] for i, text in enumerate(["a cat", "a dog"])]
    assert max_difference(*drawn) > 0


def test_a_mask_of_another_size_is_one_sentence_and_nothing_is_written(sd1, start_image, tmp_path):
    mask = tmp_path / "small.png"
    Image.new("L", (50, 35), 0).save(mask)
    with pytest.raises(UserError, match=r"small.png: the mask is 50x35 but its image .*lake.png is 100x70"):
        draw(sd1[1], tmp_path / "out", "--prompt", "x", "--image_path", str(start_image), "--mask_path", str(mask))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("latents", [False, True], ids=["image", "latents"])
def test_highres_fix_draws_small_then_refines_at_full_size_with_the_next_seed(sd1, tmp_path, latents):
    flags = ["--prompt", "a house", "--seed", "9", "--W", "128", "--H", "96", "--highres_fix_scale", "0.75"]
    flags += ["--highres_fix_steps", "2", "--highres_fix_save_1st"] + ["--highres_fix_latents_upscaling"] * latents
    first, final = draw_files(sd1[1], tmp_path, *flags)
    assert Image.open(first).size == (96, 64) and Image.open(final).size == (128, 96)  # 72 rounds down to 64
    assert first.name.endswith("_0000_9.png") and final.name.endswith("_1000_9.png")
    assert Image.open(final).text["seed"] == "9"
    small = draw(sd1[1], tmp_path / "small", "--prompt", "a house", "--seed", "9", "--W", "96", "--H", "64")[0]
    assert np.array_equal(as_array(first), small)


# --- VAE and networks ------------------------------------------------------------------------------------------


def test_vae_replaces_the_models_own(sd1, tmp_path):
    own, other = tmp_path / "own.safetensors", tmp_path / "other.safetensors"
    save_stable_diffusion_checkpoint(sd1[0], own)
    save_stable_diffusion_checkpoint(make_tiny_model(ModelFamily.SD1, seed=7), other)
    base = draw(sd1[1], tmp_path / "base", "--prompt", "x", "--seed", "1")[0]
    assert np.array_equal(base, draw(sd1[1], tmp_path / "own", "--prompt", "x", "--seed", "1", "--vae", str(own))[0])
    assert max_difference(base, draw(sd1[1], tmp_path / "o", "--prompt", "x", "--seed", "1", "--vae", str(other))[0])


def test_per_prompt_strengths_and_pre_calculation(sd1, loras, tmp_path):
    base = draw(sd1[1], tmp_path / "base", "--prompt", "x", "--seed", "1")[0]
    off, on = draw(sd1[1], tmp_path / "am", "--from_file", prompt_file(tmp_path, "x --am 0", "x"), "--seed", "1",
                   "--network_weights", loras[0], "--iter_same_seed")  # fmt: skip
    assert max_difference(base, off) <= 1 and max_difference(base, on) > 10
    flags = ["--prompt", "x", "--seed", "1", "--network_weights", *loras, "--network_mul", "0.5", "0.7"]
    merged = draw(sd1[1], tmp_path / "merged", *flags, "--network_merge")[0]
    assert np.array_equal(merged, draw(sd1[1], tmp_path / "pre", *flags, "--network_pre_calc")[0])
    with pytest.raises(UserError, match="a merged network's strength cannot change per prompt"):
        draw(sd1[1], tmp_path / "bad", "--prompt", "x --am 0", "--network_weights", loras[0], "--network_merge")
    # with a prompt's --am, sd-scripts merges again at that strength; applied here, the same image up to rounding
    one = ["--seed", "1", "--network_weights", loras[0]]
    pre = draw(sd1[1], tmp_path / "pre_am", "--prompt", "x --am 0.2", *one, "--network_pre_calc")[0]
    remerged = draw(sd1[1], tmp_path / "merged_02", "--prompt", "x", *one, "--network_mul", "0.2", "--network_merge")[0]
    assert max_difference(pre, remerged) <= 2 and max_difference(pre, base) > 2


def test_grid_of_epochs_and_strengths_holds_the_single_images(sd1, loras, tmp_path):
    prompts = prompt_file(tmp_path, "a red circle --d 4", "a blue square --d 5")
    [sheet] = draw_files(
        sd1[1], tmp_path / "grid", "--from_file", prompts, "--network_weights", *loras, "--grid", "epochs"
    )
    sheet = Image.open(sheet)
    assert sheet.size == (192 + 2 * 68, 24 + 2 * 68)
    cell = as_array(sheet.crop((192 + 68, 24 + 68, 192 + 68 + 64, 24 + 68 + 64)))  # row 2, column 2
    alone = draw(sd1[1], tmp_path / "alone", "--prompt", "a blue square --d 5", "--network_weights", loras[1])[0]
    assert np.array_equal(cell, alone)
    [sheet] = draw_files(sd1[1], tmp_path / "mul", "--from_file", prompts, "--network_weights", loras[0],
                         "--grid", "mul=0,1,0.5")  # fmt: skip
    base = draw(sd1[1], tmp_path / "base", "--prompt", "a red circle --d 4")[0]
    assert np.array_equal(as_array(Image.open(sheet).crop((192, 24, 192 + 64, 24 + 64))), base)
    assert Image.open(sheet).size[0] == 192 + 3 * 68


# --- textual inversion -----------------------------------------------------------------------------------------


def test_an_embedding_gives_the_prompt_states_diffusers_gives_with_its_own_loader(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from library.generation.embeddings import add_embeddings
    from library.sampling import SamplePrompt
    from library.sampling.generate import DrawingSetup, prompt_conditioning

    ours, reference = (make_tiny_model(ModelFamily.SD1, seed=0) for _ in range(2))
    width = ours.text_encoders[0].get_input_embeddings().weight.shape[1]
    file = tmp_path / "shinyemb.safetensors"
    save_file({"emb_params": torch.randn(3, width, generator=torch.Generator().manual_seed(1))}, file)
    expansions = add_embeddings(ours, [file])
    setup = DrawingSetup(False, None, "ddim", torch.device("cpu"), torch.float32, token_expansions=expansions)
    with torch.no_grad():
        states = prompt_conditioning(ours.text_encoders, ours.tokenizers, SamplePrompt("a shinyemb cat"), setup)
    pipeline = StableDiffusionPipeline(
        vae=reference.vae,
        text_encoder=reference.text_encoders[0],
        tokenizer=reference.tokenizers[0],
        unet=reference.unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.load_textual_inversion(str(file), token="shinyemb")
    with torch.no_grad():
        expected, _ = pipeline.encode_prompt("a shinyemb cat", "cpu", 1, False)
    assert torch.allclose(states["prompt_embeds"], expected, atol=1e-5)


def test_sdxl_embeddings_change_the_images_that_name_them_and_bad_files_are_one_sentence(sdxl, sd1, tmp_path):
    from safetensors.torch import save_file

    widths = [encoder.get_input_embeddings().weight.shape[1] for encoder in sdxl[0].text_encoders]
    file = tmp_path / "xyzneg.safetensors"
    save_file({key: torch.randn(2, width) for key, width in zip(("clip_l", "clip_g"), widths)}, file)
    flags = ["--seed", "2", "--textual_inversion_embeddings", str(file)]
    base = draw(sdxl[1], tmp_path / "base", "--prompt", "a tree", "--seed", "2")[0]
    assert np.array_equal(base, draw(sdxl[1], tmp_path / "unused", "--prompt", "a tree", *flags)[0])
    assert max_difference(base, draw(sdxl[1], tmp_path / "used", "--prompt", "a tree --n xyzneg", *flags)[0]) > 0
    sd_file = tmp_path / "plain.safetensors"
    save_file({"emb_params": torch.randn(2, 7)}, sd_file)
    with pytest.raises(UserError, match=r"plain.safetensors: not an SDXL embedding \(no clip_l or clip_g"):
        draw(sdxl[1], tmp_path / "x", "--prompt", "x", "--textual_inversion_embeddings", str(sd_file))
    with pytest.raises(UserError, match=r"plain.safetensors: its vectors are 7 wide but this model's text encoder"):
        draw(sd1[1], tmp_path / "y", "--prompt", "x", "--textual_inversion_embeddings", str(sd_file))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
