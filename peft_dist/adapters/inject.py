"""Injecting adapters into a model, freezing everything else, and the adapter-only state.

Trainability is decided by free functions here, never inside a layer: ``inject_adapters`` freezes the
whole model first, and only adapter parameters (plus whatever a method like BitFit re-enables) train.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peft_dist.adapters.base import AdaptedLinear, AdapterModule, float_dtype, linear_dims
from peft_dist.adapters.registry import get_method
from peft_dist.targets import LINEAR_TYPES, find_modules, replace_module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def find_targets(model: nn.Module, targets: Any, accept: Callable[[nn.Module], bool], what: str,
                 key: str) -> list[tuple[str, nn.Module]]:
    """``find_modules`` outside the adapters injected so far (a parallel adapter's ``down`` is not a base
    linear, a prefix's ``mlp`` is not the FFN block); raises if nothing outside them matches."""
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, AdapterModule))
    return find_modules(model, targets, accept, what, key, skip=inside)


def inject_linear_delta(model: nn.Module, config: Any,
                        make_delta: Callable[[int, int], AdapterModule]) -> list[str]:
    """Attach ``make_delta(d_out, d_in)`` under ``config.name`` to every targeted linear.

    A linear already adapted by another method is reused, so methods compose on one layer.
    """
    adapted_names = {name for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    targets = find_targets(model, config.target_modules, lambda m: _is_linear(m) or isinstance(m, AdaptedLinear),
                           "linear layer", f"adapters[{config.name}].target_modules")
    names = []
    for name, module in targets:
        if any(name.startswith(a + ".") for a in adapted_names):
            continue  # the base linear inside an AdaptedLinear: the wrapper itself is adapted
        if not isinstance(module, AdaptedLinear):
            module = AdaptedLinear(module)
            replace_module(model, name, module)
        delta = make_delta(*linear_dims(module.base))
        module.add_delta(config.name, delta.to(float_dtype(module.base)))
        names.append(name)
    return names


def inject_adapters(model: nn.Module, configs: list) -> dict[str, list[str]]:
    """Freeze ``model`` and inject every configured adapter; returns adapter name -> adapted modules."""
    model.requires_grad_(False)
    injected = {}
    for config in configs:
        injected[config.name] = get_method(config.method).inject(model, config)
    return injected


def adapter_modules(model: nn.Module) -> dict[str, AdapterModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterModule)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter module's exported tensors plus trainable parameters outside adapters (BitFit); the
    tensors must be whole (``train.checkpoint.save_adapter`` gathers them)."""
    modules = adapter_modules(model)
    state = {}
    for name, module in modules.items():
        state.update({f"{name}.{k}": v for k, v in module.adapter_state_dict().items()})
    inside = tuple(n + "." for n in modules)
    for name, param in model.named_parameters():
        if param.requires_grad and not name.startswith(inside):
            state[name] = param.detach()
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``adapter_state_dict``; refuses missing or unexpected tensors."""
    remaining = dict(state)
    for name, module in adapter_modules(model).items():
        prefix = name + "."
        own = {k[len(prefix):]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
        module.load_adapter_state_dict(own)
    params = dict(model.named_parameters())
    for name in list(remaining):
        if name in params and params[name].requires_grad:
            params[name].copy_(remaining.pop(name))
    if remaining:
        raise ValueError(f"checkpoint holds tensors this model has no adapter for: {sorted(remaining)[:5]}; "
                         "was it saved with a different adapter config?")
