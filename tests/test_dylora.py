"""networks.dylora and networks/extract_lora_from_dylora.py: the paper's forward at every rank, one rank drawn per
training step with only its last unit learning, files that are ordinary LoRAs, rank-r extracts that networks.lora
and diffusers apply exactly as the DyLoRA network at rank r, and the real trainer visiting every rank."""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_script

from library.errors import UserError
from library.lora.files import read_lora_file
from library.model_files.containers import open_checkpoint
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import save_stable_diffusion_checkpoint
from library.tiny_models import make_tiny_dataset, make_tiny_model
from library.training.script import run_training_script
from lora_helpers import (
    ModelProbe,
    assert_outputs_close,
    diffusers_pipeline,
    fill_randomly,
    peft_layer_count,
    text_encoder_argument,
    tiny_model_pair,
)
from networks import dylora, lora
from networks.extract_lora_from_dylora import extract_ranks
from training_helpers import training_arguments

EXTRACT = "networks/extract_lora_from_dylora.py"
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV_1X1 = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV_3X3 = "lora_unet_down_blocks_0_resnets_0_conv1"


def c3lier(model, multiplier=1.0, dim=8, alpha=4.0, unit=2):
    return dylora.create_network(
        multiplier, dim, alpha, None, text_encoder_argument(model), model.unet, unit=str(unit), conv_dim=str(dim)
    )


def delta_by_hand(up, down, rank, scale):
    """scale * up[:, :rank] @ down[:rank], written with einsum, shaped like the layer's weight."""
    up2 = up[:, :rank].reshape(up.shape[0], rank)
    down = down[:rank]
    return scale * (
        torch.einsum("oj,ji->oi", up2, down) if down.dim() == 2 else torch.einsum("oj,jihw->oihw", up2, down)
    )


def layer_output(layer, x, weight):
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


def layer_input(layer):
    return (
        torch.randn(2, layer.in_channels, 6, 6)
        if isinstance(layer, torch.nn.Conv2d)
        else torch.randn(2, 5, layer.in_features)
    )


# ---------------------------------------------------------------- the network


def test_the_file_is_networks_loras_with_dylora_metadata(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = c3lier(model, dim=8, alpha=4, unit=4)
    plain = lora.create_network(1.0, 8, 4, None, model.text_encoders[0], model.unet, conv_dim=8, conv_alpha=4)
    ours, theirs = network.state_dict(), plain.state_dict()
    assert {key: value.shape for key, value in ours.items()} == {key: value.shape for key, value in theirs.items()}
    assert all(ours[key].dim() == 0 and float(ours[key]) == 4.0 for key in ours if key.endswith(".alpha"))
    assert all(torch.count_nonzero(value) == 0 for key, value in ours.items() if key.endswith("lora_up.weight"))

    network.save_weights(tmp_path / "dy.safetensors", torch.float16)
    metadata = open_checkpoint(tmp_path / "dy.safetensors").metadata
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "networks.dylora",
        "8",
        "4.0",
    )
    assert json.loads(metadata["ss_network_args"]) == {"unit": "4", "conv_dim": "8"}
    assert {tensor.dtype for tensor in read_lora_file(tmp_path / "dy.safetensors")[0].values()} == {torch.float16}


def test_sdxl_encoders_get_their_own_prefixes():
    model, _ = tiny_model_pair(ModelFamily.SDXL)
    network = dylora.create_network(1.0, 4, 1, None, model.text_encoders, model.unet, unit=2)
    names = [lora_module.lora_name for lora_module in network.text_encoder_loras]
    assert len(names) == len(set(names)) and {name[:9] for name in names} == {"lora_te1_", "lora_te2_"}


def test_at_rank_r_each_module_adds_multiplier_alpha_over_r_times_the_first_r_ranks():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = c3lier(model, multiplier=0.6, dim=6, alpha=3, unit=2)
    fill_randomly(network)
    loras = {module.lora_name: module for module in network.unet_loras}
    originals = {name: loras[name].org_module.weight.detach().clone() for name in (LINEAR, CONV_1X1, CONV_3X3)}
    full = network.state_dict()
    network.apply_to(text_encoder_argument(model), model.unet)
    network.eval()
    for rank in (None, 2, 4, 6):
        network.set_rank(rank)
        for name, original in originals.items():
            layer = loras[name].org_module
            used = rank or 6
            weight = original + delta_by_hand(
                full[f"{name}.lora_up.weight"], full[f"{name}.lora_down.weight"], used, 0.6 * 3 / used
            )
            x = layer_input(layer)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), layer_output(layer, x, weight), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loras[name].get_weight(), weight - original, atol=1e-6, rtol=1e-5)


