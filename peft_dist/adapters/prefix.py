"""Prefix tuning: ``l`` trainable key and value vectors per layer and key/value head, prepended to the
keys and values of every self-attention, ``Attn(q, [P_k; K], [P_v; V])`` (Li & Liang, 2021,
arXiv:2101.00190; the attention-modification view of He et al., 2022, arXiv:2110.04366).

With ``reparameterize`` (the paper's stabilizer) each layer's vectors are ``MLP(E)`` with
``E: (l, d)`` and ``MLP = Linear(d, hidden) -> tanh -> Linear(hidden, 2 * kv_heads * head_dim)``; only the
resulting vectors are exported by ``adapter_state_dict`` (the MLP is folded away), and loading them turns
the module into plain vectors. The MLP is per layer rather than one shared MLP over all layers: that
keeps each layer's parameters inside the layer (below) and costs only one extra ``d x hidden`` matrix
per layer, the large output matrix being the same size either way.

How the prefix reaches the attention: each self-attention module is wrapped (``PrefixAttention``) and
called with a stand-in cache whose ``update`` prepends the prefix to the keys and values the module has
just computed (after the real cache, if any, has stored them), and with the attention mask widened by
``l`` admitted columns. Why this and not a top-level hook that passes a prefilled cache:

* ZeRO-3: the prefix parameters belong to a module that runs inside its decoder layer, so DeepSpeed's
  module hooks gather and release them layer by layer, in its traced order, like every other parameter.
  A top-level hook would compute every layer's prefix before the model runs.
* Positions: a prefilled cache shifts the position ids of the real tokens by ``l`` (RoPE angles, GPT-2's
  learned positions); here positions are untouched and the prefix carries none, which is the formula.
* Nothing extra from the caller: training passes only ``input_ids``/``labels``; a generation cache holds
  real tokens only; gradient checkpointing recomputes the wrapper like any module.

It relies on the attention module calling ``past_key_values.update(k, v, layer_idx)`` and receiving
``attention_mask`` by keyword, true of Llama-style and GPT-2 attention in transformers 5 with the
``eager`` and ``sdpa`` implementations (others are refused at injection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from peft_dist.adapters.base import AdapterConfig, AdapterModule
from peft_dist.adapters.bottleneck import AdaptedSublayer
from peft_dist.adapters.inject import outside_adapters
from peft_dist.adapters.registry import register
from peft_dist.config.schema import ConfigError, require
from peft_dist.targets import find_modules, replace_module

ATTENTION_NAMES = ["self_attn", "attn"]  # Llama-style, GPT-2
SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass
class PrefixConfig(AdapterConfig):
    """length: ``l``, prefix vectors per layer and head. reparameterize: train them through an MLP of
    width ``hidden`` (folded away when saving). target_modules ``auto``: the self-attention modules."""

    target_modules: Any = "auto"
    length: int = 30
    reparameterize: bool = True
    hidden: int = 800

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.length >= 1, "length", f"got {self.length}; use at least 1 prefix vector")
        require(self.hidden >= 1, "hidden", f"got {self.hidden}; the MLP width must be >= 1")
        if self.target_modules == "auto":
            self.target_modules = list(ATTENTION_NAMES)


class PrefixKV(AdapterModule):
    """One layer's prefix: ``forward()`` returns ``(P_k, P_v)``, each ``(kv_heads, l, head_dim)``."""

    def __init__(self, kv_heads: int, head_dim: int, length: int, d_model: int, reparameterize: bool,
                 hidden: int) -> None:
        super().__init__()
        self.shape = (kv_heads, length, head_dim)
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

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mlp is None:
            return self.key, self.value
        return self._split(self.mlp(self.embedding))  # a module call, so ZeRO-3 gathers the MLP

    @torch.no_grad()
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The prefix vectors only. The MLP is applied through ``Linear.forward`` (the same arithmetic as
        the training forward, but no module hooks: under ZeRO-3 the caller has gathered the parameters)."""
        if self.mlp is None:
            return {"key": self.key.detach(), "value": self.value.detach()}
        first, _, last = self.mlp
        key, value = self._split(last.forward(torch.tanh(first.forward(self.embedding))))
        return {"key": key.contiguous(), "value": value.contiguous()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load exported vectors; a reparameterized module drops its MLP and keeps the vectors."""
        if self.mlp is not None:
            dtype, device = self.embedding.dtype, self.embedding.device
            self.embedding, self.mlp = None, None
            self.key = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
            self.value = nn.Parameter(torch.empty(self.shape, dtype=dtype, device=device))
        super().load_adapter_state_dict(state)


