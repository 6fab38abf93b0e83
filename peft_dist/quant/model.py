"""Quantizing a model's frozen linears in place, with a per-layer error report."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.config.schema import ConfigError, QuantizationConfig
from peft_dist.quant.int8 import Int8Linear, row_blocks
from peft_dist.quant.nf4 import FourBitLinear
from peft_dist.targets import QuantizedLinear, find_modules, replace_module

QUANTIZED_TYPES = (Int8Linear, FourBitLinear)  # the layers the loader fills with ``load_weight``


@dataclass(frozen=True)
class QuantReport:
    """Quantization error of one layer: ``||W - deq(q(W))||_F / ||W||_F`` and the max abs error."""

    name: str
    shape: tuple[int, int]
    rel_error: float
    max_abs_error: float


@torch.no_grad()
def quantization_error(name: str, dense: torch.Tensor, layer: QuantizedLinear) -> QuantReport:
    """How far ``layer``'s dequantized weight (in the dtype the layer keeps) is from ``dense``; the float32
    differences are formed one block of rows at a time (``row_blocks``)."""
    dequantized = layer.dequantized_weight()
    error_sq = dense_sq = max_abs = 0.0
    for rows in row_blocks(dense):
        block = dense[rows].float()
        error = block - dequantized[rows].float()
        error_sq += error.square().sum().item()
        dense_sq += block.square().sum().item()
        max_abs = max(max_abs, error.abs().max().item())
    return QuantReport(name, tuple(dense.shape), math.sqrt(error_sq) / max(math.sqrt(dense_sq), 1e-12), max_abs)


def _is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@torch.no_grad()
def quantize_linear(module: nn.Module, dtype: torch.dtype,
                    quant: QuantizationConfig | None = None) -> Int8Linear | FourBitLinear:
    """The frozen quantized equivalent of an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is W^T):
    an ``Int8Linear``, or a ``FourBitLinear`` when ``quant.bits`` is 4 (``None``: int8)."""
    weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
    if quant is not None and quant.bits == 4:
        return FourBitLinear.from_weight(weight, module.bias, quant.quant_type, quant.blocksize, quant.double_quant,
                                         dtype)
    return Int8Linear.from_weight(weight, module.bias, dtype=dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, targets: Any = "all-linear", dtype: torch.dtype = torch.float32,
                   quant: QuantizationConfig | None = None) -> list[QuantReport]:
    """Replace every targeted float linear by a frozen quantized linear (int8, or 4-bit when ``quant.bits``
    is 4); return per-layer errors.

    An untied output head may be targeted (``lm_head`` in a list): an int8 head halves its shard and its
    gather. A head tied to the input embeddings may not: the int8 copy would untie the two.
    On the meta device (planner dry runs) the layers are swapped alike and the errors are NaN.
    """
    reports = []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in find_modules(model, targets, _is_float_linear, "linear layer",
                                     "quantization.target_modules"):
        if embeddings is not None and module.weight is embeddings.weight:
            raise ConfigError(f"quantization.target_modules: {name!r} shares its weight with the input embeddings "
                              "(tie_word_embeddings), and a quantized copy would untie them; leave it out "
                              "(all-linear does)")
        quantized = quantize_linear(module, dtype, quant)
        dense = module.weight.t() if isinstance(module, Conv1D) else module.weight
        if dense.is_meta:
            reports.append(QuantReport(name, tuple(dense.shape), float("nan"), float("nan")))
        else:
            reports.append(quantization_error(name, dense, quantized))
        replace_module(model, name, quantized)
    return reports
