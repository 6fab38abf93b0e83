"""One rank of a small real ZeRO-3 training run whose memory the planner predicts (test_plan_measured.py).

The run is the trainer's own setup (streaming int8 loader, adapter injection, DeepSpeed engine with
the optimizer over the adapters) on the default config with ``--set`` overrides. Memory is what the
run adds to the process: the peak resident set while training (``VmHWM``, reset once the engine is
built) minus the resident set before loading (once the process group and DeepSpeed's one-time setup
exist). bench/scaling.py measures its runs with the same ``measured_setup``.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from peft_dist.train.config import load_config
from peft_dist.distributed.env import exit_process, init_distributed, resolve_env
from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss, settled_rss_bytes
from peft_dist.distributed.zero3 import build_ds_config
from peft_dist.train.trainer import adapted_model, build_engine


def measured_setup(overrides: list[str]):
    """The trainer's setup for ``overrides`` (streamed int8 base, adapters, engine) on this rank, and the
    resident set before loading: ``(env, cfg, engine, baseline)``. The peak is reset once the engine is
    built: loading read the checkpoint through mmap, and those file pages count in VmHWM but are page
    cache, not memory the run holds."""
    dist = resolve_env()
    cfg = load_config(None, overrides)
    ds_config = build_ds_config(cfg, dist.world_size)
    init_distributed(dist)
    baseline = settled_rss_bytes(ds_config)
    model, *_ = adapted_model(cfg, ds_config)
    engine = build_engine(cfg, model, ds_config)
    gc.collect()
    reset_peak_rss()
    return dist, cfg, engine, baseline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    dist, cfg, engine, baseline = measured_setup(args.overrides)
    vocab = engine.module.config.vocab_size
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
