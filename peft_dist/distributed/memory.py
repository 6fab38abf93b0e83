"""Memory: this process's resident set and its peak (read by the loader, the tracker, bench/ and tests), how
freed buffers leave it (``return_freed_buffers_to_the_os``), and per-rank model-state memory under ZeRO-3:
the analytic formula and what an engine really holds.

Model state = parameters + gradients + optimizer state (activations, communication buckets and
prefetch buffers are not model state and are not counted). With a frozen int8 base and adapters, the
formula per rank for ``N`` ranks is (derived from DeepSpeed 0.19.8 ``runtime/zero/stage3.py``, see
docs/MEMORY.md)::

    frozen:   sum over frozen parameters of numel x bytes(dtype at run time) / N
              (int8 weights 1 byte; scales, biases, embeddings, lm_head, norms 4 in fp32, 2 in bf16)
    persistent: a tensor with numel <= stage3_param_persistence_threshold is also kept whole on every
              rank after its first use: + numel x bytes, not divided by N
    adapters: numel x (param + grad + fp32 master + Adam m and v) / N
              bf16: 2 + 2 + 4 + 8 = 16 bytes; fp32: 4 + 4 + 4 + 8 = 20 bytes. DeepSpeed keeps a
              separate fp32 master even for fp32 parameters: its no-copy branch compares
              ``tensor.device == self.device`` with ``self.device`` a string, never equal to a
              ``torch.device``. With the optimizer offloaded it also keeps a persistent fp32 gradient
              partition for the CPU optimizer: +4 bytes.
"""
from __future__ import annotations

import ctypes
import gc
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import psutil
import torch
from torch import nn

