"""Scaling with ranks: per-rank memory, step time and all-gather bytes of one ZeRO-3 run at N = 1, 2, 4.

    python bench/scaling.py            # N = 1, 2, 4 CPU processes, 6 steps each (about 3 minutes)
    python bench/scaling.py --quick    # N = 1, 2, 3 steps each (under a minute)

The model is bench/compare_peft.py's (8-layer Llama, hidden 512, FFN 1536, vocab 512), int8 base, LoRA r=8
on every decoder linear, bf16, ZeRO-3 with persistence threshold 0 and the planner's bucket bounds,
micro-batch 1 x 128 tokens per rank (so the global batch grows with N). Every N is a torchrun job of N
real CPU processes (gloo) running the trainer's setup (streaming int8 loader, injection, engine).

Per rank it reads the frozen base bytes DeepSpeed really holds (``measured_model_state_bytes``), the peak
resident memory the run added (``VmHWM`` reset after setup, minus the RSS before loading), the median
step time, and the bytes of every all-gather ZeRO-3 issues (its backend's gather function is wrapped).
Printed: the least-squares exponent of base bytes vs N (1/N sharding gives -1), and the all-gather bytes
per step against the planner's (``RankBytes.gathered`` for the forward plus ``backward_gather_bytes``:
the backward gathers every non-persistent tensor again except the tail still gathered from the forward
and the input embeddings; a ring receives (N-1)/N of it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compare_peft import SHAPE, TARGETS, write_bench_model  # noqa: E402  (bench/ is sys.path[0])

MICRO, SEQ, WARMUP_STEPS = 1, 128, 1
MIB = 2**20


def overrides(model_dir: str) -> list[str]:
    layer = sum(o * i for _, o, i, _ in SHAPE.linears(0))
    zero = "deepspeed.overrides.zero_optimization"
    return [f"model.name_or_path={model_dir}", "model.dtype=bfloat16", "train.precision=bf16",
            f"train.micro_batch_size={MICRO}", "data.path=builtin:python-stdlib", f"data.block_size={SEQ}",
            "tracking.backend=none",
            f"adapters=[{{method: lora, r: 8, alpha: 16, target_modules: [{', '.join(TARGETS)}]}}]",
            f"{zero}.stage3_param_persistence_threshold=0", f"{zero}.stage3_prefetch_bucket_size={layer}",
            f"{zero}.stage3_max_live_parameters={2 * layer}", f"{zero}.stage3_max_reuse_distance={layer}"]


def worker(model_dir: str, steps: int, out: str) -> None:
    """One rank: the trainer's setup, ``steps`` steps on random tokens, this rank's measurements to ``out``."""
    import deepspeed.comm.comm as deepspeed_comm

    from peft_dist.distributed.memory import measured_model_state_bytes, peak_rss_bytes
    from tests.distributed.plan_memory_worker import measured_setup

    env, _, engine, baseline = measured_setup(overrides(model_dir))  # the peak restarts after loading

    backend = deepspeed_comm.cdb  # ZeRO-3 gathers through DeepSpeed's backend, which holds this function
    original = backend.all_gather_function
    gathered = [0]

    def counting(output_tensor, *args, **kwargs):
        gathered[0] += output_tensor.numel() * output_tensor.element_size()
        return original(output_tensor, *args, **kwargs)

    times = []
    for step in range(steps):
        ids = torch.randint(0, SHAPE.vocab, (MICRO, SEQ), generator=torch.Generator().manual_seed(step * 1000 + env.rank))
        backend.all_gather_function = counting if step >= WARMUP_STEPS else original
        began = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        times.append(time.perf_counter() - began)
    backend.all_gather_function = original
    Path(out, f"rank{env.rank}.json").write_text(json.dumps({
        "base_bytes": measured_model_state_bytes(engine).frozen, "peak_bytes": peak_rss_bytes() - baseline,
        "step_s": statistics.median(times[WARMUP_STEPS:]), "gather_bytes": gathered[0] / (steps - WARMUP_STEPS)}))


def run(world: int, model_dir: Path, steps: int) -> list[dict]:
    """One torchrun job of ``world`` processes; every rank's measurements."""
    from tests.multiproc import run_distributed

    with tempfile.TemporaryDirectory() as out:
        run_distributed([__file__, "--worker", str(model_dir), str(steps), out], world,
                        env={"MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=900)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def fitted_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def planned_gather_bytes(world: int) -> tuple[int, int]:
    """The planner's (bytes all-gathered per step, bytes received per rank per step) at ``world`` ranks,
    micro-batch 1: the forward's gather and the backward's (``backward_gather_bytes``)."""
    from peft_dist.train.config import load_config
    from peft_dist.plan.dryrun import build_meta_model, meta_inventory
    from peft_dist.plan.estimate import backward_gather_bytes
    from peft_dist.plan.inventory import per_rank

    cfg = load_config(None, overrides("unused"))
    held = per_rank(meta_inventory(build_meta_model(SHAPE, cfg.adapters, "all-linear", "bfloat16")), world, 0)
    # On one rank the partition is the whole tensor: nothing is gathered.
    gathered = held.gathered + backward_gather_bytes(SHAPE, held, 2) if world > 1 else 0
    return gathered, round(gathered * (world - 1) / world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 2 and 3 steps")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, steps, out = args.worker
        worker(model_dir, int(steps), out)
        from peft_dist.distributed.env import exit_process

        exit_process(0)
    worlds, steps = ((1, 2), 3) if args.quick else ((1, 2, 4), 6)
    print(f"{SHAPE.layers}-layer Llama, hidden {SHAPE.hidden}, FFN {SHAPE.intermediate}, int8 base, LoRA r=8, bf16, "
          f"ZeRO-3, micro-batch {MICRO} x {SEQ} tokens per rank, {steps} steps ({WARMUP_STEPS} warm-up), "
          f"{os.cpu_count()} CPU cores\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_model(Path(tmp))
        for world in worlds:
            results[world] = run(world, Path(tmp), steps)
    print("| N | base bytes / rank (max) | peak RSS added / rank (max) | step (ms, rank 0) | tokens/s (all ranks) "
          "| all-gather bytes / step (rank 0) | planner: gathered | planner: received |")
    print("|---|---|---|---|---|---|---|---|")
    for world, ranks in results.items():
        planned, received = planned_gather_bytes(world)
        step = ranks[0]["step_s"]
        print(f"| {world} | {max(r['base_bytes'] for r in ranks):,.0f} | {max(r['peak_bytes'] for r in ranks) / MIB:.1f} MiB "
              f"| {step * 1e3:.0f} | {world * MICRO * SEQ / step:.0f} | {ranks[0]['gather_bytes']:,.0f} | {planned:,} "
              f"| {received:,} |")
    base = [max(r["base_bytes"] for r in ranks) for ranks in results.values()]
    peak = [max(r["peak_bytes"] for r in ranks) for ranks in results.values()]
    print()
    print(f"fitted exponent, base bytes per rank vs N: {fitted_exponent(list(results), base):.3f} (1/N sharding: -1)")
    print(f"fitted exponent, peak RSS added per rank vs N: {fitted_exponent(list(results), peak):.3f} "
          "(activations and buffers do not shard)")
    for world, ranks in results.items():
        planned, _ = planned_gather_bytes(world)
        if planned:
            print(f"all-gather bytes per step, N={world}: measured / planner = {ranks[0]['gather_bytes'] / planned:.3f}")


if __name__ == "__main__":
    main()
