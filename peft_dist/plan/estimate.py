"""Per-GPU memory, communication per step and step time of a ZeRO-3 adapter run on an int8 or 4-bit base.

Exact parts (checked against the meta-device model): parameter bytes per rank and the bytes one pass
all-gathers. Estimates, with their assumptions stated where they are made: activations, the
all-gather working set, step time, PCIe traffic of CPU offload. The choice of CPU offload, micro-batch
and gradient checkpointing is the fastest combination that fits with the least offload.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft_dist.config.schema import QuantizationConfig
from peft_dist.plan.inventory import FP32, MASTER_AND_ADAM_BYTES, RankBytes, TensorInfo, weight_tensors
from peft_dist.plan.models import ModelShape, PlanError
from peft_dist.quant.int8 import BLOCK_ELEMENTS

GIB = 2**30
INT8_BASE = QuantizationConfig()  # what callers that say nothing plan for: the default int8 base
# DeepSpeed ZeRO-3 CPU offload (``zero_optimization.offload_param`` / ``offload_optimizer``, device cpu),
# in order of PCIe traffic. NVMe is not an option for a quantized base: DeepSpeed's parameter swapper
# (``swap_tensor/partitioned_param_swapper.py``) allocates its buffers in the model's float dtype.
OFFLOADS = ("none", "optimizer", "param", "param+optimizer")
REDUCE_BUCKET = 50_000_000  # elements: ds_configs/' reduce_bucket_size, the most a plan writes
# Dense weights (G/s) one rank quantizes and measures the error of at load; the loader does it on the rank's
# accelerator, and each run logs its own (load/quantize_seconds).
# On the CPU (DS_ACCELERATOR=cpu), by the base's bits: one thread (torchrun's default), 4-bit through bitsandbytes'
# CPU quantize_4bit. Measured on a 4096 x 11008 bf16 weight, 2-core AVX-512 CPU, 2026-12-01.
CPU_QUANTIZE_GWS = {8: 0.30, 4: 0.036}
# On a GPU: an estimate, not yet measured (bench/gpu_check.sh's load step prints the rate). Per block of
# SCRATCH_ELEMENTS weights, about 20 small kernels and the error report's 3 waits for the device, and about 100
# bytes of memory traffic a weight; each dense weight also crosses PCIe in the checkpoint's dtype first.
GPU_QUANTIZE_GWS = 10.0


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
    pcie_gbs: float = 25.0  # host <-> GPU per GPU (PCIe 4.0 x16 achieves about 25 of its 32 GB/s)
    host_mem_gib: float = 256.0  # CPU memory per node for what is offloaded
    disk_gbs: float = 2.0  # what each node reads the checkpoint at (a parallel file system or local NVMe)
    runtime_gib: float = 1.5  # host memory of each rank's Python, torch, DeepSpeed and transformers
    accelerator: str = "gpu"  # what each rank runs on, so where it quantizes at load: gpu, or cpu (DS_ACCELERATOR=cpu)

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
    base: QuantizationConfig | None = field(default_factory=QuantizationConfig)  # None: a float base


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
    offload: str = "none"  # one of OFFLOADS
    host_bytes: int = 0  # offloaded bytes per rank in (pinned) CPU memory
    pcie_bytes: int = 0  # host <-> GPU bytes per GPU per optimizer step
    pcie_s: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    def host_total_bytes(self, hw: Hardware) -> int:
        """What one rank holds in CPU memory: the frameworks' runtime and what it offloads."""
        return int(hw.runtime_gib * GIB) + self.host_bytes

    def fits(self, hw: Hardware) -> bool:
        """Within the GPU's memory, and the host memory of a node's ranks within its CPU memory."""
        return (self.total_bytes <= hw.gpu_mem_gib * GIB
                and self.host_total_bytes(hw) * hw.gpus_per_node <= hw.host_mem_gib * GIB)


def base_name(quant: QuantizationConfig | None, itemsize: int) -> str:
    """``int8``, ``nf4``, ``fp4`` (``+dq``: double quant) or the float dtype of an unquantized base."""
    if quant is None:
        return {2: "bf16", 4: "fp32"}[itemsize]
    return "int8" if quant.bits == 8 else quant.quant_type + ("+dq" if quant.double_quant else "")


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


def _layer_weights(shape: ModelShape, quant: QuantizationConfig | None, itemsize: int) -> list[TensorInfo]:
    """The stored tensors of one decoder layer's linear weights (every linear quantized, as all-linear)."""
    return [t for name, o, i, _ in shape.linears(0) for t in weight_tensors(name, o, i, quant, itemsize)]


