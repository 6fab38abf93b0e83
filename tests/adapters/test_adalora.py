"""AdaLoRA in one process: the formula against float64, the schedule and masks against peft 0.21's
``RankAllocator``, the compact export, resume, and bad input. The multi-rank ZeRO-3 behaviour (and
gradient accumulation inside a DeepSpeed step) is in tests/distributed/test_adalora_zero3.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from peft_dist.adapters import AdaptedLinear, adapter_state_dict, inject_adapters, load_adapter_state_dict
from peft_dist.adapters.adalora import AdaLoraDelta, budget_schedule, keep_mask
from peft_dist.distributed.adalora import make_adalora_hook as make_hook
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.train.config import load_config
from peft_dist.config.schema import ConfigError
from peft_dist.distributed.importance import triplet_index
from peft_dist.model import tiny_llama_config

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "delta_t": 2, "total_step": 12}
TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=128)).eval()


def adalora_model(**extra):
    model = tiny_llama()
    config = build_adapter_config({"method": "adalora", "target_modules": TARGETS, **SCHEDULE, **extra},
                                  "adapters.0")
    inject_adapters(model, [config])
    return model, config


def deltas(model) -> list[AdaLoraDelta]:
    return [m.deltas["adalora"] for m in model.modules() if isinstance(m, AdaptedLinear)]


def random_step(tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Move every tensor by a random amount (an optimizer step stand-in) and return random gradients."""
    grads = []
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=generator) * 0.05)
            grads.append(torch.randn(t.shape, generator=generator))
    return grads


def drive(hook, model, steps, generator, start: int = 1) -> list[dict]:
    """Run the hook as the trainer does (plain PyTorch: engine=None) on random parameters and gradients."""
    records = []
    params = [p for d in deltas(model) for p in (d.P, d.lam, d.Q)]
    for step in range(start, start + steps):
        for p, g in zip(params, random_step(params, generator)):
            p.grad = g
        hook.before_step(None, step)
        hook.after_step(None, step)
        records.append({"keep": hook.keep.clone(), "budget": hook.budget,
                        "scores": None if hook.scores is None else hook.scores.clone()})
    return records


def test_budget_schedule_cubic_decay_and_fixed_tail():
    # b0 = 48, target 24, tinit 1, tfinal 2, T = 8: budget 24 + 24 (1 - (t-1)/5)^3, floored
    got = [budget_schedule(t, 48, 24, 1, 2, 8, 1) for t in range(1, 9)]
    expected_budgets = [48] + [int(24 + 24 * (1 - (t - 1) / 5) ** 3) for t in range(2, 7)] + [24, 24]
    assert [b for b, _ in got] == expected_budgets == [48, 36, 29, 25, 24, 24, 24, 24]
    assert [m for _, m in got] == [False] + [True] * 7
    # with delta_t = 2, only even steps mask, and always at T - tfinal (= 9 here)
    masks = [budget_schedule(t, 48, 24, 2, 3, 12, 2)[1] for t in range(1, 13)]
    assert masks == [False, False, False, True, False, True, False, True, True, True, True, True]


