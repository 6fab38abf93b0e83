"""ZeRO-3's gathers on gloo after ``init_distributed`` (3 CPU processes); run by test_gather.py.

Every rank gathers through DeepSpeed's ``all_gather_into_tensor`` (what ZeRO-3 calls) and through gloo's own
``torch.distributed.all_gather_into_tensor`` (the oracle), in several dtypes, sync and async, on the world
and on the group of ranks 0 and 2, with the input as a separate tensor and as the rank's own slice of the
output (as ZeRO-3 passes it). Then it measures how far each raises the peak resident set when gathering
``--mib`` MiB, and writes ``--out/rank{R}.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed.comm
import torch
import torch.distributed

from peft_dist.distributed.env import all_gather_in_place, exit_process, init_distributed, resolve_env
from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss

MIB = 2 ** 20


def gathered(gather, dtype: torch.dtype, group, rank: int, world: int, into_own_slice: bool,
             async_op: bool) -> torch.Tensor:
    """What ``gather`` leaves in the output: rank r contributes 5 values of r's own."""
    output = torch.full((world * 5,), -1, dtype=dtype)
    own = output.narrow(0, rank * 5, 5) if into_own_slice else torch.empty(5, dtype=dtype)
    own.copy_(torch.arange(5) + 10 * torch.distributed.get_rank())
    work = gather(output, own, group=group, async_op=async_op)
    if async_op:
        work.wait()
    return output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mib", type=int, default=96)
    args = parser.parse_args()
    env = resolve_env()
    init_distributed(env)
    result = {"installed": deepspeed.comm.comm.cdb.all_gather_function is all_gather_in_place, "mismatches": []}
    pair = torch.distributed.new_group([0, 2])  # every rank creates it; rank 1 is not in it
    for group, ranks in ((None, [0, 1, 2]), (pair, [0, 2])):
        if env.rank not in ranks:
            continue
        rank, world = ranks.index(env.rank), len(ranks)
        for dtype in (torch.int8, torch.uint8, torch.bfloat16, torch.float32):
            for into_own_slice in (False, True):
                for async_op in (False, True):
                    case = (dtype, len(ranks), into_own_slice, async_op)
                    ours = gathered(deepspeed.comm.all_gather_into_tensor, dtype, group, rank, world,
                                    into_own_slice, async_op)
                    gloo = gathered(torch.distributed.all_gather_into_tensor, dtype, group, rank, world,
                                    into_own_slice, async_op)
                    if not torch.equal(ours, gloo) or (ours == -1).any():
                        result["mismatches"].append(f"{case}: {ours.tolist()} vs {gloo.tolist()}")
    numel = args.mib * MIB // env.world_size
    for name, gather in (("ours", deepspeed.comm.allgather_fn), ("gloo", torch.distributed.all_gather_into_tensor)):
        output = torch.ones(numel * env.world_size, dtype=torch.int8)  # touched: resident before the gather
        shard = torch.ones(numel, dtype=torch.int8)
        torch.distributed.barrier()
        reset_peak_rss()
        before = peak_rss_bytes()
        gather(output, shard)
        result[f"{name}_peak_rise_mib"] = (peak_rss_bytes() - before) / MIB
        del output, shard
    Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    exit_process(0)


if __name__ == "__main__":
    main()
