"""BitFit: the trainable set and gradients against peft's bias training, and the no-bias (Llama) error."""
from __future__ import annotations

import copy

import pytest
import torch

from peft_dist.adapters import adapter_state_dict, inject_adapters
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.schema import ConfigError
from peft_dist.quant.model import quantize_model
from tests.adapters.test_contract import IDS, tiny_gpt2, tiny_llama


def bitfit(**fields):
    return build_adapter_config({"method": "bitfit", **fields}, "adapters.0")


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_same_trainable_biases_outputs_and_gradients_as_peft_bias_all() -> None:
    """peft's ``bias="all"`` trains every bias next to LoRA; with LoRA's B = 0 the function is the base, so
    outputs and bias gradients must equal BitFit's."""
    from peft import LoraConfig, get_peft_model

    ours = tiny_gpt2().double()
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    inject_adapters(ours, [bitfit()])
    peft_biases = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                   for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable(ours) == set(peft_biases)
    assert len(peft_biases) == 2 * (4 + 2) + 1  # per block: c_attn, c_proj, c_fc, mlp.c_proj, ln_1, ln_2; ln_f
    out = ours(input_ids=IDS, labels=IDS)
    ref = theirs(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-12, atol=1e-12)
    out.loss.backward()
    ref.loss.backward()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.grad.abs().sum() > 0
            torch.testing.assert_close(param.grad, peft_biases[name].grad, rtol=1e-10, atol=1e-12)


def test_llama_has_no_biases_and_the_error_offers_norm() -> None:
    with pytest.raises(ConfigError, match=r"adapters\[bitfit\].target_modules.*no bias parameters.*set norm: true"):
        inject_adapters(tiny_llama(), [bitfit()])
    model = tiny_llama()
    names = inject_adapters(model, [bitfit(norm=True)])["bitfit"]
    assert len(names) == 2 * 4 + 1  # input / post-attention norms per layer, final norm
    assert trainable(model) == {n for n in dict(model.named_parameters()) if "norm" in n}


def test_norm_option_adds_norm_weights_and_int8_biases_train() -> None:
    model = tiny_gpt2()
    quantize_model(model)  # biases stay floating point inside the int8 linears
    inject_adapters(model, [bitfit(norm=True)])
    names = trainable(model)
    assert {n for n in names if n.endswith("weight")} == {n for n in names if ".ln_" in n and n.endswith("weight")}
    assert "transformer.h.0.attn.c_attn.bias" in names and "transformer.ln_f.weight" in names
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.transformer.h[0].attn.c_attn.bias.grad.abs().sum() > 0
    assert set(adapter_state_dict(model)) == names  # saved under their own model names


def test_target_modules_narrows_the_biases() -> None:
    model = tiny_gpt2()
    inject_adapters(model, [bitfit(target_modules=["c_attn"])])
    assert trainable(model) == {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"}
