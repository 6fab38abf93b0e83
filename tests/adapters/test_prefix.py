"""Prefix tuning against a float64 reference of ``Attn(q, [P_k; K], [P_v; V])`` with the mask (and of the gated
``Attn(q, K, V) + tanh(g) Attn(q, P_k, P_v)``), against peft's prefix tuning on the same weights, and through
generation with a cache."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from peft_dist.adapters import adapter_state_dict, inject_adapters, load_adapter_state_dict
from peft_dist.adapters.prefix import PrefixAttention, PrefixKV
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.schema import ConfigError
from tests.adapters.test_contract import randomize_adapters, tiny_gpt2, tiny_llama


def tiny_llama_gqa(seed: int = 0, attn: str = "sdpa"):
    return tiny_llama(seed, attn, kv_heads=2)


def prefix(**fields):
    return build_adapter_config({"method": "prefix", **fields}, "adapters.0")


def attention_ref(model, layer: int, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  padding: torch.Tensor, gated: tuple = ()) -> torch.Tensor:
    """One self-attention written out: softmax(q [P_k; K]^T / sqrt(hd) + mask) [P_v; V], plus for each gated
    prefix ``(G_k, G_v, g)`` the term tanh(g) softmax(q G_k^T / sqrt(hd)) G_v per query head, then the output
    projection. Prefixes are admitted for every query; real keys are causal and padding-masked."""
    batch, length, d = x.shape
    heads = model.config.num_attention_heads
    if hasattr(model, "model"):
        attn = model.model.layers[layer].self_attn.module
        hd = attn.head_dim
        q = attn.q_proj(x).view(batch, length, heads, hd).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, -1, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(length)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out_proj = attn.o_proj
    else:
        attn = model.transformer.h[layer].attn.module
        hd = d // heads
        q, k, v = (t.view(batch, length, heads, hd).transpose(1, 2) for t in attn.c_attn(x).split(d, dim=2))
        out_proj = attn.c_proj
    groups = heads // k.shape[1]  # grouped-query attention: each key/value head serves `groups` query heads
    K = torch.cat([key.expand(batch, -1, -1, -1), k], dim=2).repeat_interleave(groups, dim=1)
    V = torch.cat([value.expand(batch, -1, -1, -1), v], dim=2).repeat_interleave(groups, dim=1)
    scores = q @ K.transpose(-1, -2) / hd ** 0.5
    real = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & padding.bool()[:, None, None, :]
    allowed = torch.cat([torch.ones(batch, 1, length, key.shape[1], dtype=torch.bool), real], dim=-1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = probs @ V  # (batch, heads, length, hd)
    for g_key, g_value, gate in gated:
        G_k, G_v = (t.expand(batch, -1, -1, -1).repeat_interleave(groups, dim=1) for t in (g_key, g_value))
        out = out + torch.tanh(gate)[:, None, None] * ((q @ G_k.transpose(-1, -2) / hd ** 0.5).softmax(-1) @ G_v)
    return out_proj(out.transpose(1, 2).reshape(batch, length, d))


def decoder_layer_ref(model, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      padding: torch.Tensor, gated: tuple = ()) -> torch.Tensor:
    """The first decoder layer written out around ``attention_ref``: pre-norm attention and MLP, each with
    its residual (Llama: input/post-attention RMSNorm; GPT-2: ln_1/ln_2)."""
    if hasattr(model, "model"):
        layer = model.model.layers[0]
        first, second = layer.input_layernorm, layer.post_attention_layernorm
    else:
        layer = model.transformer.h[0]
        first, second = layer.ln_1, layer.ln_2
    h = x + attention_ref(model, 0, first(x), key, value, padding, gated)
    return h + layer.mlp(second(h))


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_llama_gqa, tiny_gpt2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_layer_matches_float64_reference(model_fn, attn: str, reparameterize: bool, padded: bool) -> None:
    """Through the whole model (its own mask, its own decoder layer calling the wrapped attention): the first
    layer's output equals the reference, and so do the gradients of the input and the prefix parameters."""
    model = model_fn(attn=attn).double()
    inject_adapters(model, [prefix(length=3, reparameterize=reparameterize, hidden=16)])
    batch, length, d = 2, 6, model.config.hidden_size
    padding = torch.ones(batch, length, dtype=torch.long)
    if padded:
        padding[0, :2] = 0  # left padding in the first row
    x = torch.randn(batch, length, d, dtype=torch.float64, requires_grad=True)
    hidden = model(inputs_embeds=x, attention_mask=padding, output_hidden_states=True).hidden_states
    layer_in, out = hidden[0], hidden[1]  # GPT-2's layer input is x plus its position embeddings
    wrapper = model.model.layers[0].self_attn if hasattr(model, "model") else model.transformer.h[0].attn
    assert isinstance(wrapper, PrefixAttention)
    kv = wrapper.prefixes["prefix"]
    key, value, _ = kv()
    ref = decoder_layer_ref(model, layer_in, key, value, padding)
    rows = padding.bool()  # padded queries' outputs are never used; compare the real ones
    tol = 1e-6 if attn == "eager" else 1e-10  # transformers' eager softmax runs in float32 even for float64
    torch.testing.assert_close(out[rows], ref[rows], rtol=tol, atol=tol)
    without = decoder_layer_ref(model, layer_in, key[:, :0], value[:, :0], padding)
    assert (out[rows] - without[rows]).abs().max() > 1e-3  # the prefix really changed the layer
    params = list(kv.parameters())
    assert len(params) == (5 if reparameterize else 2)  # E, W1, b1, W2, b2 or P_k, P_v
    upstream = torch.randn_like(out) * rows[..., None]
    got = torch.autograd.grad((out * upstream).sum(), [x, *params], retain_graph=True)
    want = torch.autograd.grad((ref * upstream).sum(), [x, *params])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol * 10, atol=tol)


