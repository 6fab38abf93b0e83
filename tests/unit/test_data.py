"""Data loading, the prepared-once cache and the world-size-independent batch order (packing itself:
tests/unit/test_packing.py)."""
import json
import re
from pathlib import Path

import pytest
import torch

from peft_dist.config import DataConfig
from peft_dist.data import IGNORE_INDEX, DataError, GlobalBatchSampler, build_blocks, docstring_documents
from peft_dist.data.sources import docstring_modules, docstrings, stdlib_modules
from peft_dist.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny-llama")


def data(tmp_path, **settings) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **settings)


def ids(split) -> torch.Tensor:
    return split.batch(range(len(split)))["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"train.jsonl:3: malformed JSON"):
        build_blocks(data(tmp_path, path=str(path)), tokenizer)


def test_missing_field_and_empty_and_missing_files(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"body": "y"}])
    with pytest.raises(DataError, match=r"a.jsonl:2: missing field 'text'"):
        build_blocks(data(tmp_path, path=str(path)), tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        build_blocks(data(tmp_path, path=str(empty)), tokenizer)
    with pytest.raises(DataError, match="matches no data file"):
        build_blocks(data(tmp_path, path=str(tmp_path / "missing.jsonl")), tokenizer)


def test_preflight_parses_a_jsonl_until_its_blocks_are_cached(tmp_path, tokenizer, monkeypatch):
    """A requeued job does not parse its corpus again on every rank: once the blocks are cached (the key holds
    the files' size and mtime), the pre-flight check skips the record-by-record parse that preparing them ran;
    a changed file is a new key and is parsed again."""
    from peft_dist.model import load_model_config
    from peft_dist.train import preflight

    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"document {i}: " + "words " * 30} for i in range(100)])
    cfg = data(tmp_path, path=str(path), block_size=32)
    model_config = load_model_config("builtin:tiny-llama")
    parsed = []
    check_jsonl = preflight.check_jsonl
    monkeypatch.setattr(preflight, "check_jsonl", lambda file, *rest: parsed.append(file) or check_jsonl(file, *rest))
    preflight.check_data(cfg, model_config, "builtin:tiny-llama")
    assert len(parsed) == 1
    build_blocks(cfg, tokenizer)
    preflight.check_data(cfg, model_config, "builtin:tiny-llama")
    assert len(parsed) == 1
    with path.open("a") as f:
        f.write('{"text": oops}\n')
    with pytest.raises(DataError, match=r"train.jsonl:101: malformed JSON"):
        preflight.check_data(cfg, model_config, "builtin:tiny-llama")
    assert len(parsed) == 2


def test_block_size_longer_than_context_is_refused(tmp_path, tokenizer):
    with pytest.raises(DataError, match="exceeds the model's context of 512"):
        build_blocks(data(tmp_path, block_size=1024), tokenizer, max_positions=512)


