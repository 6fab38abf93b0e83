"""AdaLoRA's importance where the tensors live: on each rank's ZeRO-3 shard, with one small all-reduce.

Under ZeRO-3 every parameter is flattened, padded to a multiple of the world size and split: the rank
with partition index ``q`` owns flat elements ``[q * p, (q + 1) * p)`` (``p = param.partition_numel()``)
and ``p.grad`` is None. Gradients and fp32 parameters are read from the owned shard with DeepSpeed's
local API (``safe_get_local_grad`` / ``safe_get_local_fp32_param``: no communication). Element scores
stay local; each rank adds them into per-triplet partial sums and ONE all-reduce (SUM) of ``b0`` floats
gives every rank the same triplet scores. Without ZeRO-3 (plain PyTorch, ZeRO 0/1/2) each rank sees
whole, already averaged gradients, computes identical scores and nothing extra is communicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from peft_dist.distributed.zero3 import is_partitioned


@dataclass(frozen=True)
class LocalShard:
    """The owned flat range ``[start, start + numel)`` of a parameter; padding is excluded."""

    start: int
    numel: int
    partitioned: bool


def local_shard(param: torch.Tensor) -> LocalShard:
    if not is_partitioned(param):
        return LocalShard(0, param.numel(), False)
    size = param.partition_numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    numel = max(0, min(size, param.ds_numel - start))  # the last ranks may hold only padding
    return LocalShard(min(start, param.ds_numel), numel, True)


def local_device(param: torch.Tensor) -> torch.device:
    """Where this rank's elements of ``param`` live (its ZeRO-3 partition, or the tensor itself)."""
    return param.ds_tensor.device if is_partitioned(param) else param.device


def read_grad(param: torch.Tensor) -> torch.Tensor:
    """This rank's gradient elements (flat fp32 copy), reduced over data-parallel ranks, still loss-scaled."""
    shard = local_shard(param)
    if shard.partitioned:
        from deepspeed.utils import safe_get_local_grad

        grad = safe_get_local_grad(param)
        return (torch.zeros(shard.numel, device=local_device(param)) if grad is None
                else grad.reshape(-1)[:shard.numel].float().clone())
    grad = param.grad
    if grad is None and (hasattr(param, "_hp_mapping") or getattr(param, "_hp_grad", None) is not None):
        from deepspeed.utils import safe_get_full_grad  # ZeRO 1/2, bf16 optimizer: assembles (a collective)

        grad = safe_get_full_grad(param)
    return (torch.zeros(shard.numel, device=local_device(param)) if grad is None
            else grad.detach().reshape(-1).float().clone())


def read_param(param: torch.Tensor) -> torch.Tensor:
    """This rank's parameter elements from the fp32 master copy (flat)."""
    shard = local_shard(param)
    if shard.partitioned:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param).reshape(-1)[:shard.numel].float()
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).reshape(-1).float()
    return param.detach().reshape(-1).float()


def loss_scale(engine: Any) -> float:
    """The fp16 loss scale the gradients still carry (1 for fp32 / bf16 or without an engine)."""
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", 1.0) if engine is not None else 1.0
    return float(scale) if scale else 1.0


