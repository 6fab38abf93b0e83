"""Preparing a corpus, once, by the process that takes its cache lock (``cache.build_blocks``): read the
documents of its sources, split them by document, tokenize and pack them through ``datasets`` and publish the
blocks as Arrow with one atomic rename.

``datasets`` is imported inside the functions that read with it, not at the top (about 30 MiB resident per
process, and pandas with it where nothing else has imported pandas): the ranks that reuse a prepared corpus of
files never load it.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.compute
import torch

from peft_dist.config.schema import DataConfig
from peft_dist.data.formats import LAYOUTS, check_record, required_fields, standard_columns
from peft_dist.data.packing import fit_documents, pack_documents, pack_whole_documents, tokenize_documents
from peft_dist.data.sources import (BUILTIN_CORPORA, DataError, Source, check_jsonl, load_hub, load_saved,
                                    locate)

if TYPE_CHECKING:
    import datasets

PARALLEL_FROM = 10_000  # documents; fewer tokenize faster in one process than the workers take to start
TOKENIZE_BATCH = 64  # documents per tokenizer call: bounds the Python lists alive at once
PACK_BATCH_BLOCKS = 256  # blocks per packing batch: the dropped tail (< 1 block a batch) stays under 0.4%


def check_rows(cfg: DataConfig, source: Source, dataset: datasets.Dataset) -> None:
    """``check_record`` on every parquet, saved or hub row, naming the row (jsonl rows: ``check_jsonl``)."""
    index = 0
    for rows in dataset.iter(batch_size=1000):
        for values in zip(*rows.values()):
            problem = check_record(cfg, source.layout, dict(zip(rows, values)))
            if problem:
                raise DataError(f"{source.path}: row {index}: {problem}")
            index += 1


def load_rows(cfg: DataConfig, source: Source, cache_dir: str) -> datasets.Dataset:
    """The raw rows of ``source``; ``datasets`` writes its Arrow copy of the files under ``cache_dir``."""
    import datasets  # here, not at the top: see the module's docstring

    if source.kind == "saved":
        return load_saved(source.path, cfg.split)
    if source.kind == "hub":
        return load_hub(source.path, cfg.split)
    if source.kind == "jsonl":
        for f in source.files:
            check_jsonl(f, cfg, source.layout)
        return datasets.load_dataset("json", data_files=source.files, split="train", cache_dir=cache_dir)
    if source.kind == "parquet":
        return datasets.load_dataset("parquet", data_files=source.files, split="train", cache_dir=cache_dir)
    return datasets.load_dataset("text", data_files=source.files, split="train", sample_by="paragraph",
                                 cache_dir=cache_dir)


def read_documents(cfg: DataConfig, path: str, cache_dir: str) -> datasets.Dataset:
    """Documents as a dataset with a ``text`` column, ``prompt`` and ``response`` columns or a ``messages``
    column, empty ones dropped. Whatever ``datasets`` writes goes under ``cache_dir``, never next to a saved
    dataset."""
    import datasets  # here, not at the top: see the module's docstring

    if path in BUILTIN_CORPORA:
        dataset = datasets.Dataset.from_dict({"text": BUILTIN_CORPORA[path](cfg.max_documents)})
    else:
        source = locate(cfg, path)
        dataset = load_rows(cfg, source, cache_dir)
        if cfg.max_documents:
            dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
        if source.kind != "text":  # text files are read into a "text" column already
            missing = [k for k in required_fields(cfg, source.layout) if k not in dataset.column_names]
            if missing:
                raise DataError(f"{source.path}: no column {missing[0]!r}; columns are {dataset.column_names}")
            if source.kind in ("parquet", "saved", "hub") and source.layout in LAYOUTS:  # text, pairs: nothing to check
                check_rows(cfg, source, dataset)
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            dataset = dataset.map(standard_columns, batched=True, remove_columns=dataset.column_names,
                                  fn_kwargs={"cfg": cfg, "layout": source.layout}, desc="reading",
                                  cache_file_name=str(Path(cache_dir) / "documents.arrow"))
    dataset = dataset.filter(lambda rows: [any(str(v).strip() for v in row) for row in zip(*rows.values())],
                             batched=True)
    if len(dataset) == 0:
        raise DataError(f"data.path: {path!r} holds no non-empty documents")
    return dataset


def release_freed_memory() -> None:
    """Hand the heap that tokenizing freed back to the OS (glibc keeps it otherwise): the rank that prepared
    then trains with the memory of the ranks that did not."""
    gc.collect()
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


def prepare(cfg: DataConfig, tokenizer, template: str | None, directory: Path, progress: bool = True) -> None:
    """Read, split, tokenize and pack into a staging directory, then publish it as ``directory``. ``progress``:
    whether ``datasets`` shows its progress bars (the trainer shows them on rank 0 only, whichever rank prepares)."""
    if not progress:
        import datasets  # here, not at the top: see the module's docstring

        datasets.disable_progress_bars()
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
