"""The peak-resident-set reader that bench/ and the planner's memory test measure runs with, and the allocator
setting that lets freed buffers leave the resident set; and what an int8 rank leaves unimported."""
import subprocess
import sys

import torch

from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss
from tests.multiproc import REPO

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


HEAP_PATTERN = """
import sys
import torch
from peft_dist.distributed.memory import resident_bytes, return_freed_buffers_to_the_os

MIB = 2**20
if sys.argv[1] == "returned":
    return_freed_buffers_to_the_os()
torch.ones(24 * MIB, dtype=torch.uint8)  # freed at once: glibc's threshold rises to its size
before = resident_bytes()[0]
buffers, small = [], []
for _ in range(32):  # as in a ZeRO-3 forward: gathered buffers freed, smaller tensors kept between them
    buffers.append(torch.ones(8 * MIB, dtype=torch.uint8))
    small.append(torch.ones(128 * 1024, dtype=torch.uint8))
del buffers
print((resident_bytes()[0] - before) // MIB)
"""


def test_freed_buffers_leave_the_resident_set_once_the_trainer_has_set_the_allocator():
    """The trainer calls ``return_freed_buffers_to_the_os`` first thing; without it, 32 freed 8 MiB buffers
    stay resident in glibc's heap (the planner counts only what is live)."""

    def retained_mib(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", HEAP_PATTERN, mode], cwd=REPO, capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    assert retained_mib("default") >= 200  # of the 256 MiB freed
    assert retained_mib("returned") <= 16  # the 4 MiB of small tensors still held


BUILD_AND_LIST_IMPORTS = """
import sys
import peft_dist.train.trainer  # what launcher/train.py's main imports on every rank
from peft_dist.adapters.inject import inject_adapters
from peft_dist.quant.loader import load_quantized_base
from peft_dist.train.config import load_config

cfg = load_config(None, [])
model, _ = load_quantized_base(cfg.model, cfg.quantization)
inject_adapters(model, cfg.adapters)
print(cfg.quantization.bits, sorted({"bitsandbytes", "matplotlib"} & set(sys.modules)))
"""


def test_an_int8_rank_imports_neither_bitsandbytes_nor_matplotlib():
    # Together about 67 MiB of every rank's resident set, used only by 4-bit bases and by rank 0's plots at
    # the end (the 7B comparison with peft in docs/BENCHMARKS.md counts the whole resident set).
    out = subprocess.run([sys.executable, "-c", BUILD_AND_LIST_IMPORTS], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.splitlines()[-1] == "8 []", out.stderr[-3000:]
