"""Learning-rate schedule: linear warmup then cosine decay to a floor.

transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` has the same shape but starts its warmup at
lr 0 (the first optimizer step does nothing) and so runs one step behind in the cosine; this one starts
at ``lr / warmup_steps``."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier after ``step`` optimizer steps: ``step/warmup`` up to 1, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
