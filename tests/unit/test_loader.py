"""Streaming loader at N=1 (int8 and 4-bit): the oracle is transformers' ``from_pretrained`` followed by
``quantize_model``."""
import hashlib
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_dist.config.schema import ConfigError, ModelConfig, QuantizationConfig
from peft_dist.model import (BUILTIN_STDLIB_LLAMA, STDLIB_LLAMA, STDLIB_LLAMA_SHA256, load_tokenizer, local_path,
                             tiny_llama_config)
from peft_dist.quant.int8 import Int8Embedding, Int8Linear
from peft_dist.quant.loader import load_quantized_base
from peft_dist.quant.model import quantize_model
from peft_dist.quant.nf4 import FourBitLinear

LOGITS_ATOL = 1e-5  # same quantized tensors and the same fp32 ops; observed exactly 0
QUANTS = [QuantizationConfig(), QuantizationConfig(bits=4, double_quant=True)]
QUANT_IDS = ["int8", "nf4-double-quant"]


def save_tiny(directory, max_shard_size="200KB", tie: bool = False):
    config = tiny_llama_config()
    config.tie_word_embeddings = tie
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    return directory


def reference(directory, quant: QuantizationConfig = QuantizationConfig()):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    quantize_model(model, "all-linear", torch.float32, quant)
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("shard", ["200KB", "50MB"], ids=["sharded", "single-file"])
def test_matches_from_pretrained_then_quantize(tmp_path, shard, quant):
    directory = save_tiny(tmp_path, shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "200KB")
    model, report = load_quantized_base(ModelConfig(name_or_path=str(directory)), quant)
    want = reference(directory, quant)
    got_sd, want_sd = model.state_dict(), want.state_dict()
    assert set(got_sd) == set(want_sd)
    for key, value in want_sd.items():
        assert got_sd[key].dtype == value.dtype and torch.equal(got_sd[key], value), key
    layer_type = FourBitLinear if quant.bits == 4 else Int8Linear
    assert sum(isinstance(m, layer_type) for m in model.modules()) == 7 * 4
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, want(input_ids=ids).logits, atol=LOGITS_ATOL, rtol=0)
    assert not report.zero3 and report.world_size == 1
    assert report.quantized_on == "cpu" and "quantizing on cpu)" in report.line()  # no DeepSpeed config
    assert report.local_param_bytes == report.full_param_bytes == sum(
        p.numel() * p.element_size() for p in model.parameters())
    assert [(r.name, r.rel_error, r.max_abs_error) for r in report.quantization] == [
        (r.name, r.rel_error, r.max_abs_error)
        for r in sorted(quantize_model(AutoModelForCausalLM.from_pretrained(directory, local_files_only=True),
                                       quant=quant), key=lambda r: [r.name for r in report.quantization].index(r.name))]


