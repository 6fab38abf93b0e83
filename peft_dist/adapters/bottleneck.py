"""Sub-layer adapters of the unified view (He et al., 2022, arXiv:2110.04366) and KronA^B.

Every method here adds a function of a whole sub-layer (the attention block or the FFN block of a decoder
layer), not of one linear:

* parallel adapter (PA), from the sub-layer's input ``x``: ``h = sublayer(x) + s * up(relu(down(x)))``;
  ``s = 1`` is the plain PA, ``s = 4`` the paper's scaled PA (scaled addition beat plain addition);
* sequential adapters on the sub-layer's output ``h`` (before the residual add), each with its own
  residual: ``h <- h + up(relu(down(h)))``; Houlsby (Houlsby et al., 2019, arXiv:1902.00751) after the
  attention and after the FFN, Pfeiffer (Pfeiffer et al., 2021, arXiv:2005.00247) after the FFN only;
* KronA^B (Edalati et al., 2022, arXiv:2212.10650) in parallel with the whole FFN block:
  ``h = FFN(x) + s * x kron(A, B)^T``, and KronA^B_res which adds ``s_res * x`` with a learnable scalar
  ``s_res`` initialised to 1. The Kronecker math is ``krona.KronaDelta``; none of these are mergeable.

``AdaptedSublayer`` wraps the frozen sub-layer and calls it unchanged (Llama's attention takes keyword
arguments and returns a tuple; GPT-2's is called positionally; MLPs return a tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_dist.adapters.base import AdaptedLinear, AdapterConfig, AdapterModule, float_dtype
from peft_dist.adapters.krona import KronaDelta, factor_dim
from peft_dist.adapters.inject import find_targets
from peft_dist.adapters.registry import register
from peft_dist.config.schema import ConfigError, require
from peft_dist.targets import LINEAR_TYPES, replace_module

# Module-name suffixes of each sub-layer kind in Llama-style and GPT-2 models (target_modules: auto).
SUBLAYER_NAMES = {"attn": ["self_attn", "attn", "attention"], "ffn": ["mlp"]}  # Llama-style, GPT-2, GPT-NeoX


class Bottleneck(AdapterModule):
    """``s * up(dropout(relu(down(LN(x)))))``, LayerNorm optional.

    init ``lora``: down Kaiming-uniform, up and biases zero, so the module starts as an exact no-op.
    init ``bert``: both N(0, 0.02), biases zero (the original adapters' near-identity start).
    """

    def __init__(self, d: int, r: int, scale: float = 1.0, init: str = "lora", dropout: float = 0.0,
                 layer_norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.weight.dtype)
        return self.up(self.dropout(torch.relu(self.down(self.norm(x))))) * self.scale


class KronaBlock(KronaDelta):
    """KronA^B: ``s * x kron(A, B)^T`` over the FFN block's input; with ``residual``, ``+ s_res * x``."""

    mergeable = False

    def __init__(self, d: int, a1: int, a2: int, scale: float, residual: bool) -> None:
        super().__init__(d, d, a1, a2, scale)
        self.residual_scale = nn.Parameter(torch.ones(())) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.residual_scale * x.to(y.dtype) if self.residual_scale is not None else y

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("KronA^B runs in parallel with the whole FFN block and cannot be merged")


class AdaptedSublayer(nn.Module):
    """A frozen sub-layer plus named adapters: ``h = sublayer(x) + sum_k parallel_k(x)``, then
    ``h <- h + sequential_k(h)`` for each sequential adapter. Tuple outputs keep their other items."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.parallel = nn.ModuleDict()
        self.sequential = nn.ModuleDict()

    def add_adapter(self, name: str, adapter: AdapterModule, sequential: bool) -> None:
        if name in self.parallel or name in self.sequential:
            raise ValueError(f"adapter {name!r} is already attached; give each adapter its own name")
        (self.sequential if sequential else self.parallel)[name] = adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        out = self.module(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        for adapter in self.parallel.values():
            h = h + adapter(x).to(h.dtype)
        for adapter in self.sequential.values():
            h = h + adapter(h).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _is_sublayer(module: nn.Module) -> bool:
    return not isinstance(module, (*LINEAR_TYPES, AdaptedLinear, nn.LayerNorm, nn.Embedding, nn.ModuleList))


def attach_to_sublayers(model: nn.Module, config: Any, make_adapter: Any, sequential: bool) -> list[str]:
    """Wrap every targeted sub-layer in ``AdaptedSublayer`` (reusing an existing wrapper, so methods
    compose) and attach ``make_adapter(hidden_size)`` under ``config.name``.

    With ``target_modules: auto`` each sub-layer kind of the method's placement must be found (Houlsby on a
    model without an FFN module is refused, not silently reduced to its attention half)."""
    key = f"adapters[{config.name}].target_modules"
    what = "attention or FFN sub-layer"
    if config.target_modules == "auto":
        targets = [t for kind in config.sublayer_kinds()
                   for t in find_targets(model, SUBLAYER_NAMES[kind], _is_sublayer, what, key)]
    else:
        targets = find_targets(model, config.target_modules, _is_sublayer, what, key)
    d = model.config.hidden_size
    names = []
    for name, module in targets:
        if not isinstance(module, AdaptedSublayer):
            module = AdaptedSublayer(module)
            replace_module(model, name, module)
        try:
            adapter = make_adapter(d)
        except ConfigError as err:
            raise ConfigError(f"adapters[{config.name}].{err}") from None
        module.add_adapter(config.name, adapter.to(float_dtype(module.module)), sequential)
        names.append(name)
    return names


def _check_targets(config: AdapterConfig) -> None:
    require(config.target_modules != "all-linear", "target_modules",
            "sub-layer adapters wrap attention or FFN blocks, not linears; leave it unset (auto) or name "
            "the blocks, e.g. [mlp]")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Shared keys. r: bottleneck width; scale: multiplier ``s`` of the adapter output; init: ``lora``
    (exact no-op start) or ``bert`` (N(0, 0.02)); dropout: inside the bottleneck; layer_norm: a LayerNorm
    on the adapter input. target_modules ``auto`` picks the sub-layers from the method's placement."""

    target_modules: Any = "auto"
    r: int = 64
    scale: float = 1.0
    init: str = "lora"
    dropout: float = 0.0
    layer_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r >= 1, "r", f"got {self.r}; the bottleneck width must be >= 1")
        require(self.init in ("lora", "bert"), "init", f"got {self.init!r}; use lora or bert")
        require(0.0 <= self.dropout < 1.0, "dropout", f"got {self.dropout}; must be in [0, 1)")

    def make(self, d: int) -> Bottleneck:
        return Bottleneck(d, self.r, self.scale, self.init, self.dropout, self.layer_norm)


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    """sublayer: ``ffn`` or ``attn``, the block the adapter runs beside (from that block's input).
    scale 1 is the plain parallel adapter; the paper's scaled PA uses 4."""

    sublayer: str = "ffn"

    def __post_init__(self) -> None:
        require(self.sublayer in SUBLAYER_NAMES, "sublayer", f"got {self.sublayer!r}; use ffn or attn")
        super().__post_init__()
        _check_targets(self)

    def sublayer_kinds(self) -> tuple[str, ...]:
        return (self.sublayer,)


