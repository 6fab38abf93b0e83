"""The CLI refuses what the model cannot take before it starts a process group or reads a weight."""
import pytest
import torch

from launcher.train import main
from tests.architectures import write_checkpoint


def test_an_unsupported_method_and_architecture_are_refused_before_loading(tmp_path, capsys):
    checkpoint = write_checkpoint("opt", tmp_path / "opt")
    (checkpoint / "model.safetensors").unlink()  # never read: the refusal comes first
    run = tmp_path / "run"
    code = main(["--set", f"model.name_or_path={checkpoint}", "--set", "adapters=[{method: sequential_adapter}]",
                 "--set", f"checkpoint.output_dir={run}", "--set", "tracking.backend=none"])
    assert code == 2
    assert ("peft-dist: error: adapters[sequential_adapter].target_modules: ['mlp'] matches no attention or FFN "
            "sub-layer in OPTForCausalLM") in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and not run.exists()


def test_a_shape_error_is_refused_before_loading(tmp_path, capsys):
    checkpoint = write_checkpoint("llama", tmp_path / "llama")
    (checkpoint / "model.safetensors").unlink()
    code = main(["--set", f"model.name_or_path={checkpoint}", "--set", "adapters=[{method: krona, a1: 7}]",
                 "--set", f"checkpoint.output_dir={tmp_path / 'run'}", "--set", "tracking.backend=none"])
    assert code == 2
    assert "adapters[krona].a1: 7 does not divide 64" in capsys.readouterr().err


def test_fp16_gets_loss_scaling_or_a_clear_refusal(tmp_path, capsys):
    from deepspeed.accelerator import get_accelerator

    from peft_dist.distributed.zero3 import build_ds_config
    from peft_dist.train.config import load_config

    config = build_ds_config(load_config(None, ["train.precision=fp16"]), world_size=2)
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0 and not config["bf16"]["enabled"]
    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's accelerator supports fp16: tests/gpu trains with it")
    code = main(["--set", "train.precision=fp16", "--set", f"checkpoint.output_dir={tmp_path / 'run'}",
                 "--set", "tracking.backend=none"])
    assert code == 2 and not (tmp_path / "run").exists()
    assert "train.precision: fp16 is not supported by DeepSpeed's cpu accelerator" in capsys.readouterr().err


def test_a_planned_preset_refuses_to_start_without_its_model_and_data(tmp_path):
    """The GPT-3 presets name placeholders: the job stops before its process group until both are set."""
    from peft_dist.config.schema import ConfigError
    from peft_dist.data import DataError
    from peft_dist.train.config import load_config
    from peft_dist.train.preflight import preflight
    from tests.multiproc import REPO

    preset = REPO / "slurm" / "presets" / "gpt3-175b-16n.yaml"
    with pytest.raises(ConfigError, match="model.name_or_path: cannot load a model config from '/models/gpt3-175b'"):
        preflight(load_config(preset, [f"checkpoint.output_dir={tmp_path}"]))
    with pytest.raises(DataError, match=r"data.path: '/data/SET-data.path-TO-YOUR-CORPUS.jsonl' matches no data file"):
        preflight(load_config(preset, [f"checkpoint.output_dir={tmp_path}", "model.name_or_path=builtin:tiny-llama",
                                       "data.block_size=128", "train.precision=fp32"]))
