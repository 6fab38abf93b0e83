"""LoRA: ``y = base(x) + scale * (dropout(x) A^T) B^T`` (Hu et al., 2021, arXiv:2106.09685).

``scale = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, arXiv:2312.03732). ``A`` is Kaiming-uniform
and ``B`` zero, so the adapted model equals the base at step 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peft_dist.adapters.base import AdapterConfig, AdapterModule
from peft_dist.adapters.inject import inject_linear_delta
from peft_dist.adapters.registry import register
from peft_dist.config.schema import require


@dataclass
class LoraConfig(AdapterConfig):
    """r: rank; alpha: scaling numerator; rslora: scale by alpha/sqrt(r); dropout: on the adapter input."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r >= 1, "r", f"got {self.r}; the rank must be >= 1")
        require(0.0 <= self.dropout < 1.0, "dropout", f"got {self.dropout}; must be in [0, 1)")


class LoraDelta(AdapterModule):
    """The low-rank update of one linear layer."""

    mergeable = True

    def __init__(self, d_out: int, d_in: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        return ((x @ self.A.t()) * self.scale) @ self.B.t()  # scaled at rank r, not at d_out

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


@register("lora", LoraConfig)
def inject_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    return inject_linear_delta(model, config, lambda d_out, d_in: LoraDelta(
        d_out, d_in, config.r, config.alpha, config.dropout, config.rslora))
