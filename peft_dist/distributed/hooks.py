"""Per-step work an adapter method asks of the trainer, where it needs what DeepSpeed holds (gradients
before the step, the clip factor, parameter shards): kept here, apart from the adapter math.

The trainer calls, per optimizer step ``step`` (counted from 1): ``extra_loss`` on every micro-batch
(added to the loss, so DeepSpeed divides it by the accumulation steps like the loss); ``before_step`` at
the accumulation boundary after the last backward, gradients reduced and not yet applied; ``after_step``
after ``engine.step()``. ``state_dict`` is saved with every checkpoint and restored on resume;
``metrics`` goes to the tracker at each logging interval.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from peft_dist.distributed.adalora import make_adalora_hook


class TrainHook(Protocol):
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...

    def before_step(self, engine: Any, step: int) -> None: ...

    def after_step(self, engine: Any, step: int) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# method -> builder of its hook from (model after injection, the adapter's config, total optimizer steps)
HOOK_BUILDERS: dict[str, Callable[[nn.Module, Any, int], TrainHook]] = {"adalora": make_adalora_hook}


def make_hooks(model: nn.Module, adapters: list, total_steps: int) -> list[TrainHook]:
    """The per-step hooks of the injected ``adapters`` that have one (AdaLoRA's budget), in order."""
    return [HOOK_BUILDERS[a.method](model, a, total_steps) for a in adapters if a.method in HOOK_BUILDERS]
