"""Mixtures of sources (``data.sources``) and the sample completions logged at each evaluation: the config's
checks, the batch order (the weights, passes over each source, every world size alike), each source cached as its
lone ``data.path`` would be, per-source evaluation, completions as ``peft_dist.generate`` gives them, and a real run
of ``configs/mixture.yaml`` stopped and resumed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_dist.config import ConfigError
from peft_dist.data import DataError, GlobalBatchSampler, MixtureSampler, build_blocks, build_mixture
from peft_dist.data.sampler import MIXTURE_CYCLE
from peft_dist.generate import generate
from peft_dist.inference import load_for_inference
from peft_dist.model import load_tokenizer, tiny_llama_config
from peft_dist.train.config import load_config
from peft_dist.train.preflight import check_data
from peft_dist.train.step import evaluate, evaluate_sources, sample_completions
from tests.multiproc import REPO
from tests.unit.test_data import data, ids, write_jsonl
from tests.unit.test_export import trained_adapter


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny-llama")


@pytest.mark.parametrize("overrides, message", [
    (["data.path=a.jsonl", "data.sources=[{path: b.jsonl}]"],
     r"data.path: set either data.path or data.sources, not both; move the path into data.sources"),
    (["data.sources=[{path: a.jsonl, wieght: 2}]"],
     r"data.sources.0.wieght: unknown key. Valid keys of a source are: path, weight, name, format"),
    (["data.sources=[{path: a.jsonl, block_size: 64}]"],
     r"data.sources.0.block_size: unknown key.*the other data settings are shared: set them under data"),
    (["data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 0}]"],
     r"data.sources.1.weight: got 0; use a number > 0 \(the source's share"),
    (["data.sources=[{path: a.jsonl, weight: -0.5}]"], r"data.sources.0.weight: got -0.5; use a number > 0"),
    (["data.sources=[{path: a.jsonl, weight: two}]"], r"data.sources.0.weight: expected a number, got 'two'"),
    (["data.sources=[{path: x/chat.jsonl}, {path: y/chat.jsonl}]"],
     r"data.sources.1.name: 'chat' also names data.sources.0 \(a name defaults to the file stem\); give each"),
    (["data.sources=[{weight: 2}]"], r"data.sources.0.path: required"),
    (["data.sources=[{path: a.jsonl, name: 'a/b'}]"], r"data.sources.0.name: got 'a/b'; use letters, digits"),
    (["data.sources=[{path: a.jsonl, format: csv}]"], r"data.sources.0.format: got 'csv'; use auto, text"),
    (["data.sources=[{path: a.jsonl, prompt_field: q}]"], r"data.sources.0.prompt_field: set both"),
    (["data.sources=[a.jsonl]"], r"data.sources.0: got 'a.jsonl'; each source is a mapping"),
    (["tracking.sample_prompts=['hello', '']"], r"tracking.sample_prompts: got \['hello', ''\]; use a list of"),
    (["tracking.sample_max_new_tokens=0"], r"tracking.sample_max_new_tokens: got 0; must be >= 1"),
])
def test_bad_sources_and_sample_settings_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sources_take_the_shared_settings_their_own_and_a_name_from_the_file():
    cfg = load_config(None, ["data.text_field=body", "data.sources=[{path: 'd/my corpus.v2.jsonl', weight: 3}, "
                             "{path: someone/tiny-chat, format: chat, split: test}, {path: b.txt, name: books}]"])
    sources = cfg.data.mixture()
    assert [(s.name, s.weight) for s in sources] == [("my_corpus.v2", 3.0), ("tiny-chat", 1.0), ("books", 1.0)]
    assert [(s.data.path, s.data.format, s.data.split, s.data.text_field, s.data.sources) for s in sources] == [
        ("d/my corpus.v2.jsonl", "auto", "train", "body", []), ("someone/tiny-chat", "chat", "test", "body", []),
        ("b.txt", "auto", "train", "body", [])]
    assert cfg.data.path == "" and load_config().data.path == "builtin:python-docstrings"


def source_of(drawn: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The source of each index into the training blocks of every source, source after source."""
    return torch.searchsorted(torch.tensor(lengths).cumsum(0), drawn, right=True)