def test_reparameterization_formula_and_folding() -> None:
    kv = PrefixKV(kv_heads=2, head_dim=3, length=4, d_model=5, reparameterize=True, hidden=7).double()
    first, _, last = kv.mlp
    flat = torch.tanh(kv.embedding @ first.weight.t() + first.bias) @ last.weight.t() + last.bias
    per_token = flat.view(4, 2, 2, 3)  # (l, key/value, head, head_dim)
    key, value, _ = kv()
    torch.testing.assert_close(key, per_token[:, 0].transpose(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value, per_token[:, 1].transpose(0, 1), rtol=1e-12, atol=1e-12)
    state = kv.adapter_state_dict()
    assert sorted(state) == ["key", "value"]  # the MLP is folded away
    assert torch.equal(state["key"], key) and torch.equal(state["value"], value)
    kv.load_adapter_state_dict(state)
    assert kv.mlp is None and sorted(n for n, _ in kv.named_parameters()) == ["key", "value"]
    assert torch.equal(kv()[0], key)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_llama_gqa, tiny_gpt2])
def test_same_function_and_gradients_as_peft_prefix_tuning(model_fn) -> None:
    """peft prepends a prefilled cache, which shifts the real tokens' positions by l; passing the same
    shifted position ids to ours makes the two functions identical."""
    from peft import PrefixTuningConfig, get_peft_model

    l, n_layers = 5, model_fn().config.num_hidden_layers
    ours = model_fn().double()
    theirs = get_peft_model(copy.deepcopy(ours), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=l))
    inject_adapters(ours, [prefix(length=l, reparameterize=False)])
    theirs.prompt_encoder.double()  # peft keeps its prompt table in float32
    table = theirs.prompt_encoder["default"].embedding.weight  # (l, layers * 2 * kv_heads * head_dim)
    wrappers = [m for m in ours.modules() if isinstance(m, PrefixAttention)]
    assert len(wrappers) == n_layers
    with torch.no_grad():
        table.copy_(torch.stack([t for w in wrappers for t in w.prefixes["prefix"]()[:2]])  # (layers*2, h, l, hd)
                    .permute(2, 0, 1, 3).reshape(l, -1))
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[1, -3:] = 0  # right padding
    labels = ids.masked_fill(padding == 0, -100)
    out = ours(input_ids=ids, attention_mask=padding, labels=labels, position_ids=torch.arange(l, l + 9)[None])
    ref = theirs(input_ids=ids, attention_mask=padding, labels=labels)
    real = padding.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-10, atol=1e-10)
    out.loss.backward()
    ref.loss.backward()
    ours_grad = torch.stack([p.grad for w in wrappers for p in (w.prefixes["prefix"].key, w.prefixes["prefix"].value)])
    torch.testing.assert_close(ours_grad.permute(2, 0, 1, 3).reshape(l, -1), table.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_llama_gqa, tiny_gpt2])
