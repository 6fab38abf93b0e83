"""Prefix tuning: ``l`` trainable key and value vectors per layer and key/value head, prepended to the
keys and values of every self-attention, ``Attn(q, [P_k; K], [P_v; V])`` (Li & Liang, 2021,
arXiv:2101.00190; the attention-modification view of He et al., 2022, arXiv:2110.04366).

With ``reparameterize`` (the paper's stabilizer) each layer's vectors are ``MLP(E)`` with
``E: (l, d)`` and ``MLP = Linear(d, hidden) -> tanh -> Linear(hidden, 2 * kv_heads * head_dim)``; only the
resulting vectors are exported by ``adapter_state_dict`` (the MLP is folded away), and loading them turns
the module into plain vectors. The MLP is per layer rather than one shared MLP over all layers: that
keeps each layer's parameters inside the layer (below) and costs only one extra ``d x hidden`` matrix
per layer, the large output matrix being the same size either way.

How the prefix reaches the attention: each self-attention module is wrapped (``PrefixAttention``), which
computes the layer's prefix and hands it to the module as one extra keyword argument. The module passes
its keyword arguments on to its attention function (transformers' ``AttentionInterface``: every model of
transformers 5 calls ``attention_interface(self, query, key, value, attention_mask, **kwargs)``), and
peft-dist registers one that prepends the prefix to the keys and values it receives (already rotated and
joined with the cache) and admits the prefix in the mask, then calls the model's own ``sdpa`` or ``eager``
function. Nothing depends on what a release calls the cache argument. Why this and not a prefilled cache:

* Positions: a prefilled cache shifts the position ids of the real tokens by ``l`` (RoPE angles, GPT-2's
  learned positions); here positions are untouched and the prefix carries none, which is the formula.
* Nothing extra from the caller: training passes only ``input_ids``/``labels``; a generation cache holds
  real tokens only; gradient checkpointing recomputes the wrapper like any module.
* The prefix parameters belong to a module that runs inside its decoder layer, so they are used layer by
  layer like every other parameter.

A model whose attention does not pass the argument on is refused at its first forward (the wrapper checks
that the prefix was applied), never trained silently without it.

With ``gate`` the prefix starts as an exact no-op (LLaMA-Adapter's zero-init attention, Zhang et al., 2023,
arXiv:2303.16199): the prefix is attended separately and added through a per-query-head gate ``g``
initialised to zero, ``Attn(q, K, V) + tanh(g) * Attn(q, P_k, P_v)``. It is He et al.'s decomposition of
prefix tuning, ``(1 - lambda) Attn(q, K, V) + lambda Attn(q, P_k, P_v)``, with the data-dependent ``lambda``
replaced by a learned gate and the real tokens' weight kept at 1. Zero value vectors alone would not be a
no-op: the prefix keys would still take softmax mass from the real tokens. At ``g = 0`` the real tokens'
attention is the base's own call, and ``g`` has a nonzero gradient (``Attn(q, P_k, P_v)`` is not zero), so
training moves it from the first step.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peft_dist.adapters.base import AdapterConfig, AdapterModule
from peft_dist.adapters.bottleneck import AdaptedSublayer
from peft_dist.adapters.inject import find_targets
from peft_dist.adapters.registry import register
from peft_dist.config.schema import ConfigError, require
from peft_dist.targets import replace_module

ATTENTION_NAMES = ["self_attn", "attn", "attention"]  # Llama-style, GPT-2, GPT-NeoX
# The attention implementations prefix tuning wraps, and the names their prefix-aware twins register under.
PREFIXED = {"eager": "peft_dist_prefix_eager", "sdpa": "peft_dist_prefix_sdpa"}
PREFIX_ARGUMENT = "peft_dist_prefix"  # the keyword that carries a layer's prefix to the attention function


@dataclass
class PrefixConfig(AdapterConfig):
    """length: ``l``, prefix vectors per layer and head. reparameterize: train them through an MLP of
    width ``hidden`` (folded away when saving). gate: attend the prefix separately through a zero-initialised
    per-head gate, so that training starts exactly at the base (module docstring). target_modules ``auto``:
    the self-attention modules."""

    target_modules: Any = "auto"
    length: int = 30
    reparameterize: bool = True
    hidden: int = 800
    gate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.length >= 1, "length", f"got {self.length}; use at least 1 prefix vector")
        require(self.hidden >= 1, "hidden", f"got {self.hidden}; the MLP width must be >= 1")
        if self.target_modules == "auto":
            self.target_modules = list(ATTENTION_NAMES)


class PrefixVectors(NamedTuple):
    """One adapter's prefix in one layer: ``P_k`` and ``P_v``, each ``(kv_heads, l, head_dim)``, and the gate
    ``(heads,)`` of a gated prefix (None: ungated)."""

    key: torch.Tensor
    value: torch.Tensor
    gate: torch.Tensor | None


class PrefixKV(AdapterModule):
    """One layer's prefix: ``forward()`` returns its ``PrefixVectors``. The gate is returned by ``forward``
    rather than read as an attribute because under ZeRO-3 a parameter is whole only when its module's
    forward hands it out (DeepSpeed keeps returned parameters gathered for the caller).

    gate_heads: the number of query heads of a gated prefix (one gate each, zero-initialised); None: ungated.
    """

    def __init__(self, kv_heads: int, head_dim: int, length: int, d_model: int, reparameterize: bool,
                 hidden: int, gate_heads: int | None = None) -> None:
        super().__init__()
        self.shape = (kv_heads, length, head_dim)
        self.gate = None if gate_heads is None else nn.Parameter(torch.zeros(gate_heads))
        if reparameterize:
            self.embedding = nn.Parameter(torch.randn(length, d_model))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * kv_heads * head_dim))
        else:
            self.embedding, self.mlp = None, None
            self.key = nn.Parameter(torch.randn(self.shape))
            self.value = nn.Parameter(torch.randn(self.shape))

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(l, 2 * kv_heads * head_dim)`` -> ``(P_k, P_v)``."""
        kv_heads, length, head_dim = self.shape
        key, value = flat.view(length, 2, kv_heads, head_dim).permute(1, 2, 0, 3).unbind(0)
        return key, value

    def forward(self) -> PrefixVectors:
        if self.mlp is None:
            return PrefixVectors(self.key, self.value, self.gate)
        return PrefixVectors(*self._split(self.mlp(self.embedding)), self.gate)

    @torch.no_grad()
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix vectors (and gate) only: the MLP's output, written out from its weights (the training
        forward's arithmetic, without running the modules)."""
        gate = {} if self.gate is None else {"gate": self.gate.detach()}
        if self.mlp is None:
            return {"key": self.key.detach(), "value": self.value.detach(), **gate}
        first, _, last = self.mlp
        key, value = self._split(F.linear(torch.tanh(F.linear(self.embedding, first.weight, first.bias)),
                                          last.weight, last.bias))
        return {"key": key.contiguous(), "value": value.contiguous(), **gate}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load exported vectors; a reparameterized module drops its MLP and keeps the vectors."""
        if self.mlp is not None:
            dtype, device = self.embedding.dtype, self.embedding.device
            self.embedding, self.mlp = None, None
            self.key = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
            self.value = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
        super().load_adapter_state_dict(state)


@dataclass
class PrefixStates:
    """One layer's prefixes on their way to the attention function: the ungated ones concatenated (joined to
    the real keys; None when every prefix is gated), the gated ones each attended on its own. ``applied`` is
    set when they were used."""

    key: torch.Tensor | None  # (kv_heads, l, head_dim)
    value: torch.Tensor | None
    gated: list[PrefixVectors]
    applied: bool = False


def extend_mask(mask: torch.Tensor | None, length: int, q_len: int, kv_len: int, additive_dtype: torch.dtype | None,
                device: torch.device) -> torch.Tensor:
    """The attention mask with ``length`` admitted prefix columns in front.

    ``None`` stands for sdpa's ``is_causal`` (query ``i`` sees real keys ``0 .. kv_len - q_len + i``); it becomes
    an explicit mask because ``is_causal`` would misalign once the keys outnumber the queries. A boolean mask
    admits with True, an additive one (``additive_dtype``, eager) with 0.
    """
    if mask is None:
        past = kv_len - q_len
        mask = (torch.arange(kv_len, device=device)[None, :]
                <= past + torch.arange(q_len, device=device)[:, None])[None, None]
        if additive_dtype is not None:
            mask = torch.zeros(mask.shape, dtype=additive_dtype, device=device).masked_fill(
                ~mask, torch.finfo(additive_dtype).min)
    admit = True if mask.dtype == torch.bool else 0.0
    return F.pad(mask, (length, 0), value=admit)


def _model_eager_attention(module: nn.Module) -> Callable:
    """The eager attention function of ``module``'s own modeling file (models differ: scaling, softcap)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def gated_attention(inner: Callable, module: nn.Module, query: torch.Tensor, prefix: PrefixVectors,
                    additive_dtype: torch.dtype | None, **kwargs: Any) -> torch.Tensor:
    """``tanh(g) * Attn(q, P_k, P_v)``, ``(batch, q_len, heads, head_dim)`` like the attention functions return.

    The softmax runs over the prefix alone, through the model's own function ``inner`` (its scaling, softcap,
    grouped-query repeat and dropout). The mask admits every prefix vector for every query; it is explicit
    because sdpa would read ``None`` as ``is_causal``.
    """
    batch, q_len, length = query.shape[0], query.shape[2], prefix.key.shape[1]
    if additive_dtype is None:
        mask = torch.ones(1, 1, q_len, length, dtype=torch.bool, device=query.device)
    else:
        mask = torch.zeros(1, 1, q_len, length, dtype=additive_dtype, device=query.device)
    key = prefix.key.to(query.dtype).expand(batch, -1, -1, -1)
    value = prefix.value.to(query.dtype).expand(batch, -1, -1, -1)
    output, _ = inner(module, query, key, value, mask, **kwargs)
    return torch.tanh(prefix.gate).to(output.dtype)[:, None] * output  # the gate broadcasts over head_dim


