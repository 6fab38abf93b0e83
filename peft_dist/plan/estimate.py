"""Per-GPU memory, communication per step and step time of a ZeRO-3 adapter run on an int8 base.

Exact parts (checked against the meta-device model): parameter bytes per rank and the bytes one pass
all-gathers. Estimates, with their assumptions stated where they are made: activations, the
all-gather working set, step time. The choice of micro-batch and gradient checkpointing is the
fastest combination that fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from peft_dist.plan.inventory import RankBytes
from peft_dist.plan.models import ModelShape, PlanError

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """nodes x gpus_per_node GPUs. Bandwidths are per GPU, one direction, in GB/s (1e9 bytes)."""

    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    peak_tflops: float  # dense bf16 peak per GPU
    efficiency: float = 0.4  # achieved fraction of peak on the matmuls
    net_gbs: float = 50.0  # inter-node, per GPU (one 400 Gb/s NIC per GPU)
    nvlink_gbs: float = 300.0  # intra-node, per GPU (achieved NVLink all-gather bandwidth)
    hbm_gbs: float = 3350.0  # GPU memory bandwidth (dequantization is memory-bound)
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def link_gbs(self) -> float:
        """The bandwidth a ring all-gather over all GPUs runs at: the slowest hop."""
        return self.nvlink_gbs if self.nodes == 1 else self.net_gbs


@dataclass(frozen=True)
class Workload:
    seq_len: int
    global_batch: int  # sequences per optimizer step
    tokens: int  # training token budget
    itemsize: int = 2  # bf16 activations and adapters


@dataclass(frozen=True)
class Choice:
    micro_batch: int
    accumulation: int
    checkpointing: bool
    memory: dict  # component -> bytes per GPU
    compute_s: float  # per optimizer step
    dequant_s: float
    comm_s: float
    comm_bytes: int  # received per GPU per optimizer step
    step_s: float

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())


def activation_bytes(shape: ModelShape, micro: int, seq: int, itemsize: int, checkpointing: bool) -> int:
    """What autograd keeps for backward, per GPU (estimate, dropout off).

    Frozen int8 linears keep no input (no weight gradient); adapters keep theirs. Counted per layer
    and token with saved-tensor hooks (tests/unit/test_plan.py): 10 hidden-sized units (the adapters'
    two inputs, q, k, v and the output that SDPA keeps, no seq x seq term; the two norm inputs, which
    RMSNorm keeps in fp32; GPT-2 keeps its fused qkv output instead of a norm upcast) and the MLP's
    intermediate-sized tensors: 4 for a gated SiLU MLP (gate, up, silu, product), 5 for GPT-2's
    tanh GELU. With checkpointing only each layer's input stays, plus one layer's full set during
    its recompute.
    """
    tokens = micro * seq
    mlp = 4 if shape.family == "llama" else 5
    layer = tokens * itemsize * (10 * shape.hidden + mlp * shape.intermediate)
    if checkpointing:
        return shape.layers * tokens * shape.hidden * itemsize + layer
    return shape.layers * layer


def logits_bytes(shape: ModelShape, micro: int, seq: int, itemsize: int) -> int:
    """Logits in the training dtype, their fp32 copy for the loss and its gradient."""
    return micro * seq * shape.vocab * (itemsize + 4 + 4)


def largest_layer(shape: ModelShape) -> tuple[int, int]:
    """(numel of one decoder layer's linears, numel of its largest linear)."""
    sizes = [o * i for _, o, i, _ in shape.linears(0)]
    return sum(sizes), max(sizes)


def gather_working_set(shape: ModelShape, itemsize: int, world: int) -> int:
    """ZeRO-3 holds the running layer and the prefetched next one whole (int8), and the int8 matmul
    dequantizes one weight at a time: an int8 -> bf16 cast plus the scaled result. On one rank
    DeepSpeed gathers nothing (the partition is the whole tensor)."""
    layer, biggest = largest_layer(shape)
    return (2 * layer if world > 1 else 0) + 2 * itemsize * biggest


def backward_gather_bytes(shape: ModelShape, held: RankBytes, itemsize: int) -> int:
    """Bytes the backward all-gathers again: the forward's, less two things it does not gather.

    * The tail of the forward still gathered when the backward starts: with the written
      ``stage3_max_live_parameters`` (two layers' elements) and reuse distance, DeepSpeed keeps the last
      two layers' worth of elements (the head, the last layer, most of the one before) for the backward
      that uses them next; counted at the pass's mean bytes per element.
    * Frozen input embeddings, which no backward runs through (their inputs are token and position
      ids). A tied token embedding is the head's weight, which the backward does use.

    Measured by bench/scaling.py on 2 and 4 CPU ranks (docs/BENCHMARKS.md).
    """
    layer, _ = largest_layer(shape)
    live = min(2 * layer, held.gathered_numel)
    tail = live * held.gathered // held.gathered_numel if held.gathered_numel else 0
    embeddings = (0 if shape.tied_embeddings else shape.vocab) + (shape.max_positions if shape.family != "llama" else 0)
    return max(0, held.gathered - tail - embeddings * shape.hidden * itemsize)


def step_flops(shape: ModelShape, adapter_params: int, tokens: int, seq: int, checkpointing: bool) -> float:
    """FLOPs of one optimizer step over ``tokens`` tokens (one GPU's share).

    Forward: 2 per linear weight and token plus attention scores (4 * seq * hidden per layer, full
    square). Backward: input gradients only through the frozen base (2 per weight), twice the forward
    for attention, weight and input gradients for the adapters. Checkpointing adds one forward.
    """
    attention = 4 * shape.layers * seq * shape.hidden
    forward = 2 * shape.linear_params() + attention + 2 * adapter_params
    backward = 2 * shape.linear_params() + 2 * attention + 4 * adapter_params
    return tokens * (forward * (2 if checkpointing else 1) + backward)


def evaluate(shape: ModelShape, held: RankBytes, hw: Hardware, work: Workload, micro: int,
             checkpointing: bool) -> Choice:
    per_gpu = work.global_batch // hw.world
    accumulation = per_gpu // micro
    memory = {
        "int8 base shard": held.frozen,
        "adapter shard": held.trainable,
        "optimizer state": held.optimizer,
        "activations": activation_bytes(shape, micro, work.seq_len, work.itemsize, checkpointing),
        "logits": logits_bytes(shape, micro, work.seq_len, work.itemsize),
        "all-gather working set": gather_working_set(shape, work.itemsize, hw.world),
        "reserved": int(hw.reserve_gib * GIB),
    }
    tokens = per_gpu * work.seq_len
    compute = step_flops(shape, held.trainable_numel, tokens, work.seq_len, checkpointing) / (
        hw.peak_tflops * 1e12 * hw.efficiency)
    # Dequantizing reads int8 (1 B), writes and reads the cast (2 + 2 B) and writes the result (2 B),
    # in the forward, the backward and the recompute, for every weight, every micro-batch.
    quantized = sum(o * i for _, o, i, _ in shape.linears(0)) * shape.layers
    dequant = accumulation * (3 if checkpointing else 2) * 7 * quantized / (hw.hbm_gbs * 1e9)
    # Per micro-batch: the base and adapters are all-gathered for the forward and again (less the tail
    # still gathered and the input embeddings) for the backward; a ring receives (W-1)/W of them.
    # Adapter gradients are reduce-scattered.
    ring = (hw.world - 1) / hw.world
    trainable_whole = held.trainable_numel * work.itemsize
    gathered = held.gathered + backward_gather_bytes(shape, held, work.itemsize)
    comm_bytes = int(accumulation * ring * (gathered + trainable_whole))
    comm = comm_bytes / (hw.link_gbs * 1e9)
    # Prefetching overlaps the all-gathers with compute: the slower of the two sets the pace.
    step = max(compute + dequant, comm)
    return Choice(micro, accumulation, checkpointing, memory, compute, dequant, comm, comm_bytes, step)


def choose(shape: ModelShape, held: RankBytes, hw: Hardware, work: Workload) -> tuple[Choice, list[Choice]]:
    """The fastest (micro-batch, checkpointing) that fits, and every candidate considered.

    If nothing fits, the smallest-memory candidate is returned (its total exceeds the GPU).
    """
    if work.global_batch % hw.world:
        good = ", ".join(str(hw.world * k) for k in (1, 2, 4, 8))
        raise PlanError(f"--global-batch {work.global_batch} is not a multiple of the {hw.world} GPUs "
                        f"(data parallel over every GPU); use e.g. {good}")
    per_gpu = work.global_batch // hw.world
    candidates = [evaluate(shape, held, hw, work, micro, ckpt)
                  for micro in range(1, per_gpu + 1) if per_gpu % micro == 0 for ckpt in (False, True)]
    limit = hw.gpu_mem_gib * GIB
    fitting = [c for c in candidates if c.total_bytes <= limit]
    if fitting:
        return min(fitting, key=lambda c: (c.step_s, c.total_bytes)), candidates
    return min(candidates, key=lambda c: c.total_bytes), candidates


def steps_for(work: Workload) -> int:
    return math.ceil(work.tokens / (work.global_batch * work.seq_len))
