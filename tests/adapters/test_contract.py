"""The contract every registered adapter method keeps, on a tiny Llama and a tiny GPT-2 built from configs.

For each method in the registry: injection adapts something; a method that is a no-op at init leaves the
step-0 output unchanged; only adapter parameters train; ``adapter_state_dict`` round-trips onto a fresh
injected model with identical outputs; merging (where every delta is mergeable) keeps the forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from peft_dist.adapters import (AdaptedLinear, adapter_state_dict, inject_adapters, load_adapter_state_dict,
                                methods)
from peft_dist.adapters.inject import adapter_modules
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.model import tiny_llama_config
from peft_dist.quant.model import quantize_model


def tiny_llama(seed: int = 0, attn: str = "sdpa", kv_heads: int = 4) -> LlamaForCausalLM:
    """4 layers, hidden 64, 4 heads (``kv_heads`` < 4: grouped-query attention), FFN 176 (= 11 x 16),
    vocab 128; no biases."""
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=128)
    config.num_key_value_heads = kv_heads
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, attn: str = "sdpa") -> GPT2LMHeadModel:
    """2 layers, hidden 64, 4 heads, Conv1D linears with biases, vocab 128, dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

# Small per-method settings for the tiny models; a method not listed here is tested with its defaults.
SMALL = {"prefix": {"length": 4}, "mam": {"prefix_length": 4, "r": 8, "scale": 2.0},
         "parallel_adapter": {"r": 8}, "sequential_adapter": {"r": 8}, "bitfit": {"norm": True}}
# Methods that change the model at init by design (prefix vectors are random; KronA^B_res adds s_res * x).
NOT_NOOP_AT_INIT = {"prefix", "mam"}


def adapter_config(method: str, **extra):
    return build_adapter_config({"method": method, **SMALL.get(method, {}), **extra}, "adapters.0")


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor random values, so zero-initialized factors are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1 + p)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CASES = [(m, k) for m in sorted(methods()) for k in MODELS]


@pytest.mark.parametrize("method,model_kind", CASES)
def test_step0_and_trainable(method: str, model_kind: str) -> None:
    model = MODELS[model_kind]()
    quantize_model(model)  # the int8 base the trainer uses
    before = logits(model, IDS)
    base = {id(p): n for n, p in model.named_parameters()}
    injected = inject_adapters(model, [adapter_config(method)])
    assert injected[method], "injection adapted nothing"
    after = logits(model, IDS)
    if method not in NOT_NOOP_AT_INIT:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(after, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    inside = tuple(name + "." for name in adapter_modules(model))
    for name in trainable:  # either an adapter's own parameter or a re-enabled base bias/norm (BitFit)
        assert name.startswith(inside) or name.split(".")[-1] in ("bias", "weight") and method == "bitfit", name
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert not name.startswith(inside), f"{name}: adapter parameter left frozen"
    assert set(base) <= {id(p) for p in model.parameters()}  # the base is wrapped, not replaced or dropped
    for p in model.parameters():
        if id(p) in base and method != "bitfit":
            assert not p.requires_grad, f"{base[id(p)]}: a base parameter trains"


@pytest.mark.parametrize("method,model_kind", CASES)
def test_state_dict_round_trip(method: str, model_kind: str) -> None:
    model = MODELS[model_kind]()
    inject_adapters(model, [adapter_config(method)])
    randomize_adapters(model)
    model.train()  # a training-mode module (reparameterized prefix) must still export its folded form
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    model.eval()
    expected = logits(model, IDS)

    fresh = MODELS[model_kind]()
    inject_adapters(fresh, [adapter_config(method)])
    load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh.eval(), IDS), expected, rtol=0, atol=0)
    with pytest.raises(ValueError):
        load_adapter_state_dict(fresh, {**state, "not.a.tensor": torch.zeros(1)})


@pytest.mark.parametrize("method,model_kind", CASES)
def test_merge_equals_unmerged(method: str, model_kind: str) -> None:
    model = MODELS[model_kind]()
    inject_adapters(model, [adapter_config(method)])
    linears = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    if not linears or not all(d.mergeable for m in linears for d in m.deltas.values()):
        pytest.skip(f"{method} is not a mergeable linear delta")
    randomize_adapters(model)
    model64 = copy.deepcopy(model).double()
    expected = logits(model64, IDS)
    for m in model64.modules():
        if isinstance(m, AdaptedLinear):
            m.merge()
    torch.testing.assert_close(logits(model64, IDS), expected, rtol=1e-10, atol=1e-10)


def test_methods_compose_and_round_trip_under_their_own_names() -> None:
    configs = [adapter_config("prefix", name="attn_prefix"),
               adapter_config("krona", name="kron", target_modules=["q_proj", "v_proj"]),
               adapter_config("parallel_adapter", name="ffn_pa"),
               adapter_config("sequential_adapter", name="seq", placement="houlsby"),
               adapter_config("bitfit", name="norms")]
    model = tiny_llama()
    injected = inject_adapters(model, configs)
    assert all(injected.values())
    randomize_adapters(model)
    state = adapter_state_dict(model)
    for name in ("attn_prefix", "kron", "ffn_pa", "seq"):
        assert any(f".{name}." in key for key in state), name
    fresh = tiny_llama()
    inject_adapters(fresh, configs)
    load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, IDS), logits(model, IDS), rtol=0, atol=0)
