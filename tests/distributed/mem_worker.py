"""Model-state memory and gradient flow of a ZeRO-3 engine (CPU, gloo); run by test_memory_zero3.py.

Every rank builds the tiny job's model (``TINY_JOB``: 4-layer int8 Llama, LoRA on every linear and lm_head)
exactly as the trainer does and wraps it with the trainer's own ``build_engine`` under ZeRO-3 with
persistence threshold 0, in fp32 and bf16, each also with the optimizer offloaded, and once with the
config file's own threshold. Each variant runs one forward/backward/step on a batch that is the same
on every rank and records, per rank, to ``--out/rank{R}.json``: the analytic and measured model-state
bytes, what the DeepSpeed optimizer holds (parameter groups, fp32 partitions, gradient partitions,
Adam state), every frozen parameter's local partition, and the full gradients of the first layer's
adapters next to the same gradients from plain PyTorch (no DeepSpeed) on the same batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from peft_dist.adapters.inject import inject_adapters, trainable_parameters
from peft_dist.train.config import load_config
from peft_dist.distributed.env import exit_process, init_distributed, resolve_env
from peft_dist.distributed.memory import analytic_model_state_bytes, measured_model_state_bytes
from peft_dist.distributed.zero3 import build_ds_config
from peft_dist.quant.loader import build_model
from peft_dist.quant.model import quantize_model
from peft_dist.train.trainer import build_engine
from tests.multiproc import TINY_JOB

VARIANTS = {  # name -> (precision, DeepSpeed config, stage3_param_persistence_threshold)
    "fp32": ("fp32", "ds_configs/zero3.json", 0),
    "bf16": ("bf16", "ds_configs/zero3.json", 0),
    "fp32_offload": ("fp32", "ds_configs/zero3_offload.json", 0),
    "bf16_offload": ("bf16", "ds_configs/zero3_offload.json", 0),
    # The file's own threshold (1e5): every tensor of the tiny model stays whole on every rank too.
    "bf16_persistent": ("bf16", "ds_configs/zero3.json", None),
}
FIRST_LAYER = "model.layers.0."


def build(precision: str, ds_file: str, threshold: int | None = 0):
    """The trainer's model and config; ``threshold`` None keeps the DeepSpeed file's persistence threshold."""
    overrides = [*TINY_JOB, f"train.precision={precision}", f"deepspeed.config={ds_file}", "train.micro_batch_size=2",
                 "train.warmup_steps=0", "tracking.backend=none"]
    if threshold is not None:
        overrides.append(f"deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold={threshold}")
    cfg = load_config(None, overrides)
    model, _ = build_model(cfg.model)
    quantize_model(model, cfg.quantization.target_modules, model.dtype)
    torch.manual_seed(cfg.train.seed)  # as the trainer: the same adapter init everywhere
    inject_adapters(model, cfg.adapters)
    return cfg, model


def reference_grads(batch: torch.Tensor) -> dict[str, list[float]]:
    """The first layer's adapter gradients from plain PyTorch, fp32, no DeepSpeed."""
    _, model = build("fp32", "ds_configs/zero3.json")
    model(input_ids=batch, labels=batch).loss.backward()
    return {n: p.grad.flatten().tolist() for n, p in model.named_parameters()
            if p.requires_grad and n.startswith(FIRST_LAYER)}


def run_variant(precision: str, ds_file: str, threshold: int | None, world: int, batch: torch.Tensor) -> dict:
    from deepspeed.utils import safe_get_full_grad

    cfg, model = build(precision, ds_file, threshold)
    ds_config = build_ds_config(cfg, world)
    zero = ds_config["zero_optimization"]
    analytic = analytic_model_state_bytes(model, world, precision, offload_optimizer="offload_optimizer" in zero,
                                          persistence_threshold=int(zero["stage3_param_persistence_threshold"]))
    engine = build_engine(cfg, model, ds_config)
    opt = engine.optimizer
    named = dict(engine.module.named_parameters())
    trainable = {id(p) for p in trainable_parameters(engine.module)}

    loss = engine(input_ids=batch.to(engine.device), labels=batch.to(engine.device)).loss
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).float().flatten().tolist()  # a collective: every rank, same order
             for n, p in named.items() if p.requires_grad and n.startswith(FIRST_LAYER)}
    frozen_with_grad = [n for n, p in named.items() if not p.requires_grad and p.grad is not None]
    engine.step()

    group_params = [p for group in opt.fp16_groups for p in group]
    state_keys = {id(k) for k in opt.optimizer.state}
    return {
        "loss": loss.item(),
        "analytic": dataclasses.asdict(analytic),
        "measured": dataclasses.asdict(measured_model_state_bytes(engine)),
        "optimizer_params_all_trainable": all(id(p) in trainable for p in group_params),
        "optimizer_param_count": len(group_params),
        "trainable_count": len(trainable),
        "trainable_partition_numel": sum(p.partition_numel() for p in group_params),
        "trainable_numel": sum(p.ds_numel for p in group_params),
        "fp32_partition_numel": sum(t.numel() for t in opt.fp32_partitioned_groups_flat),
        "fp32_partition_dtypes": sorted({str(t.dtype) for t in opt.fp32_partitioned_groups_flat}),
        "grad_partition_numel": opt.grad_partitions_flat_buffer.numel(),
        "gradient_bucket_numel": [bucket.buffer.numel() for bucket in opt.ipg_buckets.values()],
        "adam_state_on_fp32_partitions_only": state_keys <= {id(t) for t in opt.fp32_partitioned_groups_flat},
        "adam_state_numel": sum(v.numel() for s in opt.optimizer.state.values() for v in s.values()
                                if torch.is_tensor(v) and v.dim() > 0),
        "frozen_with_grad": frozen_with_grad,
        "frozen": {n: {"dtype": str(p.ds_tensor.dtype), "local_numel": p.ds_tensor.numel(), "numel": p.ds_numel,
                       "resident_numel": p.data.numel(), "persistent": bool(p.ds_persist)}
                   for n, p in named.items() if not p.requires_grad},
        "grads": grads,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = parser.parse_args()
    env = resolve_env()
    init_distributed(env)
    batch = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(7))  # same on every rank
    result = {"world": env.world_size, "rank": env.rank,
              "variants": {name: run_variant(*spec, env.world_size, batch) for name, spec in VARIANTS.items()}}
    if env.rank == 0:
        result["reference_grads"] = reference_grads(batch)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_process(0)
