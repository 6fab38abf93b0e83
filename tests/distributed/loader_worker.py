"""Streaming quantized loading under real ZeRO-3 (CPU, gloo); run by test_loader_zero3.py.

Every rank loads ``--checkpoint`` with ``load_quantized_base`` and the ``--quant`` settings (JSON of
``QuantizationConfig`` fields) under ZeRO-3 (persistence threshold 0),
then records to ``--out/rank{R}.json``: each parameter's local partition (dtype, elements) and whether it
is a ZeRO-3 parameter, whether every gathered tensor is bit-identical to ``from_pretrained`` +
``quantize_model`` on this rank, the loader's RSS report, the logits of a forward pass through a
DeepSpeed engine (which gathers each layer's quantized weights just before use), and the partition dtypes
of a second load under a bf16 config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from peft_dist.config.schema import ModelConfig, QuantizationConfig
from peft_dist.distributed.env import exit_process, init_distributed, resolve_env
from peft_dist.quant.loader import load_quantized_base
from peft_dist.quant.model import quantize_model

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quant", default="{}")
    args = parser.parse_args()
    quant = QuantizationConfig(**json.loads(args.quant))
    init_distributed(resolve_env())  # the trainer's: ZeRO-3's gathers go through all_gather_in_place
    rank = torch.distributed.get_rank()
    # DeepSpeed's one-time setup (config parsing, the shm communication op) happens at the first
    # zero.Init; done here on a toy module so that the loader's RSS delta is the model's own cost.
    deepspeed.zero.Init(module=torch.nn.Linear(2, 2), config_dict_or_path=DS_CONFIG)
    model, report = load_quantized_base(ModelConfig(name_or_path=args.checkpoint), quant, DS_CONFIG)
    print(report.line(), flush=True)
    params = {name: {"zero": hasattr(p, "ds_tensor"), "dtype": str(p.ds_tensor.dtype),
                     "local": p.ds_tensor.numel(), "full": p.ds_numel}
              for name, p in model.named_parameters()}
    want = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, local_files_only=True)
    quantize_model(want, "all-linear", torch.float32, quant)
    want_params = dict(want.named_parameters())
    identical = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            identical[name] = p.dtype == want_params[name].dtype and torch.equal(p.data, want_params[name].data)
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG)
    engine.eval()
    ids = torch.arange(40).reshape(2, 20) * 7 % 512
    with torch.no_grad():
        logits = engine(input_ids=ids).logits
    # The trainer's bf16 engine: floats are partitioned in bf16 (an engine never casts partitioned params).
    bf16, _ = load_quantized_base(ModelConfig(name_or_path=args.checkpoint), quant,
                                  {**DS_CONFIG, "bf16": {"enabled": True}})
    bf16_dtypes = {name: str(p.ds_tensor.dtype) for name, p in bf16.named_parameters()}
    result = {"params": params, "bf16_dtypes": bf16_dtypes, "identical": identical,
              "report": dataclasses.asdict(report), "logits": logits.tolist(),
              "world_size": torch.distributed.get_world_size()}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_process(0)
