"""Frozen float32 Linear and large 3x3 conv layers on the CPU, computed by oneDNN's matrix product, which runs faster
there than PyTorch's default kernels (bench/NOTES.md has the measurements). The arithmetic is the same float32
products and sums; only the order of the additions inside a dot product changes, as it does between any two kernels.

Two default kernels are slow at the sizes of CPU training and generation:
- `F.linear` goes to MKL's matrix product, which on the CPU measured runs at 40-95% of the speed of oneDNN's
  (slowest with few rows: tokens or pixels times the batch), forward and backward alike.
- oneDNN's own 3x3 convolution with a large weight (1280 channels) on a small image (at most 256 output pixels over
  the batch) is 1.5-4 times slower than unfolding the image into patches and taking one matrix product: it spends
  its time rearranging the weight at each call.
"""

from __future__ import annotations

import functools
import platform
import types

import torch
import torch.nn.functional as F

UNFOLD_WEIGHTS_ABOVE = 640 * 1280 * 9  # 3x3 conv weights larger than this (SD's 640-1280 convs gain nothing) ...
UNFOLD_MAX_PIXELS = 256  # ... on at most this many output pixels, over the whole batch, are unfolded


@functools.cache
def onednn_products_available() -> bool:
    """On x86-64 CPUs, where it was measured, with PyTorch built with oneDNN; elsewhere PyTorch's kernels stay."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN (the operator inductor uses for CPU linear layers)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenProduct(torch.autograd.Function):
    """x (rows, in) -> x @ weight.T + bias, with weight and bias frozen: the backward gives x's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return _FrozenProduct.apply(grad, weight.t(), None), None, None  # itself: a double backward stays right


try:
    torch.is_autocast_enabled("cpu")
    _cpu_autocast = functools.partial(torch.is_autocast_enabled, "cpu")
except TypeError:  # torch < 2.4
    _cpu_autocast = torch.is_autocast_cpu_enabled


def _applies(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    weight, bias = layer.weight, layer.bias
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    return (
        x.device.type == "cpu"
        and weight.dtype == x.dtype == torch.float32
        and not (trained and torch.is_grad_enabled())  # a trained weight or bias needs its own gradient
        and not _cpu_autocast()
    )


def _linear_forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _applies(layer, x):
        return F.linear(x, layer.weight, layer.bias)
    y = _FrozenProduct.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def _conv_forward(layer: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or not _applies(layer, x):
        return layer._conv_forward(x, layer.weight, layer.bias)
    batch, height, width = x.shape[0], *_output_size(layer, x)
    if not 0 < batch * height * width <= UNFOLD_MAX_PIXELS:
        return layer._conv_forward(x, layer.weight, layer.bias)
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    rows = patches.transpose(1, 2).reshape(batch * height * width, -1)
    y = _FrozenProduct.apply(rows, layer.weight.reshape(layer.out_channels, -1), layer.bias)
    return y.view(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


def _output_size(layer: torch.nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    return tuple(
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            x.shape[2:], layer.padding, layer.dilation, layer.kernel_size, layer.stride
        )
    )


def _unfoldable(layer: torch.nn.Conv2d) -> bool:
    return (
        layer.kernel_size != (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and layer.weight.numel() > UNFOLD_WEIGHTS_ABOVE
    )


def use_fast_cpu_layers(module: torch.nn.Module) -> int:
    """Route the plain Linear layers and the large 3x3 convs of a frozen `module` through oneDNN's matrix product
    (before any LoRA wraps them; a layer that is not on the CPU in float32 when it runs takes PyTorch's own path).
    Returns how many layers were routed (none where `onednn_products_available()` is false)."""
    if not onednn_products_available():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is torch.nn.Linear:
            layer.forward = types.MethodType(_linear_forward, layer)  # a bound method: a deep copy binds to the copy
        elif type(layer) is torch.nn.Conv2d and _unfoldable(layer):
            layer.forward = types.MethodType(_conv_forward, layer)
        else:
            continue
        count += 1
    return count
