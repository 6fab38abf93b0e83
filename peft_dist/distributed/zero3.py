"""DeepSpeed config assembly and the few ZeRO-3 helpers the rest of the code needs."""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from peft_dist.config.load import flatten
from peft_dist.config.schema import ConfigError, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size
T = TypeVar("T")


def resolve_ds_config_path(path: str) -> Path:
    """A DeepSpeed JSON path, relative to the working directory or else to the repository root."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed.config: no such file {path!r}; see ds_configs/ for maintained configs")


def _set_dotted(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config for this run: the JSON file plus batch, precision and clipping from ``train``.

    Batch sizes always come from ``train`` so the global batch is defined in one place.
    """
    path = resolve_ds_config_path(cfg.deepspeed.config)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    batch_keys = sorted({"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
                        & set(config))
    if batch_keys:
        raise ConfigError(f"deepspeed.config: {path} sets {batch_keys[0]}; batch sizes come from train.micro_batch_size "
                          "and train.gradient_accumulation_steps (global batch = their product x world size), "
                          "remove it from the DeepSpeed file")
    train = cfg.train
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    config["train_batch_size"] = train.micro_batch_size * train.gradient_accumulation_steps * world_size
    config["gradient_clipping"] = train.grad_clip
    config["bf16"] = {"enabled": train.precision == "bf16"}
    # fp16: dynamic loss scaling from 2^16, halved on overflow (the step is then skipped by DeepSpeed).
    config["fp16"] = ({"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1} if train.precision == "fp16" else {"enabled": False})
    config.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        config["zero_optimization"]["stage"] = cfg.deepspeed.zero_stage
    # Nested and dotted overrides both merge key by key: {"zero_optimization": {"stage": 2}} keeps the
    # section's other keys.
    for dotted, value in flatten(cfg.deepspeed.overrides).items():
        _set_dotted(config, dotted, value)
    return config


def with_gradient_bucket(ds_config: dict, trainable_numel: int) -> dict:
    """``ds_config`` with ``zero_optimization.reduce_bucket_size`` at most ``trainable_numel`` elements.

    DeepSpeed allocates its gradient bucket whole on the device: under ZeRO-3 one per gradient dtype when the
    engine is built, under ZeRO-1/2 at the first backward (two with ``overlap_comm``). Its default is 5e8
    elements, ds_configs/ set 5e7: 95 MiB of bf16 per GPU where LoRA trains a few million parameters. A bucket
    that holds every trainable element still takes all the gradients at once, so the reductions are the same.
    """
    config = copy.deepcopy(ds_config)
    zero = config.setdefault("zero_optimization", {})
    zero["reduce_bucket_size"] = max(1, min(int(float(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET))),
                                            trainable_numel))
    return config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (it then carries ``ds_id``)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(param, "ds_numel", param.numel())


def scalars_as_vectors(model: nn.Module) -> None:
    """Give every 0-dim parameter the shape (1,), in place, before DeepSpeed takes the model: its engine
    broadcasts (and ZeRO-3 partitions) parameters through a byte view, which a 0-dim tensor cannot take.
    Arithmetic is unchanged (a (1,) tensor broadcasts like a scalar); ``gathered`` shows such a parameter
    as a scalar again, so a checkpoint holds the shape the adapter declares (KronA^B_res's ``s_res``)."""
    for param in model.parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)
            param.declared_scalar = True


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ``params`` whole, in their declared shapes, inside the block: ZeRO-3 partitions are gathered
    (ordinary tensors are already whole) and ``scalars_as_vectors``' parameters are scalars again.

    With ``modifier_rank`` set, that rank's in-block writes are broadcast and re-partitioned on exit.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    scalars = [p for p in params if getattr(p, "declared_scalar", False)]
    with contextlib.ExitStack() as stack:
        if partitioned:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank))
        for param in scalars:
            param.data = param.data.reshape(())
        try:
            yield
        finally:
            for param in scalars:
                param.data = param.data.reshape(1)


def call_as_forward(module: nn.Module, compute: Callable[[], T]) -> T:
    """``compute()`` run as ``module``'s forward, through ``module.__call__``.

    Under ZeRO-3 a parameter is whole only while its module runs: DeepSpeed's module hooks gather it
    before the forward, release it after, and gather it again for the backward of what the forward
    returned. A term computed from parameters outside the forward (AdaLoRA's orthogonality penalty of
    P and Q) must therefore be computed inside a module call; this is that call, for any ``compute``.
    Without ZeRO-3 it is just ``compute()``.
    """
    module.forward = compute  # an instance attribute shadows the class's forward for this one call
    try:
        return module()
    finally:
        del module.forward


def optimizer_state(engine) -> dict:
    """A copy of the optimizer state DeepSpeed keeps for the adapters (Adam's moments and step counts, per
    parameter or ZeRO partition), to put back with ``restore_optimizer_state``."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    return {param: {key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
                    for key, value in state.items()} for param, state in inner.state.items()}


def restore_optimizer_state(engine, saved: dict) -> None:
    """Put back what ``optimizer_state`` copied, dropping state a later step created."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for param in list(inner.state):
        if param not in saved:
            del inner.state[param]
    for param, state in saved.items():
        inner.state[param] = state


def zero_gradients(params: list[nn.Parameter]) -> None:
    """Zero the reduced gradient each rank holds for ``params`` before the optimizer step.

    ZeRO-3 keeps it as a local shard, ZeRO-1/2 behind a fragment mapping, plain DDP in ``p.grad``;
    DeepSpeed's ``safe_*_grad`` accessors reach the first two (the ZeRO-1/2 one is a collective, so
    every rank must call this). Used to skip a step without desynchronising DeepSpeed's counters.
    """
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

    for param in params:
        if is_partitioned(param):
            grad = safe_get_local_grad(param)
            if grad is not None:
                safe_set_local_grad(param, torch.zeros_like(grad))
        elif getattr(param, "_hp_mapping", None) is not None:
            grad = safe_get_full_grad(param)
            if grad is not None:
                safe_set_full_grad(param, torch.zeros_like(grad))
        elif param.grad is not None:
            param.grad.zero_()
