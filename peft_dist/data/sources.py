"""Where documents come from: local files (text, jsonl, parquet) or the builtin corpus, read into a
``datasets.Dataset`` with a ``text`` column or ``prompt``/``response`` columns, and their checks."""
from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path

import datasets

from peft_dist.config.schema import DataConfig

BUILTIN_STDLIB = "builtin:python-stdlib"
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".parquet": "parquet"}


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file (and line)."""


def stdlib_documents(limit: int = 0) -> list[str]:
    """Source files of this Python's standard library, sorted by path: an offline corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore").strip()
        if text:
            docs.append(text)
        if limit and len(docs) >= limit:
            break
    return docs


def resolve_files(path: str, fmt: str) -> tuple[list[str], str]:
    """Expand a file, directory or glob into data files and decide their format."""
    candidates = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    files: list[str] = []
    for candidate in candidates:
        p = Path(candidate)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix in EXTENSIONS)
        elif p.is_file():
            files.append(str(p))
    if not files:
        raise DataError(f"data.path: {path!r} matches no data file; pass a .txt, .jsonl or .parquet file, "
                        f"a directory of them, a glob, or {BUILTIN_STDLIB}")
    unknown = [f for f in files if Path(f).suffix not in EXTENSIONS]
    if fmt == "auto" and unknown:
        supported = ", ".join(f"{ext} ({kind})" for ext, kind in EXTENSIONS.items())
        raise DataError(f"data.path: {unknown[0]} is not a supported data file; supported: {supported}. Convert "
                        "it, or set data.format if its content is one of these formats")
    formats = {fmt} if fmt != "auto" else {EXTENSIONS[Path(f).suffix] for f in files}
    if len(formats) != 1:
        raise DataError(f"data.path: cannot tell one format for {files[:3]}; set data.format to text, "
                        "jsonl or parquet and use files of that one format")
    for f in files:
        if Path(f).stat().st_size == 0:
            raise DataError(f"{f}: the file is empty")
    return files, formats.pop()


def check_jsonl(path: str, required: list[str]) -> None:
    """Parse a jsonl file line by line so that a bad line is reported with its number."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg}); each line must be one "
                                "JSON object") from None
            missing = [k for k in required if not isinstance(record, dict) or k not in record]
            if missing:
                raise DataError(f"{path}:{number}: missing field {missing[0]!r}; set data.text_field "
                                "(or data.prompt_field and data.response_field) to the field names used")


def read_documents(cfg: DataConfig, cache_dir: str) -> datasets.Dataset:
    """Documents as a dataset with a ``text`` column, or ``prompt`` and ``response`` columns, empty ones
    dropped. ``datasets`` writes its Arrow copy of the raw files under ``cache_dir``."""
    if cfg.path == BUILTIN_STDLIB:
        dataset = datasets.Dataset.from_dict({"text": stdlib_documents(cfg.max_documents)})
    else:
        files, fmt = resolve_files(cfg.path, cfg.format)
        fields = [cfg.prompt_field, cfg.response_field] if cfg.prompt_field else [cfg.text_field]
        if fmt == "jsonl":
            for f in files:
                check_jsonl(f, fields)
            dataset = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
        elif fmt == "parquet":
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        else:
            fields = ["text"]
            dataset = datasets.load_dataset("text", data_files=files, split="train", sample_by="paragraph",
                                            cache_dir=cache_dir)
        missing = [k for k in fields if k not in dataset.column_names]
        if missing:
            raise DataError(f"{files[0]}: no column {missing[0]!r}; columns are {dataset.column_names}")
        if cfg.max_documents:
            dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
        names = ["prompt", "response"] if cfg.prompt_field else ["text"]
        dataset = dataset.select_columns(fields).rename_columns({k: n for k, n in zip(fields, names) if k != n})
    dataset = dataset.filter(lambda rows: [any(str(v).strip() for v in row) for row in zip(*rows.values())],
                             batched=True)
    if len(dataset) == 0:
        raise DataError(f"data.path: {cfg.path!r} holds no non-empty documents")
    return dataset


def check_block_size(block_size: int, max_positions: int | None) -> None:
    if max_positions is not None and block_size > max_positions:
        raise DataError(f"data.block_size: {block_size} exceeds the model's context of {max_positions} "
                        f"tokens; set data.block_size <= {max_positions}")
