"""Data as users bring it: conversations (messages and ShareGPT) rendered with the chat template, Alpaca rows,
save_to_disk datasets, a separate evaluation file; whole-document packing. Checked against hand-built
references: which tokens carry loss and where each document's positions restart."""
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch
from datasets.arrow_writer import ArrowWriter
from transformers import AutoModelForCausalLM

from peft_dist.assets import build_tiny_tokenizer
from peft_dist.config import ConfigError, DataConfig
from peft_dist.data import IGNORE_INDEX, DataError, build_blocks
from peft_dist.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from peft_dist.data.packing import fit_documents, pack_whole_documents, tokenize_conversation
from peft_dist.model import TINY_TOKENIZER, load_tokenizer, packed_inputs
from tests.architectures import _configs
from tests.unit.test_data import data, ids, write_jsonl

EOS = "<|endoftext|>"
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "5."}, {"role": "user", "content": "And twice that?"},
                {"role": "assistant", "content": "10."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny-llama")


def reference(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels built piece by piece: ``(text, trained)``. The pieces meet at special tokens or newlines,
    where the byte-level pre-tokenizer splits anyway, so their ids concatenate to the whole text's."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def test_every_assistant_turn_and_only_those_carries_loss(tokenizer):
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer, tokenizer.chat_template)
    expected = reference(tokenizer, [
        (f"<|system|>\nBe brief.{EOS}<|user|>\nWhat is 2 plus 3?{EOS}<|assistant|>\n", False), (f"5.{EOS}", True),
        (f"<|user|>\nAnd twice that?{EOS}<|assistant|>\n", False), (f"10.{EOS}", True)])
    assert (ids, labels) == expected
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == f"5.{EOS}10.{EOS}"


def test_a_template_that_does_not_render_prefixes_is_refused(tokenizer):
    backwards = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="does not give its prefixes"):
        tokenize_conversation(CONVERSATION, tokenizer, backwards)


