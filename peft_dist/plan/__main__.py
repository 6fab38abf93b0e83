"""``python -m peft_dist.plan``: plan a run, print it, and optionally write its config and sbatch script.

  python -m peft_dist.plan --model gpt3-175b --nodes 16 --global-batch 512 --tokens 1e9 \\
      --write slurm/presets/gpt3-175b-16n

Adapters and quantization come from ``--config`` (a run config YAML, with ``--set`` overrides) or,
without one, LoRA r=16 on every decoder linear of an int8 base; ``--bits 4`` plans (and writes) a 4-bit base.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from peft_dist.train.config import load_config
from peft_dist.config.schema import ConfigError
from peft_dist.plan.estimate import Hardware, Workload
from peft_dist.plan.models import PRESETS, PlanError, load_shape
from peft_dist.plan.planner import format_plan, make_plan
from peft_dist.plan.writers import write_all

# Without --config: LoRA r=16 on every decoder linear, and training settings for a large model (the
# embedded default config is the small CPU run).
DEFAULT_OVERRIDES = ["adapters=[{method: lora, name: lora, r: 16, alpha: 32, target_modules: all-linear}]",
                     "train.lr=2e-4", "train.warmup_steps=50", "train.log_interval=10", "data.max_documents=0"]


def default_overrides(model: str, shape_name: str) -> list[str]:
    """The default run's model path (a placeholder for presets: weights are never downloaded) and run dir."""
    path = model if model not in PRESETS else f"/models/{shape_name}"
    return DEFAULT_OVERRIDES + [f"model.name_or_path={path}", f"checkpoint.output_dir=runs/{shape_name}",
                                f"tracking.experiment={shape_name}"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m peft_dist.plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a HF config.json / model dir")
    p.add_argument("--config", help="run config YAML for adapters and quantization (default: LoRA r=16, all-linear)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run config value, as in launcher/train.py")
    p.add_argument("--bits", type=int, choices=(4, 8),
                   help="quantization.bits of the planned and written run (default: the config's, 8)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step")
    p.add_argument("--tokens", type=float, default=1e9, help="training token budget")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--efficiency", type=float, default=0.4, help="achieved fraction of peak on the matmuls")
    p.add_argument("--net-gbs", type=float, default=50.0, help="inter-node GB/s per GPU (400 Gb/s NIC = 50)")
    p.add_argument("--nvlink-gbs", type=float, default=300.0, help="intra-node all-gather GB/s per GPU")
    p.add_argument("--hbm-gbs", type=float, default=3350.0, help="GPU memory GB/s (H100 SXM: 3350)")
    p.add_argument("--pcie-gbs", type=float, default=25.0,
                   help="host <-> GPU GB/s per GPU for CPU offload (PCIe 4.0 x16 achieves about 25)")
    p.add_argument("--host-mem-gib", type=float, default=256.0,
                   help="CPU memory per node (the ranks' runtime and any CPU offload)")
    p.add_argument("--disk-gbs", type=float, default=2.0,
                   help="GB/s at which each node reads the checkpoint when a job starts or is requeued")
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="per-GPU memory for the CUDA context, NCCL buffers and fragmentation")
    p.add_argument("--runtime-gib", type=float, default=1.5,
                   help="host memory of each rank's Python, torch and DeepSpeed: the memory/peak_rss_gib that a "
                        "run of builtin:tiny-llama logs (1.5 with CUDA torch on an H200, 0.7 with the CPU build)")
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu",
                   help="what each rank runs on, so where it quantizes the base at load: gpu, or cpu to plan a "
                        "DS_ACCELERATOR=cpu run (quantizing at the CPU's measured rate)")
    p.add_argument("--persistence-threshold", type=int, default=100_000,
                   help="ZeRO-3 stage3_param_persistence_threshold (elements)")
    p.add_argument("--dry-run", action="store_true",
                   help="also build the model on the meta device and compare its exact count")
    p.add_argument("--write", metavar="PREFIX", help="write PREFIX.ds.json, PREFIX.yaml and PREFIX.sbatch")
    p.add_argument("--time-limit", default="24:00:00", help="sbatch --time of each job (requeued until done)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        for name in ("seq_len", "global_batch", "nodes", "gpus_per_node"):
            if getattr(args, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        if min(args.tokens, args.gpu_mem_gib, args.peak_tflops, args.hbm_gbs, args.pcie_gbs, args.disk_gbs) <= 0 \
                or not 0 < args.efficiency <= 1:
            raise PlanError("--tokens, --gpu-mem-gib, --peak-tflops, --hbm-gbs, --pcie-gbs and --disk-gbs must be > 0 "
                            "and --efficiency in (0, 1]")
        if args.runtime_gib < 0:
            raise PlanError(f"--runtime-gib: must be >= 0, got {args.runtime_gib:g}")
        shape = load_shape(args.model)
        if args.seq_len > shape.max_positions:
            raise PlanError(f"--seq-len {args.seq_len} exceeds {shape.name}'s {shape.max_positions} positions")
        defaults = [] if args.config else default_overrides(args.model.removesuffix("/config.json"), shape.name)
        bits = [f"quantization.bits={args.bits}"] if args.bits else []
        cfg = load_config(args.config, defaults + args.overrides + bits)
        if args.bits and not cfg.quantization.enabled:
            raise PlanError(f"--bits {args.bits}: the config's quantization.enabled is false; enable it or drop --bits")
        hardware = Hardware(args.nodes, args.gpus_per_node, args.gpu_mem_gib, args.peak_tflops, args.efficiency,
                            args.net_gbs, args.nvlink_gbs, args.hbm_gbs, args.reserve_gib, args.pcie_gbs,
                            args.host_mem_gib, args.disk_gbs, args.runtime_gib, args.accelerator)
        work = Workload(args.seq_len, args.global_batch, int(args.tokens))
        plan = make_plan(shape, cfg, hardware, work, args.persistence_threshold, args.dry_run,
                         shlex.join(a for a in argv if a != "--dry-run"))
    except (PlanError, ConfigError) as err:
        print(f"peft-dist plan: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.write:
        paths = write_all(plan, cfg, cfg.deepspeed.config, args.write, args.time_limit)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
