"""Merged and peft-format exports load back with plain transformers / peft and give the same logits."""
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from peft_dist.adapters import inject_adapters
from peft_dist.adapters.base import AdaptedLinear
from peft_dist.train.config import load_config
from peft_dist.export import ExportError, export
from peft_dist.model import TINY_TOKENIZER, base_identity
from peft_dist.quant.loader import build_model
from peft_dist.quant import quantize_model
from peft_dist.train.checkpoint import adapter_metadata, save_adapter
from peft_dist.inference import load_for_inference


def trained_adapter(tmp_path, overrides=(), base_dir="builtin:tiny-llama"):
    """An adapter checkpoint with visibly non-zero updates (as if trained)."""
    cfg = load_config(None, [f"model.name_or_path={base_dir}", *overrides])
    model, _ = build_model(cfg.model)
    quantize_model(model, cfg.quantization.target_modules, model.dtype, cfg.quantization)
    inject_adapters(model, cfg.adapters)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    metadata = adapter_metadata(cfg.adapters, cfg.quantization, cfg.model, base_identity(cfg.model, model.config), 1)
    save_adapter(model, tmp_path / "run" / "adapter", metadata, is_main=True)
    return tmp_path / "run" / "adapter"


def reference_logits(adapter_dir, ids):
    model, _ = load_for_inference(adapter_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides, base", [((), "builtin:tiny-llama"), ((), "builtin:stdlib-llama"),
                                             (("adapters=[{method: krona, target_modules: [q_proj, v_proj]}]",),
                                              "builtin:tiny-llama"),
                                             (("quantization.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                               "up_proj,down_proj,embed_tokens,lm_head]",), "builtin:tiny-llama")],
                         ids=["lora", "lora-on-the-shipped-base", "krona", "int8-embeddings-and-head"])
def test_merged_export_loads_with_plain_transformers(tmp_path, overrides, base):
    adapter = trained_adapter(tmp_path, overrides, base)
    out = export(adapter, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, AdaptedLinear) for m in plain.modules())
    with torch.no_grad():
        logits = plain(input_ids=IDS).logits
    torch.testing.assert_close(logits, reference_logits(adapter, IDS), rtol=1e-4, atol=1e-4)
    assert len(AutoTokenizer.from_pretrained(out)) == 512


def test_merged_export_of_a_gpt2_conv1d_base(tmp_path):
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(base)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(base)
    adapter = trained_adapter(tmp_path, ("adapters.0.target_modules=[c_attn, c_proj]",), base_dir=base)
    out = export(adapter, tmp_path / "merged")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits, reference_logits(adapter, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_lora_on_a_tied_head_is_exported_untied(tmp_path, arch):
    """GPT-2 (Conv1D, tied head) and Gemma (tied head): a LoRA on ``lm_head`` changes the head but not the
    input embeddings, so the merged export must give the head its own weight, not drop the update."""
    from tests.architectures import write_checkpoint

    base = write_checkpoint(arch, tmp_path / arch)
    targets = "[c_attn, c_proj, c_fc, lm_head]" if arch == "gpt2" else "[q_proj, v_proj, lm_head]"
    adapter = trained_adapter(tmp_path, (f"adapters.0.target_modules={targets}",), base_dir=base)
    out = export(adapter, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.tie_word_embeddings is False
    embeddings = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    assert torch.equal(plain.get_input_embeddings().weight, embeddings)  # the embeddings keep their values
    assert not torch.equal(plain.get_output_embeddings().weight, embeddings)  # the head took its update
    with torch.no_grad():
        logits = plain(input_ids=IDS).logits
    torch.testing.assert_close(logits, reference_logits(adapter, IDS), rtol=1e-4, atol=1e-4)


def test_peft_format_loads_with_peft_onto_the_dequantized_base(tmp_path):
    peft = pytest.importorskip("peft")
    adapter = trained_adapter(tmp_path)
    out = export(adapter, tmp_path / "peft", fmt="peft")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    with torch.no_grad():
        logits = model.eval()(input_ids=IDS).logits
    torch.testing.assert_close(logits, reference_logits(adapter, IDS), rtol=1e-4, atol=1e-4)


def test_unmergeable_methods_and_existing_output_are_refused(tmp_path):
    adapter = trained_adapter(tmp_path, ("adapters=[{method: parallel_adapter}]",))
    with pytest.raises(ExportError, match="in the forward path, not a weight update"):
        export(adapter, tmp_path / "merged")
    with pytest.raises(ExportError, match="the peft format is for LoRA"):
        export(adapter, tmp_path / "peft", fmt="peft")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ExportError, match="not empty"):
        export(adapter, tmp_path / "used")


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_frozen_float_tensors_come_from_the_adapted_model(tmp_path, fmt):
    """Embeddings and norms are the loaded model's, not a fresh build of the base (a base built another
    way, e.g. by the streaming loader, need not match a fresh init); linears are dequantized (+ merged)."""
    from peft_dist.export import write_dense_model

    adapted, _ = load_for_inference(trained_adapter(tmp_path))
    with torch.no_grad():
        adapted.model.embed_tokens.weight.add_(0.5)
        adapted.model.norm.weight.mul_(2.0)
    untied = write_dense_model(adapted, tmp_path / "plain", fmt == "merged", torch.float32, 2**30)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert untied == []  # the tiny Llama's head is not tied
    assert torch.equal(plain.model.embed_tokens.weight, adapted.model.embed_tokens.weight)
    assert torch.equal(plain.model.norm.weight, adapted.model.norm.weight)
    q = adapted.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight,
                               q.base.dequantized_weight() + (q.deltas["lora"].delta_weight() if fmt == "merged" else 0))


def test_export_streams_into_shards_without_a_float_copy_of_the_model(tmp_path):
    """A base of 16 hidden-512 layers (~190 MiB in float32): the merged export in 8 MiB shards loads like a
    single file, and the export's own peak memory stays far below the float model."""
    from transformers import LlamaConfig

    from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss, resident_bytes

    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(tmp_path / "base")
    adapter = trained_adapter(tmp_path, (), base_dir=tmp_path / "base")
    float_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_config(config).parameters())
    adapted, _ = load_for_inference(adapter)
    from peft_dist.export import write_dense_model

    gc.collect()
    reset_peak_rss()
    before = resident_bytes()[0]
    write_dense_model(adapted, tmp_path / "merged", True, torch.float32, 8 * 2**20)
    grown = peak_rss_bytes() - before
    assert len(list((tmp_path / "merged").glob("model-*-of-*.safetensors"))) > 10
    assert grown < float_bytes / 4, (grown / 2**20, float_bytes / 2**20)  # observed 1.3 MiB of 210 MiB
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, adapted(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)