class PrefixCache:
    """Stands in for the layer's cache during one attention call: ``update`` lets the real cache (if
    any) store the new keys and values, then prepends the prefix to what the attention will use."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, cache: Any) -> None:
        self.key, self.value = key, value
        self.cache = getattr(cache, "self_attention_cache", cache)  # GPT-2's EncoderDecoderCache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            key_states, value_states = self.cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        batch = key_states.shape[0]
        key = self.key.to(key_states.dtype).expand(batch, -1, -1, -1)
        value = self.value.to(value_states.dtype).expand(batch, -1, -1, -1)
        return torch.cat([key, key_states], dim=2), torch.cat([value, value_states], dim=2)


def extend_mask(mask: torch.Tensor | None, length: int, q_len: int, past: int, implementation: str,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The attention mask with ``length`` admitted prefix columns in front.

    ``None`` stands for sdpa's ``is_causal`` (query ``i`` sees real keys ``0 .. past + i``); it becomes an
    explicit mask because ``is_causal`` would misalign once the keys outnumber the queries. A boolean
    mask admits with True, an additive (eager) one with 0.
    """
    if mask is None:
        keys = torch.arange(past + q_len, device=device)
        mask = (keys[None, :] <= past + torch.arange(q_len, device=device)[:, None])[None, None]
        if implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    admit = True if mask.dtype == torch.bool else 0.0
    return F.pad(mask, (length, 0), value=admit)


class PrefixAttention(nn.Module):
    """A frozen self-attention module plus named prefixes (concatenated in order)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.module = attention
        self.prefixes = nn.ModuleDict()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1:
            raise TypeError("PrefixAttention expects the hidden states as the only positional argument "
                            "(attention_mask and past_key_values by keyword, as Llama and GPT-2 layers call it)")
        hidden = args[0] if args else kwargs["hidden_states"]
        keys, values = zip(*(prefix() for prefix in self.prefixes.values()))
        key, value = torch.cat(keys, dim=1), torch.cat(values, dim=1)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(self.module.layer_idx) if cache is not None else 0
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), key.shape[1], hidden.shape[1], past,
                                               self.module.config._attn_implementation, hidden.dtype,
                                               hidden.device)
        kwargs["past_key_values"] = PrefixCache(key, value, cache)
        return self.module(*args, **kwargs)


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, (AdaptedSublayer, PrefixAttention)):
        module = module.module
    return module


def _is_self_attention(module: nn.Module) -> bool:
    inner = _innermost(module)
    return (hasattr(inner, "layer_idx") and hasattr(inner, "head_dim") and hasattr(inner, "config")
            and not getattr(inner, "is_cross_attention", False))


@register("prefix", PrefixConfig)
def inject_prefix(model: nn.Module, config: PrefixConfig) -> list[str]:
    key = f"adapters[{config.name}]"
    implementation = model.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ConfigError(f"{key}: prefix tuning supports the {' and '.join(SUPPORTED_ATTENTION)} attention "
                          f"implementations, this model uses {implementation!r}; load it with "
                          "attn_implementation='sdpa'")
    targets = outside_adapters(model, find_modules(model, config.target_modules, _is_self_attention,
                                                   "self-attention module", f"{key}.target_modules"))
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
        module.prefixes[config.name] = PrefixKV(kv_heads, attention.head_dim, config.length,
                                                model.config.hidden_size, config.reparameterize,
                                                config.hidden).to(dtype)
        names.append(name)
    return names
