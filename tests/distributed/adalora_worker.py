"""One AdaLoRA training run under DeepSpeed ZeRO-3 (CPU, gloo); run by test_adalora_zero3.py.

Every rank builds the tiny int8 Llama with AdaLoRA, wraps it in a ZeRO-3 engine with persistence
threshold 0 (so P, lam and Q are really partitioned) and trains with the trainer's own ``train_step``
(so the hook is driven exactly as in production). The global batch is fixed: rank ``r``'s micro-batch
``i`` holds samples ``[(i * W + r) * micro, ...)``. Each step it checks that every rank holds the same
mask (all-gathered hash) and that pruned ``lam`` are zero in every copy the next forward reads, then
rank 0 writes the per-step triplet scores, masks and rank patterns to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json

import pyarrow as pa
import torch
import torch.distributed as dist

from peft_dist.adapters import inject_adapters
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.schema import ModelConfig
from peft_dist.data import Split
from peft_dist.distributed import importance
from peft_dist.distributed.adalora import make_adalora_hook
from peft_dist.distributed.env import exit_process, init_distributed, resolve_env
from peft_dist.quant.loader import build_model
from peft_dist.quant.model import quantize_model
from peft_dist.train.step import train_step

GLOBAL_BATCH, SEQ, LR, CLIP = 4, 16, 2e-2, 0.05
ADALORA = {"method": "adalora", "init_r": 4, "target_r": 2, "alpha": 8.0, "tinit": 1, "tfinal": 2,
           "delta_t": 1, "orth_reg_weight": 0.5, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def mask_hash(keep: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(keep.numpy().tobytes()).digest()[:7], "little")


def check_lam_copies(hook, world: int) -> int:
    """Pruned lam are zero in the fp32 master shard, the low-precision shard, the resident copy of a
    persistent lam and the gathered tensor; returns how many lam are persistent."""
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param

    lams = [d.lam for d in hook.deltas]
    persistent = 0
    for lam, offset, r0 in zip(lams, hook._offsets(), hook.ranks0):
        pruned = ~hook.keep[offset: offset + r0]
        if getattr(lam, "ds_persist", False):  # read before any gather: this copy is what forward uses
            assert lam.data.numel() == r0 and (lam.data[pruned] == 0).all(), "resident lam not masked"
            persistent += 1
        shard = importance.local_shard(lam)
        assert shard.partitioned and (world == 1 or lam.ds_tensor.numel() < lam.ds_numel), "lam not partitioned"
        local_pruned = pruned[shard.start: shard.start + shard.numel]
        assert (safe_get_local_fp32_param(lam)[:shard.numel][local_pruned] == 0).all()
        assert (lam.ds_tensor[:shard.numel][local_pruned] == 0).all()
    with deepspeed.zero.GatheredParameters(lams):
        for lam, offset, r0 in zip(lams, hook._offsets(), hook.ranks0):
            assert (lam.data[~hook.keep[offset: offset + r0]] == 0).all(), "a pruned lam is live in forward"
    return persistent


def build(steps: int):
    """The tiny int8 Llama with AdaLoRA, identical on every rank and in every run, and its hook."""
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    quantize_model(model)
    torch.manual_seed(0)
    config = build_adapter_config(ADALORA, "adapters.0")
    inject_adapters(model, [config])
    return model, make_adalora_hook(model, config, steps)


def plain_reference(data: torch.Tensor, steps: int, micro: int) -> list[dict]:
    """The same training in plain PyTorch (no DeepSpeed): AdamW, clip_grad_norm_, hook with engine=None."""
    model, hook = build(steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    records = []
    for step in range(1, steps + 1):
        batch = data[step - 1]
        for x in batch.split(micro):
            loss = model(input_ids=x, labels=x).loss + hook.extra_loss(model)
            (loss / (len(batch) // micro)).backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        hook.before_step(None, step)
        optimizer.step()
        hook.after_step(None, step)
        optimizer.zero_grad()
        masked = bool(hook.history) and hook.history[-1]["step"] == step
        records.append({"scores": hook.scores.tolist() if masked else None, "keep": hook.keep.tolist()})
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--gas", type=int, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--persist", type=int, default=0, help="stage3_param_persistence_threshold")
    parser.add_argument("--reference", action="store_true", help="also train a plain PyTorch replica")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    env = resolve_env()
    init_distributed(env)
    world = env.world_size
    assert args.micro * args.gas * world == GLOBAL_BATCH, "every run must use the same global batch"

    model, hook = build(args.steps)

    import deepspeed

    ds_config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.gas,
                 "train_batch_size": GLOBAL_BATCH, "gradient_clipping": CLIP, "steps_per_print": 10 ** 9,
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": args.persist,
                                       "overlap_comm": False, "contiguous_gradients": True}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=LR),
                                      model_parameters=params, config=ds_config)

    data = torch.randint(1, 512, (args.steps, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    records = []
    for step in range(1, args.steps + 1):
        rows = data[step - 1].tolist()
        blocks = Split([pa.RecordBatch.from_pydict(
            {"input_ids": rows, "labels": rows, "position_ids": [list(range(SEQ))] * len(rows)})])
        micro_batches = [torch.arange((i * world + env.rank) * args.micro, (i * world + env.rank + 1) * args.micro)
                         for i in range(args.gas)]
        loss = torch.tensor(train_step(engine, blocks, micro_batches, [hook], step, env.rank))
        dist.all_reduce(loss)
        hashes = [None] * world
        dist.all_gather_object(hashes, mask_hash(hook.keep))
        assert len(set(hashes)) == 1, f"step {step}: masks differ across ranks: {hashes}"
        persistent = check_lam_copies(hook, world)
        masked = bool(hook.history) and hook.history[-1]["step"] == step
        records.append({"step": step, "loss": loss.item() / world, "mask_step": masked, "hashes": hashes,
                        "scores": hook.scores.tolist() if masked else None, "keep": hook.keep.tolist(),
                        "bytes": hook.bytes_reduced if masked else 0,
                        "grad_norm": float(engine.get_global_grad_norm()), "persistent_lams": persistent})
    result = {"world": world, "steps": records, "updates": hook.updates, "rank_pattern": hook.rank_pattern(),
              "b0": hook.b0, "full_gather_bytes": importance.full_gather_bytes([p for p, *_ in hook.params()]),
              "state": hook.state_dict()}
    if args.reference:
        result["reference"] = plain_reference(data, args.steps, args.micro)
    if env.rank == 0:
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)
