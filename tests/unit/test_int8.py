"""The frozen int8 linear against float64 references and bitsandbytes' vector-wise quantization."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.quant import Int8Linear, quantize_linear, quantize_model, quantize_rowwise
from peft_dist.quant.loader import build_model
from peft_dist.config import ModelConfig, ConfigError


def test_rowwise_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scales
    w8, scale = quantize_rowwise(w)
    assert w8.dtype == torch.int8 and scale.shape == (64,)
    error = (w - w8.float() * scale[:, None]).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()
    assert w8.abs().amax(dim=1).eq(127).all()  # absmax maps to +-127 in every row


def test_matches_bitsandbytes_vectorwise_quantization():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    w = torch.randn(32, 40)
    w8, scale = quantize_rowwise(w)
    bnb_w8, bnb_absmax, _ = bnb.functional.int8_vectorwise_quant(w.clone())
    torch.testing.assert_close(scale * 127, bnb_absmax)
    assert (w8.int() - bnb_w8.int()).abs().max() <= 1  # rounding of exact halves may differ
    assert (w8 != bnb_w8).float().mean() < 0.01


def test_forward_and_input_gradient_match_float64_reference():
    torch.manual_seed(2)
    dense = nn.Linear(24, 16)
    layer = quantize_linear(dense, torch.float32)
    w = layer.dequantized_weight().double()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x.float())
    y_ref = x @ w.t() + dense.bias.double()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn_like(y_ref)
    (grad_x,) = torch.autograd.grad(y_ref, x, grad_y)
    x32 = x.detach().float().requires_grad_()
    layer(x32).backward(grad_y.float())
    torch.testing.assert_close(x32.grad.double(), grad_x, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_backward_saves_no_dense_weight():
    layer = Int8Linear.from_weight(torch.randn(32, 16), None)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(4, 16, requires_grad=True))
    assert all(t.dtype == torch.int8 or t.dim() <= 1 for t in saved), [(t.dtype, t.shape) for t in saved]
    y.sum().backward()


def test_conv1d_is_quantized_as_its_transpose():
    torch.manual_seed(3)
    conv = Conv1D(12, 8)  # GPT-2 layout: weight (d_in=8, d_out=12)
    nn.init.normal_(conv.weight)
    layer = quantize_linear(conv, torch.float32)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=0.02, atol=0.05)
    assert (layer.out_features, layer.in_features) == (12, 8)


def test_quantize_model_reports_per_layer_error_and_keeps_head_in_float():
    model, _ = build_model(ModelConfig())
    reports = quantize_model(model)
    assert len(reports) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    assert all(0 < r.rel_error < 0.01 for r in reports)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_quantization_targets_matching_nothing_fail_clearly():
    model, _ = build_model(ModelConfig())
    with pytest.raises(ConfigError, match="quantization.target_modules.*matches no linear.*q_proj"):
        quantize_model(model, ["qproj"])
