"""Tokenizing documents and packing them into fixed-length blocks in which no document sees another.

A block is a run of documents (the first and last may be cut). Every piece of a document gets position
ids counting from 0, so transformers builds from them the block-diagonal causal mask a model would apply
to each document alone (its packed-sequence detection; ``model.packed_attention_mask`` for architectures
that do not). The first token of every piece carries no loss: nothing of its document precedes it in the
block. Prompt tokens carry no loss either. Both functions are ``Dataset.map(batched=True)`` functions.
"""
from __future__ import annotations

from itertools import chain

import numpy as np

IGNORE_INDEX = -100  # labels that carry no loss


def tokenize_documents(rows: dict[str, list], tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of each document with EOS appended, and labels (prompt tokens ``IGNORE_INDEX``)."""
    eos = tokenizer.eos_token_id
    if "text" in rows:
        ids = [t + [eos] for t in tokenizer([str(t) for t in rows["text"]], add_special_tokens=False)["input_ids"]]
        return {"input_ids": ids, "labels": ids}
    prompts = tokenizer([str(p) for p in rows["prompt"]], add_special_tokens=False)["input_ids"]
    responses = tokenizer([str(r) for r in rows["response"]], add_special_tokens=False)["input_ids"]
    return {"input_ids": [p + r + [eos] for p, r in zip(prompts, responses)],
            "labels": [[IGNORE_INDEX] * len(p) + r + [eos] for p, r in zip(prompts, responses)]}


def pack_documents(rows: dict[str, list], block_size: int) -> dict[str, np.ndarray]:
    """Concatenate the tokenized documents of ``rows`` and cut them into ``(n, block_size)`` blocks of
    ``input_ids``, ``labels`` and ``position_ids`` (restarting at every document and every block); the
    tail shorter than a block is dropped."""
    lengths = np.array([len(d) for d in rows["input_ids"]])
    total = int(lengths.sum())
    n = total // block_size
    ids = np.fromiter(chain.from_iterable(rows["input_ids"]), dtype=np.int64, count=total)
    labels = np.fromiter(chain.from_iterable(rows["labels"]), dtype=np.int64, count=total)
    starts = np.zeros(total, dtype=bool)
    starts[np.cumsum(lengths)[:-1]] = True
    shape = (n, block_size)
    ids, labels, starts = ids[: n * block_size].reshape(shape), labels[: n * block_size].reshape(shape), \
        starts[: n * block_size].reshape(shape)
    starts[:, 0] = True
    index = np.arange(block_size)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    labels[starts] = IGNORE_INDEX
    return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
            "position_ids": positions.astype(np.int32)}
