"""A check for tests: every tensor handed to a ``torch.distributed`` collective is on the expected device.

NCCL reduces only accelerator tensors and gloo only host tensors, and a CPU tensor that meets a CUDA
parameter fails only on a GPU; inside ``collectives_on(device)`` a collective called with a tensor
elsewhere raises at once, naming the caller's tensor and device. (The static check in
tests/unit/test_devices.py covers what no test on the CPU can reach.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
           "reduce_scatter_tensor", "reduce", "send", "recv")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@contextlib.contextmanager
def collectives_on(device: torch.device | str) -> Iterator[None]:
    """Within the block, ``torch.distributed``'s tensor collectives assert that their tensors are on
    ``device`` (its type: ``cuda`` matches ``cuda:0``)."""
    expected = torch.device(device).type
    originals = {name: getattr(dist, name) for name in CHECKED}

    def checked(name):
        def call(*args, **kwargs):
            for tensor in _tensors(list(args) + list(kwargs.values())):
                assert tensor.device.type == expected, (
                    f"torch.distributed.{name} got a tensor on {tensor.device} (shape {tuple(tensor.shape)}), "
                    f"expected {expected}: create it on the parameter's or the engine's device")
            return originals[name](*args, **kwargs)
        return call

    for name in CHECKED:
        setattr(dist, name, checked(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
