"""sdxl_train_network.py on the tiny SDXL model: the conditioning equals diffusers' StableDiffusionXLPipeline
(encode_prompt and _get_add_time_ids), the saved LoRA loads completely in diffusers and in networks.lora, text-encoder
outputs are cached in memory and on disk (reused, and encoded again when stale), conflicts are one sentence each."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.dataset.buckets import SDXL_STEP_DIVISOR
from library.dataset.loader import BatchKey, BatchSettings, TrainingBatches
from library.dataset.plan import prepare_datasets
from library.errors import UserError
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import empty_model, load_stable_diffusion
from library.text_encoding import tokenize
from library.tiny_models import make_tiny_dataset, make_tiny_model
from library.training.diffusion import noisy_latents_and_target, per_sample_loss, training_scheduler
from library.training.families import sdxl as sdxl_family
from library.training.families.sdxl import SDXLTraining, size_conditioning
from library.training.fp8 import FP8, store_weights_in_fp8
from library.training.memory import estimate_peak_memory
from library.training.options import ModelOptions
from library.training.text_encoder_cache import outputs_file
from library.training.trainer import train
from lora_helpers import diffusers_pipeline, peft_layer_count
from networks.lora import create_network, create_network_from_weights
from training_helpers import training_arguments

PROMPT = "a red circle on a white background, simple shape"


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_checkpoints):
    return tiny_checkpoints[ModelFamily.SDXL][1]


@pytest.fixture(scope="module")
def sdxl_dataset(tmp_path_factory):
    """4 captioned images of 64x64, 96x64 and 64x96 pixels, 2 repeats."""
    folder = tmp_path_factory.mktemp("sdxl_data")
    make_tiny_dataset(folder, images=4, repeats=2)
    return folder


def test_conditioning_equals_diffusers_sdxl_pipeline():
    model = make_tiny_model(ModelFamily.SDXL, seed=1)
    family = SDXLTraining(model, ModelOptions("tiny"))
    ids = [tokenize(tokenizer, [PROMPT], None) for tokenizer in model.tokenizers]
    with torch.no_grad():
        context, pooled = family.encode_text(ids)
        pipeline = diffusers_pipeline(model)
        expected_context, _, expected_pooled, _ = pipeline.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(context, expected_context)
    torch.testing.assert_close(pooled, expected_pooled)
    assert context.shape[-1] == model.unet.config.cross_attention_dim


def test_size_conditioning_is_diffusers_time_ids_from_the_dataset(sdxl_dataset):
    plans, _ = prepare_datasets(
        None,
        {
            "resolution": "64",
            "enable_bucket": True,
            "min_bucket_reso": 32,
            "max_bucket_reso": 128,
            "bucket_reso_steps": 32,
        },
        train_data_dir=str(sdxl_dataset),
        bucket_step_divisor=SDXL_STEP_DIVISOR,
    )
    model = make_tiny_model(ModelFamily.SDXL)
    batches = TrainingBatches(plans, model.tokenizers, BatchSettings(seed=0))
    pipeline = diffusers_pipeline(model)
    projection = model.text_encoders[1].config.projection_dim
    seen_crop = False
    for index, sample in enumerate(plans[0].samples):
        key = BatchKey(dataset=0, samples=(index,), epoch=1, position=index, global_step=0)
        batch = batches[key]
        width, height = sample.image.size
        bucket_width, bucket_height = sample.placement.bucket
        top, left = batch["crop_top_lefts"][0].tolist()
        expected = pipeline._get_add_time_ids(
            (height, width), (top, left), (bucket_height, bucket_width), torch.float32, projection
        )
        torch.testing.assert_close(size_conditioning(batch), expected)
        excess_top, excess_left = (
            sample.placement.resized[1] - bucket_height,
            sample.placement.resized[0] - bucket_width,
        )
        assert top == excess_top // 2 and left in (
            excess_left // 2,
            excess_left - excess_left // 2,
        )  # centred; mirrored when flipped
        seen_crop |= top > 0 or left > 0
    assert seen_crop, "the dataset should have an image cropped to its bucket"
    assert batch["input_ids2"] is not None and batch["input_ids2"].shape == batch["input_ids"].shape


@pytest.mark.slow
def test_sdxl_lora_trains_caches_and_loads_everywhere(tiny_sdxl, sdxl_dataset, tmp_path, capsys):
    options = (
        "--output_name",
        "xl",
        "--max_train_steps",
        "4",
        "--learning_rate",
        "1e-3",
        "--network_dim",
        "4",
        "--network_alpha",
        "2",
        "--network_train_unet_only",
        "--cache_latents_to_disk",
        "--cache_text_encoder_outputs_to_disk",
        "--clip_skip",
        "2",
    )
    final = train(training_arguments(tiny_sdxl, sdxl_dataset, tmp_path / "out", *options, sdxl=True))
    printed = capsys.readouterr().out
    assert "--clip_skip 2 ignored" in printed
    captions = {file.read_text(encoding="utf-8").strip() for file in sdxl_dataset.rglob("*.txt")}
    assert f"text encoder outputs: {len(captions)} captions encoded, 0 reused" in printed
    image = sorted(sdxl_dataset.rglob("*.png"))[0]
    with np.load(outputs_file(image)) as npz:
        assert {"hidden_state1", "hidden_state2", "pool2"} <= set(npz.files)
        assert (
            npz["hidden_state1"].shape == (77, 64)
            and npz["hidden_state2"].shape == (77, 64)
            and npz["pool2"].shape == (64,)
        )
    assert list(image.parent.glob(f"{image.stem}_*_sdxl.npz"))

    with safe_open(str(final), "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.prediction_type"] == "epsilon" and metadata["ss_clip_skip"] == "None"

    model = load_stable_diffusion(tiny_sdxl)
    network, weights = create_network_from_weights(1.0, final, model.vae, model.text_encoders, model.unet)
    assert network.load_state_dict(weights, strict=True) is not None and len(network.unet_loras) == len(weights) // 3
    pipeline = diffusers_pipeline(load_stable_diffusion(tiny_sdxl))
    pipeline.load_lora_weights(str(final))
    assert peft_layer_count(pipeline.unet) == len(network.unet_loras) > 0

    # a second run reuses every text-encoder file; a changed caption is encoded again
    caption_file = image.with_suffix(".txt")
    caption_file.write_text("a different caption", encoding="utf-8")
    train(training_arguments(tiny_sdxl, sdxl_dataset, tmp_path / "again", *options, sdxl=True))
    assert (
        f"text encoder outputs: 1 captions encoded, {len(captions)} reused from _te_outputs.npz files"
        in capsys.readouterr().out
    )
    with np.load(outputs_file(image)) as npz:
        assert str(npz["caption"]) == "a different caption"


@pytest.mark.slow
def test_sdxl_text_encoders_train_and_load_in_diffusers_and_v_prediction_is_recorded(
    tiny_sdxl, sdxl_dataset, tmp_path, monkeypatch
):
    options = (
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--network_dim",
        "4",
        "--v_parameterization",
        "--zero_terminal_snr",
        "--disable_mmap_load_safetensors",
    )
    read = []
    monkeypatch.setattr(sdxl_family, "_read_sequentially", lambda path, **kwargs: read.append(path))
    final = train(training_arguments(tiny_sdxl, sdxl_dataset, tmp_path, *options, sdxl=True))
    assert read == [tiny_sdxl]  # --disable_mmap_load_safetensors reads the file through before mapping it
    weights = load_file(final)
    assert any(key.startswith("lora_te1_") for key in weights) and any(key.startswith("lora_te2_") for key in weights)
    with safe_open(str(final), "pt") as file:
        metadata = file.metadata()
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"

    pipeline = diffusers_pipeline(load_stable_diffusion(tiny_sdxl))
    pipeline.load_lora_weights(str(final))
    te_modules = {key.split(".")[0] for key in weights if key.startswith("lora_te")}
    unet_modules = {key.split(".")[0] for key in weights if key.startswith("lora_unet")}
    assert peft_layer_count(pipeline.text_encoder) + peft_layer_count(pipeline.text_encoder_2) == len(te_modules)
    assert peft_layer_count(pipeline.unet) == len(unet_modules)


def test_each_script_refuses_the_other_family(tiny_checkpoints, sdxl_dataset, tmp_path):
    with pytest.raises(UserError, match="train it with sdxl_train_network.py"):
        train(
            training_arguments(tiny_checkpoints[ModelFamily.SDXL][1], sdxl_dataset, tmp_path, "--max_train_steps", "1")
        )
    with pytest.raises(UserError, match="train it with train_network.py"):
        train(
            training_arguments(
                tiny_checkpoints[ModelFamily.SD1][1], sdxl_dataset, tmp_path, "--max_train_steps", "1", sdxl=True
            )
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache_text_encoder_outputs"], "add --network_train_unet_only"),
        (["--cache_text_encoder_outputs_to_disk"], "add --network_train_unet_only"),
        (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"], "sets shuffle_caption"),
        (["--v2"], "remove --v2"),
    ],
)
def test_sdxl_conflicts_are_one_sentence(tiny_sdxl, sdxl_dataset, tmp_path, extra, message):
    with pytest.raises(UserError, match=message) as error:
        train(training_arguments(tiny_sdxl, sdxl_dataset, tmp_path, "--max_train_steps", "1", *extra, sdxl=True))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_an_sdxl_run_resumed_from_its_epoch_state_ends_as_one_that_never_stopped(tiny_sdxl, sdxl_dataset, tmp_path):
    # 8 batches per epoch: 12 steps end inside epoch 2; dropout shows that the RNG state comes back too
    options = ["--output_name", "xl", "--max_train_steps", "12", "--learning_rate", "1e-2", "--network_dim", "4"]
    options += [
        "--network_dropout",
        "0.1",
        "--network_train_unet_only",
        "--cache_latents",
        "--cache_text_encoder_outputs",
    ]
    whole = train(
        training_arguments(
            tiny_sdxl, sdxl_dataset, tmp_path / "a", *options, "--save_every_n_epochs", "1", "--save_state", sdxl=True
        )
    )
    state = tmp_path / "a" / "xl-000001-state"
    resumed = train(
        training_arguments(tiny_sdxl, sdxl_dataset, tmp_path / "b", *options, "--resume", str(state), sdxl=True)
    )
    expected, tensors = load_file(whole), load_file(resumed)
    assert tensors.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(tensors[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_fp8_base_halves_the_frozen_weights_and_keeps_the_outputs_close():
    model = make_tiny_model(ModelFamily.SDXL)
    unet = model.unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 128, generator=generator)
    added = {
        "text_embeds": torch.randn(1, 64, generator=generator),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        expected = unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample
        layers = store_weights_in_fp8(unet, torch.float32)
        stored = unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample
    weights = [layer.weight for layer in unet.modules() if type(layer) in (torch.nn.Linear, torch.nn.Conv2d)]
    assert layers == len(weights) > 0 and all(weight.dtype == FP8 for weight in weights)
    assert (stored - expected).norm() / expected.norm() < 0.1  # e4m3 keeps 3 mantissa bits: a few percent


@pytest.mark.slow
def test_an_sdxl_run_with_fp8_base_trains_both_text_encoders_and_the_unet(tiny_sdxl, sdxl_dataset, tmp_path, capsys):
    options = ["--max_train_steps", "2", "--learning_rate", "1e-3", "--mixed_precision", "bf16", "--fp8_base"]
    final = train(training_arguments(tiny_sdxl, sdxl_dataset, tmp_path, *options, sdxl=True))
    printed = capsys.readouterr()
    assert "precision: bf16 on cpu, attention: PyTorch SDPA, base weights stored in float8" in printed.out
    peak = re.search(r"measured after the first step: peak host memory ([0-9.]+) GiB", printed.out + printed.err)
    assert peak and float(peak.group(1)) > 0.1  # at least the interpreter, torch and the model
    weights = load_file(final)
    assert {key.split("_")[1] for key in weights} == {"te1", "te2", "unet"}
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if "lora_up" in key)  # it learned
    with safe_open(str(final), "pt") as file:
        assert file.metadata()["ss_fp8_base"] == "True"


def test_the_memory_estimate_of_real_size_sdxl_follows_the_spec(tiny_sdxl, sdxl_dataset):
    model = empty_model(ModelFamily.SDXL)  # the real architecture on the meta device: no memory
    unet = model.unet.to(torch.bfloat16)
    network = create_network(1.0, 8, 8, None, model.text_encoders, unet)
    network.apply_to(model.text_encoders, unet, apply_text_encoder=False)
    flags = [
        "--network_train_unet_only",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--optimizer_type",
        "AdamW8bit",
    ]
    options = training_arguments(tiny_sdxl, sdxl_dataset, "out", *flags, sdxl=True)
    estimate = estimate_peak_memory(options, ModelFamily.SDXL, [unet], network, (1024, 1024), 1)
    assert estimate.weights * 2**30 == pytest.approx(5.13e9, rel=0.02)  # specs/performance.md 1.3: 2567 M in bf16
    assert estimate.activations == pytest.approx(0.54)
    assert estimate.total < 8  # the spec's "6-8 GB" for SDXL with GC and cached text-encoder outputs
    with_fp8 = sum(p.numel() * (1 if p.dim() > 1 else 2) for p in unet.parameters()) / 2**30
    assert with_fp8 + estimate.training + estimate.activations + 0.5 < 10  # the 10 GB target with --fp8_base


def test_running_out_of_cuda_memory_names_the_options_that_would_help(tiny_sdxl, sdxl_dataset, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("library.training.trainer._micro_step", out_of_memory)
    with pytest.raises(UserError, match="CUDA ran out of memory; to need less, try --gradient_checkpointing") as error:
        train(training_arguments(tiny_sdxl, sdxl_dataset, tmp_path, "--max_train_steps", "1", sdxl=True))
    message = str(error.value)
    assert "--cache_latents" in message and "--network_train_unet_only with --cache_text_encoder_outputs" in message
    assert "--optimizer_type AdamW8bit" in message and "\n" not in message
    assert not list(tmp_path.glob("*.safetensors"))


HIGH_TIMESTEP = 990  # x_t is nearly pure noise there, so predicting the noise is learnable by a small LoRA


def high_timestep_loss(model_file, data, lora_file=None) -> float:
    """The mean loss over the dataset's images at timesteps 990.. with fixed noise, through the SDXL family's own
    conditioning, with or without the LoRA."""
    model = load_stable_diffusion(model_file)
    if lora_file is not None:
        network, weights = create_network_from_weights(1.0, lora_file, model.vae, model.text_encoders, model.unet)
        network.load_state_dict(weights)
        network.apply_to(model.text_encoders, model.unet)
    family = SDXLTraining(model, ModelOptions(str(model_file)))
    plans, _ = prepare_datasets(
        None, {"resolution": "64"}, train_data_dir=str(data), bucket_step_divisor=SDXL_STEP_DIVISOR
    )
    batches = TrainingBatches(plans, model.tokenizers, BatchSettings(seed=0))
    scheduler, generator, losses = training_scheduler(False), torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for index in range(len(plans[0].samples)):
            batch = batches[BatchKey(dataset=0, samples=(index,), epoch=1, position=index, global_step=0)]
            latents = model.vae.encode(batch["images"]).latent_dist.mean * model.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.tensor([HIGH_TIMESTEP + index])
            noisy, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
            prediction = family.predict(noisy, timesteps, family.encode_text(family.token_ids(batch)), batch)
            losses.append(per_sample_loss(prediction, target, torch.ones(1)).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_sdxl_training_lowers_the_loss_and_draws_samples(tiny_sdxl, tmp_path):
    data = make_tiny_dataset(tmp_path / "data", images=4, repeats=5).parent
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shp shape, a red circle --w 64 --h 64 --d 1 --s 4\n", encoding="utf-8")
    options = ["--output_name", "xl", "--learning_rate", "1e-2", "--network_dim", "8", "--network_alpha", "8"]
    options += ["--max_train_steps", "40", "--min_timestep", str(HIGH_TIMESTEP), "--cache_latents"]
    options += ["--network_args", "conv_dim=8", "conv_alpha=8"]  # C3Lier: the tiny U-Net has few transformer layers
    options += ["--sample_prompts", str(prompts), "--sample_every_n_steps", "40"]
    final = train(training_arguments(tiny_sdxl, data, tmp_path / "out", *options, sdxl=True))
    assert high_timestep_loss(tiny_sdxl, data, final) < 0.8 * high_timestep_loss(tiny_sdxl, data)
    (sample,) = (tmp_path / "out" / "sample").glob("xl_000040_00_*_1.png")
    assert Image.open(sample).size == (64, 64)


def test_long_captions_are_encoded_in_windows_with_the_pooled_vector_of_the_first():
    model = make_tiny_model(ModelFamily.SDXL, seed=2)
    family = SDXLTraining(model, ModelOptions("tiny"))
    caption = ", ".join(f"tag{index}" for index in range(60))  # more than 75 tokens
    with torch.no_grad():
        context, pooled = family.encode_text([tokenize(tokenizer, [caption], 150) for tokenizer in model.tokenizers])
        first_window, first_pooled = family.encode_text(
            [tokenize(tokenizer, [caption], None) for tokenizer in model.tokenizers]
        )
    assert context.shape == (1, 152, 128)
    torch.testing.assert_close(context[:, :76], first_window[:, :76])  # BOS and the first 75 tokens
    torch.testing.assert_close(pooled, first_pooled)  # the first window ends with EOS in both


def test_an_sdxl_diffusers_folder_trains_with_a_separate_vae(tiny_checkpoints, sdxl_dataset, tmp_path, capsys):
    folder = tiny_checkpoints[ModelFamily.SDXL][2]
    options = ["--max_train_steps", "1", "--network_train_unet_only", "--vae", str(folder / "vae")]
    final = train(training_arguments(folder, sdxl_dataset, tmp_path, *options, sdxl=True))
    assert f"model: {folder} (SDXL, epsilon prediction), VAE from {folder / 'vae'}" in capsys.readouterr().out
    assert all(key.startswith("lora_unet_") for key in load_file(final))
