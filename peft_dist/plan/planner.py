"""A plan: what each GPU holds, how long a step takes, what the run costs, and whether it fits."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from peft_dist.config.schema import RunConfig
from peft_dist.plan.dryrun import build_meta_model, meta_inventory
from peft_dist.plan.estimate import (GIB, OFFLOADS, Choice, Hardware, LoadCost, Workload, activation_bytes,
                                     base_name, choose, load_cost, planned_zero_stage, quantize_gws, steps_for)
from peft_dist.plan.inventory import RankBytes, analytic_inventory, embedding_targeted, head_targeted, per_rank
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
    load: LoadCost
    steps: int
    persistence_threshold: int
    counted_by: str  # "analytic model" or "meta-device model"
    argv: str = ""
    dry_run: RankBytes | None = None  # the meta-device count, when asked for
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.choice.fits(self.hardware)

    @property
    def zero_stage(self) -> int:
        return planned_zero_stage(self.hardware.world, self.choice.offload, self.work.base)

    @property
    def gpu_hours(self) -> float:
        return self.steps * self.choice.step_s * self.hardware.world / 3600


def make_plan(shape: ModelShape, cfg: RunConfig, hardware: Hardware, work: Workload,
              persistence_threshold: int = 100_000, dry_run: bool = False, argv: str = "") -> Plan:
    """Count what each rank holds (analytic, or on the meta device for methods it cannot write
    down), then pick the least CPU offload that lets a candidate fit and its fastest micro-batch /
    checkpointing."""
    quant = cfg.quantization if cfg.quantization.enabled else None
    quant_targets: Any = quant.target_modules if quant else None
    held, counted_by = None, "meta-device model"
    if all(a.method == "lora" for a in cfg.adapters):
        held = per_rank(analytic_inventory(shape, cfg.adapters, quant_targets, ITEMSIZE["bfloat16"], quant),
                        hardware.world, persistence_threshold)
        counted_by = "analytic model"
    meta = None
    if dry_run or held is None:  # the real model skeleton: exact for every method
        model = build_meta_model(shape, cfg.adapters, quant_targets, "bfloat16", quant)
        meta = per_rank(meta_inventory(model), hardware.world, persistence_threshold)
        held = held or meta
    work = replace(work, base=quant)
    choice, candidates = choose(shape, held, hardware, work)
    load = load_cost(shape, held, hardware, quant, adapter_itemsize=work.itemsize)
    plan = Plan(shape, hardware, work, held, choice, candidates, load, steps_for(work), persistence_threshold,
                counted_by, argv, meta)
    if not plan.fits:
        plan.notes.append(why_not(plan))
    if "param" in choice.offload:
        plan.notes.append("offload_param with a quantized base: DeepSpeed 0.19.8 keeps each CPU partition in the "
                          "parameter's own dtype (int8/uint8 too) and copies it to the GPU in that dtype at every "
                          "gather (partition_parameters.py); a 4-bit base trains with it on 2 CPU ranks with the "
                          "losses of a run without (tests/distributed/test_plan_measured.py), not yet run on GPUs")
    if load.quantize_s > load.seconds / 2:
        plan.notes.append(f"job start: quantizing on each rank's {hardware.accelerator.upper()} is "
                          f"{load.quantize_s / load.seconds:.0%} of the load time, at every start and requeue; more "
                          "ranks per job divide it (each quantizes its share), and a longer --time-limit means fewer "
                          "requeues")
    if choice.comm_s > choice.compute_s + choice.dequant_s:
        plan.notes.append("communication-bound: every micro-batch all-gathers the base for its forward and again "
                          "for its backward; a larger micro-batch (more memory per GPU) or fewer, larger nodes "
                          "amortise it")
    return plan


def why_not(plan: Plan) -> str:
    """Which term exceeds what: the GPU terms of the smallest candidate, or, when some candidate fits the
    GPU (with offload), the CPU memory the least offload of those needs."""
    hw, limit = plan.hardware, plan.hardware.gpu_mem_gib * GIB
    on_gpu = [c for c in plan.candidates if c.total_bytes <= limit]
    if not on_gpu:
        c = min(plan.candidates, key=lambda x: x.total_bytes)
        terms = ", ".join(f"{name} {value / GIB:.2f}" for name, value in
                          sorted(c.memory.items(), key=lambda kv: -kv[1]) if value >= 0.005 * GIB)
        what = (f"the smallest candidate (micro-batch {c.micro_batch}, checkpointing "
                f"{'on' if c.checkpointing else 'off'}, offload {c.offload}) needs {c.total_bytes / GIB:.2f} GiB "
                f"per GPU > {hw.gpu_mem_gib:g} GiB ({terms} GiB)")
    else:
        c = min(on_gpu, key=lambda x: x.host_bytes)
        what = (f"it fits the GPU only with offload {c.offload}, whose {c.host_bytes / GIB:.2f} GiB per rank plus "
                f"the runtime's {hw.runtime_gib:g} GiB x {hw.gpus_per_node} ranks = "
                f"{c.host_total_bytes(hw) * hw.gpus_per_node / GIB:.1f} GiB exceed the {hw.host_mem_gib:g} GiB of "
                "CPU memory per node (--host-mem-gib)")
    bits = "" if plan.work.base is not None and plan.work.base.bits == 4 else "use --bits 4, "
    return (f"does not fit: {what}; add nodes (the base and optimizer shards shrink as 1/GPUs), shorten "
            f"--seq-len, {bits}or use GPUs with more memory")


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def base_line(quant: Any, itemsize: int) -> str:
    """How the frozen base is stored (the plan's largest per-GPU term on few GPUs)."""
    if quant is None:
        return f"{base_name(quant, itemsize)}, not quantized"
    how = ("8 bits, one scale per row" if quant.bits == 8 else
           f"4 bits, blocksize {quant.blocksize}{', double quant' if quant.double_quant else ''}")
    targets = quant.target_modules
    floats = [what for what, quantized in (
        ("embeddings", any(embedding_targeted(name, targets) for name in ("embed_tokens.weight", "wte.weight"))),
        ("head", head_targeted(targets))) if not quantized]
    return f"{base_name(quant, itemsize)} ({how}) on {targets}" + (
        f"; {' and '.join(floats)} in bf16" if floats else "")


def offload_lines(plan: Plan) -> list[str]:
    """What each DeepSpeed CPU offload option would give: the fastest fitting candidate, or the smallest."""
    hw, c = plan.hardware, plan.choice
    lines = [f"offload     {c.offload}" + (f": {c.host_bytes / GIB:.2f} GiB per rank in pinned CPU memory, "
                                           f"{c.host_bytes * hw.gpus_per_node / GIB:.1f} GiB per node of "
                                           f"{hw.host_mem_gib:g}" if c.offload != "none" else "")]
    for offload in OFFLOADS:
        options = [x for x in plan.candidates if x.offload == offload]
        fitting = [x for x in options if x.fits(hw)]
        best = min(fitting or options, key=lambda x: (x.step_s, x.total_bytes) if fitting else x.total_bytes)
        verdict = f"fits, {best.step_s:.2f} s a step" if fitting else "does not fit"
        lines.append(f"  {offload:<16} {_gib(best.total_bytes)} per GPU, {best.host_bytes / GIB:6.2f} GiB per "
                     f"rank on the host (micro-batch {best.micro_batch}, checkpointing "
                     f"{'on' if best.checkpointing else 'off'}): {verdict}")
    return lines


def step_lines(plan: Plan) -> list[str]:
    """Communication (and the PCIe copies of offload), compute and dequantization of one optimizer step."""
    c, hw, w = plan.choice, plan.hardware, plan.work
    lines = ["", "per optimizer step",
             f"  communication         {c.comm_bytes / 1e9:10.1f} GB received per GPU -> {c.comm_s:8.2f} s"]
    if c.offload != "none":
        lines.append(f"  PCIe (offload)        {c.pcie_bytes / 1e9:10.1f} GB per GPU at {hw.pcie_gbs:g} GB/s -> "
                     f"{c.pcie_s:8.2f} s")
    return lines + [f"  compute               {c.compute_s:10.2f} s",
                    f"  {base_name(w.base, w.itemsize) + ' dequantization':<22}{c.dequant_s:10.2f} s",
                    f"  step time (overlap)   {c.step_s:10.2f} s"]


def load_lines(plan: Plan) -> list[str]:
    """What each job start (and so each requeue) reads and moves before its first step (``LoadCost``)."""
    load, hw, w = plan.load, plan.hardware, plan.work
    lines = ["", "job start (again at every requeue)",
             f"  checkpoint read       {load.checkpoint_bytes / 1e9:10.2f} GB once in all (bf16 safetensors), about "
             f"1/{hw.world} by each rank -> {load.read_s:8.2f} s at {hw.disk_gbs:g} GB/s a node"]
    if w.base is not None:
        where, rate = "CPU", f"{quantize_gws(hw, w.base.bits):g} G/s"
        if hw.accelerator == "gpu":
            where, rate = "GPU after PCIe", rate + " (an estimate)"
        lines.append(f"  quantize              {load.quantized_per_rank / 1e9:10.2f} G weights by each rank (its "
                     f"turns' share, on its {where}) -> {load.quantize_s:8.2f} s at {rate}")
    if hw.world > 1:
        base = base_name(w.base, w.itemsize)
        lines += [f"  to rank 0             {load.to_rank_0_bytes / 1e9:10.2f} GB received by rank 0 (the {base} "
                  f"tensors the others read) -> {load.to_rank_0_s:8.2f} s",
                  f"  broadcast             {load.broadcast_bytes / 1e9:10.2f} GB received by each other rank (the "
                  f"{base} base, whole; it keeps 1/{hw.world}) -> {load.broadcast_s:8.2f} s"]
    return lines + [f"  resume (estimate)     {load.resume_bytes / 1e9:10.2f} GB read by each rank at a requeue (its "
                    "optimizer partition and the adapter)",
                    f"  load time             {load.seconds:10.2f} s"]


def format_plan(plan: Plan) -> str:
    s, hw, w, c, held = plan.shape, plan.hardware, plan.work, plan.choice, plan.held
    lines = [
        f"model       {s.name}: {s.total_params() / 1e9:.1f}B parameters ({s.family}, {s.layers} layers, "
        f"hidden {s.hidden}, vocab {s.vocab})",
        f"adapters    {held.trainable_numel:,} trainable parameters "
        f"({100 * held.trainable_numel / (s.total_params() + held.trainable_numel):.3f}%), counted by the "
        f"{plan.counted_by}",
        f"base        {base_line(w.base, w.itemsize)}",
        f"cluster     {hw.nodes} nodes x {hw.gpus_per_node} GPUs = {hw.world} ranks, {hw.gpu_mem_gib:g} GiB, "
        f"{hw.peak_tflops:g} TFLOP/s peak at {hw.efficiency:.0%}, link {hw.link_gbs:g} GB/s per GPU",
        f"workload    seq {w.seq_len}, global batch {w.global_batch} sequences "
        f"({w.global_batch * w.seq_len:,} tokens), {w.tokens:,} tokens = {plan.steps:,} steps",
        "",
        f"chosen      micro-batch {c.micro_batch} x accumulation {c.accumulation} per GPU, "
        f"activation checkpointing {'on' if c.checkpointing else 'off'}, CPU offload {c.offload}, "
        f"ZeRO-{plan.zero_stage}",
        "",
        "memory per GPU",
    ]
    lines += [f"  {name:<24}{_gib(value)}" for name, value in c.memory.items()]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    if not plan.fits and c.total_bytes <= hw.gpu_mem_gib * GIB:
        verdict += " (CPU memory: see the note)"
    lines.append(f"  {'total':<24}{_gib(c.total_bytes)}  of {hw.gpu_mem_gib:g} GiB -> {verdict}")
    lines += ["", "memory per rank on the host",
              f"  {'runtime':<24}{_gib(hw.runtime_gib * GIB)}  (Python, torch, DeepSpeed: --runtime-gib)",
              f"  {'CPU offload':<24}{_gib(c.host_bytes)}",
              f"  {'total':<24}{_gib(c.host_total_bytes(hw))}  x {hw.gpus_per_node} ranks = "
              f"{c.host_total_bytes(hw) * hw.gpus_per_node / GIB:.1f} GiB of {hw.host_mem_gib:g} GiB per node"]
    off, on = (activation_bytes(s, c.micro_batch, w.seq_len, w.itemsize, ckpt) for ckpt in (False, True))
    lines += ["", f"activations (micro-batch {c.micro_batch}): checkpointing off {_gib(off).strip()} | "
              f"on {_gib(on).strip()}", ""]
    lines += offload_lines(plan) + step_lines(plan) + load_lines(plan)
    lines += [
        "",
        f"total       {plan.steps * c.step_s / 3600:,.1f} h wall clock, {plan.gpu_hours:,.0f} GPU-hours",
        "",
        f"candidates with offload {c.offload} (micro-batch, checkpointing: total memory, step time)",
    ]
    lines += [f"  {x.micro_batch:>3} {'on ' if x.checkpointing else 'off'}: {_gib(x.total_bytes)}, "
              f"{x.step_s:8.2f} s{'  <- chosen' if x is c else ''}"
              for x in plan.candidates if x.offload == c.offload]
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
