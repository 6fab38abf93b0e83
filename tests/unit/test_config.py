"""Config loading: every bad input fails before any process starts, naming the key and the fix."""
from pathlib import Path

import pytest

from peft_dist.config import ConfigError, config_to_dict
from peft_dist.train.config import load_config
from peft_dist.config.load import default_config_dict
from peft_dist.data import BUILTIN_DOCSTRINGS
from peft_dist.distributed.zero3 import build_ds_config, with_gradient_bucket
from peft_dist.model import BUILTIN_STDLIB_LLAMA, STDLIB_LLAMA, load_model_config, load_tokenizer, local_path

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_equals_the_shipped_tiny_config():
    assert config_to_dict(load_config()) == config_to_dict(load_config(REPO / "configs" / "tiny-lora.yaml"))


def test_the_default_job_adapts_the_shipped_pretrained_base_to_the_docstrings():
    """An empty config is the pretrained base from the package (config, weights and tokenizer of one directory)
    and the corpus it was not trained on."""
    cfg = load_config()
    assert cfg.model.name_or_path == BUILTIN_STDLIB_LLAMA and cfg.data.path == BUILTIN_DOCSTRINGS
    assert local_path(cfg.model.name_or_path) == str(STDLIB_LLAMA)
    config = load_model_config(cfg.model.name_or_path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 256, 4)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    assert len(tokenizer) == config.vocab_size == 512 and tokenizer.eos_token_id == config.eos_token_id


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.adapters, "every example config adapts something"


def test_overrides_parse_yaml_values_and_index_lists():
    cfg = load_config(None, ["train.lr=1e-3", "adapters.0.r=4", "adapters.0.target_modules=[q_proj]",
                             "deepspeed.zero_stage=2"])
    assert cfg.train.lr == 0.001 and cfg.adapters[0].r == 4
    assert cfg.adapters[0].target_modules == ["q_proj"] and cfg.deepspeed.zero_stage == 2


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", r"train.learning_rate: unknown key. Valid keys of 'train' are: .*lr"),
    ("trian.lr=1", r"trian: unknown section"),
    ("train.max_steps=ten", r"train.max_steps: expected int, got 'ten'"),
    ("train.micro_batch_size=0", r"train.micro_batch_size: got 0; must be >= 1"),
    ("train.precision=fp8", r"train.precision: got 'fp8'; use fp32, bf16 or fp16"),
    ("adapters.0.r=0", r"adapters.0.r: got 0; the rank must be >= 1"),
    ("adapters.0.rank=8", r"adapters.0.rank: unknown key"),
    ("adapters.0.method=loraa", r"adapters.0.method: unknown adapter method 'loraa'; known: .*lora"),
    ("data.eval_fraction=1.5", r"data.eval_fraction: got 1.5"),
    ("deepspeed.zero_stage=4", r"deepspeed.zero_stage: got 4"),
    ("train", r"expected KEY=VALUE"),
    ("adapters.3.r=8", r"indexes a list of 1 items"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_duplicate_adapter_names_are_refused():
    data = default_config_dict()
    with pytest.raises(ConfigError, match="name 'lora' is used twice"):
        from peft_dist.train.config import build_run_config
        build_run_config({**data, "adapters": data["adapters"] * 2})


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_deepspeed_config_takes_batch_and_precision_from_train_and_merges_overrides():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.gradient_accumulation_steps=3",
                             "train.precision=bf16",
                             "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3  # an override of one key keeps the section's others
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ConfigError, match="deepspeed.config: no such file"):
        build_ds_config(load_config(None, ["deepspeed.config=ds_configs/nope.json"]), 1)


def test_the_gradient_bucket_holds_at_most_the_trainable_elements():
    """DeepSpeed allocates reduce_bucket_size elements whole on the device (ds_configs/: 5e7, its default 5e8)."""
    ds = build_ds_config(load_config(None, []), world_size=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert with_gradient_bucket(ds, 44_032)["zero_optimization"]["reduce_bucket_size"] == 44_032
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e7  # the caller's config is not changed
    assert with_gradient_bucket(ds, 10**9)["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert with_gradient_bucket({}, 10**9)["zero_optimization"]["reduce_bucket_size"] == 500_000_000


def test_negative_peak_tflops_is_refused():
    with pytest.raises(ConfigError, match="tracking.peak_tflops: must be >= 0"):
        load_config(None, ["tracking.peak_tflops=-1"])
