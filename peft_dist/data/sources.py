"""Where documents come from: local files (text, jsonl, parquet), a directory written by
``Dataset.save_to_disk``, a Hugging Face dataset id already in the local datasets cache, or a builtin corpus; their
layout (``formats``) and the checks that run before anything is read (``prepare`` reads them).

Every rank locates its sources (the cache key needs them), so this module does not import ``datasets`` (about
30 MiB resident per process, and pandas with it where nothing else has imported pandas): only a saved or hub
source's lookup does, where it happens."""
from __future__ import annotations

import ast
import glob
import itertools
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet

from peft_dist.config.schema import DataConfig
from peft_dist.data.formats import CONVERSATIONS, LAYOUTS, check_record, detect_layout, required_fields

if TYPE_CHECKING:
    import datasets

BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_DOCSTRINGS = "builtin:python-docstrings"
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".parquet": "parquet"}
SAVED_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")  # what save_to_disk writes


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file (and line)."""


@dataclass
class Source:
    """The files behind ``data.path`` (or ``data.eval_path``), how to read them and what their rows mean."""

    path: str
    files: list[str]  # of a hub dataset: its Arrow files in the datasets cache
    kind: str  # text, jsonl, parquet, saved (a save_to_disk directory) or hub (a cached hub dataset)
    layout: str  # text, pair, chat, sharegpt or alpaca (formats.py)


def stdlib_modules() -> Iterator[tuple[Path, str]]:
    """``(path, source)`` of each non-empty module of this Python's standard library (no tests, no
    site-packages), sorted by path: what both builtin corpora are read from, without network."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore").strip()
        if text:
            yield path, text


def stdlib_documents(limit: int = 0) -> list[str]:
    """``builtin:python-stdlib``: the standard library's source, one document per module, the first ``limit``
    (0: all)."""
    return [text for _, text in itertools.islice(stdlib_modules(), limit or None)]


def docstrings(source: str) -> str:
    """Module, class and function docstrings of a Python source, in order, one paragraph each ("" when it does
    not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


def docstring_modules() -> Iterator[tuple[Path, str]]:
    """``(path, docstrings)`` of the odd-numbered modules of ``stdlib_modules`` that have any. The shipped
    pretrained base (``builtin:stdlib-llama``) learnt the source of even-numbered ones only (bench/quality.py), so
    this English prose about code comes from files it never saw: adapting to it shows."""
    for path, source in itertools.islice(stdlib_modules(), 1, None, 2):
        text = docstrings(source)
        if text:
            yield path, text


def docstring_documents(limit: int = 0) -> list[str]:
    """``builtin:python-docstrings``: one document per module of ``docstring_modules``, the first ``limit``
    (0: all)."""
    return [text for _, text in itertools.islice(docstring_modules(), limit or None)]


BUILTIN_CORPORA = {BUILTIN_STDLIB: stdlib_documents, BUILTIN_DOCSTRINGS: docstring_documents}


def resolve_files(path: str, fmt: str) -> tuple[list[str], str]:
    """Expand a file, directory or glob into data files and decide their kind (``fmt`` when it names one)."""
    if Path(path).is_dir() and any((Path(path) / m).is_file() for m in SAVED_MARKERS):
        return sorted(str(f) for f in Path(path).rglob("*") if f.is_file()), "saved"
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
                        f"a directory of them, a glob, a Dataset.save_to_disk directory, a cached Hugging Face "
                        f"dataset id (user/name), {BUILTIN_STDLIB} or {BUILTIN_DOCSTRINGS}")
    kind = "auto" if fmt in LAYOUTS else fmt
    unknown = [f for f in files if Path(f).suffix not in EXTENSIONS]
    if kind == "auto" and unknown:
        supported = ", ".join(f"{ext} ({k})" for ext, k in EXTENSIONS.items())
        raise DataError(f"data.path: {unknown[0]} is not a supported data file; supported: {supported} and "
                        "Dataset.save_to_disk directories. Convert it, or set data.format if its content is one "
                        "of these formats")
    kinds = {kind} if kind != "auto" else {EXTENSIONS[Path(f).suffix] for f in files}
    if len(kinds) != 1:
        raise DataError(f"data.path: cannot tell one format for {files[:3]}; set data.format to text, "
                        "jsonl or parquet and use files of that one format")
    for f in files:
        if Path(f).stat().st_size == 0:
            raise DataError(f"{f}: the file is empty")
    return files, kinds.pop()


def pick_split(path: str, loaded: datasets.Dataset | datasets.DatasetDict, split: str) -> datasets.Dataset:
    """``loaded`` itself, or of a ``DatasetDict`` (a dict of splits) the split ``data.split``."""
    if isinstance(loaded, dict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; set data.split to one of {sorted(loaded)}")
        return loaded[split]
    return loaded


def load_saved(path: str, split: str) -> datasets.Dataset:
    """A ``save_to_disk`` dataset, memory-mapped; of a ``DatasetDict``, the split ``data.split``."""
    import datasets  # here, not at the top: only for a saved source (see the module's docstring)

    return pick_split(path, datasets.load_from_disk(path), split)


def is_hub_id(path: str) -> bool:
    """Whether ``path`` reads as a hub dataset id (``user/name``) rather than a local path: nothing exists there,
    it has one '/', no glob and no data file extension."""
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not Path(path).exists()
            and Path(path).suffix not in EXTENSIONS)


def load_hub(dataset_id: str, split: str) -> datasets.Dataset:
    """The split ``data.split`` of a hub dataset from the local datasets cache, memory-mapped; never downloads:
    ``datasets`` is offline for the call, so ``load_dataset(id)`` only looks in the local cache (it reads
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE into ``datasets.config`` once, at import)."""
    import datasets  # here, not at the top: only for a hub source (see the module's docstring)

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        loaded = datasets.load_dataset(dataset_id)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise DataError(
            f"data.path: {dataset_id!r} is no local file or directory, and no Hugging Face dataset of that id is "
            f"in the local datasets cache {datasets.config.HF_DATASETS_CACHE} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}). Nothing is downloaded at run time: run datasets.load_dataset("
            f"{dataset_id!r}) once on a machine with network (with this HF_HOME / HF_DATASETS_CACHE), or save the "
            "dataset with Dataset.save_to_disk and set data.path to that directory") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = before
    return pick_split(dataset_id, loaded, split)


def first_fields(files: list[str], kind: str) -> list[str]:
    """The field names of the first record (jsonl) or the columns (parquet)."""
    if kind == "parquet":
        return pyarrow.parquet.read_schema(files[0]).names
    if kind == "jsonl":
        _, record = next(json_records(files[0]), ("", {}))
        return list(record) if isinstance(record, dict) else []
    return ["text"]


def locate(cfg: DataConfig, path: str) -> Source:
    """The files at ``path``, their kind and the layout of their rows (``data.format``, else the fields)."""
    if is_hub_id(path):
        dataset = load_hub(path, cfg.split)
        files, kind, fields = [f["filename"] for f in dataset.cache_files], "hub", dataset.column_names
    else:
        files, kind = resolve_files(path, cfg.format)
        fields = load_saved(path, cfg.split).column_names if kind == "saved" else first_fields(files, kind)
    layout = detect_layout(cfg, fields)
    if kind == "text" and layout != "text":
        raise DataError(f"data.format: {layout} rows are read from jsonl, parquet or a Dataset.save_to_disk "
                        f"directory, not from text files ({files[0]})")
    return Source(path, files, kind, layout)


def data_sources(cfg: DataConfig) -> list[Source]:
    """The sources of ``data.path`` and ``data.eval_path`` (none for a builtin corpus)."""
    return [locate(cfg, p) for p in (cfg.path, cfg.eval_path) if p and p not in BUILTIN_CORPORA]


def json_records(path: str) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for every record of a jsonl file (``file:line``) or of a file holding one JSON
    array (``file: record N``; Alpaca's own ``alpaca_data.json`` is one)."""
    with open(path, encoding="utf-8") as handle:
        if handle.read(4096).lstrip().startswith("["):
            handle.seek(0)
            try:
                records = json.load(handle)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
            yield from ((f"{path}: record {number}", r) for number, r in enumerate(records, start=1))
            return
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg}); each line must be one "
                                "JSON object") from None


