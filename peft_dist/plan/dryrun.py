"""Dry run on the meta device: the real transformers model, quantized and adapted, without memory.

``torch.device("meta")`` gives every tensor a shape and dtype but no storage, so a 175B skeleton is
built in about a second. The model then goes through the same surgery as a training run (int8 or
4-bit linears, adapter injection) and its parameters are read off as an inventory for ``per_rank``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from peft_dist.config.schema import QuantizationConfig
from peft_dist.plan.inventory import TensorInfo
from peft_dist.plan.models import ModelShape, hf_config
from peft_dist.quant.model import QUANTIZED_TYPES, dense_numel
from peft_dist.train.preflight import meta_model


def build_meta_model(shape: ModelShape, adapters: list, quant_targets: Any | None,
                     dtype: str = "bfloat16", quant: QuantizationConfig | None = None) -> nn.Module:
    """The adapted model a run of ``shape`` would train, quantized as ``quant`` says (None: int8), with
    meta tensors only."""
    return meta_model(hf_config(shape, dtype), adapters, quant_targets, dtype, quant)


def meta_inventory(model: nn.Module) -> list[TensorInfo]:
    """Every (deduplicated) parameter of ``model``: what ZeRO-3 would partition; a quantized layer's ``weight``
    counts the dense weights it encodes."""
    encoded = {id(m.weight): dense_numel(m) for m in model.modules() if isinstance(m, QUANTIZED_TYPES)}
    return [TensorInfo(name, p.numel(), p.element_size(), p.requires_grad, encoded.get(id(p), 0))
            for name, p in model.named_parameters()]
