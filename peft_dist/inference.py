"""Using a trained adapter: rebuild base, quantization and adapters from an adapter checkpoint (the base
from the ``model.name_or_path`` recorded at training time, through the trainer's own loader).
``peft_dist.generate`` and ``peft_dist.export`` start here."""
from __future__ import annotations

from pathlib import Path

from peft_dist.adapters.inject import inject_adapters
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.load import build_dataclass
from peft_dist.config.schema import ModelConfig, QuantizationConfig
from peft_dist.model import base_identity, load_tokenizer
from peft_dist.quant.loader import load_quantized_base
from peft_dist.train.checkpoint import check_base, load_adapter_weights, read_metadata


def load_for_inference(directory: str | Path, force: bool = False, adapted: bool = True):
    """Rebuild base + quantization + adapters from a checkpoint; returns ``(model, tokenizer)`` in eval mode.
    ``force``: load onto a base whose weights differ from the recorded ones (same config). ``adapted=False``: the
    base alone, quantized as it was trained on, to compare with the adapted model."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    model_cfg = build_dataclass(ModelConfig, metadata["model"], "model")
    model_cfg.gradient_checkpointing = False
    quant = build_dataclass(QuantizationConfig, metadata["quantization"], "quantization")
    model, _ = load_quantized_base(model_cfg, quant)
    check_base(metadata, base_identity(model_cfg, model.config), directory, force)
    tokenizer = load_tokenizer(model_cfg.name_or_path)
    if adapted:
        adapters = [build_adapter_config(a, f"adapters.{i}") for i, a in enumerate(metadata["adapters"])]
        inject_adapters(model, adapters)
        load_adapter_weights(model, directory)
    return model.eval(), tokenizer