def test_keep_mask_threshold_and_ties():
    scores = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.9])
    assert keep_mask(scores, 3).tolist() == [True, False, True, False, True]
    assert keep_mask(scores, 4).tolist() == [True, False, True, False, True]  # a tie is pruned together
    with pytest.raises(ValueError, match="prunes nothing"):
        keep_mask(scores, 5)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_shard_partial_sums_add_up_to_the_dense_triplet_score(world):
    """ZeRO-3's layout (flatten, pad to a multiple of W, split): per-shard index_add sums, padding
    ignored, add up to s(lam) + mean over Q's row + mean over P's column."""
    r0, d_out, d_in = 4, 10, 7
    generator = torch.Generator().manual_seed(0)
    scores = {"P": torch.rand(d_out, r0, generator=generator, dtype=torch.float64),
              "lam": torch.rand(r0, generator=generator, dtype=torch.float64),
              "Q": torch.rand(r0, d_in, generator=generator, dtype=torch.float64)}
    total = torch.zeros(r0, dtype=torch.float64)
    for kind, tensor in scores.items():
        size = -(-tensor.numel() // world)  # partition_numel
        for rank in range(world):
            start = min(rank * size, tensor.numel())
            numel = max(0, min(size, tensor.numel() - rank * size))
            index, weight = triplet_index(kind, tuple(tensor.shape), start, numel)
            total.index_add_(0, index, tensor.reshape(-1)[start: start + numel] * weight)
    dense = scores["lam"] + scores["Q"].mean(dim=1) + scores["P"].mean(dim=0)
    torch.testing.assert_close(total, dense, rtol=1e-12, atol=0)


def test_scores_match_float64_reference():
    """Ibar, U, s = Ibar * U and S_i = s(lam_i) + mean_j s(Q_ij) + mean_k s(P_ki), recomputed in float64."""
    model, config = adalora_model(tinit=0, tfinal=0, delta_t=1, total_step=6)
    hook = make_hook(model, config, 6)
    params = [p for d in deltas(model) for p in (d.P, d.lam, d.Q)]
    generator = torch.Generator().manual_seed(3)
    ibar = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    unc = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for step in range(1, 6):
        grads = random_step(params, generator)
        values = [p.detach().double().clone() for p in params]  # post-step, before this step's mask
        for p, g in zip(params, grads):
            p.grad = g
        hook.before_step(None, step)
        hook.after_step(None, step)
        for i, (value, g) in enumerate(zip(values, grads)):
            ipt = (value * g.double()).abs()
            ibar[i] = 0.85 * ibar[i] + 0.15 * ipt
            unc[i] = 0.85 * unc[i] + 0.15 * (ipt - ibar[i]).abs()
        reference = torch.cat([(ibar[i + 1] * unc[i + 1]) + (ibar[i + 2] * unc[i + 2]).mean(dim=1)
                               + (ibar[i] * unc[i]).mean(dim=0) for i in range(0, len(params), 3)])
        torch.testing.assert_close(hook.scores.double(), reference, rtol=1e-5, atol=0)
        assert hook.budget == budget_schedule(step, 32, 16, 0, 0, 6, 1)[0]
        assert hook.keep.tolist() == (reference > torch.kthvalue(reference, 32 - hook.budget).values).tolist()
        assert (torch.cat([d.lam.detach() for d in deltas(model)])[~hook.keep] == 0).all()


def test_same_schedule_masks_and_importance_as_peft_rank_allocator():
    """Same parameters and gradients fed to peft's AdaLoRA and to ours: same EMA, budgets and masks."""
    from peft import AdaLoraConfig as PeftConfig
    from peft import get_peft_model

    total = SCHEDULE["total_step"]
    peft_model = get_peft_model(tiny_llama(), PeftConfig(
        init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=total, lora_alpha=8,
        target_modules=TARGETS, lora_dropout=0.0))
    ours, config = adalora_model(alpha=8.0)
    hook = make_hook(ours, config, total)
    names = [n for n, m in ours.named_modules() if isinstance(m, AdaptedLinear)]
    theirs = dict(peft_model.named_parameters())
    pairs = []  # (our tensor, peft tensor) in P, lam, Q order; peft: lora_B = P, lora_E = lam, lora_A = Q
    for name, delta in zip(names, deltas(ours)):
        prefix = f"base_model.model.{name}"
        pairs += [(delta.P, theirs[f"{prefix}.lora_B.default"]), (delta.lam, theirs[f"{prefix}.lora_E.default"]),
                  (delta.Q, theirs[f"{prefix}.lora_A.default"])]
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mine, peft_tensor in pairs:  # random start (lam too), identical in both
            peft_tensor.copy_(torch.randn(peft_tensor.shape, generator=generator) * 0.1)
            mine.copy_(peft_tensor.reshape(mine.shape))
    allocator = peft_model.base_model.rankallocator
    masked_steps = []
    for step in range(1, total + 1):
        for (mine, peft_tensor), grad in zip(pairs, random_step([t for _, t in pairs], generator)):
            peft_tensor.grad = grad
            with torch.no_grad():
                mine.copy_(peft_tensor.reshape(mine.shape))
            mine.grad = grad.reshape(mine.shape)
        peft_model.base_model.update_and_allocate(step)
        hook.before_step(None, step)
        hook.after_step(None, step)
        for mine, peft_tensor in pairs:  # the same lam were zeroed (and nothing else changed)
            assert torch.equal(mine.detach(), peft_tensor.detach().reshape(mine.shape)), f"step {step}"
        if step < total - SCHEDULE["tfinal"]:
            for i, (mine, peft_tensor) in enumerate(pairs):
                key = [n for n, t in theirs.items() if t is peft_tensor][0].removeprefix("base_model.model.")
                torch.testing.assert_close(hook._ibar[i], allocator.exp_avg_ipt[key].reshape(-1))
                torch.testing.assert_close(hook._unc[i], allocator.exp_avg_unc[key].reshape(-1))
        budget, _ = allocator.budget_schedule(step)
        if hook.history and hook.history[-1]["step"] == step:
            masked_steps.append(step)
            assert hook.budget == budget
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern:
            peft_keep = torch.cat([torch.tensor(pattern[f"{n}.lora_E.default"]) for n in names])
            assert hook.keep.tolist() == peft_keep.tolist(), f"step {step}"
    assert masked_steps == [4, 6, 8, 9]  # every delta_t = 2 after tinit, and forced at T - tfinal
    assert sum(hook.rank_pattern().values()) == 2 * len(names)


def test_orthogonality_regularizer_is_plain_frobenius_mean():
    model, config = adalora_model(orth_reg_weight=0.3)
    hook = make_hook(model, config, 12)
    terms = []
    for d in deltas(model):
        P, Q = d.P.detach().double(), d.Q.detach().double()
        eye = torch.eye(4, dtype=torch.float64)
        terms += [torch.linalg.norm(P.t() @ P - eye), torch.linalg.norm(Q @ Q.t() - eye)]
    reg = hook.extra_loss(model)
    torch.testing.assert_close(reg.double(), 0.3 * torch.stack(terms).mean(), rtol=1e-6, atol=0)
    reg.backward()
    assert all(d.P.grad is not None and d.P.grad.abs().sum() > 0 for d in deltas(model))


def test_compact_export_drops_pruned_triplets_loads_and_merges():
    model, config = adalora_model()
    hook = make_hook(model, config, 12)
    drive(hook, model, 12, torch.Generator().manual_seed(5))
    pattern = hook.rank_pattern()
    assert sorted(set(pattern.values())) != [4] and sum(pattern.values()) == 2 * len(pattern)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    for name, rank in pattern.items():
        assert state[f"{name}.deltas.adalora.lam"].shape == (rank,)
        assert state[f"{name}.deltas.adalora.P"].shape == (64, rank)
        assert state[f"{name}.deltas.adalora.Q"].shape == (rank, 64)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    fresh, _ = adalora_model()
    load_adapter_state_dict(fresh, state)
    assert sum(d.lam.numel() for d in deltas(fresh)) == sum(pattern.values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        for m in fresh.modules():
            if isinstance(m, AdaptedLinear):
                m.merge()
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_resume_continues_the_schedule_exactly():
    generator = torch.Generator().manual_seed(11)
    model, config = adalora_model()
    hook = make_hook(model, config, 12)
    first = drive(hook, model, 6, generator)
    state = json.loads(json.dumps(hook.state_dict() | hook.importance_state()))  # as a JSON checkpoint
    resumed_model = copy.deepcopy(model)
    generator_state = generator.get_state()
    rest = drive(hook, model, 6, generator, start=7)

    resumed = make_hook(resumed_model, config, 12)
    resumed.load_state_dict(state)
    generator.set_state(generator_state)
    again = drive(resumed, resumed_model, 6, generator, start=7)
    assert [r["budget"] for r in again] == [r["budget"] for r in rest]
    for a, b in zip(rest, again):
        assert torch.equal(a["keep"], b["keep"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)
    assert resumed.history == hook.history and len(hook.history) > len(first) // 2
    assert resumed.metrics() == hook.metrics()


def test_bad_config_and_bad_calls_fail_clearly():
    with pytest.raises(ConfigError, match="target_r"):
        build_adapter_config({"method": "adalora", "init_r": 4, "target_r": 4}, "adapters.0")
    with pytest.raises(ConfigError, match="delta_t"):
        build_adapter_config({"method": "adalora", "delta_t": 0}, "adapters.0")
    schedule = ["adapters=[{method: adalora, tinit: 5, tfinal: 5}]"]
    with pytest.raises(ConfigError, match=r"adapters.0.tinit: tinit \(5\) must be below the total steps \(10\)"):
        load_config(None, [*schedule, "train.max_steps=10", "train.warmup_steps=1"])
    load_config(None, [*schedule, "train.max_steps=20"])
    model, config = adalora_model(total_step=None, tinit=5, tfinal=5)
    hook = make_hook(model, config, 20)
    with pytest.raises(RuntimeError, match="before_step was not called"):
        hook.after_step(None, 1)
    with pytest.raises(RuntimeError, match="called twice"):
        hook.after_step(None, 1)
    with pytest.raises(ValueError, match="do not fit"):
        deltas(model)[0].load_adapter_state_dict({"P": torch.zeros(64, 5), "lam": torch.zeros(5),
                                                  "Q": torch.zeros(5, 64)})
