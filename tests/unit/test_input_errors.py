"""Bad input and damaged files fail in seconds with the problem and the fix, before any process group, and
never a traceback: non-UTF-8 configs, unwritable output directories, malformed data, a run directory held
by another job, damaged checkpoints."""
import json
import logging
import subprocess
import sys
import time

import pytest
import torch

from launcher.train import main
from peft_dist.config.schema import ConfigError
from peft_dist.inference import load_for_inference
from peft_dist.model import file_sha256, load_tokenizer, tiny_llama_config
from peft_dist.train.checkpoint import (CheckpointError, MANIFEST, WEIGHTS, latest_checkpoint,
                                        load_training_checkpoint, manifest_digest)
from peft_dist.train.files import LOCK, lock_run_dir, unlock_run_dirs
from tests.unit.test_export import trained_adapter


def run_cli(tmp_path, *sets: str) -> int:
    return main([*(a for s in sets for a in ("--set", s)), "--set", "tracking.backend=none",
                 "--set", f"checkpoint.output_dir={tmp_path / 'run'}"])


def test_a_config_that_is_not_utf8_text(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert main(["--config", str(config)]) == 2
    assert f"--config {config}: not UTF-8 text (byte" in capsys.readouterr().err


def test_an_output_directory_that_cannot_be_written(tmp_path, capsys):
    began = time.monotonic()
    assert main(["--set", "checkpoint.output_dir=/proc/peft-dist-run", "--set", "tracking.backend=none"]) == 2
    assert "checkpoint.output_dir: cannot create or write '/proc/peft-dist-run'" in capsys.readouterr().err
    assert time.monotonic() - began < 30 and not torch.distributed.is_initialized()


def test_a_malformed_data_line_before_the_process_group(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": oops}\n')
    assert run_cli(tmp_path, f"data.path={data}") == 2
    assert "train.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_a_bad_conversation_and_a_missing_chat_template_before_the_process_group(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}))
    assert run_cli(tmp_path, f"data.path={data}") == 2
    assert "chat.jsonl:1: turn 2: unknown role 'bot'; use system, user, assistant" in capsys.readouterr().err
    tokenizer, model = load_tokenizer("builtin:tiny-llama"), tmp_path / "model"
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model)  # a model directory whose tokenizer has no chat template
    tiny_llama_config().save_pretrained(model)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    data.write_text(json.dumps({"messages": turns}))
    assert run_cli(tmp_path, f"data.path={data}", f"model.name_or_path={model}") == 2
    assert "this tokenizer has none; set data.chat_template" in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_a_block_longer_than_the_context_before_the_process_group(tmp_path, capsys):
    assert run_cli(tmp_path, "data.block_size=4096") == 2
    assert "data.block_size: 4096 exceeds the model's context of 512 tokens" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_one_job_per_run_directory(tmp_path, caplog):
    """A second job is refused naming the holder; a lock left by a killed job is taken over."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from peft_dist.train.files import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(60)", str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"{run} is in use by another job \(host .*, pid {holder.pid}, "):
            lock_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="peft_dist"):
        lock_run_dir(run)  # the killed holder's lock is gone with it
    assert f"pid {holder.pid}" in caplog.text and "taking it over" in caplog.text
    unlock_run_dirs()
    assert (run / LOCK).read_text() == ""  # a clean end leaves no holder behind


def test_a_damaged_adapter_is_a_clear_error(tmp_path):
    adapter = trained_adapter(tmp_path)
    data = bytearray((adapter / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (adapter / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: damaged \(its sha256 differs"):
        load_for_inference(adapter)
    (adapter / WEIGHTS).write_bytes(bytes(data[: len(data) // 2]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["weights_sha256"]  # an older checkpoint without a checksum: the reader's own error
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_for_inference(adapter)


def test_resume_skips_a_damaged_checkpoint(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        path = root / f"step-{step:08d}"
        (path / "engine").mkdir(parents=True)
        (path / "engine" / "optim.pt").write_bytes(bytes([step]) * 64)
        (path / MANIFEST).write_text(json.dumps({"files": {"engine/optim.pt": file_sha256(path / "engine" / "optim.pt")}}))
    assert latest_checkpoint(tmp_path) == root / "step-00000004"
    (root / "step-00000004" / "engine" / "optim.pt").write_bytes(bytes([9]) * 64)  # one byte value flipped
    with caplog.at_level(logging.WARNING, logger="peft_dist"):
        assert latest_checkpoint(tmp_path) == root / "step-00000002"
    assert "step-00000004: engine/optim.pt does not match its checksum; skipping this checkpoint" in caplog.text


def test_resume_refuses_a_checkpoint_of_another_adapter_config_or_world_size(tmp_path):
    """Checked before DeepSpeed reads anything, so no engine is needed (None would fail if it were reached)."""
    base = {"name_or_path": "builtin:tiny-llama", "model_type": "llama", "config_sha256": "c",
            "config_sha256_as_loaded": "c", "weights_sha256": "w"}
    path = tmp_path / "checkpoints" / "step-00000003"
    path.mkdir(parents=True)
    manifest = {"step": 3, "world_size": 2, "base_model": base, "adapters": [{"method": "lora", "r": 8}], "files": {}}
    (path / MANIFEST).write_text(json.dumps({**manifest, "manifest_sha256": manifest_digest(manifest)}))
    with pytest.raises(CheckpointError, match=r"saved with adapters .*'r': 8.*resume with the same adapter config"):
        load_training_checkpoint(None, tmp_path, [], {"base_model": base, "adapters": [{"method": "lora", "r": 4}]})
    with pytest.raises(CheckpointError, match="written by 2 ranks, resumed on 1. Resume on 2 ranks"):
        load_training_checkpoint(None, tmp_path, [], {"base_model": base, "adapters": manifest["adapters"]})


def test_an_adapter_of_another_fine_tune_is_refused_unless_forced(tmp_path):
    """Two checkpoints of one config with different weights: the adapter of one is refused on the other."""
    import shutil

    from tests.architectures import write_checkpoint

    trained_on = write_checkpoint("llama", tmp_path / "a", seed=0)
    adapter = trained_adapter(tmp_path, (), base_dir=trained_on)
    shutil.rmtree(trained_on)
    write_checkpoint("llama", trained_on, seed=1)  # the same path and config, other weights
    with pytest.raises(CheckpointError, match=r"whose weights differ .*another fine-tune.*--force"):
        load_for_inference(adapter)
    model, _ = load_for_inference(adapter, force=True)
    assert model is not None
