"""The collective-device check used by the GPU tests fails on a tensor elsewhere, before the collective."""
import pytest
import torch
import torch.distributed as dist

from tests.collectives import collectives_on


def test_a_tensor_on_another_device_is_refused_before_the_collective():
    original = dist.all_reduce
    with collectives_on("cpu"):
        with pytest.raises(AssertionError, match=r"all_reduce got a tensor on meta .* expected cpu"):
            dist.all_reduce(torch.zeros(3, device="meta"))
    assert dist.all_reduce is original  # restored on exit
