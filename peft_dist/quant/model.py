"""Quantizing a model's frozen linears in place, with a per-layer error report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.quant.int8 import Int8Linear, dequantize_rowwise
from peft_dist.targets import find_modules, replace_module


@dataclass(frozen=True)
class QuantReport:
    """Quantization error of one layer: ``||W - deq(q(W))||_F / ||W||_F`` and the max abs error."""

    name: str
    shape: tuple[int, int]
    rel_error: float
    max_abs_error: float


@torch.no_grad()
def quantization_error(name: str, dense: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> QuantReport:
    """How far the int8 ``(w8, scale)`` (scale in the dtype the layer keeps) is from ``dense``."""
    error = dense.float() - dequantize_rowwise(w8, scale, scale.dtype).float()
    return QuantReport(name, tuple(dense.shape), (error.norm() / dense.float().norm().clamp_min(1e-12)).item(),
                       error.abs().max().item())


def _is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@torch.no_grad()
def quantize_linear(module: nn.Module, dtype: torch.dtype) -> Int8Linear:
    """An ``Int8Linear`` equivalent to an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is W^T)."""
    weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return Int8Linear.from_weight(weight, module.bias, dtype=dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, targets: Any = "all-linear",
                   dtype: torch.dtype = torch.float32) -> list[QuantReport]:
    """Replace every targeted float linear by a frozen ``Int8Linear``; return per-layer errors.

    On the meta device (planner dry runs) the layers are swapped alike and the errors are NaN.
    """
    reports = []
    for name, module in find_modules(model, targets, _is_float_linear, "linear layer",
                                     "quantization.target_modules"):
        quantized = quantize_linear(module, dtype)
        dense = module.weight.t() if isinstance(module, Conv1D) else module.weight
        if dense.is_meta:
            reports.append(QuantReport(name, tuple(dense.shape), float("nan"), float("nan")))
        else:
            reports.append(quantization_error(name, dense, quantized.weight, quantized.weight_scale))
        replace_module(model, name, quantized)
    return reports