def _prefixed(implementation: str) -> Callable:
    """An attention function that prepends the layer's ungated prefixes and runs ``implementation``, then adds
    the gated prefixes' attention terms. Returns the attention weights of the first call (real keys)."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        prefix: PrefixStates | None = kwargs.pop(PREFIX_ARGUMENT, None)
        inner = ALL_ATTENTION_FUNCTIONS["sdpa"] if implementation == "sdpa" else _model_eager_attention(module)
        if prefix is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        additive_dtype = None if implementation == "sdpa" else query.dtype
        if prefix.key is not None:
            batch, length = key.shape[0], prefix.key.shape[1]
            attention_mask = extend_mask(attention_mask, length, query.shape[2], key.shape[2], additive_dtype,
                                         query.device)
            key = torch.cat([prefix.key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix.value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        output, weights = inner(module, query, key, value, attention_mask, **kwargs)
        for gated in prefix.gated:
            output = output + gated_attention(inner, module, query, gated, additive_dtype, **kwargs)
        prefix.applied = True
        return output, weights

    return attention


def use_prefixed_attention(model: nn.Module, key: str) -> None:
    """Switch ``model`` to the prefix-aware twin of its ``eager`` / ``sdpa`` attention (registered with
    transformers' attention and mask interfaces on first use)."""
    implementation = model.config._attn_implementation
    if implementation in PREFIXED.values():
        return
    if implementation not in PREFIXED:
        raise ConfigError(f"{key}: prefix tuning supports the {' and '.join(PREFIXED)} attention "
                          f"implementations, this model uses {implementation!r}; load it with "
                          "attn_implementation='sdpa'")
    if implementation == "eager" and getattr(model.config, "reorder_and_upcast_attn", False):
        raise ConfigError(f"{key}: prefix tuning does not support GPT-2's reorder_and_upcast_attn with eager "
                          "attention; set reorder_and_upcast_attn=false or use attn_implementation='sdpa'")
    name = PREFIXED[implementation]
    AttentionInterface.register(name, _prefixed(implementation))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    model.config._attn_implementation = name


class PrefixAttention(nn.Module):
    """A frozen self-attention module plus named prefixes: the ungated ones concatenated in order, each gated
    one attended separately (so both kinds can share a layer)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.module = attention
        self.prefixes = nn.ModuleDict()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        vectors = [prefix() for prefix in self.prefixes.values()]
        joined = [v for v in vectors if v.gate is None]
        prefix = PrefixStates(torch.cat([v.key for v in joined], dim=1) if joined else None,
                              torch.cat([v.value for v in joined], dim=1) if joined else None,
                              [v for v in vectors if v.gate is not None])
        output = self.module(*args, **kwargs, **{PREFIX_ARGUMENT: prefix})
        if not prefix.applied:
            raise RuntimeError(
                f"prefix tuning: {type(self.module).__name__} did not pass its keyword arguments on to its "
                f"attention function (attn_implementation {self.module.config._attn_implementation!r}, "
                f"transformers {transformers.__version__}), so the prefix was not applied; use a model whose "
                "attention calls transformers' AttentionInterface (docs/COMPATIBILITY.md)")
        return output


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, (AdaptedSublayer, PrefixAttention)):
        module = module.module
    return module


def _head_dim(attention: nn.Module) -> int | None:
    return getattr(attention, "head_dim", None) or getattr(attention, "head_size", None)  # GPT-NeoX: head_size


def _is_self_attention(module: nn.Module) -> bool:
    inner = _innermost(module)
    return (hasattr(inner, "layer_idx") and _head_dim(inner) is not None and hasattr(inner, "config")
            and not getattr(inner, "is_cross_attention", False))


@register("prefix", PrefixConfig)
def inject_prefix(model: nn.Module, config: PrefixConfig) -> list[str]:
    key = f"adapters[{config.name}]"
    targets = find_targets(model, config.target_modules, _is_self_attention, "self-attention module",
                           f"{key}.target_modules")
    use_prefixed_attention(model, key)
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    names = []
    for name, module in targets:
        while isinstance(module, AdaptedSublayer):  # nest as AdaptedSublayer(PrefixAttention(attention))
            name, module = f"{name}.module", module.module
        if not isinstance(module, PrefixAttention):
            module = PrefixAttention(module)
            replace_module(model, name, module)
        if config.name in module.prefixes:
            raise ValueError(f"adapter {config.name!r} is already attached; give each adapter its own name")
        attention = module.module
        dtype = next(p.dtype for p in attention.parameters() if p.is_floating_point())
        gate_heads = model.config.num_attention_heads if config.gate else None
        module.prefixes[config.name] = PrefixKV(kv_heads, _head_dim(attention), config.length,
                                                model.config.hidden_size, config.reparameterize,
                                                config.hidden, gate_heads).to(dtype)
        names.append(name)
    return names
