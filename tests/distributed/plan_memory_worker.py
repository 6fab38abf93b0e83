"""One rank of a small real ZeRO-3 training run whose memory the planner predicts (test_plan_measured.py).

The run is the trainer's own setup (streaming int8 loader, adapter injection, DeepSpeed engine with
the optimizer over the adapters) on the default config with ``--set`` overrides. Memory is what the
run adds to the process: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
once the process group and DeepSpeed's one-time setup exist) minus the resident set at that moment.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from peft_dist.config.load import load_config
from peft_dist.distributed.env import exit_process, init_distributed, resolve_env
from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss, settled_rss_bytes
from peft_dist.distributed.zero3 import build_ds_config
from peft_dist.train.trainer import adapted_model, build_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    dist = resolve_env()
    cfg = load_config(None, args.overrides)
    ds_config = build_ds_config(cfg, dist.world_size)
    init_distributed(dist)
    baseline = settled_rss_bytes(ds_config)

    model, *_ = adapted_model(cfg, ds_config)
    engine = build_engine(cfg, model, ds_config)
    # Loading read the checkpoint through mmap; those file pages count in VmHWM but are page cache, not
    # memory the run holds. Once they are unmapped, the peak restarts from what the run really holds.
    gc.collect()
    reset_peak_rss()
    vocab = model.config.vocab_size
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.data.block_size),
                            generator=torch.Generator().manual_seed(step * 1000 + dist.rank))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    result = {"world": dist.world_size, "rank": dist.rank, "baseline": baseline, "peak": peak_rss_bytes()}
    Path(args.out, f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_process(0)
