"""Quantizing a model's frozen linears in place, with a per-layer error report."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.config.schema import ConfigError, QuantizationConfig
from peft_dist.quant.int8 import Int8Embedding, Int8Linear, float32_row_blocks
from peft_dist.quant.nf4 import FourBitLinear
from peft_dist.targets import QuantizedLinear, find_modules, replace_module

QUANTIZED_TYPES = (Int8Linear, FourBitLinear, Int8Embedding)  # what the loader fills with ``load_weight``


@dataclass(frozen=True)
class QuantReport:
    """Quantization error of one layer: ``||W - deq(q(W))||_F / ||W||_F`` and the max abs error."""

    name: str
    shape: tuple[int, int]
    rel_error: float
    max_abs_error: float
    seconds: float = 0.0  # quantizing and measuring the layer, where the loader times it


@torch.no_grad()
def quantization_error(name: str, dense: torch.Tensor, layer: QuantizedLinear) -> QuantReport:
    """How far ``layer``'s dequantized weight (in the dtype the layer keeps) is from ``dense``; the float32
    differences are formed one small block of rows at a time, in place (``float32_row_blocks``)."""
    dequantized = layer.dequantized_weight()
    error_sq = dense_sq = max_abs = 0.0
    for _, exact, error in float32_row_blocks(dense.detach(), dequantized):
        error.sub_(exact)
        dense_sq += torch.linalg.vector_norm(exact).item() ** 2
        error_sq += torch.linalg.vector_norm(error).item() ** 2
        max_abs = max(max_abs, error.amax().item(), -error.amin().item())
    return QuantReport(name, tuple(dense.shape), math.sqrt(error_sq) / max(math.sqrt(dense_sq), 1e-12), max_abs)


def dense_numel(layer: QuantizedLinear | Int8Embedding) -> int:
    """The dense weights a quantized layer encodes (a 4-bit layer packs two in a byte)."""
    return math.prod(layer.form.shape) if isinstance(layer, FourBitLinear) else layer.weight.numel()


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
def quantize_module(module: nn.Module, dtype: torch.dtype,
                    quant: QuantizationConfig | None = None) -> Int8Linear | FourBitLinear | Int8Embedding:
    """``quantize_linear``, or for an ``nn.Embedding`` an ``Int8Embedding`` (int8 whatever ``quant.bits``: a
    lookup reads rows, which 4-bit blocks would have to dequantize whole)."""
    if isinstance(module, nn.Embedding):
        return Int8Embedding.from_weight(module.weight, module.padding_idx, dtype)
    return quantize_linear(module, dtype, quant)


def float_twin(module: QuantizedLinear | Int8Embedding) -> nn.Module:
    """The float module a quantized one replaced, on the meta device: what transformers' ``_init_weights``
    initialises when a base is built from its config alone."""
    if isinstance(module, Int8Embedding):
        return nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, dtype=module.dtype,
                            device="meta")
    return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=module.dtype,
                     device="meta")


@torch.no_grad()
def quantize_model(model: nn.Module, targets: Any = "all-linear", dtype: torch.dtype = torch.float32,
                   quant: QuantizationConfig | None = None) -> list[QuantReport]:
    """Replace every targeted float linear by a frozen quantized linear (int8, or 4-bit when ``quant.bits``
    is 4), and every embedding a list or regex names by an ``Int8Embedding``; return per-layer errors.

    ``all-linear`` leaves the embeddings and the output head in floating point. Untied ones may be named
    (``embed_tokens``, ``lm_head``): each then takes half the bytes in its shard and in its gather. A tensor
    shared by two modules (``tie_word_embeddings``) may not: a quantized copy would untie them.
    On the meta device (planner dry runs) the layers are swapped alike and the errors are NaN.
    """
    reports = []
    users = Counter(id(m.weight) for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    accepted = _is_float_linear if targets == "all-linear" else (
        lambda m: _is_float_linear(m) or isinstance(m, nn.Embedding))
    for name, module in find_modules(model, targets, accepted, "linear layer or embedding",
                                     "quantization.target_modules"):
        if users[id(module.weight)] > 1:
            raise ConfigError(f"quantization.target_modules: {name!r} shares its weight with another module "
                              "(tie_word_embeddings), and a quantized copy would untie them; leave it out "
                              "(all-linear does)")
        quantized = quantize_module(module, dtype, quant)
        dense = module.weight.t() if isinstance(module, Conv1D) else module.weight
        if dense.is_meta:
            reports.append(QuantReport(name, tuple(dense.shape), float("nan"), float("nan")))
        else:
            reports.append(quantization_error(name, dense, quantized))
        replace_module(model, name, quantized)
    return reports