def check_jsonl(path: str, cfg: DataConfig, layout: str) -> None:
    """Parse a jsonl (or JSON array) file record by record so that a bad one is reported where it is."""
    required = required_fields(cfg, layout)
    for where, record in json_records(path):
        missing = [k for k in required if not isinstance(record, dict) or k not in record]
        if missing:
            raise DataError(f"{where}: missing field {missing[0]!r}; set data.text_field (or data.prompt_field "
                            "and data.response_field, or data.columns) to the field names used")
        problem = check_record(cfg, layout, record)
        if problem:
            raise DataError(f"{where}: {problem}")


def chat_template(cfg: DataConfig, tokenizer) -> str:
    """The Jinja chat template conversations are rendered with: ``data.chat_template`` (the template itself,
    or a file holding it), else the tokenizer's own."""
    template = cfg.chat_template
    if template and "{" not in template:
        if not Path(template).expanduser().is_file():
            raise DataError(f"data.chat_template: {template!r} is neither a Jinja template nor a file")
        template = Path(template).expanduser().read_text(encoding="utf-8")
    template = template or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise DataError("data: conversations need a chat template and this tokenizer has none; set "
                        "data.chat_template to a Jinja template (or a file holding one)")
    if not tokenizer.is_fast:  # the assistant turns are located through the fast tokenizer's offsets
        raise DataError(f"data: conversations need a fast tokenizer; {type(tokenizer).__name__} is not one")
    return template


def holds_conversations(found: list[Source]) -> bool:
    """Whether any of the located sources (``data_sources``) holds conversations, which need a chat template."""
    return any(source.layout in CONVERSATIONS for source in found)


def check_block_size(block_size: int, max_positions: int | None) -> None:
    if max_positions is not None and block_size > max_positions:
        raise DataError(f"data.block_size: {block_size} exceeds the model's context of {max_positions} "
                        f"tokens; set data.block_size <= {max_positions}")