def test_whole_packing_starts_a_block_for_a_document_that_does_not_fit_and_pads_as_its_own_document():
    rows = {"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8, 9]],
            "labels": [[-100, 2, 3], [-100, -100, 6, 7], [-100, 9]]}
    blocks = pack_whole_documents(rows, block_size=6, pad_id=0)
    np.testing.assert_array_equal(blocks["input_ids"], [[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(blocks["position_ids"], [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(blocks["labels"], [[-100, 2, 3, -100, -100, -100], [-100, -100, 6, 7, -100, 9]])


def test_overlong_documents_are_dropped_or_truncated_and_those_without_loss_dropped():
    rows = {"input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]],
            "labels": [[-100, -100, -100, 4, 5], [-100, 7], [-100, -100, -100, 11]]}
    assert fit_documents(rows, block_size=4, overlong="drop") == {"input_ids": [[6, 7], [8, 9, 10, 11]],
                                                                 "labels": [[-100, 7], [-100, -100, -100, 11]]}
    # truncated to 4 tokens the first has no loss left: dropped as well
    assert fit_documents(rows, block_size=3, overlong="truncate") == {"input_ids": [[6, 7]], "labels": [[-100, 7]]}


def test_a_padded_block_computes_for_each_document_what_it_computes_alone():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()["llama"]).eval()
    documents = [[5, 17, 99, 23, 41], [8, 300, 12, 0], [77, 51, 3, 260, 19, 4]]
    block = pack_whole_documents({"input_ids": documents, "labels": documents}, block_size=10, pad_id=0)
    batch = {name: torch.from_numpy(block[name]).long() for name in ("input_ids", "position_ids")}
    with torch.no_grad():
        packed = model(**packed_inputs(model.config, batch, torch.float32)).logits
        alone = [model(input_ids=torch.tensor([doc])).logits[0] for doc in documents]
    torch.testing.assert_close(packed[0, :9], torch.cat(alone[:2]), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :6], alone[2], atol=2e-5, rtol=1e-4)


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
            + ([{"role": "user", "content": "more?"}, {"role": "assistant", "content": f"more {i}."}] if i % 2 else [])
            for i in range(n)]


def documents_of(tokenizer, split) -> list[tuple[str, str]]:
    """Every document of every block, as (its text, the text of its loss tokens), cut where positions restart."""
    found = []
    for i in range(len(split)):
        block = split.batch([i])
        ids, labels, positions = (block[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [j for j, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            found.append((tokenizer.decode(ids[a:b]), tokenizer.decode([t for t in labels[a:b] if t != IGNORE_INDEX])))
    return found


@pytest.mark.parametrize("layout", ["chat", "sharegpt"])
def test_conversation_files_pack_whole_conversations_with_loss_on_the_answers(tmp_path, tokenizer, layout):
    chats = conversations(40)
    rows = [{"messages": c} for c in chats] if layout == "chat" else [
        {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
                           for t in c]} for c in chats]
    path = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    blocks = build_blocks(data(tmp_path, path=str(path), block_size=96, eval_fraction=0.1), tokenizer)  # format: auto
    expected = {tokenizer.apply_chat_template(c, tokenize=False):
                "".join(f"{t['content']}{EOS}" for t in c if t["role"] == "assistant") for c in chats}
    found = documents_of(tokenizer, blocks.train) + documents_of(tokenizer, blocks.eval)
    padding = [(text, loss) for text, loss in found if text not in expected]
    assert all(set(text) <= set(EOS) and loss == "" for text, loss in padding)  # only EOS padding, no loss
    assert sorted((t, l) for t, l in found if t in expected) == sorted(expected.items())  # every one whole, once


def test_overlong_conversations_are_counted_in_prepared_json_and_the_log_line(tmp_path, tokenizer):
    long_one = [{"role": "user", "content": "tell me everything " * 40}, {"role": "assistant", "content": "no."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in [long_one] + conversations(30)])
    dropped = build_blocks(data(tmp_path, path=str(path), block_size=80, eval_fraction=0.1, seed=0), tokenizer)
    prepared = json.loads((dropped.directory / "prepared.json").read_text())
    split = "training" if prepared["training"]["overlong"] else "evaluation"
    assert prepared[split]["overlong"] == 1 and prepared[split]["overlong_action"] == "dropped"
    assert f"{split}: 1 longer than a block dropped" in dropped.line(0)
    # truncated, the long conversation keeps only its prompt: it has no loss and is dropped as such
    truncated = build_blocks(data(tmp_path, path=str(path), block_size=80, eval_fraction=0.1, seed=0,
                                  overlong="truncate"), tokenizer)
    assert truncated.directory != dropped.directory
    assert f"{split}: 1 longer than a block truncated, 1 without loss dropped" in truncated.line(0)
    with pytest.raises(DataError, match=r"no document of the training split fits data.block_size=16 with a token "
                                        r"of loss \(28 longer, dropped; 0 without loss\)"):
        build_blocks(data(tmp_path, path=str(path), block_size=16, eval_fraction=0.1, seed=0), tokenizer)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     r"c.jsonl:2: turn 2 \(assistant\) has no 'content' text"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"c.jsonl:2: turn 1: unknown role 'robot'; use system, user"),
    ({"messages": []}, r"c.jsonl:2: empty conversation"),
    ({"conversations": [{"from": "bot", "value": "hi"}]},
     r"c.jsonl:2: turn 1: unknown role 'bot'; use system, human, gpt"),
    ({"instruction": "do it", "output": ""}, r"c.jsonl:2: 'output' is empty"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, tokenizer, row, message):
    good = {"messages": conversations(1)[0]} if "messages" in row else \
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]} if "conversations" in row \
        else {"instruction": "i", "output": "o"}
    path = write_jsonl(tmp_path / "c.jsonl", [good, row])
    with pytest.raises(DataError, match=message):
        build_blocks(data(tmp_path, path=str(path)), tokenizer)


def test_a_bad_parquet_row_is_named_by_its_number(tmp_path, tokenizer):
    rows = [{"messages": c} for c in conversations(3)] + [{"messages": [{"role": "bot", "content": "x"}]}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet: row 3: turn 1: unknown role 'bot'"):
        build_blocks(data(tmp_path, path=str(tmp_path / "c.parquet")), tokenizer)


def test_the_chat_template_comes_from_the_tokenizer_or_data_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in conversations(30)])
    bare = load_tokenizer("builtin:tiny-llama")
    bare.chat_template = None
    with pytest.raises(DataError, match="this tokenizer has none; set data.chat_template"):
        build_blocks(data(tmp_path, path=str(path)), bare)
    template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template + "{% if add_generation_prompt %}### assistant: {% endif %}")
    blocks = build_blocks(data(tmp_path, path=str(path), block_size=80, chat_template=str(tmp_path / "t.jinja")),
                          bare)
    text, loss = documents_of(bare, blocks.train)[0]
    assert text.startswith("### user: question") and loss.startswith(" answer") and loss.endswith(EOS)
    inline = build_blocks(data(tmp_path, path=str(path), block_size=80, chat_template=template), bare)
    assert inline.directory != blocks.directory  # the template text is in the cache key
    with pytest.raises(DataError, match="neither a Jinja template nor a file"):
        build_blocks(data(tmp_path, path=str(path), chat_template=str(tmp_path / "missing.jinja")), bare)


