"""train_network.py end to end on the tiny SD1 model: it learns, saves sd-scripts' files with metadata that load in
networks.lora and in diffusers, stops on a non-finite loss without saving, and notes what cannot apply on a CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.cpu_layers import onednn_products_available
from library.errors import UserError
from library.model_files.containers import open_checkpoint
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import load_stable_diffusion
from library.text_encoding import encode_tokens, tokenize
from library.training import diffusion, preparation
from library.training.trainer import train
from lora_helpers import diffusers_pipeline, peft_layer_count
from networks.lora import create_network_from_weights
from training_helpers import training_arguments

HIGH_TIMESTEP = 990  # x_t is nearly pure noise there, so predicting the noise is learnable by a small LoRA


@pytest.fixture(scope="module")
def trained(tiny_sd1, tiny_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("output")
    args = training_arguments(
        tiny_sd1,
        tiny_dataset,
        output,
        "--output_name",
        "tiny",
        "--learning_rate",
        "1e-2",
        "--network_dim",
        "8",
        "--network_alpha",
        "8",
        "--max_train_steps",
        "40",
        "--min_timestep",
        str(HIGH_TIMESTEP),
        "--cache_latents",
        "--save_every_n_steps",
        "20",
    )
    return train(args), output


def high_timestep_loss(model, lora_file=None) -> float:
    """The mean loss over the dataset's images at timesteps 990..999 with fixed noise, with or without the LoRA."""
    if lora_file is not None:
        network, weights = create_network_from_weights(1.0, lora_file, model.vae, model.text_encoders[0], model.unet)
        network.load_state_dict(weights)
        network.apply_to(model.text_encoders[0], model.unet)
    images, captions = model.images, model.captions
    generator = torch.Generator().manual_seed(0)
    scheduler = diffusion.training_scheduler(False)
    with torch.no_grad():
        latents = model.vae.encode(images).latent_dist.mean * model.vae.config.scaling_factor
        context = encode_tokens(model.text_encoders[0], tokenize(model.tokenizers[0], captions, None), None)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.arange(HIGH_TIMESTEP, HIGH_TIMESTEP + len(captions))
        noisy, target = diffusion.noisy_latents_and_target(scheduler, latents, noise, timesteps)
        prediction = model.unet(noisy, timesteps, context).sample
    return diffusion.per_sample_loss(prediction, target, torch.ones(len(captions))).mean().item()


def load_with_images(model_file, data):
    from library.dataset.images import cache_pixels
    from library.dataset.plan import prepare_datasets

    model = load_stable_diffusion(model_file)
    plans, _ = prepare_datasets(None, {"resolution": "64"}, train_data_dir=str(data))
    samples = plans[0].samples
    model.images = torch.stack([cache_pixels(sample.image.path, sample.placement, False)[0] for sample in samples])
    model.captions = [sample.image.caption for sample in samples]
    return model


@pytest.mark.slow
def test_training_lowers_the_loss_and_saves_sd_scripts_files(trained, tiny_sd1, tiny_dataset):
    final, output = trained
    assert final == output / "tiny.safetensors"
    assert sorted(path.name for path in output.iterdir()) == ["tiny-step00000020.safetensors", "tiny.safetensors"]
    before = high_timestep_loss(load_with_images(tiny_sd1, tiny_dataset))
    after = high_timestep_loss(load_with_images(tiny_sd1, tiny_dataset), final)
    assert after < 0.8 * before

    metadata = open_checkpoint(final).metadata
    assert metadata["ss_steps"] == "40" and metadata["ss_max_train_steps"] == "40"
    assert (
        metadata["ss_network_module"] == "networks.lora"
        and metadata["ss_network_dim"] == "8"
        and metadata["ss_network_alpha"] == "8.0"
    )
    assert (
        metadata["ss_output_name"] == "tiny" and metadata["ss_seed"] == "3" and metadata["ss_cache_latents"] == "True"
    )
    assert (
        metadata["ss_num_train_images"] == "20"
        and metadata["ss_num_batches_per_epoch"] == "20"
        and metadata["ss_num_epochs"] == "2"
    )
    assert (
        "shp shape" in metadata["ss_tag_frequency"] and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    )
    assert open_checkpoint(output / "tiny-step00000020.safetensors").metadata["ss_steps"] == "20"
    # sd-scripts' formats: the optimizer without "()" when it has no arguments, its default validation split, and
    # no VAE name without --vae
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW" and metadata["ss_validation_split"] == "0.0"
    assert "ss_vae_name" not in metadata


