"""Parallel / scaled parallel / sequential adapters and KronA^B against float64 references of their formulas,
on the real Llama and GPT-2 sub-layers (keyword-called tuple-returning attention, positional GPT-2 calls)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from peft_dist.adapters import inject_adapters
from peft_dist.adapters.bottleneck import AdaptedSublayer, Bottleneck, KronaBlockConfig
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.schema import ConfigError
from tests.adapters.test_contract import randomize_adapters, tiny_gpt2, tiny_llama


def config(method: str, **fields):
    return build_adapter_config({"method": method, **fields}, "adapters.0")


def bottleneck_ref(x: torch.Tensor, adapter: Bottleneck) -> torch.Tensor:
    """``s * (relu(LN(x) Wd^T + bd) Wu^T + bu)`` written out."""
    if isinstance(adapter.norm, torch.nn.LayerNorm):
        x = F.layer_norm(x, x.shape[-1:], adapter.norm.weight, adapter.norm.bias, adapter.norm.eps)
    hidden = torch.relu(x @ adapter.down.weight.t() + adapter.down.bias)
    return adapter.scale * (hidden @ adapter.up.weight.t() + adapter.up.bias)


def call_sublayer(model, layer: int, kind: str, x: torch.Tensor):
    """Call a (wrapped) sub-layer the way its decoder layer does; returns the hidden-state output."""
    is_llama = hasattr(model, "model")
    block = model.model.layers[layer] if is_llama else model.transformer.h[layer]
    if kind == "ffn":
        return block.mlp, block.mlp(x)
    if is_llama:
        position_embeddings = model.model.rotary_emb(x, torch.arange(x.shape[1])[None])
        module = block.self_attn
        return module, module(hidden_states=x, position_embeddings=position_embeddings, attention_mask=None)[0]
    return block.attn, block.attn(x)[0]


def inner_output(wrapper: AdaptedSublayer, model, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The frozen sub-layer alone (temporarily unwrapped), for the reference."""
    saved = wrapper.parallel, wrapper.sequential
    wrapper.parallel, wrapper.sequential = torch.nn.ModuleDict(), torch.nn.ModuleDict()
    try:
        return call_sublayer(model, layer, kind, x)[1]
    finally:
        wrapper.parallel, wrapper.sequential = saved


