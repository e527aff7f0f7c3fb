"""tools/verify_lora.py: every kind of file this project writes (the trainer's network for SD1, SD2 and SDXL, merge,
concat, SVD merge, resize, extract, a DyLoRA split) is applied whole by all five consumers; a renamed
key, a missing alpha, transposed factors, a te2 key of the wrong name, LyCORIS and DoRA keys, and a LoRA for another
model are each reported with the consumer and the module named, and fail the script."""

from __future__ import annotations

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.lora.files import read_lora_inputs
from library.model_files.family import ModelFamily
from library.model_files.stable_diffusion import save_stable_diffusion_checkpoint
from library.tiny_models import make_tiny_model
from lora_helpers import fill_randomly, text_encoder_argument
from networks import dylora
from networks.extract_lora_from_dylora import extract_ranks
from networks.extract_lora_from_models import ExtractOptions, extract_lora
from networks.lora import create_network
from networks.merge_lora import MergeOptions, merge_loras
from networks.resize_lora import ResizeOptions, resize
from networks.svd_merge_lora import SvdMergeOptions, svd_merge
from tools.verify_lora import CONSUMERS, LoraFile, check, verify


def lora_file(model, path, seed=0, **network_args):
    network = create_network(1.0, 4, 2, None, text_encoder_argument(model), model.unet, **network_args)
    fill_randomly(network, seed=seed)
    network.save_weights(path)
    return path


@pytest.fixture(scope="module")
def written(tiny_checkpoints, tmp_path_factory):
    """name -> a file as this project's trainer and tools write them."""
    folder = tmp_path_factory.mktemp("written")
    files = {
        family.value: lora_file(tiny_checkpoints[family][0], folder / f"{family.value}.safetensors", conv_dim=2)
        for family in ModelFamily
    }
    sd1 = tiny_checkpoints[ModelFamily.SD1][0]
    other = lora_file(sd1, folder / "other.safetensors", seed=1, conv_dim=2)
    pair = read_lora_inputs([files["sd1"], other], [0.7, 0.4])
    files["concat"] = merge_loras(folder / "concat.safetensors", pair, MergeOptions(concat=True, progress=False))
    files["svd"] = folder / "svd.safetensors"
    svd_merge(SvdMergeOptions(models=(files["sd1"], other), ratios=(0.7, 0.4), save_to=files["svd"]))
    files["resized"] = folder / "resized.safetensors"
    resize(ResizeOptions(model=files["sd1"], save_to=files["resized"]))
    files["merged"] = merge_loras(folder / "merged.safetensors", pair, MergeOptions(progress=False))
    tuned = folder / "tuned.safetensors"
    save_stable_diffusion_checkpoint(make_tiny_model(ModelFamily.SD1, seed=5), tuned)
    files["extracted"] = folder / "extracted.safetensors"
    extract_lora(tiny_checkpoints[ModelFamily.SD1][1], tuned, files["extracted"], ExtractOptions(progress=False))
    network = dylora.create_network(1.0, 4, 1, None, sd1.text_encoders[0], sd1.unet, unit=2)
    fill_randomly(network)
    network.save_weights(folder / "dylora.safetensors")
    files["dylora-split"] = extract_ranks(folder / "dylora.safetensors", folder / "split.safetensors", 2)[0]
    return files


@pytest.mark.parametrize(
    "name", ["sd1", "sd2", "sdxl", "merged", "concat", "svd", "resized", "extracted", "dylora-split"]
)
def test_every_file_this_project_writes_is_applied_whole_everywhere(written, name, capsys):
    assert check(written[name])
    printed = capsys.readouterr().out.splitlines()
    modules = len({key.split(".")[0] for key in load_file(written[name])})
    assert len(printed) == 7 and all(f"applies {modules} of {modules} modules" in line for line in printed[1:6])


def damaged(path, tmp_path, change) -> LoraFile:
    weights = load_file(path)
    change(weights)
    save_file(weights, tmp_path / "damaged.safetensors")
    return LoraFile.read(tmp_path / "damaged.safetensors", None)


def rename(weights: dict, name: str, new_name: str) -> None:
    """Give module `name`'s three tensors the module name `new_name`."""
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        weights[f"{new_name}.{part}"] = weights.pop(f"{name}.{part}")


