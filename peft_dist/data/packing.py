"""Tokenizing documents and packing them into fixed-length blocks in which no document sees another.

Every document (or piece of one) in a block gets position ids counting from 0, so transformers builds from
them the block-diagonal causal mask a model would apply to each document alone (its packed-sequence
detection; ``model.packed_attention_mask`` for architectures that do not). The first token of every piece
carries no loss: nothing of its document precedes it in the block. Prompt tokens carry no loss either.

Two packings: ``pack_documents`` concatenates and cuts anywhere (plain text: nothing is wasted, a cut
document still reads as text); ``pack_whole_documents`` never cuts (instructions and conversations: a
piece cut off its prompt would train an answer to nothing), padding the space a document did not fit in.
All functions here are ``Dataset.map(batched=True)`` functions or what they call.
"""
from __future__ import annotations

from itertools import chain

import numpy as np

from peft_dist.data.sources import DataError

IGNORE_INDEX = -100  # labels that carry no loss


def tokenize_conversation(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered by ``template``, and labels that keep every assistant turn (its
    content and the end-of-turn text the template writes after it) and mask everything else.

    The assistant spans are found by rendering prefixes: turn ``i`` spans from the end of ``messages[:i]``
    rendered with the generation prompt to the end of ``messages[:i+1]``, as characters of the whole
    rendering; a token holding any character of a span carries loss (``offset_mapping``; a generation prompt
    ending in a space has it merged into the answer's first token, which must be learnt all the same).
    This works for any template that renders a conversation as the sum of its prefixes, which generation
    relies on too, and is checked on every conversation; ``return_assistant_tokens_mask`` needs
    ``{% generation %}`` markers that most shipped templates lack. Tokenizing the whole text once (not piece
    by piece) keeps merges across turn boundaries as they are at inference.
    """
    def render(turns: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise DataError(f"data.chat_template: rendering the conversation starting {text[:60]!r} turn "
                                "by turn does not give its prefixes, so the assistant turns cannot be located; "
                                "set data.chat_template to a template that renders each turn after the last")
            spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(start < b and a < end for a, b in spans) else IGNORE_INDEX
              for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"])]
    return encoding["input_ids"], labels


def tokenize_documents(rows: dict[str, list], tokenizer, template: str | None = None) -> dict[str, list[list[int]]]:
    """Token ids of each document and labels (prompt tokens ``IGNORE_INDEX``): text and prompt/response get
    EOS appended; conversations end as ``template`` ends an assistant turn."""
    eos = tokenizer.eos_token_id
    if "messages" in rows:
        pairs = [tokenize_conversation(m, tokenizer, template) for m in rows["messages"]]
        return {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}
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


def fit_documents(rows: dict[str, list], block_size: int, overlong: str) -> dict[str, list[list[int]]]:
    """The documents whole packing can use: one longer than a block dropped or cut to ``block_size``
    (``overlong``), then any without a token of loss after its first (nothing to learn; a block of only
    such documents would have no loss at all) dropped."""
    kept: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        if len(ids) > block_size and overlong == "drop":
            continue
        ids, labels = ids[:block_size], labels[:block_size]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            kept["input_ids"].append(ids)
            kept["labels"].append(labels)
    return kept


def _padded(ids: list[int], labels: list[int], positions: list[int], block_size: int,
            pad_id: int) -> tuple[list[int], list[int], list[int]]:
    pad = block_size - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad))


def pack_whole_documents(rows: dict[str, list], block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pack documents no longer than ``block_size``, in order, into blocks: a document that does not fit the
    space left starts the next block. The rest of a block is padding (``pad_id``, no loss) whose positions
    count from 0 like a document of its own, so no document attends to it. The last block is kept."""
    blocks = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc_ids, doc_labels in zip(rows["input_ids"], rows["labels"]):
        if len(ids) + len(doc_ids) > block_size:
            blocks.append(_padded(ids, labels, positions, block_size, pad_id))
            ids, labels, positions = [], [], []
        ids += doc_ids
        labels += [IGNORE_INDEX] + doc_labels[1:]
        positions += range(len(doc_ids))
    if ids:
        blocks.append(_padded(ids, labels, positions, block_size, pad_id))
    columns = zip(*blocks) if blocks else ([], [], [])
    return {name: np.array(column, dtype=np.int32).reshape(-1, block_size)
            for name, column in zip(("input_ids", "labels", "position_ids"), columns)}
