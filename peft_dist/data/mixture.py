"""The training data as sources: ``data.path`` alone, or the weighted ``data.sources`` of a mixture. Each source is
prepared and cached on its own (``cache.build_blocks``: the cache directory a lone ``data.path`` with its settings
would have), keeps its own evaluation split, and its training blocks join one split that the sampler indexes."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from peft_dist.config.schema import DataConfig, DataSource
from peft_dist.data.cache import Blocks, Split, build_blocks
from peft_dist.data.sampler import GlobalBatchSampler, MixtureSampler
from peft_dist.data.sources import DataError


@dataclass
class Mixture:
    """The blocks of each source (in ``data.sources`` order) and their training blocks as one split, source after
    source (a lone source's own split)."""

    sources: list[DataSource]
    parts: list[Blocks]
    train: Split

    @property
    def evals(self) -> dict[str, Split]:
        """Each source's evaluation split, by name."""
        return {source.name: part.eval for source, part in zip(self.sources, self.parts)}

    def sampler(self, micro_batch_size: int, accumulation: int, world_size: int, rank: int,
                seed: int) -> GlobalBatchSampler | MixtureSampler:
        """The batch order: a lone source's as it has always been, several sources' by their weights."""
        if len(self.parts) == 1:
            return GlobalBatchSampler(len(self.train), micro_batch_size, accumulation, world_size, rank, seed)
        return MixtureSampler([len(part.train) for part in self.parts], [source.weight for source in self.sources],
                              micro_batch_size, accumulation, world_size, rank, seed)

    def lines(self, prepared_by_rank: list[list[bool]]) -> list[str]:
        """One log line per source (``Blocks.line``); ``prepared_by_rank[r][i]``: rank ``r`` tokenized source ``i``."""
        lines = []
        total = sum(source.weight for source in self.sources)
        for i, (source, part) in enumerate(zip(self.sources, self.parts)):
            preparer = next((rank for rank, prepared in enumerate(prepared_by_rank) if prepared[i]), None)
            line = part.line(preparer)
            if len(self.parts) > 1:
                line = (f"data: source {source.name} ({source.weight / total:.1%} of the training blocks): "
                        + line.removeprefix("data: "))
            lines.append(line)
        return lines


@contextmanager
def naming_source(sources: list[DataSource], index: int) -> Iterator[None]:
    """A ``DataError`` raised for source ``index`` of a mixture says which source it is (of a lone ``data.path``,
    it is clear already)."""
    try:
        yield
    except DataError as err:
        if len(sources) == 1:
            raise
        raise DataError(f"data.sources.{index} ({sources[index].name}): {err}") from None


def build_mixture(cfg: DataConfig, tokenizer, max_positions: int | None = None, progress: bool = True) -> Mixture:
    """Every source of ``cfg`` prepared if no process has yet (``cache.build_blocks``), memory-mapped."""
    sources = cfg.mixture()
    parts = []
    for index, source in enumerate(sources):
        with naming_source(sources, index):
            parts.append(build_blocks(source.data, tokenizer, max_positions, progress))
    if len(parts) == 1:
        return Mixture(sources, parts, parts[0].train)
    return Mixture(sources, parts, Split([batch for part in parts for batch in part.train.batches]))
