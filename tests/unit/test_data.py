"""Data loading, packing and the world-size-independent batch order."""
import json
import re

import pytest
import torch

from peft_dist.config import DataConfig
from peft_dist.data import IGNORE_INDEX, DataError, GlobalBatchSampler, build_blocks, pack
from peft_dist.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny-llama")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"train.jsonl:3: malformed JSON"):
        build_blocks(DataConfig(path=str(path)), tokenizer)


def test_missing_field_and_empty_and_missing_files(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"body": "y"}])
    with pytest.raises(DataError, match=r"a.jsonl:2: missing field 'text'"):
        build_blocks(DataConfig(path=str(path)), tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        build_blocks(DataConfig(path=str(empty)), tokenizer)
    with pytest.raises(DataError, match="matches no data file"):
        build_blocks(DataConfig(path=str(tmp_path / "missing.jsonl")), tokenizer)


def test_block_size_longer_than_context_is_refused(tokenizer):
    with pytest.raises(DataError, match="exceeds the model's context of 512"):
        build_blocks(DataConfig(block_size=1024), tokenizer, max_positions=512)


def test_prompt_response_pairs_mask_the_prompt(tmp_path, tokenizer):
    rows = [{"prompt": f"question {i}?", "response": f" answer {i}."} for i in range(200)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    blocks = build_blocks(DataConfig(path=str(path), prompt_field="prompt", response_field="response",
                                     block_size=32), tokenizer)
    masked = (blocks.train_labels == IGNORE_INDEX).float().mean().item()
    assert 0.2 < masked < 0.8
    keep = blocks.train_labels != IGNORE_INDEX
    assert torch.equal(blocks.train_labels[keep], blocks.train_ids[keep])


def test_pack_concatenates_with_eos_and_drops_the_tail(tokenizer):
    ids, labels = pack([{"text": "abc"}, {"text": "def"}], tokenizer, block_size=2)
    flat = tokenizer("abc", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.flatten().tolist()[: len(flat)] == flat and torch.equal(ids, labels)


def test_text_and_parquet_files_load(tmp_path, tokenizer):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "\n\n".join(f"paragraph number {i} with some words" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    blocks = build_blocks(DataConfig(path=str(tmp_path / "corpus.txt"), block_size=16), tokenizer)
    assert blocks.train_ids.shape[1] == 16 and len(blocks.eval_ids) > 0
    pq.write_table(pa.table({"content": [f"row {i} text" for i in range(300)]}), tmp_path / "t.parquet")
    blocks = build_blocks(DataConfig(path=str(tmp_path / "t.parquet"), text_field="content", block_size=16),
                          tokenizer)
    assert len(blocks.train_ids) > 0


def test_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    """Documents are numbered; every number read back from the packed blocks belongs to one split only."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} end " * 6} for i in range(60)])
    cfg = DataConfig(path=str(path), block_size=32, eval_fraction=0.2)
    a, b = build_blocks(cfg, tokenizer), build_blocks(cfg, tokenizer)
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.eval_ids, b.eval_ids)

    def documents(ids: torch.Tensor) -> set[int]:
        return {int(n) for block in ids for n in re.findall(r"document (\d+) end", tokenizer.decode(block))}

    train, evaluation = documents(a.train_ids), documents(a.eval_ids)
    assert len(evaluation) >= 6 and len(train) >= 40  # most documents survive the ragged tails
    assert not train & evaluation
    other = build_blocks(DataConfig(path=str(path), block_size=32, eval_fraction=0.2, seed=7), tokenizer)
    assert documents(other.eval_ids) != evaluation  # the split follows data.seed


def test_every_world_size_reads_the_same_global_batch():
    single = GlobalBatchSampler(100, micro_batch_size=2, accumulation=4, world_size=1, rank=0, seed=3)
    for step in (0, 5, 12, 13):  # 13 crosses into the second epoch
        reference = torch.cat(single.micro_batches(step))
        for world in (2, 4):
            parts = [torch.cat(GlobalBatchSampler(100, 2, 4 // world, world, r, 3).micro_batches(step))
                     for r in range(world)]
            assert torch.equal(torch.cat(parts), reference)
    with pytest.raises(DataError, match="cannot fill one global batch"):
        GlobalBatchSampler(3, micro_batch_size=2, accumulation=1, world_size=2, rank=0, seed=0)


def test_an_unsupported_file_names_the_supported_formats(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"train.csv is not a supported data file; supported: .txt \(text\), "
                                        r".*\.jsonl \(jsonl\).*\.parquet \(parquet\)"):
        build_blocks(DataConfig(path=str(path)), tokenizer)
