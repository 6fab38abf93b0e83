"""Training data: local files through Hugging Face ``datasets``, tokenized and packed into blocks.

Every rank builds the same blocks deterministically (no shared cache to race on) and reads its own
slice of each global batch, so any world size sees the same global batches in the same order.
"""
from __future__ import annotations

import glob
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_dist.config.schema import DataConfig

BUILTIN_STDLIB = "builtin:python-stdlib"
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".parquet": "parquet"}
IGNORE_INDEX = -100  # labels that carry no loss (prompt tokens)


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


def read_documents(cfg: DataConfig) -> list[dict]:
    """Documents as ``{'text': ...}`` or ``{'prompt': ..., 'response': ...}`` dicts."""
    if cfg.path == BUILTIN_STDLIB:
        docs = [{"text": t} for t in stdlib_documents(cfg.max_documents)]
    else:
        import datasets

        files, fmt = resolve_files(cfg.path, cfg.format)
        fields = [cfg.prompt_field, cfg.response_field] if cfg.prompt_field else [cfg.text_field]
        if fmt == "jsonl":
            for f in files:
                check_jsonl(f, fields)
            dataset = datasets.load_dataset("json", data_files=files, split="train", keep_in_memory=True)
        elif fmt == "parquet":
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", keep_in_memory=True)
        else:
            fields = ["text"]
            dataset = datasets.load_dataset("text", data_files=files, split="train", sample_by="paragraph",
                                            keep_in_memory=True)
        missing = [k for k in fields if k not in dataset.column_names]
        if missing:
            raise DataError(f"{files[0]}: no column {missing[0]!r}; columns are {dataset.column_names}")
        if cfg.max_documents:
            dataset = dataset.select(range(min(cfg.max_documents, len(dataset))))
        names = ["prompt", "response"] if cfg.prompt_field else ["text"]
        docs = [dict(zip(names, (row[k] for k in fields))) for row in dataset]
    docs = [d for d in docs if any(str(v).strip() for v in d.values())]
    if not docs:
        raise DataError(f"data.path: {cfg.path!r} holds no non-empty documents")
    return docs


def pack(docs: list[dict], tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize documents (EOS after each), concatenate and cut into ``(n, block_size)`` blocks.

    Returns ``(input_ids, labels)``; prompt tokens have label ``IGNORE_INDEX``. The ragged tail is dropped.
    """
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        if "text" in doc:
            tokens = tokenizer(str(doc["text"]), add_special_tokens=False)["input_ids"] + [eos]
            ids += tokens
            labels += tokens
        else:
            prompt = tokenizer(str(doc["prompt"]), add_special_tokens=False)["input_ids"]
            response = tokenizer(str(doc["response"]), add_special_tokens=False)["input_ids"] + [eos]
            ids += prompt + response
            labels += [IGNORE_INDEX] * len(prompt) + response
    n = len(ids) // block_size
    shape = (n, block_size)
    return (torch.tensor(ids[: n * block_size], dtype=torch.long).view(shape),
            torch.tensor(labels[: n * block_size], dtype=torch.long).view(shape))


@dataclass
class Blocks:
    """Packed training and evaluation blocks."""

    train_ids: torch.Tensor
    train_labels: torch.Tensor
    eval_ids: torch.Tensor
    eval_labels: torch.Tensor


def check_block_size(block_size: int, max_positions: int | None) -> None:
    if max_positions is not None and block_size > max_positions:
        raise DataError(f"data.block_size: {block_size} exceeds the model's context of {max_positions} "
                        f"tokens; set data.block_size <= {max_positions}")


def build_blocks(cfg: DataConfig, tokenizer, max_positions: int | None = None) -> Blocks:
    """Read, split (by document, deterministic from ``cfg.seed``), tokenize and pack."""
    check_block_size(cfg.block_size, max_positions)
    docs = read_documents(cfg)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_eval = max(1, round(len(docs) * cfg.eval_fraction))
    eval_docs = [docs[i] for i in order[:n_eval]]
    train_docs = [docs[i] for i in order[n_eval:]]
    train = pack(train_docs, tokenizer, cfg.block_size)
    evaluation = pack(eval_docs, tokenizer, cfg.block_size)
    for name, (ids, _) in (("training", train), ("evaluation", evaluation)):
        if len(ids) == 0:
            raise DataError(f"data: the {name} split has fewer than block_size={cfg.block_size} tokens; "
                            "add data, lower data.block_size or change data.eval_fraction")
    return Blocks(train[0], train[1], evaluation[0], evaluation[1])


class GlobalBatchSampler:
    """Which blocks each rank reads at each optimizer step.

    Step ``t`` consumes global batch ``t`` of a per-epoch permutation (seeded by ``seed + epoch``);
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