@pytest.mark.slow
def test_the_trained_file_loads_completely_in_diffusers(trained, tiny_sd1):
    final, _ = trained
    keys = open_checkpoint(final).keys()
    modules = {key.split(".")[0] for key in keys if key.endswith("lora_down.weight")}
    pipeline = diffusers_pipeline(load_stable_diffusion(tiny_sd1))
    pipeline.load_lora_weights(str(final))
    assert peft_layer_count(pipeline.unet) == sum(name.startswith("lora_unet_") for name in modules)
    assert peft_layer_count(pipeline.text_encoder) == sum(name.startswith("lora_te_") for name in modules) > 0


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_without_saving(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    def poisoned(prediction, *args, **kwargs):
        return prediction.mean(dim=(1, 2, 3)) * float("nan")

    monkeypatch.setattr(diffusion, "per_sample_loss", poisoned)
    with pytest.raises(UserError, match="NaN or infinite at step 1; nothing was saved"):
        train(
            training_arguments(
                tiny_sd1, tiny_dataset, tmp_path / "out", "--max_train_steps", "3", "--save_every_n_steps", "1"
            )
        )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_cuda_only_options_give_a_note_on_the_cpu(tiny_sd1, tiny_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    final = train(
        training_arguments(
            tiny_sd1,
            tiny_dataset,
            tmp_path,
            "--max_train_steps",
            "2",
            "--mixed_precision",
            "fp16",
            "--xformers",
            "--network_train_unet_only",
            "--optimizer_type",
            "AdamW8bit",
        )
    )
    printed = capsys.readouterr().out
    assert "--mixed_precision fp16 needs a CUDA GPU; training on the CPU in float32." in printed
    assert "--xformers needs a CUDA GPU" in printed
    assert "--optimizer_type AdamW8bit needs bitsandbytes on a CUDA GPU; using AdamW on the CPU." in printed
    assert final.name == "last.safetensors"
    assert not any(key.startswith("lora_te_") for key in open_checkpoint(final).keys())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "leave nothing to train"),
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], "constant has no warmup"),
        (["--log_with", "tensorboard"], "--log_with tensorboard writes TensorBoard logs under --logging_dir"),
    ],
)
def test_conflicting_options_are_one_sentence(tiny_sd1, tiny_dataset, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, "--max_train_steps", "1", *extra))


@pytest.mark.slow
def test_step_saves_outside_the_kept_window_are_removed(tiny_sd1, tiny_dataset, tmp_path):
    train(
        training_arguments(
            tiny_sd1,
            tiny_dataset,
            tmp_path,
            "--max_train_steps",
            "8",
            "--save_every_n_steps",
            "2",
            "--save_last_n_steps",
            "2",
            "--network_train_unet_only",
            "--cache_latents",
        )
    )
    # saving step 6 removes step (6 - 2 - 1) // 2 * 2 = 2; step 8 is the last step, saved as last.safetensors only
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "at-step00000004.safetensors",
        "at-step00000006.safetensors",
        "last.safetensors",
    ]


def test_logging_without_its_package_is_one_sentence(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "tensorboard" else real_find_spec(name, *rest)
    )
    with pytest.raises(UserError, match="pip install tensorboard"):
        train(
            training_arguments(
                tiny_sd1,
                tiny_dataset,
                tmp_path / "out",
                "--max_train_steps",
                "1",
                "--logging_dir",
                str(tmp_path / "logs"),
            )
        )
    assert not (tmp_path / "out").exists()


def test_a_frozen_text_encoder_encodes_each_caption_once_with_the_same_result(
    tiny_sd1, tiny_dataset, tmp_path, capsys, monkeypatch
):
    options = (
        "--output_name",
        "tiny",
        "--max_train_steps",
        "6",
        "--network_train_unet_only",
        "--learning_rate",
        "1e-2",
        "--cache_latents",
    )
    cached = train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "cached", *options))
    assert "text encoder: frozen, each caption encoded once at its first use" in capsys.readouterr().out
    monkeypatch.setattr(preparation, "_caption_states", lambda plans, train_text_encoder: None)
    uncached = train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "uncached", *options))
    expected = load_file(uncached)
    for key, tensor in load_file(cached).items():
        torch.testing.assert_close(tensor, expected[key], msg=key)


def test_captions_that_change_per_use_are_encoded_every_step(tiny_sd1, tiny_dataset, tmp_path, capsys):
    train(
        training_arguments(
            tiny_sd1, tiny_dataset, tmp_path, "--max_train_steps", "1", "--network_train_unet_only", "--shuffle_caption"
        )
    )
    assert "captions change from use to use" in capsys.readouterr().out


def test_tensorboard_logs_the_losses_and_learning_rates_per_step(tiny_sd1, tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        training_arguments(
            tiny_sd1,
            tiny_dataset,
            tmp_path / "out",
            "--max_train_steps",
            "4",
            "--learning_rate",
            "1e-3",
            "--unet_lr",
            "2e-3",
            "--logging_dir",
            str(tmp_path / "logs"),
            "--log_prefix",
            "mine-",
        )
    )
    (run_folder,) = (tmp_path / "logs").iterdir()
    assert run_folder.name.startswith("mine-") and (run_folder / "network_train").is_dir()
    events = EventAccumulator(str(run_folder / "network_train"))
    events.Reload()
    scalars = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["loss/current"]] == [1, 2, 3, 4]
    currents = [value for _, value in scalars["loss/current"]]
    averages = [value for _, value in scalars["loss/average"]]
    assert averages == pytest.approx(
        [sum(currents[: n + 1]) / (n + 1) for n in range(4)], rel=1e-5
    )  # within the first epoch
    assert [value for _, value in scalars["lr/textencoder"]] == pytest.approx([1e-3] * 4)
    assert [value for _, value in scalars["lr/unet"]] == pytest.approx([2e-3] * 4)


