"""Data prepared once per corpus and read memory-mapped by every rank.

The first process to need a corpus takes a file lock, reads, splits (by document, from ``data.seed``),
tokenizes and packs it through ``datasets`` and publishes the blocks as Arrow with one atomic rename;
every other process waits on the lock and then reuses them. The cache key covers everything that decides
the blocks: the files of ``data.path`` and ``data.eval_path`` (path, size, mtime; of a hub dataset, its Arrow
files in the datasets cache), their layout, the tokenizer and the chat template, every data setting but where
the cache is and how many processes tokenize, and the code that reads and packs. Each rank then memory-maps
the Arrow files: the blocks cost page cache, not private memory, however large the corpus.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import pyarrow.compute
import torch

from peft_dist.config.load import json_sha256
from peft_dist.config.schema import DataConfig
from peft_dist.data import formats, packing, sources
from peft_dist.data.packing import fit_documents, pack_documents, pack_whole_documents, tokenize_documents
from peft_dist.data.sources import (BUILTIN_CORPORA, DataError, Source, chat_template, check_block_size,
                                    data_sources, holds_conversations, read_documents)

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
    code = [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (formats, packing, sources)]
    # sources: one source's settings are the whole key, so a mixture's source shares the cache of that data.path
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "num_proc", "sources")}
    return json_sha256([corpora, code, tokenizer_identity(tokenizer), template, settings])[:20]


def cache_directory(cfg: DataConfig, found: list[Source], tokenizer, template: str | None) -> Path:
    """Where the blocks of ``cfg``'s corpus are, or will be, cached (``cache_key``'s arguments)."""
    return Path(cfg.cache_dir).expanduser() / cache_key(cfg, found, tokenizer, template)


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


def whole_packing(cfg: DataConfig, docs: datasets.Dataset) -> bool:
    """``data.packing``; ``auto``: whole documents unless they are plain text."""
    return cfg.packing == "whole" or (cfg.packing == "auto" and "text" not in docs.column_names)


def pack_split(docs: datasets.Dataset, tokenizer, cfg: DataConfig,
               template: str | None) -> tuple[datasets.Dataset, dict]:
    """Tokenize (in ``data.num_proc`` processes) and pack (in one, so the blocks never depend on it), in batches
    small enough that the preparing rank's memory stays bounded whatever the corpus size. Returns the blocks
    and the counts of documents (and, for whole packing, of those longer than a block and of those dropped
    for carrying no loss)."""
    workers = cfg.num_proc or (min(8, len(os.sched_getaffinity(0))) if len(docs) >= PARALLEL_FROM else 1)
    tokenized = docs.map(tokenize_documents, batched=True, batch_size=TOKENIZE_BATCH,
                         fn_kwargs={"tokenizer": tokenizer, "template": template}, remove_columns=docs.column_names,
                         num_proc=workers if workers > 1 else None, desc="tokenizing")
    counts: dict = {"documents": len(docs)}
    pack, pack_kwargs = pack_documents, {"block_size": cfg.block_size}
    if whole_packing(cfg, docs):
        lengths = pyarrow.compute.list_value_length(tokenized.data.column("input_ids"))
        overlong = pyarrow.compute.sum(pyarrow.compute.greater(lengths, cfg.block_size)).as_py() or 0
        tokenized = tokenized.map(fit_documents, batched=True, remove_columns=tokenized.column_names,
                                  fn_kwargs={"block_size": cfg.block_size, "overlong": cfg.overlong}, desc="fitting")
        dropped = overlong if cfg.overlong == "drop" else 0
        counts.update(overlong=overlong, overlong_action="dropped" if cfg.overlong == "drop" else "truncated",
                      without_loss=len(docs) - len(tokenized) - dropped)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        pack, pack_kwargs = pack_whole_documents, {"block_size": cfg.block_size, "pad_id": pad_id}
    lengths = pyarrow.compute.list_value_length(tokenized.data.column("input_ids"))
    mean_length = max(1.0, (pyarrow.compute.sum(lengths).as_py() or 0) / max(1, len(tokenized)))
    documents_per_batch = max(1, math.ceil(PACK_BATCH_BLOCKS * cfg.block_size / mean_length))
    blocks = tokenized.map(pack, batched=True, batch_size=documents_per_batch, fn_kwargs=pack_kwargs,
                           remove_columns=tokenized.column_names, desc="packing")
    return blocks, counts


def splits(cfg: DataConfig, staging: Path) -> list[tuple[str, datasets.Dataset]]:
    """The training and evaluation documents: ``data.eval_path``'s, or ``eval_fraction`` of ``data.path``'s
    held out by document (from ``data.seed``)."""
    docs = read_documents(cfg, cfg.path, str(staging / "raw" / "training"))
    if cfg.eval_path:
        return [("training", docs), ("evaluation", read_documents(cfg, cfg.eval_path, str(staging / "raw" / "eval")))]
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_eval = max(1, round(len(docs) * cfg.eval_fraction))
    return [("training", docs.select(order[n_eval:])), ("evaluation", docs.select(order[:n_eval]))]


def empty_split_error(cfg: DataConfig, name: str, counts: dict) -> DataError:
    if "overlong" not in counts:
        return DataError(f"data: the {name} split has fewer than block_size={cfg.block_size} tokens; add data, "
                         "lower data.block_size or change data.eval_fraction")
    return DataError(f"data: no document of the {name} split fits data.block_size={cfg.block_size} with a token "
                     f"of loss ({counts['overlong']} longer, {counts['overlong_action']}; {counts['without_loss']} "
                     "without loss); raise data.block_size or set data.overlong: truncate")


def prepare(cfg: DataConfig, tokenizer, template: str | None, directory: Path) -> None:
    """Read, split, tokenize and pack into a staging directory, then publish it as ``directory``."""
    staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}.staging-", dir=directory.parent))
    try:
        started = time.monotonic()
        counts = {}
        for name, docs in splits(cfg, staging):
            blocks, counts[name] = pack_split(docs, tokenizer, cfg, template)
            if len(blocks) == 0:
                raise empty_split_error(cfg, name, counts[name])
            blocks.save_to_disk(str(staging / name))
            counts[name]["blocks"] = len(blocks)
            del blocks, docs
        shutil.rmtree(staging / "raw", ignore_errors=True)
        (staging / "prepared.json").write_text(json.dumps(
            {"path": cfg.path, "eval_path": cfg.eval_path, "block_size": cfg.block_size, **counts,
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
    found = data_sources(cfg)  # located once: the template and the key both need them
    template = chat_template(cfg, tokenizer) if holds_conversations(found) else None
    directory = cache_directory(cfg, found, tokenizer, template)
    prepared_here = False
    if not directory.is_dir():
        with cache_lock(directory):
            if not directory.is_dir():
                prepare(cfg, tokenizer, template, directory)
                prepared_here = True
    train, evaluation = (datasets.load_from_disk(str(directory / name)).with_format("torch")
                         for name in ("training", "evaluation"))
    prepared = json.loads((directory / "prepared.json").read_text())
    return Blocks(Split(train), Split(evaluation), directory, prepared_here, prepared)
