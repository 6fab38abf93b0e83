"""Checks that run before any process group starts or any weight is read, so a bad config costs seconds.

The adapted model is built on the meta device (shapes and dtypes, no storage: about a second even for a
175B skeleton) and goes through the same surgery as training: quantized linears, then every adapter. Every
error that surgery can raise (targets that match nothing, a sub-layer the architecture does not have,
shapes that do not factor, an attention implementation prefix tuning cannot wrap) stops the job here,
with the same words it would have used after loading.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from peft_dist.adapters.inject import inject_adapters
from peft_dist.config.schema import ConfigError, DataConfig, QuantizationConfig, RunConfig
from peft_dist.data import (cache_directory, chat_template, check_block_size, check_jsonl, data_sources,
                            holds_conversations, naming_source)
from peft_dist.model import DTYPES, load_model_config, load_tokenizer, max_positions
from peft_dist.quant.model import quantize_model


def meta_model(config: PretrainedConfig, adapters: list, quant_targets: Any | None, dtype: str,
               quant: QuantizationConfig | None = None) -> nn.Module:
    """The adapted model with meta tensors only: the linears ``quant_targets`` matches (None: none) quantized
    as ``quant`` says (None: int8)."""
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        if quant_targets is not None:
            quantize_model(model, quant_targets, torch_dtype, quant)
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


def check_output_dir(path: Path) -> None:
    """Create the run directory and write a file in it (root passes permission checks that the file
    system then refuses, so only trying tells)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"checkpoint.output_dir: cannot create or write {str(path)!r} ({err.strerror}); "
                          "choose a directory this user can write") from None


def check_data(data: DataConfig, model_config: PretrainedConfig, model_name: str) -> None:
    """Data errors found without tokenizing, for every source: the files exist in one format (a hub id is in the
    local cache), conversations have a chat template, a block fits the model's context, and jsonl lines parse
    and carry the fields of their layout (``file:line`` on the first bad one). A source whose blocks are cached
    is not parsed again: the key holds its files' size and mtime, and preparing them ran the same check (a
    requeued job over a large corpus would otherwise parse all of it on every rank at every start)."""
    check_block_size(data.block_size, max_positions(model_config))
    tokenizer = load_tokenizer(model_name)
    entries = data.mixture()
    for index, entry in enumerate(entries):
        with naming_source(entries, index):
            located = data_sources(entry.data)
            template = chat_template(entry.data, tokenizer) if holds_conversations(located) else None
            jsonl = [(source, file) for source in located if source.kind == "jsonl" for file in source.files]
            if jsonl and not cache_directory(entry.data, located, tokenizer, template).is_dir():
                for source, file in jsonl:
                    check_jsonl(file, entry.data, source.layout)


def preflight(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` or ``DataError`` for anything this machine, model or data cannot take: the
    precision, the output directory, the data, the adapters and quantization (on the meta device)."""
    check_precision(cfg.train.precision)
    model_config = load_model_config(cfg.model.name_or_path)
    check_data(cfg.data, model_config, cfg.model.name_or_path)
    quant_targets = cfg.quantization.target_modules if cfg.quantization.enabled else None
    meta_model(model_config, cfg.adapters, quant_targets, cfg.model.dtype, cfg.quantization)
    check_output_dir(Path(cfg.checkpoint.output_dir))  # last: it creates the directory