@dataclass
class SequentialAdapterConfig(BottleneckConfig):
    """placement: ``houlsby`` (after attention and after FFN) or ``pfeiffer`` (after FFN only)."""

    placement: str = "pfeiffer"

    def __post_init__(self) -> None:
        require(self.placement in ("houlsby", "pfeiffer"), "placement",
                f"got {self.placement!r}; use houlsby or pfeiffer")
        super().__post_init__()
        _check_targets(self)

    def sublayer_kinds(self) -> tuple[str, ...]:
        return ("attn", "ffn") if self.placement == "houlsby" else ("ffn",)


@dataclass
class KronaBlockConfig(AdapterConfig):
    """a1, a2: rows and columns of ``A`` (0 = balanced factorization of the hidden size); scale: ``s``;
    residual: add the learnable ``s_res * x`` (KronA^B_res; ``s_res`` starts at 1, so unlike KronA^B the
    model is not unchanged at step 0)."""

    target_modules: Any = "auto"
    a1: int = 0
    a2: int = 0
    scale: float = 1.0
    residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.a1 >= 0 and self.a2 >= 0, "a1", "use positive divisors of the hidden size, or 0")
        require(self.scale != 0, "scale", "must be non-zero (a zero scale trains nothing)")
        _check_targets(self)

    def sublayer_kinds(self) -> tuple[str, ...]:
        return ("ffn",)

    def make(self, d: int) -> KronaBlock:
        a1, _ = factor_dim(d, self.a1, "a1", "the hidden size")
        a2, _ = factor_dim(d, self.a2, "a2", "the hidden size")
        return KronaBlock(d, a1, a2, self.scale, self.residual)


@register("parallel_adapter", ParallelAdapterConfig)
def inject_parallel_adapter(model: nn.Module, config: ParallelAdapterConfig) -> list[str]:
    return attach_to_sublayers(model, config, config.make, sequential=False)


@register("sequential_adapter", SequentialAdapterConfig)
def inject_sequential_adapter(model: nn.Module, config: SequentialAdapterConfig) -> list[str]:
    return attach_to_sublayers(model, config, config.make, sequential=True)


@register("krona_block", KronaBlockConfig)
def inject_krona_block(model: nn.Module, config: KronaBlockConfig) -> list[str]:
    return attach_to_sublayers(model, config, config.make, sequential=False)
