"""Data prepared once per corpus and read memory-mapped by every rank.

The first process to need a corpus takes a file lock, reads, splits (by document, from ``data.seed``),
tokenizes and packs it through ``datasets`` and publishes the blocks as Arrow with one atomic rename;
every other process waits on the lock and then reuses them. The cache key covers everything that decides
the blocks: the files (path, size, mtime), the tokenizer, the fields, block size, split, document cap and
the code that packs. Each rank then memory-maps the Arrow files: the blocks cost page cache, not private
memory, however large the corpus.
"""
from __future__ import annotations

import ctypes
import fcntl
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute
import torch

from peft_dist.config.schema import DataConfig
from peft_dist.data import packing, sources
from peft_dist.data.packing import pack_documents, tokenize_documents
from peft_dist.data.sources import BUILTIN_STDLIB, DataError, check_block_size, read_documents, resolve_files

COLUMNS = ("input_ids", "labels", "position_ids")
PARALLEL_FROM = 10_000  # documents; fewer tokenize faster in one process than the workers take to start
TOKENIZE_BATCH = 64  # documents per tokenizer call: bounds the Python lists alive at once
PACK_BATCH_BLOCKS = 256  # blocks per packing batch: the dropped tail (< 1 block a batch) stays under 0.4%


@dataclass
class Split:
    """The packed blocks of one split, memory-mapped."""

    rows: datasets.Dataset

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` and ``position_ids`` of the blocks at ``indices``, ``(len, block)`` longs."""
        rows = self.rows[[int(i) for i in indices]]
        return {name: rows[name].long() for name in COLUMNS}


@dataclass
class Blocks:
    """Packed training and evaluation blocks, and where they are cached."""

    train: Split
    eval: Split
    directory: Path
    prepared_here: bool  # this process tokenized the corpus (False: it reused the cache)

    def line(self) -> str:
        how = "prepared" if self.prepared_here else "reused"
        return (f"data: {len(self.train)} training and {len(self.eval)} evaluation blocks of "
                f"{len(self.train.rows[0]['input_ids'])} tokens, {how} in {self.directory}")


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokenizer_identity(tokenizer) -> str:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalizers) and its EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest([type(tokenizer).__name__, definition, tokenizer.eos_token_id])


def cache_key(cfg: DataConfig, tokenizer) -> str:
    if cfg.path == BUILTIN_STDLIB:
        corpus: object = [cfg.path, sysconfig.get_paths()["stdlib"], sys.version]
    else:
        files, fmt = resolve_files(cfg.path, cfg.format)
        corpus = [fmt, [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]]
    code = [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (packing, sources)]
    return _digest([corpus, code, tokenizer_identity(tokenizer), cfg.text_field, cfg.prompt_field,
                    cfg.response_field, cfg.block_size, cfg.eval_fraction, cfg.max_documents, cfg.seed])[:20]


def release_freed_memory() -> None:
    """Hand the heap that tokenizing freed back to the OS (glibc keeps it otherwise): the rank that prepared
    then trains with the memory of the ranks that did not."""
    gc.collect()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


def pack_split(docs: datasets.Dataset, tokenizer, block_size: int, num_proc: int) -> datasets.Dataset:
    """Tokenize (in ``num_proc`` processes) and pack (in one, so the blocks never depend on ``num_proc``),
    in batches small enough that the preparing rank's memory stays bounded whatever the corpus size."""
    workers = num_proc or (min(8, len(os.sched_getaffinity(0))) if len(docs) >= PARALLEL_FROM else 1)
    tokenized = docs.map(tokenize_documents, batched=True, batch_size=TOKENIZE_BATCH,
                         fn_kwargs={"tokenizer": tokenizer}, remove_columns=docs.column_names,
                         num_proc=workers if workers > 1 else None, desc="tokenizing")
    lengths = pyarrow.compute.list_value_length(tokenized.data.column("input_ids"))
    mean_length = max(1.0, pyarrow.compute.sum(lengths).as_py() / max(1, len(tokenized)))
    documents_per_batch = max(1, math.ceil(PACK_BATCH_BLOCKS * block_size / mean_length))
    return tokenized.map(pack_documents, batched=True, batch_size=documents_per_batch,
                         fn_kwargs={"block_size": block_size}, remove_columns=tokenized.column_names,
                         desc="packing")


def prepare(cfg: DataConfig, tokenizer, directory: Path) -> None:
    """Read, split, tokenize and pack into a staging directory, then publish it as ``directory``."""
    staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}.staging-", dir=directory.parent))
    try:
        started = time.monotonic()
        docs = read_documents(cfg, str(staging / "raw"))
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, round(len(docs) * cfg.eval_fraction))
        counts = {}
        for name, indices in (("training", order[n_eval:]), ("evaluation", order[:n_eval])):
            blocks = pack_split(docs.select(indices), tokenizer, cfg.block_size, cfg.num_proc)
            if len(blocks) == 0:
                raise DataError(f"data: the {name} split has fewer than block_size={cfg.block_size} tokens; "
                                "add data, lower data.block_size or change data.eval_fraction")
            blocks.save_to_disk(str(staging / name))
            counts[name] = {"documents": len(indices), "blocks": len(blocks)}
            del blocks
        shutil.rmtree(staging / "raw", ignore_errors=True)
        (staging / "prepared.json").write_text(json.dumps(
            {"path": cfg.path, "block_size": cfg.block_size, **counts,
             "seconds": round(time.monotonic() - started, 1)}, indent=2))
        try:
            staging.rename(directory)
        except OSError:
            if not directory.is_dir():  # else another node, without a shared lock, published it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        release_freed_memory()


def build_blocks(cfg: DataConfig, tokenizer, max_positions: int | None = None) -> Blocks:
    """The packed blocks of ``cfg``'s corpus: prepared here if no process has yet, memory-mapped."""
    check_block_size(cfg.block_size, max_positions)
    directory = Path(cfg.cache_dir).expanduser() / cache_key(cfg, tokenizer)
    prepared_here = False
    if not directory.is_dir():
        with cache_lock(directory):
            if not directory.is_dir():
                prepare(cfg, tokenizer, directory)
                prepared_here = True
    train, evaluation = (datasets.load_from_disk(str(directory / name)).with_format("torch")
                         for name in ("training", "evaluation"))
    return Blocks(Split(train), Split(evaluation), directory, prepared_here)
