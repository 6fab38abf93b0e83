"""Streaming int8 loading under real ZeRO-3 on 2 CPU processes (gloo), against the N=1 loader.

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
from peft_dist.quant.loader import load_quantized_base
from tests.multiproc import REPO, run_distributed

WORKER = str(REPO / "tests" / "distributed" / "loader_worker.py")
LOGITS_ATOL = 1e-5  # the gathered int8 tensors are bit-identical; observed difference exactly 0
MIB = 2 ** 20


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 512, 1408, 8
    config.num_key_value_heads = 8
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="10MB")
    assert (directory / "model.safetensors.index.json").exists()
    out = tmp_path_factory.mktemp("out")
    # glibc otherwise keeps freed multi-MB blocks in its heap, and RSS would show allocator slack, not tensors.
    proc = run_distributed([WORKER, "--checkpoint", str(directory), "--out", str(out)], 2, timeout=300,
                           env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return directory, ranks, proc.stdout


@pytest.mark.slow
def test_every_parameter_is_partitioned_in_int8(zero3_run):
    _, ranks, _ = zero3_run
    for result in ranks:
        assert result["world_size"] == 2
        for name, p in result["params"].items():
            assert p["zero"], name
            assert p["local"] == math.ceil(p["full"] / 2), (name, p)
            assert p["dtype"] == ("torch.int8" if name.endswith("proj.weight") else "torch.float32"), (name, p)
        assert sum(name.endswith("proj.weight") for name in result["params"]) == 7 * 4
        assert all(result["identical"].values()), [n for n, ok in result["identical"].items() if not ok]
        assert result["bf16_dtypes"] == {n: "torch.int8" if n.endswith("proj.weight") else "torch.bfloat16"
                                         for n in result["params"]}


@pytest.mark.slow
def test_logits_equal_single_process(zero3_run):
    directory, ranks, _ = zero3_run
    model, _ = load_quantized_base(ModelConfig(name_or_path=str(directory)), QuantizationConfig())
    ids = torch.arange(40).reshape(2, 20) * 7 % 512  # the worker's batch
    want = model(input_ids=ids).logits
    for result in ranks:
        torch.testing.assert_close(torch.tensor(result["logits"]), want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_peak_memory_is_a_shard_plus_one_layer(zero3_run):
    """Each rank's private memory grows by its int8 half plus about one layer, never the float model."""
    _, ranks, stdout = zero3_run
    fp32_model = sum(p["full"] * (1 if p["dtype"] == "torch.int8" else 4) for p in ranks[0]["params"].values())
    fp32_model += sum(p["full"] * 3 for n, p in ranks[0]["params"].items() if n.endswith("proj.weight"))
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
def test_only_rank_0_reads_the_checkpoint(zero3_run):
    """zero.Init broadcasts rank 0's values: rank 0 reads every stored tensor once, rank 1 reads none."""
    directory, ranks, _ = zero3_run
    stored = sum(t.numel() * t.element_size() for f in directory.glob("*.safetensors") for t in load_file(f).values())
    assert ranks[0]["report"]["bytes_read"] == stored
    assert ranks[1]["report"]["bytes_read"] == 0