def grad_norm_before_step(engine: Any) -> float | None:
    """The global gradient norm when DeepSpeed will not report it (plain fp32 ZeRO-0: whole grads here)."""
    if engine is None or engine.gradient_clipping() <= 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads or any(is_partitioned(p) for p in engine.module.parameters()):
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def clip_factor(engine: Any, norm_before: float | None) -> float:
    """The factor DeepSpeed's step applied to the gradients: ``min(1, max_norm / (norm + 1e-6))``.

    Importance uses the step's clipped gradient (reference semantics) although ``engine.step()``
    clips internally: the unclipped shard is kept before the step and scaled by this afterwards.
    """
    if engine is None or engine.gradient_clipping() <= 0:
        return 1.0
    norm = engine.get_global_grad_norm()
    norm = norm_before if norm is None else float(norm)
    if norm is None:
        raise RuntimeError("cannot tell how DeepSpeed clipped this step's gradients (no global grad norm)")
    return min(1.0, engine.gradient_clipping() / (norm + 1e-6))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def triplet_index(kind: str, shape: tuple[int, ...], start: int, numel: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """Triplet of each flat element ``f`` in ``[start, start + numel)`` and the weight that makes a mean.

    ``lam (r0,)``: ``f``; ``Q (r0, d_in)``: row ``f // d_in``, weight ``1/d_in``; ``P (d_out, r0)``:
    column ``f % r0``, weight ``1/d_out``. ``shape`` is the tensor's full shape.
    """
    flat = torch.arange(start, start + numel, device=device)
    if kind == "lam":
        return flat, 1.0
    if kind == "Q":
        return flat // shape[1], 1.0 / shape[1]
    if kind == "P":
        return flat % shape[1], 1.0 / shape[0]
    raise ValueError(f"unknown AdaLoRA tensor kind {kind!r}; expected P, lam or Q")


def add_triplet_sums(out: torch.Tensor, param: torch.Tensor, kind: str, offset: int,
                     element_scores: torch.Tensor) -> None:
    """``index_add`` this rank's element scores of ``param`` into ``out[offset + triplet]``."""
    shard = local_shard(param)
    index, weight = triplet_index(kind, full_shape(param), shard.start, shard.numel, out.device)
    out.index_add_(0, index + offset, element_scores.to(out.dtype) * weight)


def sum_over_shards(partial: torch.Tensor, params: list[torch.Tensor]) -> int:
    """All-reduce (SUM) ``partial`` in place when the parameters are ZeRO-3 shards; returns bytes sent.

    Every rank must call this at the same step (it is a collective whenever any rank has shards).
    """
    if not any(is_partitioned(p) for p in params) or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    dist.all_reduce(partial, op=dist.ReduceOp.SUM)
    return partial.numel() * partial.element_size()


def full_gather_bytes(params: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> int:
    """Bytes one rank receives if every gradient is gathered whole (``safe_get_full_grad``, as peft does)."""
    return sum(int(torch.Size(full_shape(p)).numel()) for p in params) * dtype.itemsize


@torch.no_grad()
def write_lam_mask(param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the pruned entries of ``lam`` in every copy the next forward reads.

    ZeRO-3: the fp32 master shard (``safe_set_local_fp32_param``) and the low-precision shard
    (``ds_tensor``, which the next all-gather sends); any whole resident copy (a persistent parameter,
    or no ZeRO-3 at all) directly; ZeRO 1/2's fp32 master through ``safe_set_full_fp32_param``.
    """
    mask = keep.reshape(-1).float().to(local_device(param))
    shard = local_shard(param)
    if shard.partitioned:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local_mask = mask[shard.start: shard.start + shard.numel]
        master = safe_get_local_fp32_param(param).clone()
        master.reshape(-1)[:shard.numel] *= local_mask
        safe_set_local_fp32_param(param, master)
        param.ds_tensor.data.reshape(-1)[:shard.numel] *= local_mask.to(param.ds_tensor.dtype)
    elif hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        safe_set_full_fp32_param(param, safe_get_full_fp32_param(param) * mask.reshape(param.shape))
    if param.data.numel() == mask.numel():  # a whole copy is resident
        param.data.mul_(mask.to(param.dtype).reshape(param.data.shape))


def gather_full(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole flat tensor from each rank's owned elements of ``param``'s layout (a collective)."""
    shard = local_shard(param)
    if not shard.partitioned or dist.get_world_size(group=param.ds_process_group) == 1:
        return local.clone()
    size = param.partition_numel()
    padded = torch.zeros(size, dtype=local.dtype, device=local.device)
    padded[:shard.numel] = local
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group=param.ds_process_group))]
    dist.all_gather(parts, padded, group=param.ds_process_group)
    return torch.cat(parts)[:param.ds_numel]


def local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Inverse of ``gather_full``: this rank's owned elements of a whole flat tensor."""
    shard = local_shard(param)
    return full.reshape(-1)[shard.start: shard.start + shard.numel].clone()
