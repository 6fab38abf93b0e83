"""MAM: the preset equals its two parts configured by hand, keeps their names apart in the checkpoint, and
starts exactly at the base with a gated prefix."""
from __future__ import annotations

import pytest
import torch

from peft_dist.adapters import adapter_state_dict, inject_adapters
from peft_dist.adapters.bottleneck import AdaptedSublayer
from peft_dist.adapters.prefix import PrefixAttention
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.schema import ConfigError
from tests.adapters.test_contract import IDS, randomize_adapters, tiny_gpt2, tiny_llama


def cfg(method: str, **fields):
    return build_adapter_config({"method": method, **fields}, "adapters.0")


def test_defaults_are_the_papers() -> None:
    mam = cfg("mam")
    assert (mam.prefix_length, mam.r, mam.scale) == (30, 512, 4.0)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_preset_equals_prefix_plus_scaled_parallel_adapter(model_fn) -> None:
    preset = model_fn()
    torch.manual_seed(5)
    names = inject_adapters(preset, [cfg("mam", prefix_length=4, r=8, scale=2.0, hidden=16)])["mam"]
    by_hand = model_fn()
    torch.manual_seed(5)
    inject_adapters(by_hand, [cfg("prefix", name="mam_prefix", length=4, hidden=16),
                              cfg("parallel_adapter", name="mam_ffn", r=8, scale=2.0, sublayer="ffn")])
    n_layers = preset.config.num_hidden_layers
    assert len(names) == 2 * n_layers
    assert sum(isinstance(m, PrefixAttention) for m in preset.modules()) == n_layers
    assert sum(isinstance(m, AdaptedSublayer) for m in preset.modules()) == n_layers
    randomize_adapters(preset)
    randomize_adapters(by_hand)
    assert torch.equal(preset(input_ids=IDS).logits, by_hand(input_ids=IDS).logits)
    keys = adapter_state_dict(preset)
    assert keys.keys() == adapter_state_dict(by_hand).keys()
    assert {k.split(".")[-2] for k in keys if "prefixes" in k} == {"mam_prefix"}
    assert any(".parallel.mam_ffn." in k for k in keys)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_gated_preset_starts_exactly_at_the_base(model_fn) -> None:
    """gate: true reaches the prefix part; with the FFN adapter's zero start the whole preset is a no-op."""
    model = model_fn()
    before = model(input_ids=IDS).logits
    inject_adapters(model, [cfg("mam", prefix_length=4, r=8, scale=2.0, hidden=16, gate=True)])
    wrappers = [m for m in model.modules() if isinstance(m, PrefixAttention)]
    assert wrappers and all(w.prefixes["mam_prefix"].gate is not None for w in wrappers)
    assert torch.equal(model(input_ids=IDS).logits, before)


def test_gradients_reach_both_parts() -> None:
    model = tiny_llama()
    inject_adapters(model, [cfg("mam", prefix_length=4, r=8, scale=2.0, hidden=16)])
    randomize_adapters(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("mam_prefix" in n for n in grads) and any("mam_ffn" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_bad_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match="target_modules: MAM places its parts itself"):
        cfg("mam", target_modules=["mlp"])
    with pytest.raises(ConfigError, match="prefix_length: got 0"):
        cfg("mam", prefix_length=0)
