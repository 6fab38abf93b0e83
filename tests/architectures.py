"""Small local checkpoints of the common causal-LM families, built from configs (no download).

Each is written with ``save_pretrained`` (safetensors, the library's own key names on disk, e.g. GPT-NeoX's
``embed_out``) next to the builtin tiny tokenizer (vocabulary 512), so that peft-dist loads it exactly as
it loads a user's model directory. Heads: tied for GPT-2, OPT, Qwen2 and Gemma, untied for the others;
grouped-query attention for Mistral and Qwen2, multi-query for Gemma.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          OPTConfig, PhiConfig, PretrainedConfig, Qwen2Config)

from peft_dist.model import TINY_TOKENIZER

VOCAB, HIDDEN, HEADS, LAYERS, FFN, POSITIONS = 512, 64, 4, 2, 176, 256
TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def _configs() -> dict[str, PretrainedConfig]:
    llama_like = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                  "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS, **TOKENS}
    return {
        "llama": LlamaConfig(**llama_like, num_key_value_heads=HEADS, tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **TOKENS),
        "mistral": MistralConfig(**llama_like, num_key_value_heads=2, sliding_window=POSITIONS,
                                 tie_word_embeddings=False),
        "qwen2": Qwen2Config(**llama_like, num_key_value_heads=2, tie_word_embeddings=True),
        "gpt_neox": GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, rotary_pct=0.25,
                                  max_position_embeddings=POSITIONS, tie_word_embeddings=False, **TOKENS),
        "phi": PhiConfig(**llama_like, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0,
                         attention_dropout=0.0, tie_word_embeddings=False),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
                         dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=0, pad_token_id=1),
        "gemma": GemmaConfig(**llama_like, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
    }


ARCHITECTURES = tuple(_configs())


def write_checkpoint(arch: str, directory: Path, seed: int = 0) -> Path:
    """A random-weight ``arch`` model saved to ``directory`` with the tiny tokenizer; returns the directory."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[arch])
    model.save_pretrained(directory)
    for file in TINY_TOKENIZER.iterdir():
        shutil.copy(file, directory / file.name)
    return directory
