"""MAM adapter ("mix-and-match", He et al., 2022, arXiv:2110.04366): prefix tuning on the attention plus a
scaled parallel adapter on the FFN, as one preset composed from ``prefix`` and ``parallel_adapter``.

The two parts are injected as adapters named ``<name>_prefix`` and ``<name>_ffn``, so the checkpoint keeps
them apart. Defaults are the paper's summarization / translation setting (l = 30, r = 512, s = 4, about
6.7% extra parameters at BART-large scale, matching full fine-tuning); its smaller GLUE setting was
l = 16, r = 16, s = 2, and on a tiny model r should stay near the hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peft_dist.adapters.base import AdapterConfig
from peft_dist.adapters.bottleneck import ParallelAdapterConfig, inject_parallel_adapter
from peft_dist.adapters.prefix import PrefixConfig, inject_prefix
from peft_dist.adapters.registry import register
from peft_dist.config.schema import require


@dataclass
class MamConfig(AdapterConfig):
    """prefix_length: ``l`` of the attention prefix; reparameterize, hidden: its training MLP; gate: start the
    prefix as an exact no-op through a zero-initialised gate (see prefix; the FFN adapter already starts at
    zero, so the whole preset then does). r, scale: width and multiplier ``s`` of the FFN parallel adapter.
    target_modules must stay ``auto``: each part uses its own automatic targets (configure prefix /
    parallel_adapter separately otherwise)."""

    target_modules: Any = "auto"
    prefix_length: int = 30
    reparameterize: bool = True
    hidden: int = 800
    gate: bool = False
    r: int = 512
    scale: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.target_modules == "auto", "target_modules",
                "MAM places its parts itself (prefix on attention, adapter on FFN); leave it unset, or list "
                "a prefix and a parallel_adapter adapter to target other modules")
        require(self.prefix_length >= 1, "prefix_length", f"got {self.prefix_length}; use at least 1")
        require(self.hidden >= 1, "hidden", f"got {self.hidden}; the MLP width must be >= 1")
        require(self.r >= 1, "r", f"got {self.r}; the bottleneck width must be >= 1")

    def parts(self) -> tuple[PrefixConfig, ParallelAdapterConfig]:
        return (PrefixConfig(name=f"{self.name}_prefix", length=self.prefix_length,
                             reparameterize=self.reparameterize, hidden=self.hidden, gate=self.gate),
                ParallelAdapterConfig(name=f"{self.name}_ffn", r=self.r, scale=self.scale, sublayer="ffn"))


@register("mam", MamConfig)
def inject_mam(model: nn.Module, config: MamConfig) -> list[str]:
    prefix_config, ffn_config = config.parts()
    return inject_prefix(model, prefix_config) + inject_parallel_adapter(model, ffn_config)