def largest_layer(shape: ModelShape, quant: QuantizationConfig | None = INT8_BASE,
                  itemsize: int = 2) -> tuple[int, int]:
    """(parameter elements one decoder layer's linears are stored in, numel of its largest weight).

    Elements as DeepSpeed counts them (``ds_numel``): the bucket and live-parameter limits are in these.
    """
    return (sum(t.numel for t in _layer_weights(shape, quant, itemsize)),
            max(o * i for _, o, i, _ in shape.linears(0)))


def gather_working_set(shape: ModelShape, itemsize: int, world: int,
                       quant: QuantizationConfig | None = INT8_BASE, param_offload: bool = False) -> int:
    """ZeRO-3 holds the running layer and the prefetched next one whole (as stored: int8 or 4-bit with its
    statistics), and the quantized matmul dequantizes as it goes: int8 one block of ``BLOCK_ELEMENTS`` of a
    weight at a time (``quant/int8.py``: a cast of the block plus, in fp16, its scaled copy), 4-bit
    bitsandbytes' whole dequantized weight plus the backward's copy of it in the forward's layout
    (``quant/nf4.py``); 2 x itemsize bytes per element of that block or of the largest linear.
    On one rank DeepSpeed gathers nothing (the partition is the whole tensor), unless the partitions
    are in CPU memory (``offload_param``): then the two layers are fetched to the GPU all the same."""
    layer = sum(t.numel * t.itemsize for t in _layer_weights(shape, quant, itemsize))
    _, biggest = largest_layer(shape, quant, itemsize)
    fetched = 2 * layer if world > 1 or param_offload else 0
    if quant is None:
        return fetched
    return fetched + 2 * itemsize * (min(biggest, BLOCK_ELEMENTS) if quant.bits == 8 else biggest)


def dequant_bytes(shape: ModelShape, quant: QuantizationConfig | None, itemsize: int,
                  checkpointing: bool) -> float:
    """HBM bytes one micro-batch's dequantization moves (memory-bound; the matmuls are in compute).

    int8: reads the int8 weight (1 B), writes and reads the cast (2 + 2 B), writes the scaled result (2 B),
    in every pass. 4-bit (bitsandbytes' ``dequantize_4bit``): reads the codes and block statistics as stored
    (0.5 + 4 / blocksize B; double quant first dequantizes the absmax, writing and reading them as float32,
    + 8 / blocksize B) and writes the weight (2 B); the backward then copies it into the forward's layout
    (reads and writes 2 B each). Passes: forward, backward, and with checkpointing the recompute.
    """
    weights = sum(o * i for _, o, i, _ in shape.linears(0)) * shape.layers
    if quant is None:
        return 0.0
    if quant.bits == 8:
        return (3 if checkpointing else 2) * (1 + 3 * itemsize) * weights
    stored = sum(t.numel * t.itemsize for t in _layer_weights(shape, quant, itemsize)) * shape.layers / weights
    forward = stored + (2 * FP32 / quant.blocksize if quant.double_quant else 0) + itemsize
    return ((2 if checkpointing else 1) * forward + forward + 2 * itemsize) * weights


def backward_gather_bytes(shape: ModelShape, held: RankBytes, itemsize: int,
                          quant: QuantizationConfig | None = INT8_BASE) -> int:
    """Bytes the backward all-gathers again: the forward's, less two things it does not gather.

    * The tail of the forward still gathered when the backward starts: with the written
      ``stage3_max_live_parameters`` (two layers' elements) and reuse distance, DeepSpeed keeps the last
      two layers' worth of elements (the head, the last layer, most of the one before) for the backward
      that uses them next; counted at the pass's mean bytes per element.
    * Frozen input embeddings, which no backward runs through (their inputs are token and position
      ids). A tied token embedding is the head's weight, which the backward does use.

    Measured by bench/scaling.py on 2 and 4 CPU ranks (docs/BENCHMARKS.md).
    """
    layer, _ = largest_layer(shape, quant, itemsize)
    live = min(2 * layer, held.gathered_numel)
    tail = live * held.gathered // held.gathered_numel if held.gathered_numel else 0
    embeddings = (0 if shape.tied_embeddings else shape.vocab) + (shape.max_positions if shape.family != "llama" else 0)
    return max(0, held.gathered - tail - embeddings * shape.hidden * itemsize)


def planned_zero_stage(world: int, offload: str, base: QuantizationConfig | None) -> int:
    """2 on one GPU without CPU offload, else 3. One rank partitions nothing, yet ZeRO-3 still runs its
    per-layer gather bookkeeping: the same CLI run on an H200 trained 2.1x faster under ZeRO-2 at the
    same memory (docs/SCALING.md, "On a GPU"). CPU offload and a 4-bit base stay on ZeRO-3, the stage
    they are tested under (docs/COMPATIBILITY.md)."""
    four_bit = base is not None and base.bits == 4
    return 2 if world == 1 and offload == "none" and not four_bit else 3


