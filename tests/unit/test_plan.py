"""The planner: analytic counts vs the real model skeleton on the meta device, choices, files, errors."""
import json
import math

import pytest
import torch

from peft_dist.adapters.registry import build_adapter_config, methods
from peft_dist.train.config import load_config
from peft_dist.distributed.zero3 import REPO_ROOT, build_ds_config
from peft_dist.plan.__main__ import main
from peft_dist.plan.dryrun import build_meta_model, meta_inventory
from peft_dist.plan.estimate import GIB, Hardware, Workload, activation_bytes, backward_gather_bytes, choose
from peft_dist.plan.inventory import TensorInfo, analytic_inventory, per_rank
from peft_dist.plan.models import PRESETS, PlanError, hf_config, load_shape, with_layers


def lora(**kw):
    return build_adapter_config({"method": "lora", **kw}, "adapters.0")


@pytest.fixture(scope="module")
def gpt3_meta():
    """The real GPT-3 175B skeleton, int8 on every decoder linear, LoRA r=16 on all of them."""
    adapters = [lora(r=16, alpha=32, target_modules="all-linear")]
    return adapters, build_meta_model(PRESETS["gpt3-175b"], adapters, "all-linear")


def test_gpt3_175b_skeleton_is_175b_and_allocates_nothing(gpt3_meta):
    _, model = gpt3_meta
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    h = 12288
    scales = 96 * (3 * h + h + 4 * h + h)  # one per output row of every quantized linear
    assert sum(p.numel() for p in params if not p.requires_grad) == 174_604_259_328 + scales
    int8 = sum(p.numel() for p in params if p.dtype == torch.int8)
    assert int8 == 12 * 12288**2 * 96  # every decoder linear: qkv 3h^2, proj h^2, fc 4h^2, fc-proj 4h^2
    assert PRESETS["gpt3-175b"].total_params() == 174_604_259_328  # HF GPT-2 at GPT-3 sizes (paper: 175B)


@pytest.mark.parametrize("world", [1, 8, 128, 512, 1000])
@pytest.mark.parametrize("threshold", [0, 100_000, 10**9])
def test_gpt3_analytic_per_rank_bytes_match_meta_model_exactly(gpt3_meta, world, threshold):
    adapters, model = gpt3_meta
    analytic = analytic_inventory(PRESETS["gpt3-175b"], adapters, "all-linear", itemsize=2)
    assert per_rank(analytic, world, threshold) == per_rank(meta_inventory(model), world, threshold)


@pytest.mark.parametrize("preset,targets,quant", [
    ("llama-70b", ["q_proj", "v_proj"], "all-linear"),  # grouped-query attention: k/v are 1/8 wide
    ("llama-7b", "all-linear", None),  # no quantization: bf16 linears
    ("llama-7b", r".*\.mlp\..*", ["o_proj", "down_proj"]),  # regex adapters, partial quantization
])
def test_llama_analytic_matches_meta_model(preset, targets, quant):
    shape = with_layers(PRESETS[preset], 3)  # real widths; the count is per layer
    adapters = [lora(r=8, target_modules=targets), lora(name="second", r=4, target_modules=["up_proj"])]
    model = build_meta_model(shape, adapters, quant)
    analytic = analytic_inventory(shape, adapters, quant, itemsize=2)
    assert sorted((t.numel, t.itemsize, t.trainable) for t in analytic) == \
        sorted((t.numel, t.itemsize, t.trainable) for t in meta_inventory(model))
    for world in (1, 7, 64):
        assert per_rank(analytic, world, 100_000) == per_rank(meta_inventory(model), world, 100_000)


def test_per_rank_follows_zero3_padding_and_persistence():
    inventory = [TensorInfo("w", 1001, 1, False), TensorInfo("norm", 10, 2, False), TensorInfo("A", 40, 2, True)]
    held = per_rank(inventory, world=4, persistence_threshold=16)
    assert held.frozen == 251 * 1 + (3 * 2 + 10 * 2)  # ceil(1001/4) int8; norm: its shard and a whole copy
    assert held.trainable == 10 * 2 and held.optimizer == 10 * (2 + 4 + 8)  # bf16 grad, fp32 master, Adam
    assert held.gathered == 1001 + 40 * 2 and held.gathered_numel == 1041  # persistent ones are never gathered again
    assert held.trainable_numel == 40 and held.total_numel == 1051


