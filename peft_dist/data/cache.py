"""Data prepared once per corpus and read memory-mapped by every rank.

The first process to need a corpus takes a file lock, reads, splits (by document, from ``data.seed``),
tokenizes and packs it (``prepare``, through ``datasets``) and publishes the blocks as Arrow with one atomic
rename; every other process waits on the lock and then reuses them. The cache key covers everything that
decides the blocks: the files of ``data.path`` and ``data.eval_path`` (path, size, mtime; of a hub dataset, its
Arrow files in the datasets cache), their layout, the tokenizer and the chat template, every data setting but
where the cache is and how many processes tokenize, and the code that reads and packs. Each rank then
memory-maps the Arrow files through pyarrow: the blocks cost page cache, not private memory, however large the
corpus, and a rank that did not prepare them imports ``datasets`` only to locate a saved or hub source.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from peft_dist.config.load import json_sha256
from peft_dist.config.schema import DataConfig
from peft_dist.data.prepare import prepare
from peft_dist.data.sources import (BUILTIN_CORPORA, DataError, Source, chat_template, check_block_size,
                                    data_sources, holds_conversations)

COLUMNS = ("input_ids", "labels", "position_ids")
CODE = ("formats.py", "packing.py", "sources.py", "prepare.py")  # this package's files that decide the blocks


@dataclass
class Split:
    """The packed blocks of one split: Arrow record batches of equal-length lists, memory-mapped."""

    batches: list[pa.RecordBatch]

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])  # first block of each record batch

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` and ``position_ids`` of the blocks at ``indices``, ``(len, block)`` longs.
        Each block is sliced from its own record batch: ``Table.take`` would first join all of a column's
        batches, reading the whole split into private memory."""
        indices = [int(i) for i in indices]
        where = np.searchsorted(self.starts, indices, side="right") - 1
        rows = pa.Table.from_batches([self.batches[b].slice(i - self.starts[b], 1) for i, b in zip(indices, where)])
        return {name: longs(rows.column(name).combine_chunks().flatten()).view(len(indices), -1) for name in COLUMNS}


def longs(values: pa.Array) -> torch.Tensor:
    """An int32 or int64 Arrow array without nulls as a new int64 tensor, read from its values buffer:
    ``Array.to_numpy`` would import pandas (24 MiB resident) in a process that has not."""
    width = values.type.bit_width // 8
    flat = np.frombuffer(values.buffers()[1], dtype=f"int{8 * width}", count=len(values), offset=values.offset * width)
    return torch.from_numpy(flat.astype(np.int64))


def read_split(directory: Path) -> Split:
    """A split that ``Dataset.save_to_disk`` wrote: its Arrow stream files, in order, memory-mapped by pyarrow."""
    files = json.loads((directory / "state.json").read_text())["_data_files"]
    return Split([batch for f in files for batch in pa.ipc.open_stream(pa.memory_map(str(directory / f["filename"])))])


@dataclass
class Blocks:
    """Packed training and evaluation blocks, and where they are cached."""

    train: Split
    eval: Split
    directory: Path
    prepared_here: bool  # this process tokenized the corpus (False: it reused the cache)
    prepared: dict  # prepared.json: documents, blocks and, for whole packing, documents left out, per split

    def line(self, preparer: int | None) -> str:
        """One log line; ``preparer``: the rank of this job that tokenized the corpus (None: an earlier job)."""
        how = f"tokenized by rank {preparer}" if preparer is not None else "tokenized by an earlier job"
        left_out = "; ".join(f"{name}: {c['overlong']} longer than a block {c['overlong_action']}, "
                             f"{c['without_loss']} without loss dropped"
                             for name, c in self.prepared.items() if isinstance(c, dict) and "overlong" in c)
        return (f"data: {len(self.train)} training and {len(self.eval)} evaluation blocks of "
                f"{self.prepared['block_size']} tokens" + (f" ({left_out})" if left_out else "")
                + f"; {how}, cached in {self.directory}")


def tokenizer_identity(tokenizer) -> str:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalizers) and its EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return json_sha256([type(tokenizer).__name__, definition, tokenizer.eos_token_id])


def corpus_identity(source: Source) -> object:
    """What identifies a located source's documents: the files (path, size, mtime), their kind and layout."""
    return [source.kind, source.layout,
            [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in source.files]]


def cache_key(cfg: DataConfig, found: list[Source], tokenizer, template: str | None) -> str:
    """``found``: the located sources of ``data.path`` and ``data.eval_path`` (``data_sources``)."""
    corpora = [corpus_identity(source) for source in found]
    corpora += [[path, sysconfig.get_paths()["stdlib"], sys.version] for path in (cfg.path, cfg.eval_path)
                if path in BUILTIN_CORPORA]
    code = [hashlib.sha256(Path(__file__).with_name(name).read_bytes()).hexdigest() for name in CODE]
    # sources: one source's settings are the whole key, so a mixture's source shares the cache of that data.path
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "num_proc", "sources")}
    return json_sha256([corpora, code, tokenizer_identity(tokenizer), template, settings])[:20]


def cache_directory(cfg: DataConfig, found: list[Source], tokenizer, template: str | None) -> Path:
    """Where the blocks of ``cfg``'s corpus are, or will be, cached (``cache_key``'s arguments)."""
    return Path(cfg.cache_dir).expanduser() / cache_key(cfg, found, tokenizer, template)


@contextmanager
def cache_lock(directory: Path):
    """An exclusive ``flock`` on ``directory``'s lock file in the cache, waited for."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        handle = open(directory.parent / f"{directory.name}.lock", "a")
    except OSError as err:
        raise DataError(f"data.cache_dir: cannot write in {directory.parent} ({err.strerror}); set "
                        "data.cache_dir to a writable directory") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_blocks(cfg: DataConfig, tokenizer, max_positions: int | None = None, progress: bool = True) -> Blocks:
    """The packed blocks of ``cfg``'s corpus: prepared here if no process has yet (with progress bars if
    ``progress``), memory-mapped."""
    check_block_size(cfg.block_size, max_positions)
    found = data_sources(cfg)  # located once: the template and the key both need them
    template = chat_template(cfg, tokenizer) if holds_conversations(found) else None
    directory = cache_directory(cfg, found, tokenizer, template)
    prepared_here = False
    if not directory.is_dir():
        with cache_lock(directory):
            if not directory.is_dir():
                prepare(cfg, tokenizer, template, directory, progress)
                prepared_here = True
    prepared = json.loads((directory / "prepared.json").read_text())
    return Blocks(read_split(directory / "training"), read_split(directory / "evaluation"), directory,
                  prepared_here, prepared)