def gradient_bucket_elements(trainable_numel: int) -> int:
    """The ``reduce_bucket_size`` a plan writes: ds_configs/' 5e7 elements, or the trainable elements if fewer
    (what the trainer caps it at, ``zero3.with_gradient_bucket``)."""
    return min(REDUCE_BUCKET, trainable_numel)


def gradient_bucket_bytes(trainable_numel: int, itemsize: int, stage: int) -> int:
    """DeepSpeed's gradient buckets, allocated whole on the device in the training dtype: one under ZeRO-3,
    two under ZeRO-2 with ``overlap_comm``."""
    return gradient_bucket_elements(trainable_numel) * itemsize * (2 if stage == 2 else 1)


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


def offload_terms(held: RankBytes, hw: Hardware, work: Workload, accumulation: int, gathered: int,
                  offload: str) -> tuple[dict, int, int]:
    """(GPU bytes of the model state, offloaded bytes per rank, PCIe bytes per step) under ``offload``.

    offload_param: DeepSpeed keeps every partition in pinned CPU memory, in the parameter's own dtype
    (DeepSpeed 0.19.8 ``partition_parameters._partition_param``: ``torch.empty(partition_size,
    dtype=param.dtype, device=cpu)``; its all-gather copies ``ds_tensor`` to the GPU in that dtype, so
    int8 and uint8 partitions are moved as bytes), and copies a rank's partition of each gathered tensor
    to the GPU at every gather; persistent tensors stay whole on the GPU. offload_optimizer: the gradient
    partition, fp32 master and Adam moments live in CPU memory, plus a persistent fp32 gradient partition
    (docs/MEMORY.md); each micro-batch's reduced gradient partition goes down, the updated partition up.
    """
    params_off, optimizer_off = "param" in offload, "optimizer" in offload
    state = {"base": held.frozen_persistent if params_off else held.frozen,
             "adapters": held.trainable_persistent if params_off else held.trainable,
             "optimizer": 0 if optimizer_off else held.optimizer}
    host = pcie = 0
    if params_off:
        host += held.params - held.frozen_persistent - held.trainable_persistent
        pcie += accumulation * gathered // hw.world
    if optimizer_off:
        host += held.optimizer + FP32 * held.trainable_owned
        pcie += (accumulation + 1) * held.trainable_owned * work.itemsize
    return state, host, pcie


def evaluate(shape: ModelShape, held: RankBytes, hw: Hardware, work: Workload, micro: int,
             checkpointing: bool, offload: str = "none") -> Choice:
    per_gpu = work.global_batch // hw.world
    accumulation = per_gpu // micro
    # Per micro-batch: the base and adapters are all-gathered for the forward and again (less the tail
    # still gathered and the input embeddings) for the backward; a ring receives (W-1)/W of them.
    # Adapter gradients are reduce-scattered.
    gathered = held.gathered + backward_gather_bytes(shape, held, work.itemsize, work.base)
    state, host, pcie_bytes = offload_terms(held, hw, work, accumulation, gathered, offload)
    memory = {
        f"{base_name(work.base, work.itemsize)} base shard": state["base"],
        "adapter shard": state["adapters"],
        "optimizer state": state["optimizer"],
        "activations": activation_bytes(shape, micro, work.seq_len, work.itemsize, checkpointing),
        "logits": logits_bytes(shape, micro, work.seq_len, work.itemsize),
        "all-gather working set": gather_working_set(shape, work.itemsize, hw.world, work.base, "param" in offload),
        "gradient bucket": gradient_bucket_bytes(held.trainable_numel, work.itemsize,
                                                 planned_zero_stage(hw.world, offload, work.base)),
        "reserved": int(hw.reserve_gib * GIB),
    }
    tokens = per_gpu * work.seq_len
    compute = step_flops(shape, held.trainable_numel, tokens, work.seq_len, checkpointing) / (
        hw.peak_tflops * 1e12 * hw.efficiency)
    dequant = accumulation * dequant_bytes(shape, work.base, work.itemsize, checkpointing) / (hw.hbm_gbs * 1e9)
    ring = (hw.world - 1) / hw.world
    comm_bytes = int(accumulation * ring * (gathered + held.trainable_numel * work.itemsize))
    comm = comm_bytes / (hw.link_gbs * 1e9)
    # Prefetching overlaps the all-gathers with compute: the slower of the two sets the pace. The PCIe
    # copies of offload run in the gathers (and the gradient path) they feed: counted with communication.
    pcie = pcie_bytes / (hw.pcie_gbs * 1e9)
    step = max(compute + dequant, comm + pcie)
    return Choice(micro, accumulation, checkpointing, memory, compute, dequant, comm, comm_bytes, step,
                  offload, host, pcie_bytes, pcie)


