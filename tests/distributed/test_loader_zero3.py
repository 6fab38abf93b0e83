"""Streaming quantized loading under real ZeRO-3 on 2 CPU processes (gloo), against the N=1 loader, in int8
and in 4 bits (NF4 with double quantization: every kind of 4-bit parameter).

A 4-layer Llama (hidden 512, ~40 MB in fp32, 10.5 MB in int8) is saved sharded; loader_worker.py loads it
on 2 ranks with persistence threshold 0. The N=1 oracle is the same loader without DeepSpeed, which
tests/unit/test_loader.py holds bit-identical to ``from_pretrained`` + ``quantize_model``.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_dist.config.schema import ModelConfig, QuantizationConfig
from peft_dist.model import tiny_llama_config
from peft_dist.plan.dryrun import build_meta_model, meta_inventory
from peft_dist.plan.estimate import CPU_QUANTIZE_GWS, Hardware, load_cost
from peft_dist.plan.inventory import per_rank
from peft_dist.plan.models import shape_from_hf
from peft_dist.quant.loader import load_quantized_base
from tests.multiproc import REPO, run_distributed

WORKER = str(REPO / "tests" / "distributed" / "loader_worker.py")
LOGITS_ATOL = 1e-5  # the gathered quantized tensors are bit-identical; observed difference exactly 0
MIB = 2 ** 20
# The partition dtype of each parameter of a quantized linear (by parameter name); any other parameter
# (and an int8 linear's scale) is in the float precision of the load.
QUANTIZED_DTYPES = {8: {"weight": "torch.int8"},
                    4: {"weight": "torch.uint8", "absmax": "torch.uint8", "nested_absmax": "torch.float32",
                        "nested_code": "torch.float32", "absmax_offset": "torch.float32"}}


def expected_dtype(name: str, bits: int, floats: str) -> str:
    module, _, param = name.rpartition(".")
    return QUANTIZED_DTYPES[bits].get(param, floats) if module.endswith("proj") else floats


def stored_bytes(directory) -> int:
    """Bytes of every tensor in the (float32) checkpoint: the float model."""
    return sum(t.numel() * t.element_size() for f in directory.glob("*.safetensors") for t in load_file(f).values())


@pytest.fixture(scope="module", params=[{}, {"bits": 4, "double_quant": True}], ids=["int8", "nf4"])
def zero3_run(tmp_path_factory, request):
    directory = tmp_path_factory.mktemp("ckpt")
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 512, 1408, 8
    config.num_key_value_heads = 8
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="10MB")
    assert (directory / "model.safetensors.index.json").exists()
    out = tmp_path_factory.mktemp("out")
    # glibc otherwise keeps freed multi-MB blocks in its heap, and RSS would show allocator slack, not tensors.
    proc = run_distributed([WORKER, "--checkpoint", str(directory), "--out", str(out), "--quant",
                            json.dumps(request.param)], 2, timeout=300, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return directory, ranks, proc.stdout, QuantizationConfig(**request.param)


@pytest.mark.slow
def test_every_parameter_is_partitioned_in_its_stored_dtype(zero3_run):
    """Half of every tensor on each rank, quantized tensors as bytes; the 4-bit statistics stay float32
    under a bf16 config, and every gathered tensor equals the N=1 quantization bit for bit."""
    _, ranks, _, quant = zero3_run
    for result in ranks:
        assert result["world_size"] == 2
        for name, p in result["params"].items():
            assert p["zero"], name
            assert p["local"] == math.ceil(p["full"] / 2), (name, p)
            assert p["dtype"] == expected_dtype(name, quant.bits, "torch.float32"), (name, p)
        assert sum(name.endswith("proj.weight") for name in result["params"]) == 7 * 4
        assert all(result["identical"].values()), [n for n, ok in result["identical"].items() if not ok]
        assert result["bf16_dtypes"] == {n: expected_dtype(n, quant.bits, "torch.bfloat16") for n in result["params"]}


@pytest.mark.slow
def test_logits_equal_single_process(zero3_run):
    directory, ranks, _, quant = zero3_run
    model, _ = load_quantized_base(ModelConfig(name_or_path=str(directory)), quant)
    ids = torch.arange(40).reshape(2, 20) * 7 % 512  # the worker's batch
    want = model(input_ids=ids).logits
    for result in ranks:
        torch.testing.assert_close(torch.tensor(result["logits"]), want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_peak_memory_is_a_shard_plus_one_layer(zero3_run):
    """Each rank's private memory grows by its quantized half plus about one layer, never the float model."""
    directory, ranks, stdout, _ = zero3_run
    fp32_model = stored_bytes(directory)
    largest_fp32 = 1408 * 512 * 4
    for rank, result in enumerate(ranks):
        report = result["report"]
        assert f"[rank {rank}/2] load_quantized_base zero3=True: peak RSS" in stdout
        assert report["zero3"] and report["local_param_bytes"] <= report["full_param_bytes"] / 2 + 1024
        grown = report["peak_private"] - report["private_before"]
        # observed: ~5.6 MiB shard + ~1.5 MiB; the float model is ~40 MiB, its bf16 copy ~20 MiB
        assert grown < report["local_param_bytes"] + 2 * largest_fp32, (grown / MIB, report)
        assert grown < fp32_model / 4, (grown / MIB, fp32_model / MIB)


