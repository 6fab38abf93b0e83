"""Checks that run before any process group starts or any weight is read, so a bad config costs seconds.

The adapted model is built on the meta device (shapes and dtypes, no storage: about a second even for a
175B skeleton) and goes through the same surgery as training: int8 linears, then every adapter. Every
error that surgery can raise (targets that match nothing, a sub-layer the architecture does not have,
shapes that do not factor, an attention implementation prefix tuning cannot wrap) stops the job here,
with the same words it would have used after loading.
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from peft_dist.adapters.inject import inject_adapters
from peft_dist.config.schema import ConfigError, RunConfig
from peft_dist.model import DTYPES, load_model_config
from peft_dist.quant.model import quantize_model


def meta_model(config: PretrainedConfig, adapters: list, quant_targets: Any | None, dtype: str) -> nn.Module:
    """The adapted model (int8 linears unless ``quant_targets`` is None) with meta tensors only."""
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        if quant_targets is not None:
            quantize_model(model, quant_targets, torch_dtype)
        inject_adapters(model, adapters)
    return model


def check_precision(precision: str) -> None:
    """Refuse a training precision this machine's DeepSpeed accelerator does not support (fp16 on a CPU
    without native fp16) before DeepSpeed would, after loading the whole model."""
    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        raise ConfigError(f"train.precision: {precision} is not supported by DeepSpeed's "
                          f"{accelerator.device_name()} accelerator on this machine; use "
                          f"{' or '.join(p for p, ok in supported.items() if ok)}")


def preflight(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` for a precision, adapter or quantization setting this machine or model cannot
    take."""
    check_precision(cfg.train.precision)
    quant_targets = cfg.quantization.target_modules if cfg.quantization.enabled else None
    meta_model(load_model_config(cfg.model.name_or_path), cfg.adapters, quant_targets, cfg.model.dtype)