def choose(shape: ModelShape, held: RankBytes, hw: Hardware, work: Workload) -> tuple[Choice, list[Choice]]:
    """The fastest (micro-batch, checkpointing) that fits with the least CPU offload that lets anything
    fit (offload costs host memory and PCIe time, so it is used only where needed), and every candidate
    considered.

    If nothing fits, the smallest-memory candidate is returned (its total exceeds the GPU or the host).
    """
    if work.global_batch % hw.world:
        good = ", ".join(str(hw.world * k) for k in (1, 2, 4, 8))
        raise PlanError(f"--global-batch {work.global_batch} is not a multiple of the {hw.world} GPUs "
                        f"(data parallel over every GPU); use e.g. {good}")
    per_gpu = work.global_batch // hw.world
    candidates = [evaluate(shape, held, hw, work, micro, ckpt, offload) for offload in OFFLOADS
                  for micro in range(1, per_gpu + 1) if per_gpu % micro == 0 for ckpt in (False, True)]
    for offload in OFFLOADS:
        fitting = [c for c in candidates if c.offload == offload and c.fits(hw)]
        if fitting:
            return min(fitting, key=lambda c: (c.step_s, c.total_bytes)), candidates
    return min(candidates, key=lambda c: (c.total_bytes, c.host_bytes)), candidates


@dataclass(frozen=True)
class LoadCost:
    """What every job start, and so every requeue, reads and moves before its first step.

    The loader (``quant/loader.py``) has the ranks take turns: of every N modules, rank i reads and
    quantizes the i-th, so the job reads each stored tensor once and each rank about 1/N of the checkpoint.
    Rank 0 receives what the others quantized, and ``zero.Init`` broadcasts it: every other rank receives
    the base as stored, whole, and keeps its 1/N. A requeued job then also reads its newest checkpoint: each
    rank its own optimizer partition (fp32 master and Adam moments) and the adapter.
    """

    checkpoint_bytes: int  # read from disk once in all, about 1/N by each rank
    to_rank_0_bytes: int  # received by rank 0: what the other ranks read and quantized
    broadcast_bytes: int  # received by each other rank
    resume_bytes: int  # read by each rank at a requeue
    read_s: float  # each node reads its ranks' share
    to_rank_0_s: float
    broadcast_s: float
    quantized_per_rank: int  # dense weights each rank quantizes (its turns' share)
    quantize_s: float  # on a GPU with the copies of the dense weights to it

    @property
    def seconds(self) -> float:
        """Reading, quantizing, sending to rank 0 and broadcasting run one turn of modules after the other, so
        their times add up."""
        return self.read_s + self.quantize_s + self.to_rank_0_s + self.broadcast_s


def load_cost(shape: ModelShape, held: RankBytes, hw: Hardware, base: QuantizationConfig | None,
              checkpoint_itemsize: int = 2, adapter_itemsize: int = 2) -> LoadCost:
    """``LoadCost`` for a checkpoint of ``checkpoint_itemsize``-byte floats (bf16 safetensors: 2) and adapters
    saved in ``adapter_itemsize``-byte elements; each rank quantizes its share at ``quantize_gws``."""
    checkpoint = shape.total_params() * checkpoint_itemsize
    broadcast = held.frozen_stored if hw.world > 1 else 0
    to_rank_0 = broadcast * (hw.world - 1) // hw.world
    resume = held.trainable_owned * MASTER_AND_ADAM_BYTES + held.trainable_numel * adapter_itemsize
    quantized = math.ceil(held.quantized_numel / hw.world)
    quantize_s = 0.0
    if base is not None:
        quantize_s = quantized / (quantize_gws(hw, base.bits) * 1e9)
        if hw.accelerator == "gpu":
            quantize_s += quantized * checkpoint_itemsize / (hw.pcie_gbs * 1e9)
    return LoadCost(checkpoint, to_rank_0, broadcast, resume, checkpoint / hw.nodes / (hw.disk_gbs * 1e9),
                    to_rank_0 / (hw.link_gbs * 1e9), broadcast / (hw.link_gbs * 1e9), quantized, quantize_s)


def quantize_gws(hw: Hardware, bits: int) -> float:
    """Dense weights (G/s) each rank quantizes at load, where ``hw``'s ranks run: ``CPU_QUANTIZE_GWS`` by
    ``bits`` (an int8 embedding under a 4-bit base at the 4-bit rate: an overestimate of a few percent), or
    ``GPU_QUANTIZE_GWS``."""
    return CPU_QUANTIZE_GWS[bits] if hw.accelerator == "cpu" else GPU_QUANTIZE_GWS


def steps_for(work: Workload) -> int:
    return math.ceil(work.tokens / (work.global_batch * work.seq_len))