def test_alpaca_rows_use_the_alpaca_prompt_with_and_without_input(tmp_path, tokenizer):
    rows = [{"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"numbers {i}", "output": f"{i + 1}"}
            for i in range(30)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    blocks = build_blocks(data(tmp_path, path=str(path), block_size=160, eval_fraction=0.1), tokenizer)
    expected = {(ALPACA_PROMPT.format(instruction=r["instruction"], input=r["input"]) if r["input"] else
                 ALPACA_PROMPT_NO_INPUT.format(instruction=r["instruction"])) + r["output"] + EOS: r["output"] + EOS
                for r in rows}
    found = [d for d in documents_of(tokenizer, blocks.train) + documents_of(tokenizer, blocks.eval) if d[1]]
    assert sorted(found) == sorted(expected.items())


def test_a_json_array_file_like_alpaca_data_json_reads_like_jsonl(tmp_path, tokenizer):
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i + 1}"} for i in range(30)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(rows, indent=2))
    blocks = build_blocks(data(tmp_path, path=str(tmp_path / "alpaca_data.json"), block_size=160), tokenizer)
    assert sorted(loss for _, loss in documents_of(tokenizer, blocks.train) + documents_of(tokenizer, blocks.eval)
                  if loss) == sorted(f"{i + 1}{EOS}" for i in range(30))
    (tmp_path / "bad.json").write_text(json.dumps(rows[:2] + [{"instruction": "x"}], indent=2))
    with pytest.raises(DataError, match=r"bad.json: record 3: missing field 'output'"):
        build_blocks(data(tmp_path, path=str(tmp_path / "bad.json")), tokenizer)


def test_saved_datasets_and_dataset_dicts_load_without_writing_next_to_them(tmp_path, tokenizer):
    rows = {"body": [f"document number {i} " * 3 for i in range(80)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"main": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    before = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    plain = build_blocks(data(tmp_path, path=str(tmp_path / "saved"), text_field="body", block_size=16), tokenizer)
    split = build_blocks(data(tmp_path, path=str(tmp_path / "dict"), text_field="body", block_size=16, split="main"),
                         tokenizer)
    assert torch.equal(plain.train.batch([0, 1, 2])["input_ids"], split.train.batch([0, 1, 2])["input_ids"])
    assert "document number" in tokenizer.decode(plain.train.batch([0, 1])["input_ids"].flatten())
    assert sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts) == before
    with pytest.raises(DataError, match=r"dict: no split 'train'; set data.split to one of \['main'\]"):
        build_blocks(data(tmp_path, path=str(tmp_path / "dict"), text_field="body"), tokenizer)
    (tmp_path / "chat.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"data.format: chat rows are read from jsonl, parquet or a "):
        build_blocks(data(tmp_path, path=str(tmp_path / "chat.txt"), format="chat"), tokenizer)


def cache_hub_dataset(hf_cache: Path, dataset_id: str, splits: dict[str, datasets.Dataset], commit: str) -> Path:
    """What ``datasets.load_dataset(dataset_id)`` leaves in the datasets cache on a machine with network, for the
    hub revision ``commit``: ``<user>___<name>/default/0.0.0/<commit>/`` holding ``dataset_info.json`` and one
    Arrow stream ``<name>-<split>.arrow`` per split; the layout datasets' offline lookup searches (its
    ``load.CachedDatasetModuleFactory`` and ``packaged_modules/cache``)."""
    user, name = dataset_id.split("/")
    directory = hf_cache / f"{user}___{name}" / "default" / "0.0.0" / commit
    directory.mkdir(parents=True)
    infos = {}
    for split, rows in splits.items():
        with ArrowWriter(path=str(directory / f"{name}-{split}.arrow"), features=rows.features) as writer:
            writer.write_table(rows.data.table)
            examples, size = writer.finalize()
        infos[split] = datasets.SplitInfo(split, num_bytes=size, num_examples=examples, dataset_name=name)
    datasets.DatasetInfo(features=rows.features, config_name="default", dataset_name=name,
                         splits=datasets.SplitDict(infos)).write_to_directory(str(directory))
    return directory


def test_a_cached_hub_dataset_id_trains_like_a_file_without_network(tmp_path, tokenizer, monkeypatch):
    """``data.path: user/name`` reads what ``load_dataset`` once put in the datasets cache: the same blocks as the
    rows in a jsonl file, columns renamed, the split chosen, the cache key following the cached files. It reads
    offline even where the environment does not say so (the lookup then never goes to the hub); an id that is not
    cached is refused with the way to get it."""
    hf_cache = tmp_path / "hf"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # a machine with network, as far as datasets knows
    rows = [{"dialog": c} for c in conversations(40)]
    cache_hub_dataset(hf_cache, "someone/tiny-chat", {"train": datasets.Dataset.from_list(rows[:30]),
                                                      "test": datasets.Dataset.from_list(rows[30:])}, "0123abcd")
    settings = {"format": "chat", "columns": {"messages": "dialog"}, "block_size": 80}
    hub = build_blocks(data(tmp_path, path="someone/tiny-chat", **settings), tokenizer)
    local = build_blocks(data(tmp_path, path=str(write_jsonl(tmp_path / "c.jsonl", rows[:30])), **settings), tokenizer)
    assert torch.equal(ids(hub.train), ids(local.train)) and torch.equal(ids(hub.eval), ids(local.eval))
    assert datasets.config.HF_HUB_OFFLINE is False  # offline only while reading
    test = build_blocks(data(tmp_path, path="someone/tiny-chat", split="test", **settings), tokenizer)
    assert sorted(loss for _, loss in documents_of(tokenizer, test.train) + documents_of(tokenizer, test.eval)
                  if loss) == sorted(f"answer {i}.{EOS}" + (f"more {i}.{EOS}" if i % 2 else "") for i in range(30, 40))
    assert not build_blocks(data(tmp_path, path="someone/tiny-chat", **settings), tokenizer).prepared_here

    cache_hub_dataset(hf_cache, "someone/tiny-chat", {"train": datasets.Dataset.from_list(rows[10:])}, "4567cdef")
    newer = build_blocks(data(tmp_path, path="someone/tiny-chat", **settings), tokenizer)  # the newest revision
    assert newer.prepared_here and newer.directory != hub.directory
    with pytest.raises(DataError, match=r"someone/tiny-chat: no split 'test'; set data.split to one of \['train'\]"):
        build_blocks(data(tmp_path, path="someone/tiny-chat", split="test", **settings), tokenizer)
    with pytest.raises(DataError, match=r"data.path: 'someone/missing' is no local file or directory, and no Hugging "
                                        r"Face dataset of that id is in the local datasets cache .*/hf \(.*Offline"
                                        r".*run datasets.load_dataset\('someone/missing'\) once on a machine with "
                                        r"network .* or save the dataset with Dataset.save_to_disk"):
        build_blocks(data(tmp_path, path="someone/missing"), tokenizer)


def test_data_columns_rename_the_fields_of_a_layout(tmp_path, tokenizer):
    rows = [{"dialog": c} for c in conversations(30)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    blocks = build_blocks(data(tmp_path, path=str(path), block_size=80, format="chat",
                               columns={"messages": "dialog"}), tokenizer)
    assert all(loss.startswith("answer") for _, loss in documents_of(tokenizer, blocks.train) if loss)


def test_an_evaluation_file_replaces_the_held_out_share(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in conversations(30)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "held out?"},
                                                                     {"role": "assistant", "content": "yes."}]}] * 4)
    blocks = build_blocks(data(tmp_path, path=str(train), eval_path=str(evaluation), block_size=80), tokenizer)
    answers = [loss for _, loss in documents_of(tokenizer, blocks.eval) if loss]
    assert answers == [f"yes.{EOS}"] * 4
    assert len([1 for _, loss in documents_of(tokenizer, blocks.train) if loss]) == 30  # all of path trains
    prepared = json.loads((blocks.directory / "prepared.json").read_text())
    assert prepared["evaluation"]["documents"] == 4 and prepared["training"]["documents"] == 30


@pytest.mark.parametrize("setting, message", [
    ({"format": "csv"}, "data.format|format: got 'csv'; use auto, text, jsonl, parquet, chat, sharegpt, alpaca"),
    ({"columns": {"text": "body"}}, "columns: got"),
    ({"overlong": "wrap"}, "overlong: got 'wrap'; use drop or truncate"),
])
def test_bad_data_settings_name_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**setting)


def test_the_builder_makes_the_committed_tiny_tokenizer_with_its_chat_template(tmp_path):
    build_tiny_tokenizer.main(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (TINY_TOKENIZER / name).read_text()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == \
        build_tiny_tokenizer.CHAT_TEMPLATE