def test_tied_embeddings_stay_tied(tmp_path):
    """A tied checkpoint stores only the embedding; lm_head must be the very same parameter."""
    directory = save_tiny(tmp_path, tie=True)
    model, _ = load_quantized_base(ModelConfig(name_or_path=str(directory)), QuantizationConfig())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(directory)(input_ids=ids).logits,
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("extra", [["lm_head"], ["embed_tokens", "lm_head"]], ids=["head", "embeddings-and-head"])
def test_untied_embeddings_and_head_can_be_quantized_and_tied_ones_are_refused(tmp_path, extra):
    """``lm_head`` and ``embed_tokens`` in ``quantization.target_modules``: the loader quantizes them as
    ``quantize_model`` does after ``from_pretrained`` for an untied checkpoint, and refuses a tied one, which
    would come untied."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *extra]
    directory = save_tiny(tmp_path / "untied")
    model, report = load_quantized_base(ModelConfig(name_or_path=str(directory)),
                                        QuantizationConfig(target_modules=targets))
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.embed_tokens, Int8Embedding) == ("embed_tokens" in extra)
    assert {"lm_head", "model.embed_tokens"} & {r.name for r in report.quantization} == {
        "lm_head", *(["model.embed_tokens"] if "embed_tokens" in extra else [])}
    want = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    quantize_model(want, targets, torch.float32)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(input_ids=ids).logits, want(input_ids=ids).logits, atol=LOGITS_ATOL, rtol=0)
    with pytest.raises(ConfigError, match="shares its weight.*tie_word_embeddings"):
        load_quantized_base(ModelConfig(name_or_path=str(save_tiny(tmp_path / "tied", tie=True))),
                            QuantizationConfig(target_modules=targets))


def test_the_builtin_base_draws_the_same_embedding_quantized_or_not():
    """Built from its config alone, an int8 embedding is the int8 form of the table transformers draws."""
    targets = ["embed_tokens", "q_proj"]
    quantized, _ = load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama"),
                                       QuantizationConfig(target_modules=targets))
    plain, _ = load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(enabled=False))
    want = Int8Embedding.from_weight(plain.model.embed_tokens.weight)
    assert torch.equal(quantized.model.embed_tokens.weight, want.weight)


def test_config_only_is_initialised_like_transformers():
    """The transformers init trap: a badly initialised model starts far above ln(vocab)."""
    model, _ = load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig())
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - math.log(512)) < 0.15, loss
    q = model.model.layers[0].self_attn.q_proj
    std = q.dequantized_weight().std().item()
    assert abs(std - tiny_llama_config().initializer_range) < 0.002, std  # normal(0, 0.02), then int8


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_builtin_base_has_the_same_values_with_and_without_quantization(quant):
    """The quantized builtin base is exactly the float one, quantized: same random draws in the same order."""
    tiny = ModelConfig(name_or_path="builtin:tiny-llama")
    quantized, _ = load_quantized_base(tiny, quant)
    float_base, _ = load_quantized_base(tiny, QuantizationConfig(enabled=False))
    quantize_model(float_base, "all-linear", torch.float32, quant)
    want = float_base.state_dict()
    assert all(torch.equal(value, want[key]) for key, value in quantized.state_dict().items())


def test_quantization_disabled_keeps_float_linears(tmp_path):
    directory = save_tiny(tmp_path)
    model, _ = load_quantized_base(ModelConfig(name_or_path=str(directory)), QuantizationConfig(enabled=False))
    want = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))


def test_bad_input_is_refused(tmp_path):
    save_tiny(tmp_path)
    for file in tmp_path.glob("*.safetensors*"):
        file.unlink()
    with pytest.raises(ConfigError, match="no model.safetensors.*save_pretrained\\(safe_serialization=True\\)"):
        load_quantized_base(ModelConfig(name_or_path=str(tmp_path)), QuantizationConfig())
    with pytest.raises(RuntimeError, match="ZeRO-3 but no process group.*init_distributed"):
        load_quantized_base(ModelConfig(name_or_path="builtin:tiny-llama"), QuantizationConfig(),
                            {"zero_optimization": {"stage": 3}})


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_tiny(tmp_path, "50MB")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_quantized_base(ModelConfig(name_or_path=str(directory)), QuantizationConfig())


def test_tensors_are_read_exactly_and_no_checkpoint_file_stays_mapped(tmp_path):
    """Every dtype a checkpoint holds reads back bit for bit (the oracle: safetensors' own loader), and
    reading maps nothing: a mapped file's pages would count in the rank's resident set."""
    from safetensors.torch import load_file, save_file

    from peft_dist.quant.loader import read_tensor, safetensors_header

    tensors = {"bf16": torch.randn(3, 5).bfloat16(), "f32": torch.randn(7), "i8": torch.randint(-128, 127, (4, 4),
               dtype=torch.int8), "u8": torch.randint(0, 255, (9, 1), dtype=torch.uint8),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    header, start = safetensors_header(path)
    got = {name: read_tensor(path, header[name], start) for name in tensors}
    assert str(path) not in Path("/proc/self/maps").read_text()
    expected = load_file(str(path))  # (maps the file)
    for name in tensors:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 3)
    with pytest.raises(ConfigError, match="ends inside a tensor; the file is truncated"):
        [read_tensor(path, entry, start) for entry in header.values()]


def test_the_shipped_pretrained_base_streams_its_safetensors_values():
    """``builtin:stdlib-llama`` is the shipped directory: every tensor the loader streams in is the file's, bit for
    bit (the oracle: safetensors' own loader), and its int8 base is exactly those tensors quantized."""
    from safetensors.torch import load_file

    want = load_file(STDLIB_LLAMA / "model.safetensors")
    shipped = ModelConfig(name_or_path=BUILTIN_STDLIB_LLAMA)
    model, report = load_quantized_base(shipped, QuantizationConfig(enabled=False))
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    assert report.bytes_read == sum(v.numel() * v.element_size() for v in want.values())
    quantized, _ = load_quantized_base(shipped, QuantizationConfig())
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 7 * 4
    quantize_model(model, "all-linear", torch.float32, QuantizationConfig())
    want_quantized = model.state_dict()
    assert all(torch.equal(value, want_quantized[key]) for key, value in quantized.state_dict().items())


def test_a_damaged_shipped_base_is_refused_naming_both_hashes_and_the_command(tmp_path, monkeypatch):
    """One flipped byte in a copy of the shipped weights: loading refuses before reading a tensor, with the file,
    the recorded and the actual sha256, and the command that regenerates it. The intact copy loads."""
    import peft_dist.model

    copy = tmp_path / "stdlib_llama"
    shutil.copytree(STDLIB_LLAMA, copy)
    monkeypatch.setattr(peft_dist.model, "STDLIB_LLAMA", copy)
    assert local_path(BUILTIN_STDLIB_LLAMA) == str(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    message = (rf"{re.escape(str(weights))}: sha256 {actual}, expected {STDLIB_LLAMA_SHA256} .*"
               r"`python bench/quality\.py --make-base`")
    with pytest.raises(ConfigError, match=message):
        load_quantized_base(ModelConfig(name_or_path=BUILTIN_STDLIB_LLAMA), QuantizationConfig())
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(BUILTIN_STDLIB_LLAMA)