def test_prompt_response_pairs_mask_the_prompt(tmp_path, tokenizer):
    rows = [{"prompt": f"question {i}?", "response": f" answer {i}."} for i in range(200)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    blocks = build_blocks(data(tmp_path, path=str(path), prompt_field="prompt", response_field="response",
                               block_size=32), tokenizer)
    train = blocks.train.batch(range(len(blocks.train)))
    masked = (train["labels"] == IGNORE_INDEX).float().mean().item()
    assert 0.2 < masked < 0.8
    keep = train["labels"] != IGNORE_INDEX
    assert torch.equal(train["labels"][keep], train["input_ids"][keep])


def test_text_and_parquet_files_load(tmp_path, tokenizer):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "\n\n".join(f"paragraph number {i} with some words" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    blocks = build_blocks(data(tmp_path, path=str(tmp_path / "corpus.txt"), block_size=16), tokenizer)
    assert ids(blocks.train).shape[1] == 16 and len(blocks.eval) > 0
    pq.write_table(pa.table({"content": [f"row {i} text" for i in range(300)]}), tmp_path / "t.parquet")
    blocks = build_blocks(data(tmp_path, path=str(tmp_path / "t.parquet"), text_field="content", block_size=16),
                          tokenizer)
    assert len(blocks.train) > 0


def test_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    """Documents are numbered; every number read back from the packed blocks belongs to one split only."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} end " * 6} for i in range(60)])
    a = build_blocks(data(tmp_path / "a", path=str(path), block_size=32, eval_fraction=0.2), tokenizer)
    b = build_blocks(data(tmp_path / "b", path=str(path), block_size=32, eval_fraction=0.2), tokenizer)
    assert a.prepared_here and b.prepared_here  # two caches, prepared independently: the same blocks
    assert torch.equal(ids(a.train), ids(b.train)) and torch.equal(ids(a.eval), ids(b.eval))

    def documents(split) -> set[int]:
        return {int(n) for block in ids(split) for n in re.findall(r"document (\d+) end", tokenizer.decode(block))}

    train, evaluation = documents(a.train), documents(a.eval)
    assert len(evaluation) >= 6 and len(train) >= 40  # most documents survive the ragged tails
    assert not train & evaluation
    other = build_blocks(data(tmp_path, path=str(path), block_size=32, eval_fraction=0.2, seed=7), tokenizer)
    assert documents(other.eval) != evaluation  # the split follows data.seed


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


def test_a_pass_over_the_blocks_draws_its_permutation_once(monkeypatch):
    """Not once per step: over millions of blocks a draw takes longer than a GPU step."""
    draws = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: draws.append(n) or randperm(n, **kw))
    sampler = GlobalBatchSampler(100, micro_batch_size=2, accumulation=4, world_size=1, rank=0, seed=3)
    for step in range(12):  # 12 steps of 8 blocks: the first pass
        sampler.micro_batches(step)
    assert draws == [100]
    sampler.micro_batches(12)
    assert draws == [100, 100]


def test_an_unsupported_file_names_the_supported_formats(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"train.csv is not a supported data file; supported: .txt \(text\), "
                                        r".*\.jsonl \(jsonl\).*\.parquet \(parquet\)"):
        build_blocks(data(tmp_path, path=str(path)), tokenizer)


def _prepare_in_a_process(cache: str, path: str, queue) -> None:
    import sys

    blocks = build_blocks(DataConfig(path=path, block_size=16, cache_dir=cache), load_tokenizer("builtin:tiny-llama"))
    imported = ("datasets" in sys.modules, "pandas" in sys.modules)
    queue.put((blocks.prepared_here, imported, ids(blocks.train).tolist(), str(blocks.directory)))


def test_a_corpus_is_prepared_once_and_every_process_reads_the_same_blocks(tmp_path, tokenizer):
    """Three processes start at once on one cache: one tokenizes, the others wait and memory-map its blocks
    without importing ``datasets`` or pandas (about 30 and 24 MiB resident that a rank which only reads does not
    need)."""
    import multiprocessing

    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} " * (i % 7 + 1)} for i in range(300)])
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_prepare_in_a_process, args=(str(tmp_path / "cache"), str(path), queue))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert sorted(r[:2] for r in results) == [(False, (False, False)), (False, (False, False)), (True, (True, True))]
    assert results[0][2:] == results[1][2:] == results[2][2:]
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [Path(results[0][3]).name]


def test_a_block_is_read_from_its_own_record_batch(tmp_path):
    """``Split.batch`` slices each block from its record batch of the memory-mapped split; ``Table.take``
    would first join all of a column's batches, reading the whole split into this rank (on the 7B bench's
    100M-token corpus: 1.4 GiB of file pages and 0.8 GiB of private memory per rank)."""
    import numpy as np
    import pyarrow as pa

    from peft_dist.data.cache import read_split
    from peft_dist.distributed.memory import resident_bytes

    rows, block, per_batch = 50_000, 64, 1_000
    ids = np.arange(rows * block, dtype=np.int64).reshape(rows, block) % 50_021
    (tmp_path / "training").mkdir()
    with pa.OSFile(str(tmp_path / "training" / "data-00000-of-00001.arrow"), "wb") as sink:
        offsets = pa.array(np.arange(per_batch + 1, dtype=np.int32) * block)
        columns = {"input_ids": pa.int32(), "labels": pa.int64(), "position_ids": pa.int32()}
        schema = pa.schema([(name, pa.list_(kind)) for name, kind in columns.items()])
        with pa.ipc.new_stream(sink, schema) as writer:
            for start in range(0, rows, per_batch):
                values = ids[start:start + per_batch].ravel()
                writer.write_batch(pa.record_batch(
                    [pa.ListArray.from_arrays(offsets, pa.array(values.astype(kind.to_pandas_dtype())))
                     for kind in columns.values()], schema=schema))
    (tmp_path / "training" / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00001.arrow"}]}))
    size = (tmp_path / "training" / "data-00000-of-00001.arrow").stat().st_size
    split = read_split(tmp_path / "training")
    before, _ = resident_bytes()
    picked = split.batch([0, 49_999, 1_000, 12_345])
    grown, _ = resident_bytes()
    assert len(split) == rows and (grown - before) < size / 8, (grown - before, size)
    for name in ("input_ids", "labels", "position_ids"):
        assert picked[name].dtype == torch.long and torch.equal(picked[name], torch.from_numpy(
            ids[[0, 49_999, 1_000, 12_345]]))


def test_the_cache_follows_the_files_and_the_settings_and_a_failed_preparation_leaves_nothing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} end " * 4} for i in range(50)])
    first = build_blocks(data(tmp_path, path=str(path), block_size=16), tokenizer)
    assert build_blocks(data(tmp_path, path=str(path), block_size=16), tokenizer).directory == first.directory
    shorter = build_blocks(data(tmp_path, path=str(path), block_size=8), tokenizer)
    assert shorter.prepared_here and shorter.directory != first.directory
    write_jsonl(path, [{"text": f"changed {i} end " * 4} for i in range(50)])
    changed = build_blocks(data(tmp_path, path=str(path), block_size=16), tokenizer)
    assert changed.prepared_here and changed.directory != first.directory
    with pytest.raises(DataError, match="the training split has fewer than block_size=4096 tokens"):
        build_blocks(data(tmp_path, path=str(path), block_size=4096), tokenizer)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted(
        [first.directory.name, shorter.directory.name, changed.directory.name])  # no staging directory left


def test_an_unwritable_cache_directory_is_named(tmp_path, tokenizer):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match=r"data.cache_dir: cannot write in .*file/sub .*set data.cache_dir"):
        build_blocks(DataConfig(path="builtin:python-stdlib", cache_dir=str(blocker / "sub")), tokenizer)


def test_docstrings_keeps_only_docstrings():
    source = '"""Module."""\nx = 1\n\nclass A:\n    """Class."""\n    def f(self):\n        """Function."""\n        return "not this"\n'
    assert docstrings(source) == "Module.\n\nClass.\n\nFunction."
    assert docstrings("def broken(:\n") == ""


def test_the_docstrings_corpus_comes_from_files_the_shipped_base_never_saw(tmp_path, tokenizer):
    """builtin:stdlib-llama was pretrained on the source of the even-numbered stdlib modules (bench/quality.py's
    corpus A); builtin:python-docstrings reads the docstrings of odd-numbered ones only, one document per file."""
    modules = list(stdlib_modules())
    pretrained_on = {path for path, _ in modules[0::2]}
    corpus = list(docstring_modules())
    assert len(corpus) > 100 and not {path for path, _ in corpus} & pretrained_on
    assert docstring_documents(5) == [text for _, text in corpus[:5]]
    blocks = build_blocks(data(tmp_path, path="builtin:python-docstrings", max_documents=20), tokenizer)
    assert len(blocks.train) > 0 and len(blocks.eval) > 0
