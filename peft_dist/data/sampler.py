"""Which blocks each rank reads at each optimizer step, the same global batches for every world size."""
from __future__ import annotations

import torch

from peft_dist.data.sources import DataError


class GlobalBatchSampler:
    """Step ``t`` consumes global batch ``t`` of a per-epoch permutation (seeded by ``seed + epoch``);
    rank ``r`` takes the ``r``-th contiguous chunk and splits it into micro-batches. The same step
    therefore trains on the same samples for every world size, which makes runs comparable across
    N and resumable from the step number alone.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, accumulation: int, world_size: int,
                 rank: int, seed: int) -> None:
        self.micro = micro_batch_size
        self.accumulation = accumulation
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch_size * accumulation * world_size
        self.num_samples = num_samples
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"data: {num_samples} training blocks cannot fill one global batch of "
                            f"{self.global_batch} (micro_batch_size x gradient_accumulation_steps x world "
                            "size); add data or lower those settings")

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = position * self.global_batch + self.rank * self.micro * self.accumulation
        chunk = order[start: start + self.micro * self.accumulation]
        return list(chunk.split(self.micro))
