"""KronA: factorization, the reshaped forward against torch.kron in float64, merge, and peft's LoKr."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.adapters import AdaptedLinear, inject_adapters
from peft_dist.adapters.krona import KronaDelta, balanced_factors, factor_dim, kron_apply
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.schema import ConfigError
from peft_dist.quant.int8 import Int8Linear
from tests.adapters.test_contract import IDS, tiny_llama


def krona(**fields):
    return build_adapter_config({"method": "krona", **fields}, "adapters.0")


def test_balanced_factors_match_the_spec() -> None:
    assert balanced_factors(4096) == (64, 64)
    assert balanced_factors(11008) == (86, 128)
    assert balanced_factors(768) == (24, 32)
    assert balanced_factors(176) == (11, 16)


def test_prime_dimension_and_non_divisor_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"a1: 13 .* is prime.*set a1: 1"):
        factor_dim(13, 0, "a1", "d_out of layer x")
    with pytest.raises(ConfigError, match=r"a2: 5 does not divide 64.*\[1, 2, 4, 8, 16, 32, 64\]"):
        factor_dim(64, 5, "a2", "d_in of layer x")
    assert factor_dim(13, 1, "a1", "x") == (1, 13)  # an explicit 1 x p is accepted


def test_inject_reports_the_layer_that_does_not_factor() -> None:
    model = nn.Sequential(nn.Linear(64, 13))
    with pytest.raises(ConfigError, match=r"adapters\[krona\]\.a1: 13 \(d_out of a \(13, 64\) layer\) is prime"):
        inject_adapters(model, [krona(target_modules=["0"])])
    with pytest.raises(ConfigError, match=r"adapters\[krona\]\.a2: 3 does not divide 64"):
        inject_adapters(nn.Sequential(nn.Linear(64, 16)), [krona(target_modules=["0"], a2=3)])
    model = nn.Sequential(nn.Linear(64, 13))
    inject_adapters(model, [krona(target_modules=["0"], a1=1, a2=4)])
    delta = model[0].deltas["krona"]
    assert delta.A.shape == (1, 4) and delta.B.shape == (13, 16)


@pytest.mark.parametrize("seed", range(4))
def test_reshaped_forward_equals_kron_in_float64(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a1, a2, b1, b2 = (int(v) for v in torch.randint(1, 7, (4,), generator=g))
    A = torch.randn(a1, a2, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(b1, b2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, a2 * b2, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, a1 * b1, generator=g, dtype=torch.float64)

    y = kron_apply(x, A, B)
    grads = torch.autograd.grad((y * upstream).sum(), (x, A, B))
    ref = x @ torch.kron(A, B).t()
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (x, A, B))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_delta_is_zero_at_init_and_scaled() -> None:
    delta = KronaDelta(12, 20, 3, 4, scale=2.5)
    assert torch.count_nonzero(delta.A) == 0 and torch.count_nonzero(delta.B) > 0
    x = torch.randn(7, 20)
    assert torch.count_nonzero(delta(x)) == 0
    with torch.no_grad():
        delta.A.normal_()
    torch.testing.assert_close(delta(x), x @ (2.5 * torch.kron(delta.A, delta.B)).t())
    torch.testing.assert_close(delta.delta_weight(), 2.5 * torch.kron(delta.A, delta.B))


@pytest.mark.parametrize("base_kind", ["linear", "conv1d", "int8"])
def test_merge_then_forward_equals_unmerged(base_kind: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(24, 36)
    base = {"linear": linear, "conv1d": Conv1D(36, 24),
            "int8": Int8Linear.from_weight(linear.weight, linear.bias)}[base_kind]
    layer = AdaptedLinear(base)
    layer.add_delta("krona", KronaDelta(36, 24, 6, 4, scale=0.5))
    with torch.no_grad():
        layer.deltas["krona"].A.normal_()
    x = torch.randn(5, 24)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_same_function_and_gradients_as_peft_lokr_with_full_factors() -> None:
    """peft's LoKr with full w1, w2 (r large, no decomposition) is KronA: delta = alpha/r * kron(w1, w2)."""
    from peft import LoKrConfig, get_peft_model

    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # 64x64, 176x64 and 64x176
    ours = tiny_llama().double()
    theirs = get_peft_model(copy.deepcopy(ours), LoKrConfig(r=64, alpha=64 * 0.5, target_modules=targets))
    inject_adapters(ours, [krona(target_modules=targets, scale=0.5)])
    g = torch.Generator().manual_seed(3)
    pairs = []
    for name, module in ours.named_modules():
        if isinstance(module, AdaptedLinear):
            delta = module.deltas["krona"]
            lokr = theirs.get_submodule("base_model.model." + name)
            w1, w2 = lokr.lokr_w1["default"], lokr.lokr_w2["default"]
            assert w1.shape == delta.A.shape and w2.shape == delta.B.shape
            with torch.no_grad():
                delta.A.copy_(torch.randn(delta.A.shape, generator=g, dtype=torch.float64))
                w1.copy_(delta.A)
                w2.copy_(delta.B)
            pairs += [(delta.A, w1), (delta.B, w2)]
    assert len(pairs) == 2 * 4 * len(targets)
    out = ours(input_ids=IDS, labels=IDS)
    ref = theirs(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    ref.loss.backward()
    for mine, peft_param in pairs:
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-9, atol=1e-12)