@pytest.mark.parametrize("method", sorted(set(methods()) - {"lora"}))
def test_other_methods_are_counted_on_the_meta_device(method):
    shape = with_layers(PRESETS["gpt3-6.7b"], 2)  # GPT-2 family: has biases (BitFit), Conv1D layers
    adapters = [build_adapter_config({"method": method}, "adapters.0")]
    with pytest.raises(PlanError, match="LoRA only"):
        analytic_inventory(shape, adapters, "all-linear", 2)
    model = build_meta_model(shape, adapters, "all-linear")
    trainable = sum(t.numel for t in meta_inventory(model) if t.trainable)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_hf_config_file_round_trips(tmp_path):
    shape = PRESETS["llama-70b"]
    hf_config(shape).to_json_file(tmp_path / "config.json")
    loaded = load_shape(str(tmp_path))
    assert (loaded.hidden, loaded.kv_heads, loaded.intermediate, loaded.layers) == (8192, 8, 28672, 80)
    with pytest.raises(PlanError, match="neither a preset"):
        load_shape(str(tmp_path / "missing"))
    (tmp_path / "notes.json").write_text("not json")
    with pytest.raises(PlanError, match="is not JSON"):
        load_shape(str(tmp_path / "notes.json"))
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PlanError, match="not modelled"):
        load_shape(str(tmp_path / "bert.json"))


def held_for(preset: str, world: int, threshold: int = 100_000):
    shape = PRESETS[preset]
    return shape, per_rank(analytic_inventory(shape, [lora(r=16)], "all-linear", 2), world, threshold)


def test_choice_is_the_fastest_that_fits_and_memory_shrinks_with_nodes():
    work = Workload(seq_len=2048, global_batch=512, tokens=10**9)
    shape, held = held_for("gpt3-175b", 128)
    hw = Hardware(16, 8, 80, 989)
    choice, candidates = choose(shape, held, hw, work)
    fitting = [c for c in candidates if c.total_bytes <= 80 * GIB]
    assert choice.step_s == min(c.step_s for c in fitting)
    assert {(c.micro_batch, c.accumulation) for c in candidates} == {(1, 4), (2, 2), (4, 1)}
    assert choice.micro_batch * choice.accumulation * hw.world == 512
    # Checkpointing keeps one layer input per layer: at micro-batch 1, 96 x 2048 x 12288 x 2 B + one layer.
    on = next(c for c in candidates if c.micro_batch == 1 and c.checkpointing)
    assert on.memory["activations"] == 96 * 2048 * 12288 * 2 + 2048 * 2 * (10 * 12288 + 5 * 4 * 12288)
    # Twice the GPUs: half the partitioned base per GPU (persistent copies stay), the same bytes gathered.
    _, twice = held_for("gpt3-175b", 256, threshold=0)
    assert twice.frozen == pytest.approx(held_for("gpt3-175b", 128, threshold=0)[1].frozen / 2, rel=1e-6)
    assert held_for("gpt3-175b", 256)[1].gathered == held.gathered
    # Comm per micro-batch = the forward's gather and the backward's (+ adapter grads), ring factor.
    one = next(c for c in candidates if c.micro_batch == 4)
    expected = (127 / 128) * (held.gathered + backward_gather_bytes(shape, held, 2) + held.trainable_numel * 2)
    assert one.comm_bytes == math.floor(expected)


def test_backward_gathers_all_but_the_live_tail_and_the_input_embeddings():
    shape, held = held_for("gpt3-175b", 128, threshold=0)
    layer = 12 * 12288**2  # a GPT-3 layer's linears: qkv 3h^2, proj h^2, fc 4h^2, proj 4h^2
    tail = 2 * layer * held.gathered // held.gathered_numel  # two layers' elements, at the mean bytes per element
    positions = 2048 * 12288 * 2  # wpe, bf16 (wte is tied to the head: the backward uses it)
    assert backward_gather_bytes(shape, held, 2) == held.gathered - tail - positions
    assert held.gathered - backward_gather_bytes(shape, held, 2) < 0.03 * held.gathered  # ~2 of 96 layers


