"""Base-model loading, run-directory safety and checkpoint identity checks (no process group needed)."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, ViTConfig

from peft_dist.adapters import adapter_state_dict, inject_adapters
from peft_dist.config import CheckpointConfig, ConfigError, ModelConfig
from peft_dist.distributed.zero3 import build_ds_config
from peft_dist.inference import load_for_inference
from peft_dist.model import base_identity, load_model_config
from peft_dist.quant.loader import build_model
from peft_dist.train.checkpoint import (CONFIG, CheckpointError, adapter_metadata, check_base, check_run_dir,
                                        save_adapter)
from peft_dist.train.config import load_config
from tests.adapters.test_contract import randomize_adapters


def test_missing_model_path_and_non_causal_model_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path: cannot load a model config from"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="is a 'vit' model, not a causal language model"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "vit")))


def test_local_hugging_face_directory_loads(tmp_path):
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    from peft_dist.model import TINY_TOKENIZER
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(tmp_path / "gpt2")
    model, tokenizer = build_model(ModelConfig(name_or_path=str(tmp_path / "gpt2")))
    assert model.config.model_type == "gpt2" and len(tokenizer) == 512


def test_existing_run_directory_is_refused(tmp_path):
    (tmp_path / "run_config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run.*checkpoint.resume=true.*overwrite=true"):
        check_run_dir(tmp_path, CheckpointConfig(output_dir=str(tmp_path)))
    check_run_dir(tmp_path, CheckpointConfig(output_dir=str(tmp_path), resume=True))
    check_run_dir(tmp_path, CheckpointConfig(output_dir=str(tmp_path), overwrite=True))


def test_batch_sizes_in_the_deepspeed_file_are_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="sets train_batch_size; batch sizes come from train.micro_batch_size"):
        build_ds_config(load_config(None, [f"deepspeed.config={path}"]), world_size=2)


def test_adapter_from_another_base_is_refused(tmp_path):
    cfg = load_config()
    model, _ = build_model(cfg.model)
    inject_adapters(model, cfg.adapters)
    randomize_adapters(model)  # LoRA's B starts at zero: give every tensor a value a fresh init would not have
    metadata = adapter_metadata(cfg.adapters, cfg.quantization, cfg.model,
                                base_identity(cfg.model, model.config), step=0)
    save_adapter(model, tmp_path / "adapter", metadata, is_main=True)
    loaded, _ = load_for_inference(tmp_path / "adapter")  # the right base loads, with the saved adapter
    saved, reloaded = adapter_state_dict(model), adapter_state_dict(loaded)
    assert sorted(reloaded) == sorted(saved) and all(torch.equal(reloaded[k], saved[k]) for k in saved)
    saved = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    saved["base_model"]["config_sha256"] = "0" * 64
    (tmp_path / "adapter" / CONFIG).write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="config differs from this base"):
        load_for_inference(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="not an adapter checkpoint"):
        load_for_inference(tmp_path)


def test_the_base_identity_does_not_depend_on_the_dtype_the_base_was_built_in():
    """Under ZeRO-3 the trainer builds the base in the engine's precision (fp16 or bf16) and inference in
    ``model.dtype``: an adapter trained in fp16 on a bf16 base must load (the first GPU run caught this)."""
    cfg = load_config()
    identities = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_model_config(cfg.model.name_or_path), dtype=dtype)
        identities[dtype] = base_identity(cfg.model, model.config)
    assert len({identity["config_sha256"] for identity in identities.values()}) == 1
    # A checkpoint written before the dtype was left out recorded the digest with it: still accepted.
    bf16 = identities[torch.bfloat16]
    older = {"base_model": {**bf16, "config_sha256": bf16["config_sha256_as_loaded"]}}
    check_base(older, bf16, Path("adapter"))
    with pytest.raises(CheckpointError, match="config differs"):
        check_base(older, identities[torch.float16], Path("adapter"))