@pytest.mark.parametrize(
    ("family", "extra", "version", "architecture", "prediction"),
    [
        (ModelFamily.SD1, [], "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
        (ModelFamily.SD1, ["--no_metadata"], "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
        (ModelFamily.SD2, ["--v2", "--v_parameterization"], "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
    ],
)
def test_the_file_records_the_model_and_prediction_the_run_trained(
    tiny_checkpoints, tiny_dataset, tmp_path, family, extra, version, architecture, prediction
):
    final = train(
        training_arguments(tiny_checkpoints[family][1], tiny_dataset, tmp_path, "--max_train_steps", "1", *extra)
    )
    with safe_open(str(final), "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == str(family is ModelFamily.SD2)
    assert metadata["modelspec.architecture"] == architecture and metadata["modelspec.prediction_type"] == prediction
    assert ("ss_seed" in metadata) == ("--no_metadata" not in extra)


def test_nan_latents_name_the_images_and_the_fix(tiny_sd1, tiny_dataset, tmp_path, monkeypatch):
    from library.training import forward

    encode = forward.batch_latents
    monkeypatch.setattr(forward, "batch_latents", lambda *args: encode(*args) * float("nan"))
    with pytest.raises(
        UserError, match=r"the VAE produced NaN or infinite latents at step 1 for .*\.png; .*--no_half_vae"
    ):
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, "--max_train_steps", "1"))
    assert not list(tmp_path.glob("*.safetensors"))


def test_scale_weight_norms_logs_what_it_scaled(tiny_sd1, tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--max_train_steps", "2", "--learning_rate", "1e-1", "--scale_weight_norms", "1e-4"]
    train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "out", *flags, "--logging_dir", str(tmp_path / "logs")))
    (run_folder,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run_folder / "network_train"))
    events.Reload()
    scalars = {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["max_norm/keys_scaled"][-1] > 0  # a cap of 1e-4 scales the modules that learned anything
    assert scalars["max_norm/max_key_norm"][-1] <= 1e-4 * 1.0001 and scalars["norm/avg_key_norm"][-1] <= 1e-4 * 1.0001


@pytest.mark.slow
def test_schedule_free_steps_in_train_mode_and_saves_the_averaged_weights(
    tiny_sd1, tiny_dataset, tmp_path, monkeypatch
):
    from library.training.saving import Saver

    modes = []
    save = Saver.save

    def recording(self, network, path, where):
        group = self.accelerator._optimizers[0].optimizer.param_groups[0]
        modes.append(group["train_mode"])
        return save(self, network, path, where)

    monkeypatch.setattr(Saver, "save", recording)
    flags = ["--max_train_steps", "4", "--optimizer_type", "AdamWScheduleFree", "--save_every_n_steps", "2"]
    flags += ["--learning_rate", "1e-3", "--network_train_unet_only", "--cache_latents"]
    final = train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, *flags))
    assert modes == [False, False]  # both saves (step 2, last) in eval mode: the averaged weights
    assert any(tensor.abs().sum() > 0 for key, tensor in load_file(final).items() if "lora_up" in key)


@pytest.mark.slow
def test_a_compiled_unet_trains_as_the_eager_one(tiny_sd1, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preparation, "use_fast_cpu_layers", lambda module: 0)  # as a compiled U-Net: PyTorch's kernels
    flags = ["--max_train_steps", "3", "--learning_rate", "1e-2", "--cache_latents", "--network_train_unet_only"]
    eager = load_file(train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "eager", *flags)))
    compiled_flags = ["--torch_compile", "--dynamo_backend", "eager"]  # inductor needs minutes of C++ on a CPU
    compiled = load_file(
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "compiled", *flags, *compiled_flags))
    )
    assert "U-Net compiled (eager)" in capsys.readouterr().out
    for key, tensor in eager.items():
        torch.testing.assert_close(compiled[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.skipif(not onednn_products_available(), reason="oneDNN's products are used on x86-64 only")
def test_a_float32_cpu_run_routes_the_frozen_layers_through_onednn_and_trains_as_the_default_kernels(
    tiny_sd1, tiny_dataset, tmp_path, capsys, monkeypatch, routed_products
):
    # SGD: its update is linear in the gradient, so the kernels' rounding stays at rounding size (AdamW's first steps
    # turn a rounding-size gradient into a step of the learning rate's size)
    flags = ["--max_train_steps", "3", "--learning_rate", "1e-2", "--cache_latents", "--optimizer_type", "SGDNesterov"]
    fast = load_file(train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "fast", *flags)))
    assert "oneDNN matrix products for the frozen layers" in capsys.readouterr().out and routed_products

    monkeypatch.setattr(preparation, "use_fast_cpu_layers", lambda module: 0)
    default = load_file(train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "default", *flags)))
    for key, tensor in default.items():
        torch.testing.assert_close(fast[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
