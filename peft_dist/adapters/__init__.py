"""Adapter methods. Importing this package registers every method with the registry."""
from peft_dist.adapters import lora  # noqa: F401
from peft_dist.adapters import adalora  # noqa: F401
from peft_dist.adapters import krona  # noqa: F401
from peft_dist.adapters import bottleneck  # noqa: F401
from peft_dist.adapters import prefix  # noqa: F401
from peft_dist.adapters import bitfit  # noqa: F401
from peft_dist.adapters import mam  # noqa: F401
from peft_dist.adapters.base import AdaptedLinear, AdapterConfig, AdapterModule
from peft_dist.adapters.inject import (adapter_state_dict, inject_adapters, load_adapter_state_dict,
                                       trainable_parameters)
from peft_dist.adapters.registry import get_method, methods, register

__all__ = ["AdaptedLinear", "AdapterConfig", "AdapterModule", "adapter_state_dict", "inject_adapters",
           "load_adapter_state_dict", "trainable_parameters",
           "get_method", "methods", "register"]
