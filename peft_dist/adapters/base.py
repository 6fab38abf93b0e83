"""The common adapter interface.

Two kinds of module exist:

* ``AdapterModule``: every module peft-dist injects derives from it. Its parameters are the trainable
  ones; ``adapter_state_dict`` is what the adapter-only checkpoint stores for it (a method may export
  a compact or folded form, e.g. AdaLoRA's pruned triplets or prefix tuning without its MLP).
* ``AdaptedLinear``: a frozen base linear (``nn.Linear``, GPT-2 ``Conv1D`` or a quantized linear) plus named
  *linear deltas* (LoRA, AdaLoRA, KronA): ``y = base(x) + sum_k delta_k(x)``. A linear delta is an
  ``AdapterModule`` with ``delta_weight()`` so that it can be merged into the base.

Adapter math never touches distributed or quantization code: the base is only called, and dense
weights are read through ``dense_weight`` for merging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.config.schema import TrainConfig, require
from peft_dist.targets import QuantizedLinear


@dataclass
class AdapterConfig:
    """Fields every method shares.

    name: the adapter's name in the model and the checkpoint (defaults to the method name).
    target_modules: a list of module-name suffixes (``q_proj``), a regex matched against full module
        names, or ``all-linear`` (every decoder linear; not lm_head).
    """

    name: str = ""
    target_modules: Any = "all-linear"

    method = ""  # set by ``register``; a class attribute, not a config field

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.method
        require(self.name.isidentifier(), "name",
                f"got {self.name!r}; use letters, digits and underscores (it becomes a module name)")
        require(isinstance(self.target_modules, (str, list)), "target_modules",
                "use 'all-linear', a list of module-name suffixes or a regex string")

    def check_training(self, train: TrainConfig) -> None:
        """Checks that need the ``train`` section (e.g. a schedule within ``max_steps``); run at load time."""


class AdapterModule(nn.Module):
    """Base of every injected module. Subclasses set ``mergeable`` and, if so, ``delta_weight``."""

    mergeable: bool = False

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the adapter-only checkpoint, keyed relative to this module."""
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``adapter_state_dict``; strict, so a wrong adapter is refused."""
        self.load_state_dict(state, strict=True)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight update this module adds (mergeable methods only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into a linear weight")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear-like module, whatever its storage layout."""
    if isinstance(module, (nn.Linear, QuantizedLinear)):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):  # GPT-2 stores W^T: weight is (d_in, d_out)
        return module.nf, module.nx
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype an adapter on ``module`` takes: that of its first floating-point parameter, where a
    quantized linear counts by its ``dtype`` (a 4-bit linear keeps its block statistics in float32 whatever
    the model's dtype)."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            return m.dtype
        own = [p.dtype for p in m.parameters(recurse=False) if p.is_floating_point()]
        if own:
            return own[0]
    raise TypeError(f"{type(module).__name__} has no floating-point parameter to take a dtype from")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight of a linear-like module in floating point (dequantized if quantized)."""
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight()
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


class AdaptedLinear(nn.Module):
    """A frozen base linear plus named linear deltas; mergeable into a dense base."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.out_features, self.in_features = linear_dims(base)
        self.deltas = nn.ModuleDict()
        self.merged: list[str] = []

    def add_delta(self, name: str, delta: AdapterModule) -> None:
        if name in self.deltas:
            raise ValueError(f"adapter {name!r} is already attached; give each adapter its own name")
        self.deltas[name] = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, delta in self.deltas.items():
            if name not in self.merged:
                y = y + delta(x).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every delta into the base weight. A quantized base is first dequantized to a float linear,
        so merging is exact and ``unmerge`` restores the unmerged function up to rounding."""
        if isinstance(self.base, QuantizedLinear):
            self.base = self.base.to_linear()
        for name, delta in self.deltas.items():
            if name not in self.merged:
                self._add_to_weight(delta.delta_weight(), +1.0)
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.merged):
            self._add_to_weight(self.deltas[name].delta_weight(), -1.0)
        self.merged.clear()

    def _add_to_weight(self, delta: torch.Tensor, sign: float) -> None:
        if not torch.isfinite(delta).all():
            raise FloatingPointError("adapter delta has non-finite values; refusing to merge it")
        weight = self.base.weight
        update = delta.t() if isinstance(self.base, Conv1D) else delta
        weight.add_(update.to(weight.dtype), alpha=sign)
