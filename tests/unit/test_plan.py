"""The planner: analytic counts vs the real model skeleton on the meta device, choices, files, errors."""
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_dist.adapters.registry import build_adapter_config, methods
from peft_dist.config import ConfigError
from peft_dist.train.config import load_config
from peft_dist.distributed.zero3 import REPO_ROOT, build_ds_config
from peft_dist.plan.__main__ import main
from peft_dist.plan.dryrun import build_meta_model, meta_inventory
from peft_dist.plan.estimate import GIB, Hardware, Workload, activation_bytes, backward_gather_bytes, choose
from peft_dist.plan.inventory import TensorInfo, analytic_inventory, per_rank
from peft_dist.plan.models import PRESETS, PlanError, hf_config, load_shape, shape_from_hf, with_layers


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


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("preset,targets,quant", [
    ("llama-70b", ["q_proj", "v_proj"], "all-linear"),  # grouped-query attention: k/v are 1/8 wide
    ("llama-7b", "all-linear", None),  # no quantization: bf16 linears
    ("llama-7b", r".*\.mlp\..*", ["o_proj", "down_proj"]),  # regex adapters, partial quantization
    ("llama-7b", ["q_proj", "v_proj"], [*LLAMA_LINEARS, "lm_head"]),  # an int8 output head
    ("llama-7b", ["q_proj", "v_proj"], [*LLAMA_LINEARS, "embed_tokens", "lm_head"]),  # and int8 embeddings
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



def test_a_quantized_head_must_be_untied():
    """The planner and the loader refuse the same config: an int8 copy of a tied head would untie it."""
    shape = with_layers(PRESETS["gpt3-175b"], 1)  # GPT-3 ties its head to the token embeddings
    with pytest.raises(PlanError, match="tied to the input embeddings"):
        analytic_inventory(shape, [lora(r=8)], ["c_attn", "lm_head"], itemsize=2)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        build_meta_model(shape, [lora(r=8)], ["c_attn", "lm_head"])
    with pytest.raises(PlanError, match="wte is tied to the output head"):
        analytic_inventory(shape, [lora(r=8)], ["c_attn", "wte"], itemsize=2)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        build_meta_model(shape, [lora(r=8)], ["c_attn", "wte"])
    position = [t for t in analytic_inventory(shape, [lora(r=8)], ["c_attn", "wpe"], itemsize=2) if "wpe" in t.name]
    assert [(t.numel, t.itemsize) for t in position] == [(2048 * 12288, 1), (2048, 2)]  # untied: int8 + scales


def test_an_explicit_head_dim_is_counted():
    """A config whose head_dim is not hidden / heads (Gemma, Qwen3, Mistral-NeMo do this) has narrower or wider
    attention projections: the shape read from it counts them as the model built from it holds them."""
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    shape = shape_from_hf(config, "narrow-heads")
    assert shape.head_dim == 16 and hf_config(shape).head_dim == 16
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    assert shape.total_params() == sum(p.numel() for p in built.parameters())
    adapters = [lora(r=8, target_modules="all-linear")]
    analytic = analytic_inventory(shape, adapters, "all-linear", itemsize=2)
    assert per_rank(analytic, 4, 0) == per_rank(meta_inventory(build_meta_model(shape, adapters, "all-linear")), 4, 0)


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
    # A GPT-3 layer's linears as stored: int8 qkv 3h^2, proj h^2, fc 4h^2, proj 4h^2 and a scale per output row.
    layer = 12 * 12288**2 + (3 + 1 + 4 + 1) * 12288
    tail = 2 * layer * held.gathered // held.gathered_numel  # two layers' elements, at the mean bytes per element
    positions = 2048 * 12288 * 2  # wpe, bf16 (wte is tied to the head: the backward uses it)
    assert backward_gather_bytes(shape, held, 2) == held.gathered - tail - positions
    assert held.gathered - backward_gather_bytes(shape, held, 2) < 0.03 * held.gathered  # ~2 of 96 layers


def test_too_small_gpus_fit_only_with_cpu_offload_and_say_what_to_change(capsys):
    argv = ["--model", "gpt3-175b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gib", "24",
            "--global-batch", "8", "--tokens", "1e6"]
    assert main(argv) == 0  # the int8 base (20.5 GiB a rank) in pinned CPU memory: 164 GiB of the node's 256
    out = capsys.readouterr().out
    assert "CPU offload param" in out and "163.8 GiB per node of 256" in out
    assert main(argv + ["--host-mem-gib", "128"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "add nodes" in out and "exceed the 128 GiB of CPU memory" in out


@pytest.mark.parametrize("argv,message", [
    (["--global-batch", "500"], "not a multiple of the 128 GPUs"),
    (["--global-batch", "512", "--seq-len", "4096"], "exceeds gpt3-175b's 2048 positions"),
    (["--global-batch", "512", "--model", "gpt-5"], "neither a preset"),
    (["--global-batch", "512", "--set", "adapters.0.r=0"], "adapters.0.r"),
    (["--global-batch", "512", "--disk-gbs", "0"], "--pcie-gbs and --disk-gbs must be > 0"),
    (["--global-batch", "512", "--runtime-gib", "-1"], "--runtime-gib: must be >= 0, got -1"),
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


def nf4(**kw):
    from peft_dist.config.schema import QuantizationConfig

    return QuantizationConfig(bits=4, **kw)


@pytest.mark.parametrize("quant", [nf4(), nf4(double_quant=True), nf4(quant_type="fp4", blocksize=128)])
def test_four_bit_analytic_matches_the_real_four_bit_layers(quant):
    """FourBitLinear on the meta device: packed codes, float32 absmax per block (double quant: uint8 absmax,
    nested absmax, code and offset), counted tensor by tensor as the analytic model writes them down."""
    shape = with_layers(PRESETS["llama-70b"], 2)
    adapters = [lora(r=8, target_modules="all-linear")]
    model = build_meta_model(shape, adapters, "all-linear", "bfloat16", quant)
    meta = meta_inventory(model)
    analytic = analytic_inventory(shape, adapters, "all-linear", 2, quant)
    assert sorted((t.numel, t.itemsize, t.trainable) for t in analytic) == \
        sorted((t.numel, t.itemsize, t.trainable) for t in meta)
    prefix = "model.layers.0.mlp.down_proj.base."  # the adapter wraps the FourBitLinear
    down = {t.name.removeprefix(prefix): (t.numel, t.itemsize) for t in meta if t.name.startswith(prefix)}
    n = 8192 * 28672
    blocks = n // quant.blocksize
    expected = {"weight": (n // 2, 1), "absmax": (blocks, 1 if quant.double_quant else 4)}
    if quant.double_quant:
        expected |= {"nested_absmax": (math.ceil(blocks / 256), 4), "nested_code": (256, 4), "absmax_offset": (1, 4)}
    assert down == expected
    for world in (1, 2, 64):
        assert per_rank(analytic, world, 100_000) == per_rank(meta, world, 100_000)


def llama_70b_plan(*extra, **hardware):
    """The issue's case: llama-70b, one node of 2 x 24 GiB GPUs, 4-bit base (defaults otherwise)."""
    from peft_dist.plan.__main__ import default_overrides
    from peft_dist.plan.planner import make_plan

    cfg = load_config(None, default_overrides("llama-70b", "llama-70b") + ["quantization.bits=4", *extra])
    return make_plan(PRESETS["llama-70b"], cfg, Hardware(1, 2, 24, 989, **hardware), Workload(2048, 512, 10**9))


def test_llama_70b_4bit_on_two_24gib_gpus_fits_only_with_the_base_offloaded_to_cpu():
    plan = llama_70b_plan()
    h, kv, i, vocab = 8192, 1024, 28672, 32000
    weights = 80 * (2 * h * h + 2 * kv * h + 3 * i * h)  # q, o; k, v (grouped-query); gate, up, down
    norms = (2 * 80 + 1) * h  # persistent (<= 1e5 elements): a half shard and a whole bf16 copy each
    base = weights * (0.5 + 4 / 64) / 2 + 2 * vocab * h * 2 / 2 + norms * (2 / 2 + 2)
    assert plan.held.frozen == base  # codes 0.5 B + float32 absmax 4/64 B per weight; embeddings, head bf16
    assert base / GIB == pytest.approx(18.42, abs=0.01)
    none = [c for c in plan.candidates if c.offload == "none"]
    smallest = min(none, key=lambda c: c.total_bytes)  # micro-batch 1, checkpointing on
    assert smallest.memory["nf4 base shard"] == base
    assert smallest.memory["gradient bucket"] == 50_000_000 * 2  # ds_configs/' 5e7 bf16: LoRA trains 207M here
    assert smallest.total_bytes / GIB == pytest.approx(29.69, abs=0.01) and not smallest.fits(plan.hardware)
    assert not any(c.fits(plan.hardware) for c in plan.candidates if c.offload == "optimizer")
    c = plan.choice  # the cheapest that fits: the base to the CPU, the optimizer stays on the GPU
    assert plan.fits and (c.offload, c.micro_batch, c.checkpointing) == ("param", 4, True)
    assert c.total_bytes / GIB == pytest.approx(22.66, abs=0.01) and c.memory["nf4 base shard"] == norms * 2
    persistent = norms * 2 + plan.held.trainable_persistent  # norms, and LoRA's small k/v B matrices
    assert c.host_bytes == plan.held.params - persistent  # every shard but the persistent copies, pinned
    assert c.host_bytes / GIB == pytest.approx(18.61, abs=0.01)
    gathered = plan.held.gathered + backward_gather_bytes(plan.shape, plan.held, 2, plan.work.base)
    assert c.pcie_bytes == 64 * gathered // 2  # each rank's share of every gather, 64 micro-batches
    assert c.pcie_s == pytest.approx(c.pcie_bytes / 25e9)


def test_offload_only_when_nothing_fits_without_it():
    """llama-13b, 4 bits, one 24 GiB GPU: offloading the base would allow micro-batch 8 (1% faster, the
    PCIe copies hidden under compute), but micro-batch 4 fits without: no offload."""
    shape, hw = PRESETS["llama-13b"], Hardware(1, 1, 24, 989)
    held = per_rank(analytic_inventory(shape, [lora(r=16)], "all-linear", 2, nf4()), 1, 100_000)
    choice, candidates = choose(shape, held, hw, Workload(2048, 16, 10**9, base=nf4()))
    assert (choice.offload, choice.micro_batch, choice.checkpointing) == ("none", 4, True)
    faster = min((c for c in candidates if c.fits(hw)), key=lambda c: c.step_s)
    assert (faster.offload, faster.micro_batch) == ("param", 8) and faster.step_s < choice.step_s


def test_four_bit_dequantization_moves_fewer_bytes_than_int8():
    """HBM bytes per weight and micro-batch: int8 7 B a pass; NF4 reads 0.5 + 4/64 B, writes 2 B, and the
    backward copies the weight into the forward's layout (4 B)."""
    from peft_dist.plan.estimate import INT8_BASE, dequant_bytes

    shape = PRESETS["llama-70b"]
    weights = sum(o * i for _, o, i, _ in shape.linears(0)) * shape.layers
    assert dequant_bytes(shape, INT8_BASE, 2, True) == 3 * 7 * weights
    forward = 0.5 + 4 / 64 + 2
    assert dequant_bytes(shape, nf4(), 2, True) == pytest.approx((3 * forward + 4) * weights)
    assert dequant_bytes(shape, nf4(), 2, False) == pytest.approx((2 * forward + 4) * weights)
    assert dequant_bytes(shape, None, 2, True) == 0


def test_the_issue_command_plans_and_writes_a_4bit_run_with_the_base_offloaded(tmp_path, capsys):
    argv = ["--model", "llama-70b", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "24", "--bits", "4"]
    assert main(argv + ["--write", str(tmp_path / "llama70b")]) == 0
    out = capsys.readouterr().out
    assert "CPU offload param" in out and "FITS" in out and "18.61 GiB per rank in pinned CPU memory" in out
    assert "int8/uint8 too" in out  # what the plan says about DeepSpeed's offload of non-float parameters
    cfg = load_config(tmp_path / "llama70b.yaml")
    assert (cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.blocksize) == (4, "nf4", 64)
    ds = build_ds_config(cfg, world_size=2)
    zero = ds["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True} and "offload_optimizer" not in zero
    layer = sum(o * i // 2 + o * i // 64 for _, o, i, _ in PRESETS["llama-70b"].linears(0))  # codes + absmax
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"]) == (layer, 2 * layer)
    assert ds["train_batch_size"] == 512 and ds["bf16"] == {"enabled": True}


def test_a_plan_that_fits_nowhere_names_the_term(capsys):
    base = ["--model", "llama-70b", "--nodes", "1", "--gpus-per-node", "2", "--bits", "4"]
    assert main(base + ["--gpu-mem-gib", "8"]) == 1
    out = capsys.readouterr().out
    assert "needs 9.73 GiB per GPU > 8 GiB (reserved 4.00, activations 3.25, all-gather working set 1.77" in out
    assert main(base + ["--gpu-mem-gib", "24", "--host-mem-gib", "32"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT (CPU memory" in out
    assert ("only with offload param, whose 18.61 GiB per rank plus the runtime's 1.5 GiB x 2 ranks = 40.2 GiB "
            "exceed the 32 GiB") in out
    # 37.2 GiB of offload fit 38 GiB per node; with each rank's runtime (--runtime-gib) they do not
    assert main(base + ["--gpu-mem-gib", "24", "--host-mem-gib", "38"]) == 1
    assert main(base + ["--gpu-mem-gib", "24", "--host-mem-gib", "38", "--runtime-gib", "0"]) == 0
    capsys.readouterr()
    assert main(base + ["--gpu-mem-gib", "24", "--set", "quantization.enabled=false"]) == 2
    assert "quantization.enabled is false" in capsys.readouterr().err


def test_quantizing_at_job_start_is_priced_where_the_ranks_run():
    """The 70B NF4 plan: on the GPU each rank's 34.2 G weights cost the estimated device rate plus their bf16 bytes
    over PCIe, seconds of a job start; on the CPU (DS_ACCELERATOR=cpu) the measured rate, most of it, and a note."""
    from peft_dist.plan.estimate import CPU_QUANTIZE_GWS, GPU_QUANTIZE_GWS

    gpu = llama_70b_plan()
    weights = gpu.load.quantized_per_rank
    assert weights / 1e9 == pytest.approx(34.23, abs=0.01)
    assert gpu.load.quantize_s == pytest.approx(weights / (GPU_QUANTIZE_GWS * 1e9) + weights * 2 / 25e9)
    assert gpu.load.quantize_s < 0.1 * gpu.load.seconds and not any("quantizing" in n for n in gpu.notes)
    cpu = llama_70b_plan(accelerator="cpu")
    assert cpu.load.quantize_s == pytest.approx(weights / (CPU_QUANTIZE_GWS[4] * 1e9))
    assert any(n.startswith("job start: quantizing on each rank's CPU is 93% of the load time") for n in cpu.notes)


def test_cpu_ranks_gather_one_parameter_at_a_time():
    """A plan for CPU ranks writes ``stage3_allgather_sequential`` (a coalesced prefetch is held twice while it is
    copied out: docs/BENCHMARKS.md, 7B); a GPU plan keeps DeepSpeed's coalesced prefetch, not measured against it."""
    from peft_dist.plan.writers import ds_config

    for accelerator, sequential in (("gpu", False), ("cpu", True)):
        zero = ds_config(llama_70b_plan(accelerator=accelerator), "ds_configs/zero3.json")["zero_optimization"]
        assert zero.get("stage3_allgather_sequential", False) is sequential


def test_llama_70b_doc_shows_what_the_planner_prints(capsys):
    """docs/SCALING.md quotes the issue's 4-bit 70B plan; it must stay the planner's real output."""
    assert main(["--model", "llama-70b", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "24",
                 "--bits", "4"]) == 0
    assert capsys.readouterr().out.strip() in (REPO_ROOT / "docs" / "SCALING.md").read_text()


@pytest.mark.parametrize("argv, stage", [
    ([], 2),  # one GPU: ZeRO-3 would partition nothing
    (["--gpus-per-node", "2"], 3),
    (["--bits", "4"], 3),  # a 4-bit base is tested under ZeRO-3 only
    (["--gpu-mem-gib", "12"], 3),  # the base fits only with offload_param, a ZeRO-3 option
])
def test_a_plan_for_one_gpu_writes_zero2(tmp_path, capsys, argv, stage):
    base = ["--model", "llama-7b", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gib", "80",
            "--global-batch", "8", "--tokens", "1e6"]
    assert main(base + argv + ["--write", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert f"ZeRO-{stage}\n" in out
    cfg = load_config(tmp_path / "p.yaml")
    zero = build_ds_config(cfg, world_size=1)["zero_optimization"]
    assert cfg.deepspeed.zero_stage == zero["stage"] == stage
    assert any(key.startswith("stage3_") for key in zero) == (stage == 3)
    # The gradient bucket: the trainable elements (fewer than 5e7), written, and counted in the plan's memory
    # (two buffers under ZeRO-2 with overlap_comm, one under ZeRO-3; bf16).
    trainable = int(re.search(r"adapters +([\d,]+) trainable", out).group(1).replace(",", ""))
    assert zero["reduce_bucket_size"] == trainable < 5e7
    bucket = float(re.search(r"gradient bucket +([\d.]+) GiB", out).group(1))
    assert bucket == round(trainable * 2 * (2 if stage == 2 else 1) / 2**30, 2)