@pytest.mark.slow
def test_the_ranks_read_the_checkpoint_once_between_them(zero3_run):
    """The ranks take turns module by module: every stored tensor is read once in the job, about half by each
    rank (the values are still every rank's own: test_each_rank_holds_its_share_of_the_quantized_model)."""
    directory, ranks, _, _ = zero3_run
    read = [rank["report"]["bytes_read"] for rank in ranks]
    assert sum(read) == stored_bytes(directory)
    assert all(abs(r - stored_bytes(directory) / 2) < 0.05 * stored_bytes(directory) for r in read), read


@pytest.mark.slow
def test_the_planners_load_cost_is_what_the_loader_read_and_holds(zero3_run):
    """The plan's job-start lines: the job reads the checkpoint's bytes once, rank 0 receives rank 1's half of
    the base, the base as stored, whole (what zero.Init broadcasts to every other rank), is what the loader
    reports for the model it built, and each rank quantizes about half its weights, timing each layer."""
    directory, ranks, _, quant = zero3_run
    shape = shape_from_hf(AutoModelForCausalLM.from_pretrained(directory).config, "loader-test")
    held = per_rank(meta_inventory(build_meta_model(shape, [], "all-linear", "float32", quant)), 2, 0)
    cost = load_cost(shape, held, Hardware(1, 2, gpu_mem_gib=80, peak_tflops=1, accelerator="cpu"), quant,
                     checkpoint_itemsize=4)
    assert cost.checkpoint_bytes == sum(rank["report"]["bytes_read"] for rank in ranks) == stored_bytes(directory)
    assert cost.to_rank_0_bytes == pytest.approx(ranks[1]["report"]["full_param_bytes"] / 2, rel=0.05)
    assert cost.broadcast_bytes == ranks[1]["report"]["full_param_bytes"]
    quantized = [sum(math.prod(q["shape"]) for q in rank["report"]["quantization"]) for rank in ranks]
    assert sum(quantized) == held.quantized_numel == sum(o * i for layer in range(shape.layers)
                                                         for _, o, i, _ in shape.linears(layer))
    assert all(q == pytest.approx(cost.quantized_per_rank, rel=0.1) for q in quantized), quantized
    assert cost.quantize_s == cost.quantized_per_rank / (CPU_QUANTIZE_GWS[quant.bits] * 1e9)
    assert all(q["seconds"] > 0 for rank in ranks for q in rank["report"]["quantization"])


@pytest.mark.slow
def test_a_tied_conv1d_model_loads_in_turns(tmp_path):
    """GPT-2 in turns: its head shares the embedding's tensor (read once, by whichever rank's turn reaches it
    first) and its linears are Conv1D (stored transposed). Every gathered tensor equals ``from_pretrained`` +
    ``quantize_model``, the logits equal the single-process loader's, and the checkpoint is read once."""
    from tests.architectures import write_checkpoint

    directory = write_checkpoint("gpt2", tmp_path / "gpt2")
    out = tmp_path / "out"
    out.mkdir()
    run_distributed([WORKER, "--checkpoint", str(directory), "--out", str(out)], 2, timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    model, _ = load_quantized_base(ModelConfig(name_or_path=str(directory)), QuantizationConfig())
    want = model(input_ids=torch.arange(40).reshape(2, 20) * 7 % 512).logits  # the worker's batch
    for result in ranks:
        assert all(result["identical"].values()), [n for n, ok in result["identical"].items() if not ok]
        torch.testing.assert_close(torch.tensor(result["logits"]), want, atol=LOGITS_ATOL, rtol=0)
    assert sum(rank["report"]["bytes_read"] for rank in ranks) == stored_bytes(directory)
    assert all(rank["report"]["bytes_read"] > 0 for rank in ranks)
