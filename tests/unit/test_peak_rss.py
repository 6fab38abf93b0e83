"""The peak-resident-set reader that bench/ and the planner's memory test measure runs with."""
import torch

from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss

MIB = 2**20


def test_peak_rises_with_touched_memory_and_restarts_after_reset():
    reset_peak_rss()
    before = peak_rss_bytes()
    # touched, so resident; larger than whatever earlier tests of this process left free in the heap
    block = torch.ones(512 * MIB, dtype=torch.uint8)
    during = peak_rss_bytes()
    del block
    reset_peak_rss()
    after = peak_rss_bytes()
    assert during - before >= 480 * MIB
    assert after < during - 256 * MIB  # the freed block no longer counts