def assert_same_grads(out: torch.Tensor, ref: torch.Tensor, params: list[torch.Tensor], x: torch.Tensor) -> None:
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum(), [x, *params])
    want = torch.autograd.grad((ref * upstream).sum(), [x, *params])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_bottleneck_module_matches_formula(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d, r = (int(v) for v in torch.randint(2, 24, (2,), generator=g))
    adapter = Bottleneck(d, r, scale=float(torch.rand((), generator=g)) * 4, init="bert",
                         layer_norm=bool(seed % 2)).double()
    x = torch.randn(3, 4, d, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = adapter(x), bottleneck_ref(x, adapter)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_same_grads(out, ref, list(adapter.parameters()), x)


def test_lora_init_is_exact_noop_and_bert_init_is_near_identity() -> None:
    x = torch.randn(5, 32)
    assert torch.count_nonzero(Bottleneck(32, 8, init="lora")(x)) == 0
    bert = Bottleneck(32, 8, init="bert")(x)
    assert 0 < bert.abs().max() < 0.1 * x.abs().max()


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("sublayer", ["ffn", "attn"])
def test_parallel_adapter_is_computed_from_the_sublayer_input(model_fn, sublayer: str) -> None:
    model = model_fn().double()
    names = inject_adapters(model, [config("parallel_adapter", r=6, scale=4.0, sublayer=sublayer)])
    n_layers = model.config.num_hidden_layers
    assert len(names["parallel_adapter"]) == n_layers
    randomize_adapters(model)
    x = torch.randn(2, 7, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    wrapper, out = call_sublayer(model, 1, sublayer, x)
    adapter = wrapper.parallel["parallel_adapter"]
    assert adapter.scale == 4.0
    ref = inner_output(wrapper, model, 1, sublayer, x) + bottleneck_ref(x, adapter)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_same_grads(out, ref, list(adapter.parameters()), x)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_sequential_adapters_wrap_the_sublayer_output(model_fn, placement: str) -> None:
    model = model_fn().double()
    names = inject_adapters(model, [config("sequential_adapter", r=5, placement=placement)])["sequential_adapter"]
    n_layers = model.config.num_hidden_layers
    attn_wrapped = [n for n in names if n.endswith("attn")]
    assert len(names) == (2 if placement == "houlsby" else 1) * n_layers
    assert len(attn_wrapped) == (n_layers if placement == "houlsby" else 0)
    randomize_adapters(model)
    for kind in ("ffn", "attn") if placement == "houlsby" else ("ffn",):
        x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
        wrapper, out = call_sublayer(model, 0, kind, x)
        adapter = wrapper.sequential["sequential_adapter"]
        h = inner_output(wrapper, model, 0, kind, x)
        ref = h + bottleneck_ref(h, adapter)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert_same_grads(out, ref, list(adapter.parameters()), x)


@pytest.mark.parametrize("residual", [False, True])
def test_krona_block_in_parallel_with_the_ffn(residual: bool) -> None:
    model = tiny_gpt2().double()
    before = model(input_ids=torch.arange(1, 9)[None]).logits
    inject_adapters(model, [config("krona_block", scale=0.7, residual=residual)])
    after = model(input_ids=torch.arange(1, 9)[None]).logits
    assert torch.equal(before, after) != residual  # s_res = 1 changes the model at step 0, KronA^B does not
    wrapper = model.transformer.h[0].mlp
    block = wrapper.parallel["krona_block"]
    assert block.A.shape == (8, 8) and block.B.shape == (8, 8)  # hidden 64 = 8 x 8
    assert not block.mergeable
    if residual:  # shape (1,): ZeRO-3 cannot partition a 0-dim parameter
        assert block.residual_scale.shape == () and block.residual_scale.item() == 1.0
    randomize_adapters(model)
    x = torch.randn(3, 4, 64, dtype=torch.float64, requires_grad=True)
    out = wrapper(x)
    ref = inner_output(wrapper, model, 0, "ffn", x) + 0.7 * x @ torch.kron(block.A, block.B).t()
    params = [block.A, block.B]
    if residual:
        ref = ref + block.residual_scale * x
        params.append(block.residual_scale)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_same_grads(out, ref, params, x)


def test_methods_compose_on_one_sublayer() -> None:
    model = tiny_llama()
    inject_adapters(model, [config("parallel_adapter", name="pa", r=4),
                            config("sequential_adapter", name="seq", r=4),
                            config("krona_block", name="kb")])
    wrapper = model.model.layers[0].mlp
    assert isinstance(wrapper, AdaptedSublayer) and not isinstance(wrapper.module, AdaptedSublayer)
    assert list(wrapper.parallel) == ["pa", "kb"] and list(wrapper.sequential) == ["seq"]
    with pytest.raises(ValueError, match="already attached"):
        inject_adapters(model, [config("parallel_adapter", name="pa", r=4)])


def test_bad_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match="sublayer: got 'mlp'; use ffn or attn"):
        config("parallel_adapter", sublayer="mlp")
    with pytest.raises(ConfigError, match="placement: got 'after'"):
        config("sequential_adapter", placement="after")
    with pytest.raises(ConfigError, match="target_modules: sub-layer adapters wrap"):
        config("parallel_adapter", target_modules="all-linear")
    with pytest.raises(ConfigError, match="init: got 'xavier'"):
        config("sequential_adapter", init="xavier")
    with pytest.raises(ConfigError, match=r"adapters\[parallel_adapter\].target_modules: \['ffn_block'\]"):
        inject_adapters(tiny_llama(), [config("parallel_adapter", target_modules=["ffn_block"])])
    with pytest.raises(ConfigError, match=r"a1: 13 \(the hidden size\) is prime"):
        KronaBlockConfig().make(13)
