"""Gradients only on adapters, and model-state memory that divides by N, under real ZeRO-3 (CPU, gloo).

The worker (mem_worker.py) builds the tiny job's model (``tests.multiproc.TINY_JOB``: tiny int8 Llama, LoRA on
every linear and lm_head) with the trainer's ``build_engine`` on 1, 2 and 4 processes, persistence threshold 0, in
fp32 and bf16, each with and without optimizer offload, plus bf16 with ds_configs/zero3.json's own
threshold (1e5), and reports what the DeepSpeed optimizer holds.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peft_dist.distributed.memory import analytic_model_state_bytes, measured_model_state_bytes
from peft_dist.quant.int8 import Int8Linear
from tests.multiproc import run_distributed

WORLDS = (1, 2, 4)
# The issue asks for the total within 10%; each component is held to 1%. Observed: exact except Adam's
# 4-byte step counter (the tiny model's tensor sizes are multiples of 4, so no partition padding).
COMPONENT_RTOL = 0.01
GRAD_RTOL_FP32 = 1e-4  # DeepSpeed vs plain PyTorch: only the order of fp32 reductions differs
GRAD_NORM_RTOL_BF16 = 0.05  # bf16 engine vs fp32 plain PyTorch, ||got - want|| / ||want||
LINEARS_PER_LAYER, LAYERS = 7, 4


def test_analytic_bytes_by_hand():
    """An int8 linear (8 -> 4, bias) and 10 trainable floats, counted by hand."""
    model = nn.Module()
    model.base = Int8Linear(8, 4, bias=True)
    model.adapter = nn.Parameter(torch.zeros(10))
    fp32 = analytic_model_state_bytes(model, 2, "fp32")
    # frozen: 32 int8 + 4 scales x 4 + 4 biases x 4 = 64 bytes, over 2 ranks
    assert (fp32.frozen, fp32.adapter_params, fp32.gradients, fp32.master, fp32.optimizer) == (32, 20, 20, 20, 40)
    bf16 = analytic_model_state_bytes(model, 2, "bf16")
    assert (bf16.frozen, bf16.adapter_params, bf16.gradients, bf16.master, bf16.optimizer) == (24, 10, 10, 20, 40)
    assert bf16.total == 104 and 10 * 16 / 2 == bf16.total - bf16.frozen  # 2 + 2 + 12 bytes per adapter param
    offload = analytic_model_state_bytes(model, 1, "fp32", offload_optimizer=True)
    assert offload.gradients == 10 * (4 + 4) and offload.total - offload.frozen == 10 * 24
    # Threshold 10: the 4 scales, 4 biases and the 10 adapter elements are also held whole (32 int8 are not).
    persistent = analytic_model_state_bytes(model, 2, "bf16", persistence_threshold=10)
    assert (persistent.frozen, persistent.adapter_params) == (24 + 8 + 8, 10 + 20)


def test_bad_input_is_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="precision: got 'fp16'"):
        analytic_model_state_bytes(model, 1, "fp16")
    with pytest.raises(ValueError, match="world_size: got 0"):
        analytic_model_state_bytes(model, 0, "fp32")
    with pytest.raises(ValueError, match="persistence_threshold: got -1"):
        analytic_model_state_bytes(model, 1, "fp32", persistence_threshold=-1)
    # Only the optimizer's type is read before refusing; a plain torch optimizer stands for a ZeRO-1/2 engine.
    engine = SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()), module=model)
    with pytest.raises(ValueError, match="zero_optimization.stage=3"):
        measured_model_state_bytes(engine)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, list[dict]]:
    """world size -> one report per rank."""
    out = tmp_path_factory.mktemp("mem")
    reports = {}
    for world in WORLDS:
        run_distributed(["-m", "tests.distributed.mem_worker", "--out", str(out / f"w{world}")], world, timeout=300)
        reports[world] = [json.loads((out / f"w{world}" / f"rank{r}.json").read_text()) for r in range(world)]
    return reports


def each_variant(ranks):
    for world, reports in ranks.items():
        for report in reports:
            for name, variant in report["variants"].items():
                yield world, name, variant


@pytest.mark.slow
def test_no_optimizer_state_grad_or_master_for_frozen_parameters(ranks):
    for world, name, v in each_variant(ranks):
        where = (world, name)
        assert v["optimizer_params_all_trainable"] and v["optimizer_param_count"] == v["trainable_count"], where
        assert v["frozen_with_grad"] == [], where
        # fp32 master, gradient partitions and Adam state cover exactly the adapters' partitions ...
        assert v["fp32_partition_numel"] == v["grad_partition_numel"] == v["trainable_partition_numel"], where
        assert v["adam_state_on_fp32_partitions_only"] and v["adam_state_numel"] == 2 * v["fp32_partition_numel"]
        assert v["fp32_partition_dtypes"] == ["torch.float32"], where
        # ... which are 1/N of the adapter parameters up to padding each tensor to a multiple of N.
        share = v["trainable_numel"] / world
        assert share <= v["fp32_partition_numel"] <= share + v["trainable_count"] * (world - 1), where
        assert v["trainable_numel"] == 44_032  # LoRA r=8 on 28 int8 linears + lm_head
        # DeepSpeed's gradient bucket holds the adapters' elements, not ds_configs/' 5e7 (zero3.with_gradient_bucket).
        assert v["gradient_bucket_numel"] == [v["trainable_numel"]], where


@pytest.mark.slow
def test_frozen_int8_weights_are_int8_shards(ranks):
    for world, name, v in each_variant(ranks):
        int8 = {n: f for n, f in v["frozen"].items() if f["dtype"] == "torch.int8"}
        assert len(int8) == LINEARS_PER_LAYER * LAYERS and all(n.endswith("base.weight") for n in int8)
        persistent = name.endswith("persistent")  # threshold 1e5: every tiny tensor also stays whole
        for n, f in v["frozen"].items():
            assert f["local_numel"] == math.ceil(f["numel"] / world), (world, name, n)
            assert f["persistent"] == persistent, (world, name, n)
            assert f["resident_numel"] == (f["numel"] if persistent else 0), (world, name, n)  # else released
        floats = {f["dtype"] for f in v["frozen"].values()} - {"torch.int8"}
        assert floats == {"torch.float32" if name.startswith("fp32") else "torch.bfloat16"}, (world, name)


@pytest.mark.slow
def test_model_state_bytes_match_the_formula_and_divide_by_n(ranks):
    for world, name, v in each_variant(ranks):
        analytic, measured = v["analytic"], v["measured"]
        for kind in analytic:
            assert measured[kind] == pytest.approx(analytic[kind], rel=COMPONENT_RTOL), (world, name, kind)
    one = {n: sum(v["measured"].values()) for n, v in ranks[1][0]["variants"].items()}
    for n, v in ranks[4][3]["variants"].items():
        if not n.endswith("persistent"):  # whole resident copies do not divide
            assert sum(v["measured"].values()) == pytest.approx(one[n] / 4, rel=0.02), n


@pytest.mark.slow
def test_activation_gradients_flow_through_int8_layers(ranks):
    """First-layer adapter gradients under ZeRO-3 equal plain PyTorch's on the same batch (every rank
    sees it, so the averaged gradient is the single-process one). B of q/k/v/gate/up is nonzero only
    if the gradient went back through the int8 o_proj / down_proj; A's is zero since B starts at 0."""
    reference = ranks[1][0]["reference_grads"]
    flowing = [n for n in reference
               if n.endswith(".B") and not n.split(".deltas")[0].endswith(("o_proj", "down_proj"))]
    assert len(flowing) == 5
    for n in flowing:
        assert torch.tensor(reference[n]).abs().max() > 1e-4, n
    for world, name, v in each_variant(ranks):
        assert set(v["grads"]) == set(reference)
        for n, grad in v["grads"].items():
            got, want = torch.tensor(grad), torch.tensor(reference[n])
            if name.startswith("fp32"):
                torch.testing.assert_close(got, want, rtol=GRAD_RTOL_FP32, atol=1e-7, msg=f"{world} {name} {n}")
            else:  # bf16 forward and backward: relative error of the whole tensor (observed 1.1e-2)
                assert (got - want).norm() <= GRAD_NORM_RTOL_BF16 * want.norm() + 1e-6, (world, name, n)