@pytest.mark.parametrize("gate", [False, True])
def test_generation_with_a_cache_equals_without(model_fn, gate: bool) -> None:
    """Decoding steps (one query against the cache) apply the same prefix as the uncached full forward."""
    model = model_fn()
    inject_adapters(model, [prefix(length=4, gate=gate)])
    randomize_adapters(model)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(ids)}
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


def test_trains_from_input_ids_and_labels_alone_and_round_trips_folded() -> None:
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inject_adapters(model, [prefix(length=4, hidden=32)])
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    state = adapter_state_dict(model)
    assert all(k.endswith((".key", ".value")) for k in state) and len(state) == 2 * 4
    fresh = tiny_llama()
    inject_adapters(fresh, [prefix(length=4, hidden=32)])
    load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def layer0_wrapper(model) -> PrefixAttention:
    wrapper = model.model.layers[0].self_attn if hasattr(model, "model") else model.transformer.h[0].attn
    assert isinstance(wrapper, PrefixAttention)
    return wrapper


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_llama_gqa, tiny_gpt2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("reparameterize", [False, True])
def test_gated_prefix_starts_exactly_at_the_base(model_fn, attn: str, reparameterize: bool) -> None:
    """gate: true at step 0: logits and loss bitwise equal to the base's (the real keys' attention is the
    base's own call, the prefix term is multiplied by tanh(0) = 0), with and without padding; the gates get a
    nonzero gradient, so training starts, while the prefix vectors get none until the gates move."""
    base = model_fn(attn=attn)
    model = copy.deepcopy(base)
    inject_adapters(model, [prefix(length=3, reparameterize=reparameterize, hidden=16, gate=True)])
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    for padding in (torch.ones_like(ids), torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])):
        labels = ids.masked_fill(padding == 0, -100)
        want = base(input_ids=ids, attention_mask=padding, labels=labels)
        got = model(input_ids=ids, attention_mask=padding, labels=labels)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    got.loss.backward()
    kvs = [w.prefixes["prefix"] for w in model.modules() if isinstance(w, PrefixAttention)]
    assert len(kvs) == model.config.num_hidden_layers
    for kv in kvs:
        assert kv.gate.shape == (model.config.num_attention_heads,) and (kv.gate.grad != 0).all()
        assert all(p.grad is None or not p.grad.any() for n, p in kv.named_parameters() if n != "gate")


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_gated_prefix_trains_from_the_base(model_fn) -> None:
    """A few AdamW steps on one batch: the gates move off zero and the loss falls below the base's."""
    model = model_fn()
    model.train()
    inject_adapters(model, [prefix(length=4, hidden=16, gate=True)])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    gates = [w.prefixes["prefix"].gate for w in model.modules() if isinstance(w, PrefixAttention)]
    assert gates and all((g != 0).all() for g in gates)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_llama_gqa, tiny_gpt2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gated_prefix_matches_float64_reference(model_fn, attn: str, mixed: bool, padded: bool) -> None:
    """Through the whole model: ``Attn(q, [P_k; K], [P_v; V]) + tanh(g) Attn(q, G_k, G_v)`` per query head, with
    ``P`` empty unless an ungated prefix shares the layer (``mixed``); outputs and gradients of the input and
    of every prefix parameter, the gates included, equal the reference (grouped-query attention included)."""
    model = model_fn(attn=attn).double()
    adapters = [prefix(name="gated", length=3, reparameterize=False, gate=True)]
    if mixed:
        adapters.append(prefix(name="plain", length=2, reparameterize=False))
    inject_adapters(model, adapters)
    wrapper = layer0_wrapper(model)
    with torch.no_grad():
        wrapper.prefixes["gated"].gate.copy_(torch.randn(model.config.num_attention_heads))
    batch, length, d = 2, 6, model.config.hidden_size
    padding = torch.ones(batch, length, dtype=torch.long)
    if padded:
        padding[0, -2:] = 0  # right padding: every query still sees a real key without the joined prefix
    x = torch.randn(batch, length, d, dtype=torch.float64, requires_grad=True)
    hidden = model(inputs_embeds=x, attention_mask=padding, output_hidden_states=True).hidden_states
    layer_in, out = hidden[0], hidden[1]
    gated = [wrapper.prefixes["gated"]()]
    key, value, _ = wrapper.prefixes["plain"]() if mixed else (gated[0].key[:, :0], gated[0].value[:, :0], None)
    ref = decoder_layer_ref(model, layer_in, key, value, padding, gated)
    rows = padding.bool()
    tol = 1e-6 if attn == "eager" else 1e-10  # transformers' eager softmax runs in float32 even for float64
    torch.testing.assert_close(out[rows], ref[rows], rtol=tol, atol=tol)
    ungated = decoder_layer_ref(model, layer_in, key, value, padding)
    assert (out[rows] - ungated[rows]).abs().max() > 1e-3  # the gated term really changed the layer
    params = [p for kv in wrapper.prefixes.values() for p in kv.parameters()]
    assert len(params) == (5 if mixed else 3)  # G_k, G_v, g (+ P_k, P_v)
    upstream = torch.randn_like(out) * rows[..., None]
    got = torch.autograd.grad((out * upstream).sum(), [x, *params], retain_graph=True)
    want = torch.autograd.grad((ref * upstream).sum(), [x, *params])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol * 10, atol=tol)


