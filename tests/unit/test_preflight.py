"""The CLI refuses what the model cannot take before it starts a process group or reads a weight."""
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