def test_mixture_batches_follow_the_weights_and_read_each_source_a_pass_at_a_time():
    """Of the first N blocks, source s supplies N * weight_s / sum(weights) to within (S + 1) / 2 blocks (S
    sources; its j-th block of a cycle comes at time (j + 1/2) / share_s, and n blocks reach time n / L to within
    S / 2 blocks) plus one block per cycle begun (each share of a cycle of L blocks is rounded to whole blocks)."""
    lengths, weights = [50, 7, 300], [1.0, 2.0, 4.0]
    sampler = MixtureSampler(lengths, weights, micro_batch_size=4, accumulation=4, world_size=1, rank=0, seed=5)
    drawn = torch.cat([torch.cat(sampler.micro_batches(step)) for step in range(1500)])  # 24,000 blocks
    sources = source_of(drawn, lengths)
    for n in (16, 1_000, MIXTURE_CYCLE, 24_000):
        counts = torch.bincount(sources[:n], minlength=3).tolist()
        bound = (len(weights) + 1) / 2 + math.ceil(n / MIXTURE_CYCLE)
        for count, weight in zip(counts, weights):
            assert abs(count - n * weight / sum(weights)) <= bound, (n, counts)
    offsets = [0, 50, 57]
    for source, length in enumerate(lengths):  # every block once in each pass, in a new order each pass
        own = (drawn[sources == source] - offsets[source]).tolist()
        passes = [own[start:start + length] for start in range(0, len(own) - length + 1, length)]
        assert len(passes) >= 10 and all(sorted(p) == list(range(length)) for p in passes)
        assert len({tuple(p) for p in passes[:5]}) == 5


def test_mixture_batches_are_the_same_for_every_world_size_and_from_the_step_alone():
    """Rank r takes the r-th chunk of the global batch; a sampler made anew (a resumed job's) gives the same
    batches as the one that ran, and the seed decides the order within each source."""
    lengths, weights = [40, 9], [3.0, 1.0]
    single = MixtureSampler(lengths, weights, 2, 4, 1, 0, seed=3)
    seen = [torch.cat(single.micro_batches(step)) for step in range(30)]
    resumed = MixtureSampler(lengths, weights, 2, 4, 1, 0, seed=3)
    for step in (29, 7, 12):
        assert torch.equal(torch.cat(resumed.micro_batches(step)), seen[step])
        for world in (2, 4):
            parts = [torch.cat(MixtureSampler(lengths, weights, 2, 4 // world, world, r, 3).micro_batches(step))
                     for r in range(world)]
            assert torch.equal(torch.cat(parts), seen[step])
    other = torch.cat([torch.cat(MixtureSampler(lengths, weights, 2, 4, 1, 0, seed=4).micro_batches(s))
                       for s in range(30)])
    assert not torch.equal(other, torch.cat(seen))
    assert torch.equal(source_of(other, lengths), source_of(torch.cat(seen), lengths))  # same shares, per block


def test_each_source_is_cached_as_its_data_path_and_errors_name_the_source(tmp_path, tokenizer):
    """A source's blocks are those (in the cache directory) of a lone ``data.path`` with its settings; the mixture's
    training split holds them source after source; a one-source mixture trains exactly as ``data.path``."""
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"body": f"text number {i} " * 5} for i in range(80)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"q": f"question {i}?", "a": f" answer {i}."} for i in range(80)])
    mixed = build_mixture(data(tmp_path, block_size=16, sources=[
        {"path": str(texts), "text_field": "body", "weight": 2},
        {"path": str(pairs), "prompt_field": "q", "response_field": "a"}]), tokenizer)
    alone = [build_blocks(data(tmp_path, path=str(texts), text_field="body", block_size=16), tokenizer),
             build_blocks(data(tmp_path, path=str(pairs), prompt_field="q", response_field="a", block_size=16),
                          tokenizer)]
    assert [p.directory for p in mixed.parts] == [a.directory for a in alone]
    assert not any(a.prepared_here for a in alone)
    assert torch.equal(ids(mixed.train), torch.cat([ids(a.train) for a in alone]))
    assert list(mixed.evals) == ["texts", "pairs"] and torch.equal(ids(mixed.evals["pairs"]), ids(alone[1].eval))

    one = build_mixture(data(tmp_path, block_size=16, sources=[{"path": str(texts), "text_field": "body"}]), tokenizer)
    assert one.parts[0].directory == alone[0].directory
    sampler, reference = one.sampler(2, 2, 1, 0, seed=1), GlobalBatchSampler(len(alone[0].train), 2, 2, 1, 0, 1)
    assert type(sampler) is GlobalBatchSampler
    for step in range(9):
        assert torch.equal(torch.cat(sampler.micro_batches(step)), torch.cat(reference.micro_batches(step)))
    with pytest.raises(DataError, match=r"data.sources.1 \(gone\): data.path: '.*gone.jsonl' matches no data file"):
        build_mixture(data(tmp_path, text_field="body", sources=[{"path": str(texts)},
                                                                 {"path": str(tmp_path / "gone.jsonl")}]), tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"q": "x?", "a": "y"}\n{"q": oops}\n')
    with pytest.raises(DataError, match=r"data.sources.1 \(bad\): .*bad.jsonl:2: malformed JSON"):  # pre-flight
        check_data(data(tmp_path, sources=[{"path": str(texts), "text_field": "body"}, {
            "path": str(tmp_path / "bad.jsonl"), "prompt_field": "q", "response_field": "a"}]), tiny_llama_config(),
            "builtin:tiny-llama")


