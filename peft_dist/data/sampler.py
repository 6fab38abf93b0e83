"""Which blocks each rank reads at each optimizer step, the same global batches for every world size: of one
source (``GlobalBatchSampler``) or of a mixture of sources in proportion to their weights (``MixtureSampler``)."""
from __future__ import annotations

import torch

from peft_dist.data.sources import DataError


class Permutations:
    """The seeded permutation of each source's blocks for its current pass, drawn once per pass and not once per
    step: over millions of blocks a draw takes 0.1-1 s, more than a GPU step."""

    def __init__(self) -> None:
        self.latest: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (seed, its permutation)

    def get(self, source: int, length: int, seed: int) -> torch.Tensor:
        if self.latest.get(source, (None,))[0] != seed:
            self.latest[source] = (seed, torch.randperm(length, generator=torch.Generator().manual_seed(seed)))
        return self.latest[source][1]


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
        self.permutations = Permutations()
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"data: {num_samples} training blocks cannot fill one global batch of "
                            f"{self.global_batch} (micro_batch_size x gradient_accumulation_steps x world "
                            "size); add data or lower those settings")

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self.permutations.get(0, self.num_samples, self.seed + epoch)
        start = position * self.global_batch + self.rank * self.micro * self.accumulation
        chunk = order[start: start + self.micro * self.accumulation]
        return list(chunk.split(self.micro))


MIXTURE_CYCLE = 10_000  # blocks per cycle of a mixture: the weights are kept to the nearest 1/10,000


def apportion(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights``: whole shares, the rest to the largest remainders (the first
    source on a tie)."""
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (shares[s] - exact[s], s))
    for source in by_remainder[: total - sum(shares)]:
        shares[source] += 1
    return shares


class MixtureSampler:
    """Global batches drawn from several sources in proportion to their weights, per block: of the training
    blocks, source ``s`` supplies ``weight_s / sum(weights)``. Like ``GlobalBatchSampler``, step ``t`` consumes
    positions ``t*B .. t*B+B-1`` of one global stream of blocks, rank ``r`` the ``r``-th contiguous chunk, so
    every world size trains on the same blocks and a resumed run continues from the step number alone.

    The stream is dealt in cycles of ``MIXTURE_CYCLE`` blocks. A cycle holds each source's share, in whole
    blocks (``apportion``), spread evenly over it: source ``s``'s ``j``-th block of the cycle comes at time
    ``(j + 1/2) / share_s`` (a stride schedule), so the blocks of any stretch of the stream, a global batch for
    one, follow the weights to within a block or two per source. Each source reads its own blocks in a new
    permutation per pass over them (seeded by ``seed``, the source and the pass), every block once before any
    block again. ``lengths``: the training blocks of each source, which are indexed source after source
    (``offsets``).
    """

    def __init__(self, lengths: list[int], weights: list[float], micro_batch_size: int, accumulation: int,
                 world_size: int, rank: int, seed: int) -> None:
        self.micro = micro_batch_size
        self.accumulation = accumulation
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch_size * accumulation * world_size
        self.lengths = torch.tensor(lengths)
        self.offsets = self.lengths.cumsum(0) - self.lengths
        self.permutations = Permutations()
        self.shares = torch.tensor(apportion(weights, MIXTURE_CYCLE))
        if not bool((self.shares > 0).all()):
            raise DataError(f"data.sources: a weight below 1/{MIXTURE_CYCLE:,} of their sum gives its source no "
                            "block; raise it or drop the source")
        times = torch.cat([(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in self.shares.tolist()])
        owners = torch.cat([torch.full((n,), s) for s, n in enumerate(self.shares.tolist())])
        self.cycle = owners[torch.argsort(times, stable=True)]  # the source of each block of a cycle
        owned = torch.nn.functional.one_hot(self.cycle, len(lengths))
        self.earlier = owned.cumsum(0) - owned  # blocks of each source earlier in the cycle

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        start = step * self.global_batch + self.rank * self.micro * self.accumulation
        positions = torch.arange(start, start + self.micro * self.accumulation)
        cycles, within = positions // MIXTURE_CYCLE, positions % MIXTURE_CYCLE
        sources = self.cycle[within]
        drawn = cycles * self.shares[sources] + self.earlier[within, sources]  # earlier blocks of the same source
        passes, places = drawn // self.lengths[sources], drawn % self.lengths[sources]
        indices = torch.empty_like(positions)
        for source, epoch in sorted(set(zip(sources.tolist(), passes.tolist()))):
            chosen = (sources == source) & (passes == epoch)
            order = self.permutations.get(source, int(self.lengths[source]), self.seed + 1_000_003 * source + epoch)
            indices[chosen] = self.offsets[source] + order[places[chosen]]
        return list(indices.split(self.micro))
