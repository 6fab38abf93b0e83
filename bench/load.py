"""Loading the int8 base under ZeRO-3 at N = 1, 2, 4 ranks: bytes each rank reads, load wall time, memory.

    python bench/load.py            # a 12-layer hidden-1024 Llama (~700 MB in fp32), N = 1, 2, 4 CPU ranks
    python bench/load.py --bits 4   # the same as an NF4 base
    python bench/load.py --accelerator cuda --ranks 1   # one GPU rank: it quantizes on the GPU (bench/gpu_check.sh)

Each rank calls the trainer's loader (``load_quantized_base``) on the same safetensors checkpoint and
reports what its ``LoadReport`` measured: checkpoint bytes read, the loop's wall time and of it the
quantizing (with the rate: the planner's ``CPU_QUANTIZE_GWS`` or ``GPU_QUANTIZE_GWS``), private memory growth
and the parameter bytes it holds. Targets: bytes read over all ranks <= 1.1x the checkpoint, per-rank private
growth about the rank's quantized shard plus one layer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 2**20
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def write_model(directory: Path) -> int:
    """The checkpoint (fp32, sharded at 100 MB); returns its tensor bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, max_shard_size="100MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def worker(checkpoint: str, out: str, bits: str) -> None:
    """One rank: DeepSpeed's one-time setup first (so the load line is the model's own cost), then load."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from peft_dist.config.schema import ModelConfig, QuantizationConfig
    from peft_dist.distributed.env import exit_process
    from peft_dist.quant.loader import load_quantized_base
    from peft_dist.quant.model import quantize_linear

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    deepspeed.zero.Init(module=torch.nn.Linear(2, 2), config_dict_or_path=DS_CONFIG)
    quant = QuantizationConfig(bits=int(bits))
    # A device's first quantizing loads its kernels (bitsandbytes' library on a GPU): once here, so that the
    # load's rate is the steady one.
    quantize_linear(torch.nn.Linear(256, 256, device=get_accelerator().current_device_name()), torch.float32, quant)
    _, report = load_quantized_base(ModelConfig(name_or_path=checkpoint), quant, DS_CONFIG)
    Path(out, f"rank{report.rank}.json").write_text(json.dumps({**dataclasses.asdict(report),
                                                                "quantize_seconds": report.quantize_seconds}))
    exit_process(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(4, 8), default=8, help="int8 (default) or NF4 base")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="the N to load at")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu", help="the ranks' DS_ACCELERATOR")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
    from tests.multiproc import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        stored = write_model(Path(tmp) / "model")
        print(f"checkpoint: {stored / MIB:,.0f} MiB of fp32 tensors, loaded as a {args.bits}-bit base on "
              f"{args.accelerator}; one torch thread a rank (OMP_NUM_THREADS=1, as torchrun sets it)\n")
        print("| N | rank | read (MiB) | load (s) | quantizing (s) | G weights/s | private growth (MiB) "
              "| parameters held (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        totals = {}
        for world in args.ranks:
            out = Path(tmp) / f"n{world}"
            out.mkdir()
            run_distributed([__file__, "--worker", str(Path(tmp) / "model"), str(out), str(args.bits)], world,
                            timeout=900, env={"MALLOC_MMAP_THRESHOLD_": "65536",
                                              "DS_ACCELERATOR": args.accelerator})
            reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            for r in reports:
                weights = sum(math.prod(q["shape"]) for q in r["quantization"])
                print(f"| {world} | {r['rank']} | {r['bytes_read'] / MIB:,.1f} | {r['seconds']:.1f} | "
                      f"{r['quantize_seconds']:.2f} | {weights / r['quantize_seconds'] / 1e9:.3f} | "
                      f"{(r['peak_private'] - r['private_before']) / MIB:,.1f} | {r['local_param_bytes'] / MIB:,.1f} |")
            totals[world] = sum(r["bytes_read"] for r in reports)
        print()
        for world, total in totals.items():
            print(f"ratio N={world}: bytes read over all ranks / checkpoint = {total / stored:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
