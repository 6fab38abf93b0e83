"""python -m peft_dist.generate: the adapted model's continuation and, with --compare-base, its base's first."""
import sys

from peft_dist.config.schema import ModelConfig, QuantizationConfig
from peft_dist.generate import generate, main
from peft_dist.model import generate_ids, load_tokenizer
from peft_dist.quant.loader import load_quantized_base
from tests.unit.test_export import trained_adapter


def test_compare_base_prints_the_base_then_the_adapted_continuation(tmp_path, monkeypatch, capsys):
    adapter = str(trained_adapter(tmp_path))
    prompt = "def main("
    base = generate(adapter, prompt, max_new_tokens=8, adapted=False)
    adapted = generate(adapter, prompt, max_new_tokens=8)
    model, _ = load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig())
    tokenizer = load_tokenizer("builtin:tiny-llama")
    prompt_ids, new_ids = generate_ids(model.eval(), tokenizer, prompt, 8)
    assert base == tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)  # the base alone, as loaded
    assert adapted != base
    monkeypatch.setattr(sys, "argv", ["generate", adapter, "--prompt", prompt, "--max-new-tokens", "8",
                                      "--compare-base"])
    assert main() == 0
    assert capsys.readouterr().out == f"--- base\n{base}\n--- adapted\n{adapted}\n"