def skipped_everywhere(lora: LoraFile, module: str, reason: str) -> None:
    for verdict in verify(lora, CONSUMERS):
        assert not verdict.complete and reason in verdict.skipped[module], (verdict.consumer, verdict.skipped)


def test_a_renamed_key_is_skipped_by_every_consumer(written, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = damaged(written["sd1"], tmp_path, lambda weights: rename(weights, name, f"{name}x"))
    verdicts = {verdict.consumer: verdict for verdict in verify(lora, CONSUMERS)}
    assert all(f"{name}x" in verdict.skipped and len(verdict.skipped) == 1 for verdict in verdicts.values())
    assert "lora key not loaded" in verdicts["comfyui"].skipped[f"{name}x"]
    assert "does not have" in verdicts["diffusers"].skipped[f"{name}x"]


def test_a_missing_alpha_is_named_for_every_consumer_and_transposed_factors_against_the_model(
    written, tiny_checkpoints, tmp_path, capsys
):
    names = sorted({key.split(".")[0] for key in load_file(written["sd1"])})
    fc2 = "lora_te_text_model_encoder_layers_0_mlp_fc2"  # 128 -> 64: transposed factors make another layer

    def break_two(weights):
        del weights[f"{names[0]}.alpha"]
        weights[f"{fc2}.lora_down.weight"], weights[f"{fc2}.lora_up.weight"] = (
            weights[f"{fc2}.lora_up.weight"].T.contiguous(),
            weights[f"{fc2}.lora_down.weight"].T.contiguous(),
        )

    lora = damaged(written["sd1"], tmp_path, break_two)
    skipped_everywhere(lora, names[0], "no alpha")
    assert not check(lora.path, model=str(tiny_checkpoints[ModelFamily.SD1][1]))
    assert f"--model: module '{fc2}' is made for another layer shape than (64, 128)" in capsys.readouterr().out


def test_a_te2_key_without_the_text_model_level_is_skipped_where_the_level_is_needed(written, tmp_path):
    name = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    lora = damaged(
        written["sdxl"], tmp_path, lambda weights: rename(weights, name, "lora_te2_encoder_layers_0_mlp_fc1")
    )
    verdicts = {verdict.consumer: verdict for verdict in verify(lora, CONSUMERS)}
    for consumer in ("a1111", "comfyui", "invokeai", "sd-scripts"):
        assert list(verdicts[consumer].skipped) == ["lora_te2_encoder_layers_0_mlp_fc1"], consumer
    # diffusers' converter maps it to encoder.layers.0.mlp.fc1, which transformers 5's CLIP model has
    assert verdicts["diffusers"].complete


def test_lycoris_and_dora_modules_are_reported_where_they_are_not_applied(written, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"

    def to_loha_and_dora(weights):
        down, up = weights.pop(f"{name}.lora_down.weight"), weights.pop(f"{name}.lora_up.weight")
        weights.update({f"{name}.hada_w1_a": up.flatten(1), f"{name}.hada_w1_b": down.flatten(1)})
        weights.update({f"{name}.hada_w2_a": up.flatten(1).clone(), f"{name}.hada_w2_b": down.flatten(1).clone()})
        dora = "lora_unet_down_blocks_0_attentions_0_proj_out"
        weights[f"{dora}.dora_scale"] = torch.ones(weights[f"{dora}.lora_up.weight"].shape[0], 1)

    verdicts = {
        verdict.consumer: verdict for verdict in verify(damaged(written["sd1"], tmp_path, to_loha_and_dora), CONSUMERS)
    }
    assert "raises ValueError on LoHa keys" in verdicts["diffusers"].refused
    assert "lycoris.kohya" in verdicts["sd-scripts"].skipped[name]
    assert "per input column" in verdicts["a1111"].skipped["lora_unet_down_blocks_0_attentions_0_proj_out"]
    assert verdicts["comfyui"].complete and verdicts["invokeai"].complete


def test_a_lora_for_another_model_fails_the_script(written, tiny_checkpoints):
    with pytest.raises(UserError, match="is an SD1.x LoRA but --model is an SDXL model"):
        check(written["sd1"], model=str(tiny_checkpoints[ModelFamily.SDXL][1]))
    refused = run_script(
        "tools/verify_lora.py", str(written["sd1"]), "--model", str(tiny_checkpoints[ModelFamily.SD2][1])
    )
    assert refused.returncode == 2 and "is an SD1.x LoRA but --model is an SD2.x model" in refused.stderr
