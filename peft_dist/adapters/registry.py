"""Method name -> (config class, inject function). Methods register themselves on import."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from peft_dist.config.load import build_dataclass
from peft_dist.config.schema import ConfigError

InjectFn = Callable[[nn.Module, Any], list[str]]


@dataclass(frozen=True)
class AdapterMethod:
    """A registered method. ``inject(model, config)`` adds the adapter and returns the adapted module
    names; it must raise ``ConfigError`` if nothing matches."""

    name: str
    config_cls: type
    inject: InjectFn


_METHODS: dict[str, AdapterMethod] = {}


def register(name: str, config_cls: type) -> Callable[[InjectFn], InjectFn]:
    """Decorator for a method's inject function: ``@register("lora", LoraConfig)``."""

    def decorator(inject: InjectFn) -> InjectFn:
        if name in _METHODS:
            raise ValueError(f"adapter method {name!r} is registered twice")
        config_cls.method = name
        _METHODS[name] = AdapterMethod(name, config_cls, inject)
        return inject

    return decorator


def methods() -> dict[str, AdapterMethod]:
    """Every registered method (importing ``peft_dist.adapters``, which any import of this module does
    first, registers them all)."""
    return dict(_METHODS)


def get_method(name: str) -> AdapterMethod:
    known = methods()
    if name not in known:
        raise ConfigError(f"method: unknown adapter method {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def build_adapter_config(data: Any, path: str) -> Any:
    """``{'method': 'lora', 'r': 8, ...}`` -> the method's validated config dataclass."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"{path}: each adapter needs a 'method' key, e.g. method: lora")
    fields = dict(data)
    try:
        method = get_method(fields.pop("method"))
    except ConfigError as err:
        raise ConfigError(f"{path}.{err}") from None
    return build_dataclass(method.config_cls, fields, path)
