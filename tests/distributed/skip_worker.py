"""A non-finite step on 2 ZeRO-3 ranks (run by test_reliability.py): each rank compares its optimizer state
and its adapter partitions after the skipped step with those before it, bit for bit, and writes the
verdict to ``OUT/rank{R}.json``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from peft_dist.data import GlobalBatchSampler, build_blocks
from peft_dist.distributed.env import exit_process, init_distributed, resolve_env
from peft_dist.distributed.zero3 import build_ds_config, optimizer_state
from peft_dist.model import load_tokenizer, max_positions
from peft_dist.train.config import load_config
from peft_dist.train.step import train_step
from peft_dist.train.trainer import adapted_model, build_engine
from tests.multiproc import TINY_JOB


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(torch.equal(torch.as_tensor(a[p][k]), torch.as_tensor(b[p][k]))
                                           for k in a[p]) for p in a)


def main(out: Path) -> None:
    cfg = load_config(None, [*TINY_JOB, "tracking.backend=none", "data.max_documents=20", "train.warmup_steps=0",
                             "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0"])
    dist = resolve_env()
    ds_config = build_ds_config(cfg, dist.world_size)
    init_distributed(dist)
    model, _, _ = adapted_model(cfg, ds_config)
    engine = build_engine(cfg, model, ds_config)
    blocks = build_blocks(cfg.data, load_tokenizer(cfg.model.name_or_path), max_positions(model.config))
    sampler = GlobalBatchSampler(len(blocks.train), cfg.train.micro_batch_size, 1, dist.world_size, dist.rank,
                                 cfg.data.seed)
    for step in (1, 2):
        assert train_step(engine, blocks.train, sampler.micro_batches(step - 1), [], step, dist.rank) is not None
    state, shards = optimizer_state(engine), [p.ds_tensor.clone() for p in engine.module.parameters() if p.requires_grad]
    os.environ["PEFT_DIST_FAULT"] = "nan:0:3"
    skipped = train_step(engine, blocks.train, sampler.micro_batches(2), [], 3, dist.rank)
    after = [p.ds_tensor for p in engine.module.parameters() if p.requires_grad]
    (out / f"rank{dist.rank}.json").write_text(json.dumps({
        "skipped": skipped is None, "optimizer_state_unchanged": same(state, optimizer_state(engine)),
        "adapters_unchanged": all(torch.equal(a, b) for a, b in zip(shards, after)), "entries": len(state)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_process(0)
