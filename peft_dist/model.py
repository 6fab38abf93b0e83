"""Building the base causal LM and its tokenizer, without any network access."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from peft_dist.config.load import json_sha256
from peft_dist.config.schema import ConfigError, ModelConfig

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer"
BUILTIN_STDLIB_LLAMA = "builtin:stdlib-llama"
STDLIB_LLAMA = Path(__file__).parent / "assets" / "stdlib_llama"
# sha256 of STDLIB_LLAMA / "model.safetensors" as MAKE_BASE writes it (and prints it): checked before every use, so
# a damaged or swapped file is refused instead of training on whatever it holds.
STDLIB_LLAMA_SHA256 = "b347d46431c0fc22f20c8124d60eca2a3b4949ecca694f845c10c914e74fe5e6"
MAKE_BASE = "python bench/quality.py --make-base"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Architectures whose model builds its attention mask without the position ids, so transformers' packed-sequence
# detection never sees them (checked for every family by tests/unit/test_packing.py).
MASK_WITHOUT_POSITIONS = frozenset({"opt"})


def tiny_llama_config(vocab_size: int = 512) -> LlamaConfig:
    """A 4-layer Llama small enough for CPU tests (~0.3M parameters in its linears)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_path(name_or_path: str) -> str:
    """Where ``name_or_path`` lives on disk: the shipped directory of ``builtin:stdlib-llama`` (a Hugging Face
    model directory: config, safetensors, tokenizer), once its weights match the recorded sha256; any other name
    as it is."""
    if name_or_path != BUILTIN_STDLIB_LLAMA:
        return name_or_path
    weights = STDLIB_LLAMA / "model.safetensors"
    actual = file_sha256(weights) if weights.is_file() else "(no such file)"
    if actual != STDLIB_LLAMA_SHA256:
        raise ConfigError(f"model.name_or_path: {BUILTIN_STDLIB_LLAMA}'s weights {weights}: sha256 {actual}, "
                          f"expected {STDLIB_LLAMA_SHA256} (peft_dist/model.py's STDLIB_LLAMA_SHA256). Reinstall "
                          f"peft-dist, or regenerate the base with `{MAKE_BASE}` and record the sha256 it prints")
    return str(STDLIB_LLAMA)


def load_tokenizer(name_or_path: str):
    path = TINY_TOKENIZER if name_or_path == BUILTIN_TINY_LLAMA else local_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: no tokenizer in {name_or_path!r} ({err}); save the model's "
                          "tokenizer next to its weights (tokenizer.save_pretrained)") from None


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """The base model's transformers config; refuses paths that do not hold a causal LM."""
    if name_or_path == BUILTIN_TINY_LLAMA:
        return tiny_llama_config()
    path = local_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot load a model config from {name_or_path!r} ({err}). "
                          "Pass a local Hugging Face model directory, an already cached hub id, "
                          f"{BUILTIN_STDLIB_LLAMA} or {BUILTIN_TINY_LLAMA}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"model.name_or_path: {name_or_path!r} is a {config.model_type!r} model, "
                          "not a causal language model; peft-dist adapts causal LMs only")
    return config


SAMPLE_BYTES = 1 << 16


def weights_fingerprint(name_or_path: str) -> str:
    """A sha256 over each safetensors file's name, size, header and three 64 KiB samples of its data (start,
    middle, end): it tells two fine-tunes of one architecture apart (same header, different values) while
    reading a few hundred KiB whatever the model's size. builtin:tiny-llama's values are fixed by its seed."""
    if name_or_path == BUILTIN_TINY_LLAMA:
        return BUILTIN_TINY_LLAMA
    digest = hashlib.sha256()
    for path in sorted(Path(local_path(name_or_path)).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header))
            start = 8 + header
            for offset in (start, (start + size) // 2, max(start, size - SAMPLE_BYTES)):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def base_identity(cfg: ModelConfig, model_config: PretrainedConfig) -> dict:
    """What an adapter checkpoint records about its base, to refuse loading onto another model: its config
    and a fingerprint of its weights. ``config_sha256`` leaves the config's dtype out: it is how the base was
    loaded (under ZeRO-3, the engine's precision), not which base it is, and inference loads it in
    ``model.dtype``. ``config_sha256_as_loaded`` keeps it: what checkpoints written before 2026-11-30
    recorded as ``config_sha256``, which ``check_base`` still accepts."""
    config = model_config.to_diff_dict()
    without_dtype = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    return {"name_or_path": cfg.name_or_path, "model_type": model_config.model_type,
            "config_sha256": json_sha256(without_dtype), "config_sha256_as_loaded": json_sha256(config),
            "weights_sha256": weights_fingerprint(cfg.name_or_path)}


def max_positions(model_config: PretrainedConfig) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(model_config, key, None):
            return int(getattr(model_config, key))
    return None


def packed_inputs(config: PretrainedConfig, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Model inputs for packed blocks in which each document attends only to itself: the position ids restart at
    every document, from which transformers derives the block-diagonal causal mask; architectures in
    ``MASK_WITHOUT_POSITIONS`` get that mask explicitly, in the 4-D form their attention takes (boolean for
    sdpa, additive in ``dtype`` for eager). No KV cache is built (it would also disable the derivation)."""
    inputs = {**batch, "use_cache": False}
    if config.model_type not in MASK_WITHOUT_POSITIONS:
        return inputs
    position_ids = batch["position_ids"]
    document = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = (causal & (document[:, :, None] == document[:, None, :]))[:, None]
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    if mask_function is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]:
        return {**inputs, "attention_mask": mask}
    if mask_function is ALL_MASK_ATTENTION_FUNCTIONS["eager"]:
        additive = torch.zeros(mask.shape, dtype=dtype, device=position_ids.device)
        return {**inputs, "attention_mask": additive.masked_fill(~mask, torch.finfo(dtype).min)}
    raise ConfigError(f"model: packed documents on {config.model_type} need the sdpa or eager attention, not "
                      f"{config._attn_implementation!r}")


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 synced: bool = False) -> tuple[list[int], list[int]]:
    """The token ids of ``prompt`` and those ``model`` adds to it (greedy at temperature 0). ``synced``: every rank
    of a ZeRO-3 job calls this alike; transformers then runs a forward on each rank until all ranks are done, as
    each forward gathers the parameters collectively."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature if temperature > 0 else None,
                            pad_token_id=tokenizer.eos_token_id, synced_gpus=synced)
    length = inputs["input_ids"].shape[1]
    return output[0, :length].tolist(), output[0, length:].tolist()