PARAM_BYTES = {"fp32": 4, "bf16": 2}  # what DeepSpeed casts floating-point parameters to
MASTER_BYTES = 4  # DeepSpeed's fp32 master partition
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32 each


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of model state one rank holds, by kind."""

    frozen: float  # local partitions of frozen parameters (int8 base, scales, embeddings, norms, ...)
    adapter_params: float  # local partitions of trainable parameters, in the training precision
    gradients: float  # gradient partitions of trainable parameters
    master: float  # fp32 master partitions that are separate tensors from the parameters
    optimizer: float  # optimizer state tensors (Adam: exp_avg, exp_avg_sq)

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def analytic_model_state_bytes(model: nn.Module, world_size: int, precision: str,
                               offload_optimizer: bool = False,
                               persistence_threshold: int = 0) -> ModelStateBytes:
    """Expected per-rank model-state bytes of ``model`` (adapters injected, before DeepSpeed) under ZeRO-3.

    Args:
        model: the model whose ``requires_grad`` parameters are the adapters.
        world_size: number of ranks ``N`` every tensor is partitioned over.
        precision: ``fp32`` or ``bf16`` (the trainer's ``train.precision``).
        offload_optimizer: ZeRO-3 with ``offload_optimizer`` (ds_configs/zero3_offload.json).
        persistence_threshold: ``stage3_param_persistence_threshold`` (its global cap
            ``stage3_model_persistence_threshold`` is assumed unlimited, DeepSpeed's default).
    Returns:
        Exact fractions ``numel x bytes / N`` (DeepSpeed pads each tensor to a multiple of ``N``).
    Raises:
        ValueError: an unknown precision, a world size below 1 or a negative threshold.
    """
    if persistence_threshold < 0:
        raise ValueError(f"persistence_threshold: got {persistence_threshold}; must be >= 0")
    if precision not in PARAM_BYTES:
        raise ValueError(f"precision: got {precision!r}; use one of {sorted(PARAM_BYTES)}")
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size}; must be >= 1")
    param_bytes = PARAM_BYTES[precision]
    frozen, adapter, trainable = 0.0, 0.0, 0
    for param in model.parameters():
        numel = param.numel()
        size = param_bytes if param.is_floating_point() else param.element_size()
        held = numel * size / world_size + (numel * size if numel <= persistence_threshold else 0)
        if param.requires_grad:
            adapter += held
            trainable += numel
        else:
            frozen += held
    grad = param_bytes + (4 if offload_optimizer else 0)
    return ModelStateBytes(frozen=frozen, adapter_params=adapter,
                           gradients=trainable * grad / world_size,
                           master=trainable * MASTER_BYTES / world_size,
                           optimizer=trainable * ADAM_STATE_BYTES / world_size)


def measured_model_state_bytes(engine) -> ModelStateBytes:
    """The model-state bytes this rank's ZeRO-3 engine actually holds, read from its tensors.

    Walks every parameter's local partition (``ds_tensor``, plus the whole tensor of a persistent
    parameter and any secondary partition), the optimizer's gradient partitions, its fp32 partitions
    where they are not the parameters themselves, and the inner optimizer's state. Call it after at
    least one ``engine.step()``: torch's Adam creates its state lazily.

    Raises:
        ValueError: the engine is not ZeRO stage 3.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        raise ValueError(f"measured_model_state_bytes reads ZeRO-3 partitions; this engine's optimizer is "
                         f"{type(optimizer).__name__}. Set zero_optimization.stage=3 (ds_configs/zero3.json)")
    frozen, adapter = 0, 0
    for param in engine.module.parameters():
        local = _tensor_bytes(param.ds_tensor) + _tensor_bytes(getattr(param, "ds_secondary_tensor", None))
        if param.ds_persist:  # resident whole on every rank besides its partition
            local += _tensor_bytes(param.data)
        if param.requires_grad:
            adapter += local
        else:
            frozen += local
    gradients = _tensor_bytes(optimizer.grad_partitions_flat_buffer)
    gradients += sum(_tensor_bytes(flat.grad) for flat in optimizer.fp32_partitioned_groups_flat)
    master = sum(_tensor_bytes(flat) for flat, low in zip(optimizer.fp32_partitioned_groups_flat,
                                                          optimizer.fp16_partitioned_groups_flat)
                 if low is None or flat.data_ptr() != low.data_ptr())
    state = sum(_tensor_bytes(value) for per_param in optimizer.optimizer.state.values()
                for value in per_param.values() if torch.is_tensor(value))
    return ModelStateBytes(frozen=frozen, adapter_params=adapter, gradients=gradients, master=master,
                           optimizer=state)


def resident_bytes() -> tuple[int, int]:
    """This process's resident set now, and its private part: the resident set minus file-backed shared
    pages (a checkpoint read through mmap counts in the resident set although the kernel may drop it)."""
    info = psutil.Process().memory_info()
    return info.rss, info.rss - info.shared


def settled_rss_bytes(ds_config: dict) -> int:
    """The resident set once DeepSpeed's one-time ZeRO setup (its first ``zero.Init``, a few hundred MiB
    of imports and buffers) is done: the baseline that a measured run's own memory is counted from."""
    import deepspeed

    deepspeed.zero.Init(module=nn.Linear(2, 2), config_dict_or_path=ds_config)
    gc.collect()
    return resident_bytes()[0]


def peak_rss_bytes() -> int:
    """The process's peak resident set (Linux ``VmHWM``) since it started or since ``reset_peak_rss``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is read from Linux's /proc")


MMAP_THRESHOLD_BYTES = 64 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_buffers_to_the_os() -> None:
    """Serve every allocation above 64 KiB from its own mapping, unmapped when freed, as
    ``MALLOC_MMAP_THRESHOLD_=65536`` would. glibc otherwise raises its threshold to the largest block freed,
    so the buffers of loading and of ZeRO-3's gathers come from a heap that fragments and never shrinks:
    measured on 2 CPU ranks with a 1.1B int8 base, the first forward left 0.83 GiB resident that the next
    layer's gathers did not reuse (docs/SCALING.md). A no-op where the C library is not glibc."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def reset_peak_rss() -> None:
    """Restart ``peak_rss_bytes`` from the current resident set: after loading, the checkpoint's mmap'd
    pages (page cache, not memory the run holds) stop counting in the peak."""
    Path("/proc/self/clear_refs").write_text("5")