def test_too_small_gpus_do_not_fit_and_say_what_to_change(capsys):
    assert main(["--model", "gpt3-175b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "24",
                 "--global-batch", "8", "--tokens", "1e6"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "add nodes" in out


@pytest.mark.parametrize("argv,message", [
    (["--global-batch", "500"], "not a multiple of the 128 GPUs"),
    (["--global-batch", "512", "--seq-len", "4096"], "exceeds gpt3-175b's 2048 positions"),
    (["--global-batch", "512", "--model", "gpt-5"], "neither a preset"),
    (["--global-batch", "512", "--set", "adapters.0.r=0"], "adapters.0.r"),
])
def test_bad_input_names_the_option(capsys, argv, message):
    base = ["--model", "gpt3-175b", "--nodes", "16", "--tokens", "1e9"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("nodes", [16, 32, 64])
def test_committed_gpt3_presets_are_what_the_planner_writes(tmp_path, capsys, nodes):
    """slurm/presets/gpt3-175b-*: regenerated and compared; the run config and DeepSpeed config load."""
    name = f"gpt3-175b-{nodes}n"
    assert main(["--model", "gpt3-175b", "--nodes", str(nodes), "--global-batch", "512", "--tokens", "1e9",
                 "--write", str(tmp_path / name)]) == 0
    committed = REPO_ROOT / "slurm" / "presets"
    for ext in (".ds.json", ".yaml"):
        assert (tmp_path / f"{name}{ext}").read_text().replace(str(tmp_path), "slurm/presets").split("\n")[1:] == \
            (committed / f"{name}{ext}").read_text().split("\n")[1:]
    sbatch = (committed / f"{name}.sbatch").read_text()
    assert f"#SBATCH --nodes={nodes}" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert f"--config slurm/presets/{name}.yaml" in sbatch
    cfg = load_config(committed / f"{name}.yaml")
    ds = build_ds_config(cfg, world_size=nodes * 8)
    assert ds["train_batch_size"] == 512 and ds["zero_optimization"]["stage"] == 3
    assert cfg.model.dtype == "bfloat16" and cfg.train.precision == "bf16"


def test_scaling_doc_shows_what_the_planner_prints(capsys):
    """docs/SCALING.md quotes the 16-node plan; it must stay the planner's real output."""
    assert main(["--model", "gpt3-175b", "--nodes", "16", "--global-batch", "512", "--tokens", "1e9",
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "matches the analytic count exactly" in printed
    assert printed in (REPO_ROOT / "docs" / "SCALING.md").read_text()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_estimate_matches_what_autograd_saves(family):
    """A real (small) adapted int8 model: bytes that autograd saves inside a decoder layer, measured
    with saved-tensor hooks, vs the planner's per-layer estimate (dropout off, SDPA attention)."""
    from transformers import AutoModelForCausalLM

    from peft_dist.adapters.inject import inject_adapters
    from peft_dist.plan.models import ModelShape
    from peft_dist.quant.model import quantize_model

    intermediate = 688 if family == "llama" else 1024
    shape = ModelShape("small", family, 256, 3, 4, 4, intermediate, 512, 512, family == "gpt2")
    config = hf_config(shape, "bfloat16")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()
    quantize_model(model, "all-linear", torch.bfloat16)
    inject_adapters(model, [lora(r=8, target_modules="all-linear")])
    params = {p.data_ptr() for p in model.parameters()}
    layers = model.model.layers if family == "llama" else model.transformer.h
    saved, current = {}, [None]

    def pack(tensor):
        if current[0] is not None and tensor.data_ptr() not in params:
            storage = tensor.untyped_storage()
            saved[(current[0], storage.data_ptr())] = storage.nbytes()
        return tensor

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=index: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    micro, seq = 2, 96
    ids = torch.randint(0, 512, (micro, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    # Layer 0's input needs no gradient (frozen embeddings), so it saves less; layers 1 and 2 are typical.
    measured = sum(b for (layer, _), b in saved.items() if layer >= 1) / 2
    estimate = activation_bytes(shape, micro, seq, 2, checkpointing=False) / shape.layers
    assert estimate == pytest.approx(measured, rel=0.15)


def test_plan_of_a_non_lora_method_uses_the_meta_count(capsys):
    assert main(["--model", "llama-7b", "--nodes", "1", "--global-batch", "32", "--tokens", "1e8",
                 "--set", "adapters=[{method: krona}]"]) == 0
    out = capsys.readouterr().out
    model = build_meta_model(PRESETS["llama-7b"], [build_adapter_config({"method": "krona"}, "a")], "all-linear")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"adapters    {trainable:,} trainable parameters" in out and "counted by the meta-device model" in out
