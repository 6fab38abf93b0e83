"""Learning-rate schedule: linear warmup, cosine decay to the floor."""
import math

import pytest

from peft_dist.train.schedule import warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(16)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_no_warmup_starts_at_full_rate():
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_ratio=0.0) == pytest.approx(1.0)