def test_a_training_step_uses_the_drawn_rank_and_only_its_last_unit_learns():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = c3lier(model, dim=8, alpha=8, unit=2)
    fill_randomly(network)
    network.apply_to(text_encoder_argument(model), model.unet)
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=0.1, weight_decay=0.1)
    module = {m.lora_name: m for m in network.unet_loras}[CONV_3X3]
    layer, x = module.org_module, torch.randn(2, module.org_module.in_channels, 6, 6)
    for rank in (8, 4, 2):  # a unit that learned in an earlier step has Adam momentum, yet must stay put when not drawn
        for each in network.text_encoder_loras + network.unet_loras:
            each.step_rank = rank  # what on_step_start draws
        before = [unit.detach().clone() for unit in (*module.lora_down_units, *module.lora_up_units)]
        full = network.state_dict()
        output = layer(x)
        expected = layer_output(
            layer,
            x,
            layer.weight
            + delta_by_hand(full[f"{CONV_3X3}.lora_up.weight"], full[f"{CONV_3X3}.lora_down.weight"], rank, 8 / rank),
        )
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
        output.square().mean().backward()
        learning = rank // 2 - 1
        assert [unit.grad is not None for unit in module.lora_down_units] == [index == learning for index in range(4)]
        assert [unit.grad is not None for unit in module.lora_up_units] == [index == learning for index in range(4)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = [unit.detach() for unit in (*module.lora_down_units, *module.lora_up_units)]
        changed = [not torch.equal(a, b) for a, b in zip(before, after)]
        assert changed == [index % 4 == learning for index in range(8)]


def test_one_rank_is_drawn_per_step_for_the_whole_network_and_inference_uses_the_full_rank():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    network = dylora.create_network(1.0, 16, 1, None, model.text_encoders[0], model.unet, unit=4)
    network.apply_to(model.text_encoders[0], model.unet)
    assert network.ranks == [4, 8, 12, 16]
    network.train()
    with pytest.raises(UserError, match=r"no rank was drawn; call network.on_step_start\(\)"):
        model.unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, 64))
    torch.manual_seed(0)
    drawn = []
    for _ in range(40):
        network.on_step_start()
        assert {module.step_rank for module in network.text_encoder_loras + network.unet_loras} == {network.step_rank}
        drawn.append(network.step_rank)
    torch.manual_seed(0)
    again = []
    for _ in range(40):
        network.on_step_start()
        again.append(network.step_rank)
    assert set(drawn) == {4, 8, 12, 16} and drawn == again
    network.eval()
    assert {module.factors()[1].shape[0] for module in network.unet_loras} == {16}
    with pytest.raises(UserError, match="rank 6 is not one this network trains.*choose one of 4, 8, 12, 16"):
        network.set_rank(6)


@pytest.mark.parametrize(
    ("dim", "arguments", "message"),
    [
        (10, {"unit": "4"}, r"--network_dim 10 is not a multiple of unit=4.*such as 8 or 12"),
        (16, {"unit": "0"}, r"unit=0 must be at least 1"),
        (16, {"unit": "two"}, r"unit=two is not a number"),
        (16, {"unit": "4", "conv_dim": "8"}, r"conv_dim=8 must equal --network_dim 16.*write conv_dim=16"),
        (
            16,
            {"block_dims": ",".join(["4"] * 25)},
            r"'block_dims' is an option of networks.lora that networks.dylora does not have",
        ),
        (16, {"rank_dropout": "0.1"}, r"'rank_dropout' is an option of networks.lora"),
        (16, {"unti": "4"}, r"unknown argument 'unti' for networks.dylora; the known ones are unit, conv_dim"),
    ],
)
def test_bad_network_args_are_one_sentence(dim, arguments, message):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    with pytest.raises(UserError, match=message):
        dylora.create_network(1.0, dim, 1, None, model.text_encoders[0], model.unet, **arguments)


def test_conv_alpha_is_used_and_defaults_to_network_alpha():
    model, _ = tiny_model_pair(ModelFamily.SD1)
    default = dylora.create_network(1.0, 8, 2, None, model.text_encoders[0], model.unet, conv_dim=8)
    given = dylora.create_network(1.0, 8, 2, None, model.text_encoders[0], model.unet, conv_dim=8, conv_alpha=6)
    for network, conv_alpha in ((default, 2.0), (given, 6.0)):
        alphas = {module.uses_conv_rank: float(module.alpha) for module in network.unet_loras}
        assert alphas == {False: 2.0, True: conv_alpha}
    with pytest.raises(UserError, match="--network_dropout 0.1: networks.dylora has no dropout"):
        dylora.create_network(1.0, 8, 2, None, model.text_encoders[0], model.unet, neuron_dropout=0.1)
    with pytest.raises(UserError, match="--scale_weight_norms is not available with networks.dylora"):
        default.apply_max_norm_regularization(1.0)
    flags = ["--network_module", "networks.dylora", "--scale_weight_norms", "1"]
    with pytest.raises(UserError, match="--scale_weight_norms is not available with networks.dylora"):
        training_arguments("model.safetensors", "data", "out", *flags)  # refused with the options, before loading


