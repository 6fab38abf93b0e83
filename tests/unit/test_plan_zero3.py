"""The planner's ZeRO-3 layout against real DeepSpeed: what each of 2 CPU ranks actually holds.

The file is both the test and (run under torchrun) the worker: each rank builds a small Llama with odd
sizes (so padding shows), quantizes it, injects LoRA, wraps it in a ZeRO-3 engine and reports the
bytes of its parameter partitions, the whole (persistent) copies it keeps, its gradient partition,
fp32 master and Adam state (read by ``peft_dist.distributed.memory.measured_model_state_bytes``).
The test compares them with ``per_rank`` on the meta-device inventory of the same model.
"""
import dataclasses
import json
import os
import sys

import pytest

THRESHOLD = 150  # small, so that most tensors are partitioned and a few (norms) persist
ADAPTERS = [{"method": "lora", "name": "lora", "r": 3, "target_modules": "all-linear"}]


def shape():
    from peft_dist.plan.models import ModelShape

    return ModelShape("odd-llama", "llama", hidden=66, layers=2, heads=3, kv_heads=3, intermediate=151,
                      vocab=101, max_positions=64, tied_embeddings=False)


def worker(out_dir: str) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from peft_dist.adapters.inject import inject_adapters, trainable_parameters
    from peft_dist.adapters.registry import build_adapter_config
    from peft_dist.distributed.env import init_distributed, resolve_env
    from peft_dist.distributed.memory import measured_model_state_bytes
    from peft_dist.plan.models import hf_config
    from peft_dist.quant.model import quantize_model

    dist = resolve_env()
    init_distributed(dist)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(shape(), "bfloat16"), dtype=torch.bfloat16)
    quantize_model(model, "all-linear", torch.bfloat16)
    inject_adapters(model, [build_adapter_config(a, "adapters.0") for a in ADAPTERS])
    params = trainable_parameters(model)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": THRESHOLD}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3),
                                      model_parameters=params, config=config)
    x = torch.tensor([[1, 2, 3, 4]])
    for _ in range(2):  # once the first step has traced the module order, persistent parameters stay whole
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    held = measured_model_state_bytes(engine)
    with open(os.path.join(out_dir, f"rank{dist.rank}.json"), "w") as f:
        json.dump(dataclasses.asdict(held), f)


@pytest.mark.slow
def test_per_rank_matches_deepspeed_zero3_partitions(tmp_path):
    from peft_dist.adapters.registry import build_adapter_config
    from peft_dist.plan.dryrun import build_meta_model, meta_inventory
    from peft_dist.plan.inventory import per_rank
    from tests.multiproc import run_distributed

    run_distributed([__file__, str(tmp_path)], nprocs=2, timeout=300)
    adapters = [build_adapter_config(a, "adapters.0") for a in ADAPTERS]
    predicted = per_rank(meta_inventory(build_meta_model(shape(), adapters, "all-linear")), 2, THRESHOLD)
    for rank in (0, 1):
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert held["frozen"] == predicted.frozen
        assert held["adapter_params"] == predicted.trainable
        # Gradient partition (bf16), fp32 master and Adam moments, plus Adam's one 4-byte step counter.
        assert held["gradients"] + held["master"] + held["optimizer"] == predicted.optimizer + 4


if __name__ == "__main__":
    from peft_dist.distributed.env import exit_process

    worker(sys.argv[1])
    exit_process(0)
