"""library/cpu_layers.py: frozen layers routed through oneDNN's matrix product compute what a Linear or conv computes
(outputs and the input's gradient against float64 references), are routed exactly where the module says, step aside
where they do not apply, and leave a LoRA wrapped around them working."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from library import cpu_layers
from library.cpu_layers import onednn_products_available, use_fast_cpu_layers
from networks.lora import LoRAModule

pytestmark = pytest.mark.skipif(not onednn_products_available(), reason="oneDNN's products are used on x86-64 only")


def outputs_and_input_gradient(layer, reference, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and input gradient, and the float64 reference's, for one random output gradient."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference(x64)
    y64.backward(grad.double())
    assert y.shape == y64.shape
    return torch.stack([(y.double() - y64).abs().max(), (x.grad.double() - x64.grad).abs().max()])


@pytest.mark.parametrize("rows", [8, 154, 600])
@pytest.mark.parametrize("bias", [True, False])
def test_a_routed_linear_layer_computes_its_outputs_and_input_gradient(rows, bias, routed_products):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 80, bias=bias).requires_grad_(False)
    assert use_fast_cpu_layers(layer) == 1
    weight, bias64 = layer.weight.double(), layer.bias.double() if bias else None
    errors = outputs_and_input_gradient(layer, lambda x: F.linear(x, weight, bias64), torch.randn(2, rows // 2, 96))
    assert errors.max() < 1e-5
    assert routed_products == [rows, rows]


@pytest.mark.parametrize(("stride", "rows"), [(1, 32), (2, 8)])
def test_a_large_3x3_conv_on_a_small_image_is_one_product_of_patches_and_computes_the_same(
    stride, rows, routed_products
):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(1920, 640, 3, stride=stride, padding=1).requires_grad_(False)  # an SD1 up-block conv
    assert use_fast_cpu_layers(layer) == 1
    weight, bias = layer.weight.double(), layer.bias.double()
    reference = lambda x: F.conv2d(x, weight, bias, stride, 1)  # noqa: E731
    errors = outputs_and_input_gradient(layer, reference, torch.randn(2, 1920, 4, 4))
    assert errors.max() < 1e-5
    assert routed_products == [rows, rows]


def test_small_convs_and_large_images_keep_the_usual_convolution(routed_products):
    small = torch.nn.Conv2d(1280, 640, 3, padding=1).requires_grad_(False)  # as fast as oneDNN's convolution
    pointwise = torch.nn.Conv2d(1280, 1280, 1).requires_grad_(False)
    assert use_fast_cpu_layers(small) == use_fast_cpu_layers(pointwise) == 0
    large = torch.nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)
    assert use_fast_cpu_layers(large) == 1
    large(torch.randn(1, 1280, 16, 16))  # 256 output pixels: unfolded
    large(torch.randn(2, 1280, 16, 16))  # 512: oneDNN's convolution
    assert large(torch.randn(0, 1280, 4, 4)).shape == (0, 1280, 4, 4)  # no pixels: the convolution
    assert routed_products == [256]


def test_a_trained_weight_or_bias_keeps_the_usual_path_and_gets_its_gradient_and_inference_is_routed(routed_products):
    layer = torch.nn.Linear(32, 32)  # requires_grad, as a loaded module's weights are until frozen
    use_fast_cpu_layers(layer)
    layer(torch.randn(20, 32)).sum().backward()
    assert layer.weight.grad is not None and routed_products == []
    layer.weight.requires_grad_(False)
    layer(torch.randn(20, 32)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((32,), 40.0)) and routed_products == []  # 20 rows, twice
    with torch.no_grad():
        layer(torch.randn(20, 32))
    assert routed_products == [20]


def test_other_dtypes_and_autocast_keep_the_usual_path(routed_products):
    layer = torch.nn.Linear(32, 32).requires_grad_(False)
    use_fast_cpu_layers(layer)
    layer.to(torch.bfloat16)(torch.randn(20, 32, dtype=torch.bfloat16))
    layer.float()
    with torch.autocast("cpu", torch.bfloat16):
        assert layer(torch.randn(20, 32)).dtype == torch.bfloat16
    assert routed_products == []


def test_a_lora_wrapped_around_a_routed_layer_adds_its_delta_and_learns(routed_products):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    use_fast_cpu_layers(layer)
    lora = LoRAModule("lora_unet_test", layer, multiplier=1.0, lora_dim=4, alpha=2)
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(40, 64, requires_grad=True)  # as the layer's input is, behind an earlier LoRA
    effective = layer.weight + lora.lora_up.weight @ lora.lora_down.weight * 0.5  # alpha / rank
    y = layer(x)
    assert torch.allclose(y, F.linear(x, effective, layer.bias), atol=1e-5)
    y.sum().backward()
    assert torch.allclose(x.grad, effective.sum(0).expand(40, 64).detach(), atol=1e-5)
    assert lora.lora_down.weight.grad is not None and lora.lora_up.weight.grad is not None
    assert routed_products == [40, 40]


def test_without_onednn_products_nothing_is_routed(monkeypatch):
    monkeypatch.setattr(cpu_layers, "onednn_products_available", lambda: False)
    assert use_fast_cpu_layers(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(640, 1280, 3))) == 0


def test_a_deep_copy_of_a_routed_module_computes_with_its_own_weights(routed_products):
    original = torch.nn.Sequential(torch.nn.Linear(8, 8)).requires_grad_(False)
    use_fast_cpu_layers(original)
    copied = copy.deepcopy(original)
    torch.nn.init.zeros_(copied[0].weight)
    torch.nn.init.zeros_(copied[0].bias)
    x = torch.randn(3, 8)
    assert torch.equal(copied(x), torch.zeros(3, 8))
    assert torch.allclose(original(x), F.linear(x, original[0].weight, original[0].bias), atol=1e-6)
    assert routed_products == [3, 3]


def test_a_second_derivative_through_a_routed_layer_is_the_default_one(routed_products):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16).requires_grad_(False)
    x = torch.randn(20, 16, requires_grad=True)
    derivatives = []
    for routed in (False, True):
        if routed:
            use_fast_cpu_layers(layer)
        (first,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
        derivatives.append(torch.autograd.grad(first.pow(2).sum(), x)[0])
    assert torch.allclose(*derivatives, atol=1e-5) and routed_products
