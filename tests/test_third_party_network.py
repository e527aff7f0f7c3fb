"""A third-party network module (LyCORIS's lycoris.kohya, as sd-scripts users run it) trains, saves files whose key
names are sd-scripts' (the naming table's), loads back with the package's own loader, and a module that fails while
building its network, or is missing, is one sentence naming the package."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.lora.naming import sd_scripts_view, text_encoder_targets, unet_targets
from library.model_files.stable_diffusion import load_stable_diffusion
from library.training.trainer import train
from training_helpers import training_arguments

lycoris_kohya = pytest.importorskip("lycoris.kohya")
PRESET = "preset=attn-mlp"  # lycoris-lora 4 builds duplicate U-Net modules with its default preset


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_algorithms_train_with_sd_scripts_names_and_load_back(tiny_sd1, tiny_dataset, tmp_path, capsys, algo):
    flags = ["--max_train_steps", "2", "--learning_rate", "1e-3", "--network_module", "lycoris.kohya"]
    final = train(
        training_arguments(tiny_sd1, tiny_dataset, tmp_path, *flags, "--network_args", f"algo={algo}", PRESET)
    )
    assert f"network: lycoris.kohya (algo={algo}, {PRESET})" in capsys.readouterr().out
    weights = load_file(final)
    model = load_stable_diffusion(tiny_sd1)
    # the naming table's names, and for the layers it does not target (LyCORIS also adapts the time embedding)
    # sd-scripts' names: lora_unet_ and the layer's path with underscores
    known = {target.name for target in text_encoder_targets(model.text_encoders)}
    known |= {target.name for target in unet_targets(model.unet, with_conv_containers=True)}
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    known |= {
        "lora_unet_" + path.replace(".", "_") for path, layer in model.unet.named_modules() if isinstance(layer, layers)
    }
    modules = {key.split(".")[0] for key in weights}
    assert any(name.startswith("lora_te_text_model_encoder_layers_") for name in modules)
    assert modules <= known, sorted(modules - known)[:3]
    text_encoder = sd_scripts_view(model.text_encoders[0])  # as sd-scripts' (transformers 4) text model looks
    network, loaded = lycoris_kohya.create_network_from_weights(1.0, str(final), model.vae, text_encoder, model.unet)
    assert len(network.text_encoder_loras) + len(network.unet_loras) == len(modules) and loaded.keys() == weights.keys()
    assert any(tensor.abs().sum() > 0 for key, tensor in weights.items() if key.endswith(("_b", "lora_up.weight")))


def test_a_network_that_fails_to_build_names_the_package_and_what_to_do(tiny_sd1, tiny_dataset, tmp_path):
    version = importlib.metadata.version("lycoris-lora")
    flags = ["--max_train_steps", "1", "--network_module", "lycoris.kohya", "--network_args", "algo=loha"]
    if not version.startswith("4"):
        pytest.skip("the default preset builds with this lycoris-lora version")
    with pytest.raises(
        UserError, match=f"lycoris-lora {version}\\) could not build the network: duplicated lora name"
    ) as error:
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, *flags))
    assert 'add --network_args "preset=attn-mlp"' in str(error.value) and "\n" not in str(error.value)


def test_a_missing_network_module_is_one_sentence(tiny_sd1, tiny_dataset, tmp_path):
    with pytest.raises(
        UserError, match="--network_module no_such_networks.kohya: it cannot be imported .*pip install no_such_networks"
    ):
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path, "--network_module", "no_such_networks.kohya"))


def test_the_view_gives_text_model_names_and_patches_the_encoder_itself():
    from library.model_files.family import ModelFamily
    from library.tiny_models import make_tiny_model

    encoder = make_tiny_model(ModelFamily.SD1).text_encoders[0]
    view = sd_scripts_view(encoder)
    assert dict(view.named_modules())["text_model.encoder.layers.0.mlp.fc1"] is encoder.encoder.layers[0].mlp.fc1
    assert sd_scripts_view(view) is view and isinstance(sd_scripts_view([encoder, encoder]), list)
    assert torch.equal(next(view.parameters()), next(encoder.parameters()))


@pytest.mark.slow
def test_lycoris_dora_draws_samples_and_resumes_exactly(tiny_sd1, tiny_dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shp shape --w 64 --h 64 --d 1 --s 3\n", encoding="utf-8")
    flags = [
        "--max_train_steps",
        "4",
        "--network_module",
        "lycoris.kohya",
        "--output_name",
        "d",
        "--save_every_n_steps",
        "2",
    ]
    flags += ["--network_args", "algo=locon", "dora_wd=True", PRESET, "--save_state", "--cache_latents"]
    flags += ["--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--network_dropout", "0.1"]
    whole = load_file(train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "a", *flags)))
    assert any(key.endswith(".dora_scale") for key in whole)
    assert len(list((tmp_path / "a" / "sample").glob("d_00000*_00_*_1.png"))) == 2
    state = tmp_path / "a" / "d-step00000002-state"
    resumed = load_file(
        train(training_arguments(tiny_sd1, tiny_dataset, tmp_path / "b", *flags, "--resume", str(state)))
    )
    for key, tensor in whole.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=key)