# ---------------------------------------------------------------- files and extraction


def file_data_sha256(path) -> str:
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_length :]).hexdigest()


def test_each_extracted_rank_applied_by_networks_lora_and_diffusers_equals_dylora_at_that_rank(tmp_path):
    model, untouched = tiny_model_pair(ModelFamily.SD1)
    network = c3lier(model, multiplier=0.7, dim=6, alpha=3, unit=2)
    fill_randomly(network, std=0.1)
    network.save_weights(tmp_path / "dy.safetensors", metadata={"ss_training_comment": "shapes"})
    finished = run_script(
        EXTRACT,
        "--model",
        str(tmp_path / "dy.safetensors"),
        "--save_to",
        str(tmp_path / "out.safetensors"),
        "--unit",
        "2",
    )
    assert finished.returncode == 0, finished.stderr
    files = {rank: tmp_path / f"out-{rank:04d}.safetensors" for rank in (2, 4, 6)}
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "dy.safetensors",
        *sorted(path.name for path in files.values()),
    ]

    network.apply_to(model.text_encoders[0], model.unet)
    network.eval()
    probe = ModelProbe(model)
    hashes = set()
    for rank, path in files.items():
        network.set_rank(rank)
        expected = probe.outputs(model.text_encoders, model.unet)
        target = copy.deepcopy(untouched)
        extracted, weights = lora.create_network_from_weights(0.7, path, None, target.text_encoders[0], target.unet)
        extracted.apply_to(target.text_encoders[0], target.unet)
        extracted.load_state_dict(weights)  # strict: exactly networks.lora's keys
        assert {module.lora_dim for module in extracted.unet_loras} == {rank}
        assert_outputs_close(expected, probe.outputs(target.text_encoders, target.unet))

        metadata = open_checkpoint(path).metadata
        assert metadata["ss_network_dim"] == str(rank) and metadata["ss_network_module"] == "networks.dylora"
        assert metadata["ss_training_comment"] == f"split from DyLoRA, rank 6 to {rank}; shapes"
        assert metadata["sshs_model_hash"] == file_data_sha256(path)
        assert metadata["modelspec.title"] == f"out-{rank:04d}"
        hashes.add(metadata["sshs_model_hash"])
    assert len(hashes) == 3
    full, source = read_lora_file(files[6])[0], read_lora_file(tmp_path / "dy.safetensors")[0]
    assert full.keys() == source.keys() and all(torch.equal(full[key], source[key]) for key in full)

    network.set_rank(4)
    network.set_multiplier(1.0)  # diffusers applies the file at scale 1
    pipeline = diffusers_pipeline(copy.deepcopy(untouched))
    pipeline.load_lora_weights(str(files[4]))
    assert peft_layer_count(pipeline.unet) == len(network.unet_loras)
    assert_outputs_close(
        probe.outputs(model.text_encoders, model.unet), probe.outputs([pipeline.text_encoder], pipeline.unet)
    )


def assert_same_state(network, other):
    ours, theirs = network.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_dylora_file_loads_back_with_its_unit_and_resumes_exactly(tmp_path):
    model, untouched = tiny_model_pair(ModelFamily.SD1)
    network = c3lier(model, dim=8, alpha=2, unit=4)
    fill_randomly(network)
    network.save_weights(tmp_path / "dy.safetensors")
    loaded, weights = dylora.create_network_from_weights(
        1.0, tmp_path / "dy.safetensors", None, untouched.text_encoders[0], untouched.unet
    )
    loaded.load_state_dict(weights)
    assert (loaded.unit, loaded.ranks) == (4, [4, 8])
    assert_same_state(loaded, network)
    resumed = c3lier(copy.deepcopy(untouched), dim=8, alpha=1, unit=4)
    resumed.load_weights(tmp_path / "dy.safetensors")
    assert {module.alpha_value for module in resumed.unet_loras} == {2.0}
    assert_same_state(resumed, network)
    with pytest.raises(UserError, match=r"dy\.safetensors: its rank 8 is not a multiple of unit=3"):
        dylora.create_network_from_weights(
            1.0, tmp_path / "dy.safetensors", None, untouched.text_encoders[0], untouched.unet, unit=3
        )


@pytest.fixture
def files(tmp_path):
    model, _ = tiny_model_pair(ModelFamily.SD1)
    c3lier(model, dim=8, unit=4).save_weights(tmp_path / "dy.safetensors")
    c3lier(model, dim=8, unit=4).save_weights(tmp_path / "dy.pt")
    lora.create_network(1.0, 8, 1, None, model.text_encoders[0], model.unet).save_weights(
        tmp_path / "plain.safetensors"
    )
    return tmp_path


