"""BitFit: train only the bias vectors of the frozen model, optionally its norm parameters too
(Ben Zaken et al., 2022, arXiv:2106.10199).

No module is added: injection re-enables ``requires_grad`` on existing parameters, which the adapter-only
checkpoint stores under their model names (``inject.adapter_state_dict`` keeps every trainable parameter
outside adapter modules). A model without biases (Llama) would train nothing, so that is an error that
points to ``norm: true``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peft_dist.adapters.base import AdapterConfig
from peft_dist.adapters.registry import register
from peft_dist.config.schema import ConfigError
from peft_dist.targets import find_modules


@dataclass
class BitFitConfig(AdapterConfig):
    """norm: also train the weights of normalization layers (LayerNorm, RMSNorm).
    target_modules: the modules whose biases train; ``all-linear`` means every module outside the output
    head (biases of norms included), a list of suffixes or a regex narrows it."""

    target_modules: Any = "all-linear"
    norm: bool = False


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, or any module whose class name says it normalizes (LlamaRMSNorm, T5LayerNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _own(module: nn.Module, name: str) -> nn.Parameter | None:
    """The module's own floating-point parameter ``name`` (not a child's), if any."""
    param = dict(module.named_parameters(recurse=False)).get(name)
    return param if param is not None and param.is_floating_point() else None


@register("bitfit", BitFitConfig)
def inject_bitfit(model: nn.Module, config: BitFitConfig) -> list[str]:
    key = f"adapters[{config.name}]"

    def selected(module: nn.Module) -> list[nn.Parameter]:
        params = [_own(module, "bias")]
        if config.norm and _is_norm(module):
            params.append(_own(module, "weight"))
        return [p for p in params if p is not None]

    try:
        targets = find_modules(model, config.target_modules, lambda m: bool(selected(m)),
                               "module with a bias" + (" or a norm" if config.norm else ""), f"{key}.target_modules")
    except ConfigError as err:
        if config.norm:
            raise
        raise ConfigError(f"{err}. BitFit would train nothing: this model has no bias parameters there "
                          "(Llama-style models have none); set norm: true to train the norm parameters "
                          "instead") from None
    names = []
    for name, module in targets:
        for param in selected(module):
            param.requires_grad_(True)
        names.append(name)
    return names

