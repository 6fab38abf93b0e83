"""Finding modules by name and replacing them: the only model surgery peft-dist does."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.config.schema import ConfigError


@runtime_checkable
class QuantizedLinear(Protocol):
    """A frozen linear stored quantized (``peft_dist.quant``'s ``Int8Linear``, ``FourBitLinear``) that knows
    its shape, its floating-point dtype (that of its bias, its dequantized weight and the adapters put on it)
    and how to dequantize itself, so that code above it (adapters, export) needs no quantization import."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    dtype: torch.dtype

    def dequantized_weight(self) -> torch.Tensor: ...

    def to_linear(self) -> nn.Linear: ...


@runtime_checkable
class QuantizedEmbedding(Protocol):
    """A frozen token or position embedding stored quantized (``peft_dist.quant``'s ``Int8Embedding``), whose
    table export reads back in floating point without a quantization import."""

    num_embeddings: int
    embedding_dim: int
    dtype: torch.dtype

    def dequantized_weight(self) -> torch.Tensor: ...


def float_linear(module: QuantizedLinear) -> nn.Linear:
    """A frozen float ``nn.Linear`` equal to a quantized linear: its ``to_linear`` (merging and export)."""
    weight = module.dequantized_weight()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=weight.dtype,
                       device=weight.device)
    linear.weight.data.copy_(weight)
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.detach())
    linear.requires_grad_(False)
    return linear


LINEAR_TYPES = (nn.Linear, Conv1D, QuantizedLinear)
# Output heads are never adapted or quantized by "all-linear": they tie to embeddings and set the logits.
HEAD_NAMES = ("lm_head", "embed_out", "output")


def name_matches(name: str, targets: Any) -> bool:
    """``targets``: a list of suffixes (``q_proj`` matches ``...self_attn.q_proj``) or a full-name regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_modules(model: nn.Module, targets: Any, accept: Callable[[nn.Module], bool],
                 what: str, key: str, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """All ``(name, module)`` pairs whose name matches ``targets`` and that ``accept`` admits, except names
    starting with a prefix in ``skip``.

    ``all-linear`` means every accepted module outside the output head. Raises ``ConfigError`` naming ``key``
    and listing candidate names when nothing matches, because a silent no-op run wastes a whole job.
    """
    found = []
    for name, module in model.named_modules():
        if not accept(module) or name.startswith(skip):
            continue
        if targets == "all-linear":
            if name.split(".")[-1] not in HEAD_NAMES:
                found.append((name, module))
        elif name_matches(name, targets):
            found.append((name, module))
    if not found:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules()
                             if accept(m) and n and not n.startswith(skip)})
        raise ConfigError(
            f"{key}: {targets!r} matches no {what} in {type(model).__name__}. "
            f"Candidate names: {', '.join(candidates[:30]) or 'none'}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