@pytest.mark.parametrize(
    ("model", "unit", "message"),
    [
        ("plain.safetensors", 4, r"plain\.safetensors: the file was trained with networks\.lora, not networks\.dylora"),
        (
            "dy.safetensors",
            3,
            r"--unit 3: .*dy\.safetensors was trained with unit=4.*give --unit 4 or a multiple of it",
        ),
        ("dy.safetensors", 16, r"dy\.safetensors: its rank 8 is not a multiple of unit=16"),
        ("dy.pt", None, r"dy\.pt: the file does not say which unit it was trained with.*give it with --unit"),
    ],
)
def test_the_extractor_refuses_what_is_not_a_dylora_or_not_a_trained_rank(files, model, unit, message):
    with pytest.raises(UserError, match=message):
        extract_ranks(files / model, files / "out.safetensors", unit)
    assert not list(files.glob("out*"))


def test_the_extractor_takes_the_files_unit_and_a_pickle_with_unit(files):
    assert [path.name for path in extract_ranks(files / "dy.safetensors", files / "a.safetensors")] == [
        "a-0004.safetensors",
        "a-0008.safetensors",
    ]
    assert [path.name for path in extract_ranks(files / "dy.pt", files / "b.safetensors", 8)] == ["b-0008.safetensors"]
    finished = run_script(
        EXTRACT, "--model", str(files / "plain.safetensors"), "--save_to", str(files / "c.safetensors")
    )
    assert finished.returncode == 2 and finished.stderr.count("\n") == 1 and finished.stderr.startswith("error: ")


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    """Twenty steps of train_network.py with networks.dylora, dim 16, unit 4 on the tiny SD1 model, recording the
    rank drawn at each step."""
    folder = tmp_path_factory.mktemp("dylora_training")
    save_stable_diffusion_checkpoint(make_tiny_model(ModelFamily.SD1), folder / "tiny.safetensors")
    make_tiny_dataset(folder / "data", images=2, repeats=1)
    drawn = []
    draw = dylora.DyLoRANetwork.on_step_start

    def recording(network):
        draw(network)
        drawn.append(network.step_rank)

    patch = pytest.MonkeyPatch()
    patch.setattr(dylora.DyLoRANetwork, "on_step_start", recording)
    try:
        final = run_training_script(
            sdxl=False,
            argv=[
                "--pretrained_model_name_or_path",
                str(folder / "tiny.safetensors"),
                "--train_data_dir",
                str(folder / "data"),
                "--resolution",
                "32",
                "--output_dir",
                str(folder / "out"),
                "--output_name",
                "dy",
                "--seed",
                "1",
                "--network_module",
                "networks.dylora",
                "--network_dim",
                "16",
                "--network_args",
                "unit=4",
                "--max_train_steps",
                "20",
                "--learning_rate",
                "1e-3",
                "--cache_latents",
                "--max_data_loader_n_workers",
                "0",
            ],
        )
    finally:
        patch.undo()
    return final, drawn


def test_training_with_unit_4_and_dim_16_visits_all_four_ranks(trained):
    final, drawn = trained
    assert len(drawn) == 20 and set(drawn) == {4, 8, 12, 16}
    metadata = open_checkpoint(final).metadata
    assert metadata["ss_network_module"] == "networks.dylora" and json.loads(metadata["ss_network_args"])["unit"] == "4"
    weights = read_lora_file(final)[0]
    up = weights[f"{LINEAR}.lora_up.weight"]
    assert all(torch.count_nonzero(up[:, start : start + 4]) > 0 for start in (0, 4, 8, 12))  # every unit learned


def test_the_extracted_full_rank_file_is_the_trained_network(trained, tmp_path):
    final, _ = trained
    written = extract_ranks(final, tmp_path / "split.safetensors", 4)
    assert [path.name for path in written] == [f"split-{rank:04d}.safetensors" for rank in (4, 8, 12, 16)]
    full, source = read_lora_file(written[-1])[0], read_lora_file(final)[0]
    assert full.keys() == source.keys() and all(torch.equal(full[key], source[key]) for key in full)


@pytest.mark.slow
def test_the_guides_try_it_commands(tmp_path):
    from test_docs_examples import run_as_user, try_it_commands

    for folder in ("tools", "networks"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    (tmp_path / "train_network.py").symlink_to(ROOT / "train_network.py")
    make, training, extract = try_it_commands("dylora.md")
    for command in (make, training):
        finished = run_as_user(command, tmp_path)
        assert finished.returncode == 0, finished.stderr
    finished = run_as_user(extract, tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines() == [f"saved tiny/out/split-{rank:04d}.safetensors" for rank in (4, 8, 12, 16)]
