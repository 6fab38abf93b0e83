"""LoRA against a float64 reference and against Hugging Face ``peft``; merge, injection, checkpoint."""
import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from peft_dist.adapters import AdaptedLinear, adapter_state_dict, inject_adapters, load_adapter_state_dict
from peft_dist.adapters.lora import LoraConfig, LoraDelta
from peft_dist.config import ConfigError, ModelConfig
from peft_dist.config.schema import QuantizationConfig
from peft_dist.quant.loader import build_model
from peft_dist.quant import quantize_linear, quantize_model
from peft_dist.targets import QuantizedLinear
from peft_dist.tracking.run_info import parameter_summary


def randomize(delta: LoraDelta, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        delta.B.normal_()  # B starts at zero; make the update visible


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_float64_reference(rslora):
    torch.manual_seed(0)
    delta = LoraDelta(12, 20, r=4, alpha=8.0, rslora=rslora)
    randomize(delta)
    x = torch.randn(3, 7, 20, dtype=torch.float64)
    scale = 8.0 / (math.sqrt(4) if rslora else 4)
    expected = x @ delta.A.double().t() @ delta.B.double().t() * scale
    torch.testing.assert_close(delta(x.float()).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.delta_weight().double(), delta.B.double() @ delta.A.double() * scale)


def test_lora_starts_as_identity_and_a_is_kaiming_uniform():
    delta = LoraDelta(64, 256, r=8, alpha=16)
    assert delta.B.abs().sum() == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform with a=sqrt(5): bound = 1/sqrt(fan_in)
    assert delta.A.abs().max() <= bound and delta.A.abs().max() > 0.9 * bound


@pytest.mark.parametrize("base_kind", ["linear", "int8", "nf4", "conv1d"])
def test_merge_equals_unmerged_forward_and_unmerge_restores(base_kind):
    torch.manual_seed(1)
    linear = nn.Linear(16, 10)
    base = {"linear": linear, "int8": quantize_linear(linear, torch.float32),
            "nf4": quantize_linear(linear, torch.float32, QuantizationConfig(bits=4)),
            "conv1d": Conv1D(10, 16)}[base_kind]
    layer = AdaptedLinear(base)
    delta = LoraDelta(10, 16, r=2, alpha=4)
    randomize(delta)
    layer.add_delta("lora", delta)
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    assert not isinstance(layer.base, QuantizedLinear)  # merged into a dequantized base
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_delta():
    layer = AdaptedLinear(nn.Linear(4, 4))
    delta = LoraDelta(4, 4, r=1, alpha=1)
    with torch.no_grad():
        delta.B.fill_(float("inf"))
    layer.add_delta("lora", delta)
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer.merge()


def test_injection_counts_and_only_adapters_train():
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    quantize_model(model)
    injected = inject_adapters(model, [LoraConfig(name="lora", target_modules=["q_proj", "v_proj"], r=4)])
    assert len(injected["lora"]) == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}.deltas.lora.{p}"
                         for i in range(4) for m in ("q_proj", "v_proj") for p in ("A", "B")}
    summary = parameter_summary(model)
    assert summary["trainable"] == 8 * 4 * (64 + 64)
    assert summary["base_bytes"] < summary["base_bytes_bf16"]


def test_regex_targets_and_composition_of_two_adapters():
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    injected = inject_adapters(model, [
        LoraConfig(name="attn", target_modules=r".*layers\.[01]\.self_attn\.(q|k)_proj", r=2),
        LoraConfig(name="all", target_modules="all-linear", r=2)])
    assert len(injected["attn"]) == 4 and len(injected["all"]) == 28
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, AdaptedLinear) and set(q.deltas) == {"attn", "all"}


def test_targets_matching_nothing_name_the_key_and_candidates():
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    with pytest.raises(ConfigError, match=r"adapters\[lora\].target_modules.*matches no.*q_proj"):
        inject_adapters(model, [LoraConfig(name="lora", target_modules=["query"])])


def test_adapter_state_dict_round_trip():
    model, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    cfg = [LoraConfig(name="lora", target_modules=["q_proj"], r=2)]
    inject_adapters(model, cfg)
    for m in model.modules():
        if isinstance(m, LoraDelta):
            randomize(m, seed=7)
    state = adapter_state_dict(model)
    fresh, _ = build_model(ModelConfig(name_or_path="builtin:tiny-llama"))
    inject_adapters(fresh, cfg)
    load_adapter_state_dict(fresh, state)
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(ValueError, match="different adapter config"):
        load_adapter_state_dict(fresh, {**state, "model.extra.A": torch.zeros(1)})


def test_same_outputs_and_gradients_as_peft_lora_on_gpt2():
    """peft's LoRA on GPT-2 (Conv1D, fan_in_fan_out) with the same weights: same logits and grads."""
    peft = pytest.importorskip("peft")
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(config)
    theirs = GPT2LMHeadModel(config)
    theirs.load_state_dict(ours.state_dict())
    inject_adapters(ours, [LoraConfig(name="lora", target_modules=["c_attn"], r=4, alpha=8)])
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                          fan_in_fan_out=True, lora_dropout=0.0))
    torch.manual_seed(5)
    for i in range(2):
        delta = ours.transformer.h[i].attn.c_attn.deltas["lora"]
        with torch.no_grad():
            delta.B.normal_()
        peft_layer = theirs.base_model.model.transformer.h[i].attn.c_attn
        peft_layer.lora_A["default"].weight.data.copy_(delta.A)
        peft_layer.lora_B["default"].weight.data.copy_(delta.B)
    x = torch.randint(0, 128, (2, 12))
    out_ours = ours(input_ids=x, labels=x)
    out_theirs = theirs(input_ids=x, labels=x)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for i in range(2):
        delta = ours.transformer.h[i].attn.c_attn.deltas["lora"]
        peft_layer = theirs.base_model.model.transformer.h[i].attn.c_attn
        torch.testing.assert_close(delta.A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(delta.B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_all_linear_after_a_parallel_adapter_skips_the_adapters_own_linears():
    from peft_dist.train.config import build_run_config

    cfg = build_run_config({"adapters": [{"method": "parallel_adapter", "name": "pa"},
                                         {"method": "lora", "name": "lora"}]})
    model, _ = build_model(cfg.model)
    injected = inject_adapters(model, cfg.adapters)
    assert len(injected["lora"]) == 28 and not [n for n in injected["lora"] if ".pa." in n or "parallel" in n]
