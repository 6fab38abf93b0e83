"""A plan: what each GPU holds, how long a step takes, what the run costs, and whether it fits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft_dist.config.schema import RunConfig
from peft_dist.plan.dryrun import build_meta_model, meta_inventory
from peft_dist.plan.estimate import GIB, Choice, Hardware, Workload, activation_bytes, choose, steps_for
from peft_dist.plan.inventory import RankBytes, analytic_inventory, per_rank
from peft_dist.plan.models import ModelShape

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    shape: ModelShape
    hardware: Hardware
    work: Workload
    held: RankBytes
    choice: Choice
    candidates: list[Choice]
    steps: int
    persistence_threshold: int
    counted_by: str  # "analytic model" or "meta-device model"
    argv: str = ""
    dry_run: RankBytes | None = None  # the meta-device count, when asked for
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.choice.total_bytes <= self.hardware.gpu_mem_gib * GIB

    @property
    def gpu_hours(self) -> float:
        return self.steps * self.choice.step_s * self.hardware.world / 3600


def make_plan(shape: ModelShape, cfg: RunConfig, hardware: Hardware, work: Workload,
              persistence_threshold: int = 100_000, dry_run: bool = False, argv: str = "") -> Plan:
    """Count what each rank holds (analytic, or on the meta device for methods it cannot write
    down), then pick the fastest micro-batch / checkpointing that fits."""
    quant_targets: Any = cfg.quantization.target_modules if cfg.quantization.enabled else None
    held, counted_by = None, "meta-device model"
    if all(a.method == "lora" for a in cfg.adapters):
        held = per_rank(analytic_inventory(shape, cfg.adapters, quant_targets, ITEMSIZE["bfloat16"]),
                        hardware.world, persistence_threshold)
        counted_by = "analytic model"
    meta = None
    if dry_run or held is None:  # the real model skeleton: exact for every method
        model = build_meta_model(shape, cfg.adapters, quant_targets, "bfloat16")
        meta = per_rank(meta_inventory(model), hardware.world, persistence_threshold)
        held = held or meta
    choice, candidates = choose(shape, held, hardware, work)
    plan = Plan(shape, hardware, work, held, choice, candidates, steps_for(work), persistence_threshold,
                counted_by, argv, meta)
    if not plan.fits:
        plan.notes.append("does not fit even at micro-batch 1 with checkpointing: add nodes (the base and "
                          "optimizer shards shrink as 1/GPUs), shorten --seq-len, or use GPUs with more memory")
    if choice.comm_s > choice.compute_s + choice.dequant_s:
        plan.notes.append("communication-bound: every micro-batch all-gathers the base for its forward and again "
                          "for its backward; a larger micro-batch (more memory per GPU) or fewer, larger nodes "
                          "amortise it")
    return plan


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: Plan) -> str:
    s, hw, w, c, held = plan.shape, plan.hardware, plan.work, plan.choice, plan.held
    lines = [
        f"model       {s.name}: {s.total_params() / 1e9:.1f}B parameters ({s.family}, {s.layers} layers, "
        f"hidden {s.hidden}, vocab {s.vocab})",
        f"adapters    {held.trainable_numel:,} trainable parameters "
        f"({100 * held.trainable_numel / held.total_numel:.3f}%), counted by the {plan.counted_by}",
        f"cluster     {hw.nodes} nodes x {hw.gpus_per_node} GPUs = {hw.world} ranks, {hw.gpu_mem_gib:g} GiB, "
        f"{hw.peak_tflops:g} TFLOP/s peak at {hw.efficiency:.0%}, link {hw.link_gbs:g} GB/s per GPU",
        f"workload    seq {w.seq_len}, global batch {w.global_batch} sequences "
        f"({w.global_batch * w.seq_len:,} tokens), {w.tokens:,} tokens = {plan.steps:,} steps",
        "",
        f"chosen      micro-batch {c.micro_batch} x accumulation {c.accumulation} per GPU, "
        f"activation checkpointing {'on' if c.checkpointing else 'off'}",
        "",
        "memory per GPU",
    ]
    lines += [f"  {name:<24}{_gib(value)}" for name, value in c.memory.items()]
    lines.append(f"  {'total':<24}{_gib(c.total_bytes)}  of {hw.gpu_mem_gib:g} GiB -> "
                 f"{'FITS' if plan.fits else 'DOES NOT FIT'}")
    off, on = (activation_bytes(s, c.micro_batch, w.seq_len, w.itemsize, ckpt) for ckpt in (False, True))
    lines += ["", f"activations (micro-batch {c.micro_batch}): checkpointing off {_gib(off).strip()} | "
              f"on {_gib(on).strip()}"]
    lines += [
        "",
        "per optimizer step",
        f"  communication         {c.comm_bytes / 1e9:10.1f} GB received per GPU -> {c.comm_s:8.2f} s",
        f"  compute               {c.compute_s:10.2f} s",
        f"  int8 dequantization   {c.dequant_s:10.2f} s",
        f"  step time (overlap)   {c.step_s:10.2f} s",
        "",
        f"total       {plan.steps * c.step_s / 3600:,.1f} h wall clock, {plan.gpu_hours:,.0f} GPU-hours",
        "",
        "candidates (micro-batch, checkpointing: total memory, step time)",
    ]
    lines += [f"  {x.micro_batch:>3} {'on ' if x.checkpointing else 'off'}: {_gib(x.total_bytes)}, "
              f"{x.step_s:8.2f} s{'  <- chosen' if x is c else ''}" for x in plan.candidates]
    if plan.dry_run is not None:
        d = plan.dry_run
        if plan.counted_by != "analytic model":
            verdict = "the count used above (no analytic model for this adapter method)"
        elif d == held:
            verdict = "matches the analytic count exactly"
        else:
            verdict = "DIFFERS from the analytic count: please report it"
        lines += ["", f"dry run (meta device): {d.total_numel:,} parameters, {d.trainable_numel:,} trainable; "
                  f"per rank base {d.frozen:,} B, adapters {d.trainable:,} B, optimizer {d.optimizer:,} B -> "
                  f"{verdict}"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
