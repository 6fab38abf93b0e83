"""Model shapes for planning: presets, Hugging Face config files, and the tensors each shape holds.

A ``ModelShape`` is enough to list every parameter tensor of the transformers model it stands for
(``tensors``), which is what the analytic memory model counts; ``hf_config`` turns it back into the
transformers config that the meta-device dry run builds, so the two can be compared exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import GPT2Config, LlamaConfig, PretrainedConfig


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory, communication and FLOPs.

    family: ``llama`` (RMSNorm, gated SiLU MLP, no biases, rotary positions; also Mistral-style configs)
        or ``gpt2`` (LayerNorm, GELU MLP, biases, learned positions, GPT-2 ``Conv1D`` layers: GPT-3).
    """

    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tied_embeddings: bool
    head_size: int = 0  # a config's explicit head_dim (Gemma, Qwen3, Mistral-NeMo); 0: hidden // heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def linears(self, layer: int) -> list[tuple[str, int, int, bool]]:
        """``(full module name, d_out, d_in, has_bias)`` of every linear of decoder layer ``layer``."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "llama":
            p = f"model.layers.{layer}"
            return [(f"{p}.self_attn.q_proj", q, h, False), (f"{p}.self_attn.k_proj", kv, h, False),
                    (f"{p}.self_attn.v_proj", kv, h, False), (f"{p}.self_attn.o_proj", h, q, False),
                    (f"{p}.mlp.gate_proj", i, h, False), (f"{p}.mlp.up_proj", i, h, False),
                    (f"{p}.mlp.down_proj", h, i, False)]
        p = f"transformer.h.{layer}"
        return [(f"{p}.attn.c_attn", 3 * h, h, True), (f"{p}.attn.c_proj", h, h, True),
                (f"{p}.mlp.c_fc", i, h, True), (f"{p}.mlp.c_proj", h, i, True)]

    def head(self) -> tuple[str, int, int, bool]:
        return ("lm_head", self.vocab, self.hidden, False)

    def other_tensors(self) -> list[tuple[str, int]]:
        """``(name, numel)`` of every parameter that is not a decoder linear: embeddings, norms, head."""
        h = self.hidden
        if self.family == "llama":
            out = [("model.embed_tokens.weight", self.vocab * h), ("model.norm.weight", h)]
            out += [(f"model.layers.{n}.{norm}.weight", h) for n in range(self.layers)
                    for norm in ("input_layernorm", "post_attention_layernorm")]
        else:
            out = [("transformer.wte.weight", self.vocab * h), ("transformer.wpe.weight", self.max_positions * h),
                   ("transformer.ln_f.weight", h), ("transformer.ln_f.bias", h)]
            out += [(f"transformer.h.{n}.{norm}.{kind}", h) for n in range(self.layers)
                    for norm in ("ln_1", "ln_2") for kind in ("weight", "bias")]
        if not self.tied_embeddings:
            out.append(("lm_head.weight", self.vocab * h))
        return out

    def linear_params(self) -> int:
        """Weights of all decoder linears plus the output head (the matmul FLOPs per token are 2x this)."""
        decoder = sum(o * i for _, o, i, _ in self.linears(0)) * self.layers
        return decoder + self.vocab * self.hidden

    def total_params(self) -> int:
        biases = sum(o for _, o, _, b in self.linears(0) if b) * self.layers
        decoder = sum(o * i for _, o, i, _ in self.linears(0)) * self.layers
        return decoder + biases + sum(n for _, n in self.other_tensors())


PRESETS: dict[str, ModelShape] = {
    # GPT-3 (Brown et al. 2020, table 2.1) on the GPT-2 architecture (dense attention throughout).
    "gpt3-175b": ModelShape("gpt3-175b", "gpt2", 12288, 96, 96, 96, 4 * 12288, 50257, 2048, True),
    # The paper's 13B lists d_model 5140 with 40 heads of 128; 5120 keeps the heads whole.
    "gpt3-13b": ModelShape("gpt3-13b", "gpt2", 5120, 40, 40, 40, 4 * 5120, 50257, 2048, True),
    "gpt3-6.7b": ModelShape("gpt3-6.7b", "gpt2", 4096, 32, 32, 32, 4 * 4096, 50257, 2048, True),
    "llama-7b": ModelShape("llama-7b", "llama", 4096, 32, 32, 32, 11008, 32000, 4096, False),
    "llama-13b": ModelShape("llama-13b", "llama", 5120, 40, 40, 40, 13824, 32000, 4096, False),
    "llama-70b": ModelShape("llama-70b", "llama", 8192, 80, 64, 8, 28672, 32000, 4096, False),
}


class PlanError(ValueError):
    """Planner input that cannot describe a real run; the message names the option and the fix."""


def shape_from_hf(config: PretrainedConfig, name: str) -> ModelShape:
    """The shape of a Llama-family or GPT-2-family transformers config."""
    kind = config.model_type
    if kind in ("llama", "mistral"):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return ModelShape(name, "llama", config.hidden_size, config.num_hidden_layers, heads,
                          getattr(config, "num_key_value_heads", None) or heads, config.intermediate_size,
                          config.vocab_size, config.max_position_embeddings, bool(config.tie_word_embeddings),
                          0 if head_dim == config.hidden_size // heads else head_dim)
    if kind == "gpt2":
        return ModelShape(name, "gpt2", config.n_embd, config.n_layer, config.n_head, config.n_head,
                          config.n_inner or 4 * config.n_embd, config.vocab_size, config.n_positions,
                          bool(getattr(config, "tie_word_embeddings", True)))
    raise PlanError(f"--model: model_type {kind!r} is not modelled; the planner knows llama, mistral and "
                    f"gpt2 configs, or a preset ({', '.join(PRESETS)})")


def load_shape(model: str) -> ModelShape:
    """A preset name, or a Hugging Face ``config.json`` (or a directory holding one)."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model: {model!r} is neither a preset ({', '.join(PRESETS)}) nor a Hugging Face "
                        "config.json file or model directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlanError(f"--model: {path} is not JSON ({err}); pass a Hugging Face config.json") from None
    from transformers import AutoConfig

    if not isinstance(data, dict) or "model_type" not in data:
        raise PlanError(f"--model: {path} has no model_type; is it a Hugging Face config.json?")
    config = AutoConfig.for_model(**data)
    return shape_from_hf(config, path.parent.name or path.stem)


def hf_config(shape: ModelShape, dtype: str = "bfloat16") -> PretrainedConfig:
    """The transformers config that ``shape`` describes (for the meta-device dry run)."""
    if shape.family == "llama":
        return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                           num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                           max_position_embeddings=shape.max_positions, tie_word_embeddings=shape.tied_embeddings,
                           dtype=dtype)
    return GPT2Config(vocab_size=shape.vocab, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                      n_inner=shape.intermediate, n_positions=shape.max_positions,
                      tie_word_embeddings=shape.tied_embeddings, dtype=dtype)


def with_layers(shape: ModelShape, layers: int) -> ModelShape:
    """The same model with fewer layers (tests build small skeletons with real widths)."""
    return replace(shape, layers=layers)
