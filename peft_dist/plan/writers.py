"""The files a plan assumes: a run config, a DeepSpeed config and an sbatch script.

The run config carries the planned batch split and checkpointing, the DeepSpeed config the ZeRO stage
and the ZeRO-3 buckets sized from the model, and the sbatch script the allocation, time limit and the
pre-timeout signal; ``slurm/launch.sh`` does the rest (srun, logs, requeue).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import yaml

from peft_dist.config.load import config_to_dict
from peft_dist.config.schema import RunConfig
from peft_dist.data import BUILTIN_CORPORA
from peft_dist.distributed.zero3 import REPO_ROOT, resolve_ds_config_path
from peft_dist.plan.estimate import gradient_bucket_elements, largest_layer
from peft_dist.plan.planner import Plan

# A planned run's data: the job stops before its process group with "matches no data file" until set.
DATA_PLACEHOLDER = "/data/SET-data.path-TO-YOUR-CORPUS.jsonl"


def ds_config(plan: Plan, base_path: str) -> dict:
    """``base_path``'s DeepSpeed config at the plan's ZeRO stage, with ZeRO-3 buckets sized for this model and
    the gradient bucket the plan counts (``gradient_bucket_elements``).

    Prefetch one decoder layer ahead and keep at most two whole (the working set the plan counts):
    DeepSpeed keeps a used parameter gathered if it is reused within ``stage3_max_reuse_distance``
    elements, and its default (1e9) would keep a whole small model, or a billion elements of a large
    one, gathered from the end of the forward into the backward. Overlap communication with compute
    (the step time assumes it). On CPU ranks, gather one parameter at a time
    (``stage3_allgather_sequential``; DeepSpeed then prefetches one parameter ahead): a prefetch of several
    parameters goes through one flat buffer and is then copied out, so for a moment it is held twice
    (measured at 7B, docs/BENCHMARKS.md); on GPUs the cost of the shallower prefetch is not yet measured, so
    they keep the coalesced one. Batch sizes stay in the run config, where ``build_ds_config`` takes
    them from. The plan's CPU offload, if any, as DeepSpeed's own ``offload_param`` / ``offload_optimizer``
    (pinned CPU memory); with the optimizer offloaded DeepSpeed runs the trainer's torch AdamW on the CPU
    partitions (``zero_force_ds_cpu_optimizer: false``, docs/MEMORY.md), and any offload the base file
    sets that the plan did not choose is removed. A ZeRO-2 plan (one GPU, ``Plan.zero_stage``) has no
    ``stage3_*`` settings.
    """
    config = json.loads(resolve_ds_config_path(base_path).read_text())
    zero = config.setdefault("zero_optimization", {})
    for key in [k for k in zero if k.startswith("offload_") or (plan.zero_stage == 2 and k.startswith("stage3_"))]:
        del zero[key]
    zero.update({"stage": plan.zero_stage, "overlap_comm": True,
                 "reduce_bucket_size": gradient_bucket_elements(plan.held.trainable_numel)})
    if plan.zero_stage == 3:
        layer, _ = largest_layer(plan.shape, plan.work.base, plan.work.itemsize)
        zero.update({"stage3_prefetch_bucket_size": layer, "stage3_max_live_parameters": 2 * layer,
                     "stage3_max_reuse_distance": layer,
                     "stage3_param_persistence_threshold": plan.persistence_threshold})
        if plan.hardware.accelerator == "cpu":
            zero["stage3_allgather_sequential"] = True
    for kind in ("param", "optimizer"):
        if kind in plan.choice.offload:
            zero[f"offload_{kind}"] = {"device": "cpu", "pin_memory": True}
    if "optimizer" in plan.choice.offload:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def run_config(plan: Plan, base: RunConfig, ds_path: str) -> dict:
    """``base`` with the planned model dtype, sequence length, batch split, steps and checkpointing."""
    cfg = copy.deepcopy(base)
    choice = plan.choice
    cfg.model.dtype = "bfloat16"
    cfg.model.gradient_checkpointing = choice.checkpointing
    cfg.data.block_size = plan.work.seq_len
    if cfg.data.path in BUILTIN_CORPORA:  # a demo corpus is never what a planned run trains on
        cfg.data.path = DATA_PLACEHOLDER
    cfg.train.precision = "bf16"
    cfg.train.micro_batch_size = choice.micro_batch
    cfg.train.gradient_accumulation_steps = choice.accumulation
    cfg.train.max_steps = plan.steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, plan.steps)
    cfg.deepspeed.config = ds_path
    cfg.deepspeed.zero_stage = plan.zero_stage
    # A resumable checkpoint about every 30 minutes bounds the work a crash (not a signal) loses.
    cfg.checkpoint.save_interval = max(1, round(1800 / choice.step_s))
    return config_to_dict(cfg)


def signal_lead_s(plan: Plan) -> int:
    """Seconds before the time limit to ask for SIGUSR1: finish the running step (up to two, since
    Slurm may signal up to a minute late) and write the checkpoint, rounded up to whole minutes."""
    return max(300, 60 * math.ceil((2 * plan.choice.step_s + 180) / 60))


def sbatch_script(plan: Plan, run_config_path: str, sbatch_path: str, time_limit: str, job_name: str) -> str:
    hw = plan.hardware
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by `python -m peft_dist.plan {plan.argv}`; see docs/SCALING.md.",
        f"# {plan.shape.name} on {hw.nodes} x {hw.gpus_per_node} GPUs: micro-batch {plan.choice.micro_batch}, "
        f"accumulation {plan.choice.accumulation}, checkpointing {'on' if plan.choice.checkpointing else 'off'}, "
        f"{plan.steps} steps of ~{plan.choice.step_s:.1f} s.",
        "# Submit from the repository root (mkdir -p logs), naming the weights and the data:",
        f"#   sbatch {sbatch_path} --set model.name_or_path=/models/... --set data.path=/data/...",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={hw.nodes}",
        f"#SBATCH --ntasks-per-node={hw.gpus_per_node}",
        f"#SBATCH --gpus-per-node={hw.gpus_per_node}",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --exclusive",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=logs/%x-%j.log",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=USR1@{signal_lead_s(plan)}",
        "#SBATCH --requeue",
        f'exec bash "${{PEFT_DIST_ROOT:-$SLURM_SUBMIT_DIR}}/slurm/launch.sh" --config {run_config_path} "$@"',
        "",
    ]
    return "\n".join(lines)


def write_all(plan: Plan, base: RunConfig, base_ds: str, out_prefix: str | Path,
              time_limit: str = "24:00:00") -> list[Path]:
    """Write ``PREFIX.ds.json``, ``PREFIX.yaml`` and ``PREFIX.sbatch``; paths inside are relative to
    the repository root when the files are under it (templates are submitted from there)."""
    prefix = Path(out_prefix).resolve()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + ext) for ext in (".ds.json", ".yaml", ".sbatch")]

    def shown(path: Path) -> str:
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)

    paths[0].write_text(json.dumps(ds_config(plan, base_ds), indent=2) + "\n")
    header = f"# Written by `python -m peft_dist.plan {plan.argv}`: the run the plan assumes.\n"
    paths[1].write_text(header + yaml.safe_dump(run_config(plan, base, shown(paths[0])), sort_keys=False))
    paths[2].write_text(sbatch_script(plan, shown(paths[1]), shown(paths[2]), time_limit, prefix.name))
    paths[2].chmod(0o755)
    return paths