def test_the_eval_loss_is_the_per_source_losses_weighted_by_their_evaluated_tokens(tmp_path, tokenizer):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"text number {i} " * 5} for i in range(120)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q {i}?", "response": f" a {i}."} for i in range(120)])
    mixed = build_mixture(data(tmp_path, block_size=16, eval_fraction=0.2, sources=[
        {"path": str(texts)}, {"path": str(pairs), "prompt_field": "prompt", "response_field": "response"}]), tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    metrics = evaluate_sources(model, mixed.evals, micro=2, batches=3)
    tokens = {name: (split.batch(range(min(len(split), 6)))["labels"][:, 1:] != -100).sum().item()
              for name, split in mixed.evals.items()}
    assert set(metrics) == {"eval/loss", "eval/texts/loss", "eval/pairs/loss"}
    for name, split in mixed.evals.items():
        assert metrics[f"eval/{name}/loss"] == evaluate(model, split, 2, 3)
    weighted = sum(tokens[n] * metrics[f"eval/{n}/loss"] for n in tokens) / sum(tokens.values())
    assert metrics["eval/loss"] == pytest.approx(weighted, rel=1e-12)
    assert metrics["eval/texts/loss"] != pytest.approx(metrics["eval/pairs/loss"], rel=1e-3)
    assert evaluate_sources(model, {"texts": mixed.evals["texts"]}, 2, 3) == {
        "eval/loss": evaluate(model, mixed.evals["texts"], 2, 3)}


def test_sample_completions_are_what_generate_gives(tmp_path):
    adapter = trained_adapter(tmp_path)
    model, tokenizer = load_for_inference(adapter)
    prompts = ["def main(", "the cat sat on"]
    completions = sample_completions(model, tokenizer, prompts, max_new_tokens=12)
    assert all(isinstance(c, str) for c in completions) and any(completions)
    assert [generate(str(adapter), p, max_new_tokens=12) for p in prompts] == [
        p + c for p, c in zip(prompts, completions)]


def launch(config: str, *overrides: str, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the run directory's SQLite store
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), "--config", config,
                           *(a for o in overrides for a in ("--set", o))], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == returncode, proc.stderr[-6000:]
    return proc


@pytest.mark.slow  # three runs of the launcher
def test_the_mixture_example_runs_stops_and_resumes_with_per_source_eval_and_samples(tmp_path, tokenizer):
    """configs/mixture.yaml as written (a few steps): stopped after step 2 and resumed, it trains on the losses of
    the uninterrupted run; MLflow holds eval/<source>/loss of both sources at each eval, eval/loss their mean
    weighted by evaluated tokens, and the sample table of each eval."""
    common = ["train.max_steps=4", "train.eval_interval=2", "train.eval_batches=2", "train.log_interval=1",
              "tracking.sample_max_new_tokens=6", f"data.cache_dir={tmp_path / 'cache'}"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    launch("configs/mixture.yaml", *common, f"checkpoint.output_dir={full}")
    launch("configs/mixture.yaml", *common, f"checkpoint.output_dir={parts}", "checkpoint.exit_interval=2",
           returncode=75)
    launch("configs/mixture.yaml", *common, f"checkpoint.output_dir={parts}", "checkpoint.resume=true")
    reference, resumed = (json.loads((d / "result.json").read_text()) for d in (full, parts))
    assert resumed["first_step"] == 3
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], rel=1e-6, abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)

    client = mlflow.MlflowClient(f"sqlite:///{full}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("peft-dist").experiment_id])
    losses = {key: dict((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
              for key in ("eval/loss", "eval/chat/loss", "eval/alpaca/loss")}
    assert all(sorted(points) == [2, 4] for points in losses.values())
    cfg = load_config(REPO / "configs" / "mixture.yaml", common[-1:])
    evals = build_mixture(cfg.data, tokenizer).evals  # the cached blocks the run evaluated
    tokens = {name: (split.batch(range(min(len(split), 2 * cfg.train.micro_batch_size)))["labels"][:, 1:] != -100)
              .sum().item() for name, split in evals.items()}
    for step in (2, 4):
        weighted = sum(tokens[n] * losses[f"eval/{n}/loss"][step] for n in tokens) / sum(tokens.values())
        assert losses["eval/loss"][step] == pytest.approx(weighted, rel=1e-9)
    assert losses["eval/loss"][4] == pytest.approx(reference["eval_loss"], rel=1e-12)
    for step in (2, 4):
        table = json.loads(Path(client.download_artifacts(run.info.run_id, f"samples/step-{step:08d}.json",
                                                          str(tmp_path / "dl"))).read_text())
        assert table["columns"] == ["step", "prompt", "completion"]
        assert [(row[0], row[1]) for row in table["data"]] == [(step, p) for p in cfg.tracking.sample_prompts]
        assert all(isinstance(row[2], str) for row in table["data"])