def test_gated_prefix_round_trips_folded_with_its_gate() -> None:
    """The saved adapter holds each layer's vectors and gate (the MLP folded away); loading it onto a fresh
    gated model gives the same logits and a plain-vector prefix that keeps its gate."""
    model = tiny_llama()
    inject_adapters(model, [prefix(length=4, hidden=16, gate=True)])
    randomize_adapters(model)
    model.train()
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert sorted({k.rsplit(".", 1)[1] for k in state}) == ["gate", "key", "value"]
    assert len(state) == 3 * model.config.num_hidden_layers
    fresh = tiny_llama()
    inject_adapters(fresh, [prefix(length=4, hidden=16, gate=True)])
    load_adapter_state_dict(fresh, state)
    kv = layer0_wrapper(fresh).prefixes["prefix"]
    assert kv.mlp is None and sorted(n for n, _ in kv.named_parameters()) == ["gate", "key", "value"]
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    ungated = tiny_llama()
    inject_adapters(ungated, [prefix(length=4, hidden=16)])
    with pytest.raises(RuntimeError, match="gate"):  # a gated checkpoint does not load onto an ungated prefix
        load_adapter_state_dict(ungated, state)


def test_bad_configs() -> None:
    with pytest.raises(ConfigError, match="length: got 0"):
        prefix(length=0)
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="prefix tuning supports the eager and sdpa.*'flex_attention'"):
        inject_adapters(model, [prefix()])
    with pytest.raises(ConfigError, match=r"adapters\[prefix\].target_modules: \['q_proj'\] matches no self-attention"):
        inject_adapters(tiny_llama(), [prefix(target_modules=["q_proj"])])
