"""One device, one model: peft-dist LoRA on an int8 base through the user's own flow (the CLI, metrics read
back from the run's MLflow store) against peft LoRA on a bf16 base and on bitsandbytes 8-bit, same data,
batch and steps, in a plain loop on the same device.

    python bench/gpu_bench.py                 # on a GPU: a 1.1B Llama (hidden 2048, 22 layers), bf16
    python bench/gpu_bench.py --size small    # anywhere: an 8-layer hidden-512 Llama (the CPU mode)

Prints tokens/s, MFU (given --peak-tflops; 989 = an H100/H200's dense bf16) and peak memory of each side,
and the ratios of peft-dist under ZeRO-3 to the others (peft-dist under ZeRO-2 among them: on one device it shows
what ZeRO-3's gathers cost). Every number of a peft-dist row is what ``python launcher/train.py`` logged
(``train/tokens_per_s``, ``train/mfu``, ``memory/peak_accelerator_gib`` or ``memory/peak_rss_gib``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_dist.plan.models import ModelShape, hf_config  # noqa: E402

SIZES = {"1b": ModelShape("gpu-bench-1b", "llama", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                          vocab=32000, max_positions=2048, tied_embeddings=False),
         "small": ModelShape("gpu-bench-small", "llama", hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1536,
                             vocab=512, max_positions=512, tied_embeddings=False)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_model(shape: ModelShape, directory: Path) -> None:
    """Random bf16 weights with the shipped tokenizer (its 512 ids are a subset of any vocabulary here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_dist.model import TINY_TOKENIZER

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config(shape, "bfloat16"), dtype=torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(directory)


def ours(model_dir: Path, run_dir: Path, args, zero_stage: int) -> dict:
    """The CLI's run under ``zero_stage``; its logged metrics at the last step."""
    import mlflow

    run_dir = run_dir / f"zero{zero_stage}"
    run_dir.mkdir()
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"),
                    "--set", f"model.name_or_path={model_dir}", "--set", "model.dtype=bfloat16",
                    "--set", "train.precision=bf16", "--set", f"train.micro_batch_size={args.batch}",
                    "--set", "data.path=builtin:python-stdlib", "--set", f"data.block_size={args.seq}",
                    "--set", "data.max_documents=200",
                    "--set", f"train.max_steps={args.steps}", "--set", "train.warmup_steps=0",
                    "--set", f"train.log_interval={args.steps}", "--set", "train.eval_batches=1",
                    "--set", f"adapters=[{{method: lora, r: 8, alpha: 16, target_modules: {TARGETS}}}]",
                    "--set", f"deepspeed.zero_stage={zero_stage}", "--set", f"tracking.uri={uri}",
                    "--set", f"tracking.peak_tflops={args.peak_tflops}",
                    "--set", f"checkpoint.output_dir={run_dir / 'run'}"], check=True, cwd=REPO)
    mlflow.set_tracking_uri(uri)
    metrics = mlflow.search_runs(search_all_experiments=True, output_format="list")[0].data.metrics
    memory = metrics.get("memory/peak_accelerator_gib/rank0", metrics["memory/peak_rss_gib/rank0"])
    return {"tokens_per_s": metrics["train/tokens_per_s"], "mfu": metrics.get("train/mfu"), "peak_gib": memory}


def peft_side(model_dir: Path, eight_bit: bool, args) -> dict:
    """peft LoRA on a bf16 (or bitsandbytes 8-bit) base: the same batch shape and steps, AdamW, on one device."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_dist.tracking.run_info import model_flops_per_token, peak_rss_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = BitsAndBytesConfig(load_in_8bit=True) if eight_bit else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quantization,
                                                 device_map={"": device})
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 512, (args.batch, args.seq), device=device)
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    tokens_per_s = args.batch * args.seq / statistics.median(times[1:])
    achieved = tokens_per_s * model_flops_per_token(model, args.seq) / 1e12
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    return {"tokens_per_s": tokens_per_s, "mfu": achieved / args.peak_tflops if args.peak_tflops else None,
            "peak_gib": memory / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--peft", choices=["bf16", "bnb8"], help=argparse.SUPPRESS)  # one peft side, in a child
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft:  # each side in its own process, so each peak is its own
        print(json.dumps(peft_side(Path(args.model_dir), args.peft == "bnb8", args)))
        return
    shape = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_model(shape, model_dir)
        rows = {f"peft-dist (int8 base, ZeRO-{stage}, CLI)": ours(model_dir, Path(tmp), args, stage)
                for stage in (3, 2)}
        for side in ("bf16", "bnb8"):
            child = subprocess.run([sys.executable, __file__, "--peft", side, "--model-dir", str(model_dir),
                                    "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                                    "--peak-tflops", str(args.peak_tflops)], capture_output=True, text=True)
            rows[f"peft ({side} base)"] = (json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0
                                           else {"error": (child.stderr.strip().splitlines() or ["?"])[-1]})
    print(f"{shape.name}: {shape.layers} layers, hidden {shape.hidden}; LoRA r=8 on every decoder linear; "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, bf16")
    print("| setup | tokens/s | MFU | peak memory (GiB) |\n|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | |")
        else:
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_gib']:.2f} |")
    ref = rows["peft-dist (int8 base, ZeRO-3, CLI)"]
    for name, r in list(rows.items())[1:]:
        if "error" not in r:
            print(f"ratio peft-dist ZeRO-3 / {name}: tokens/s {ref['tokens_per_s'] / r['tokens_per_s']:.2f}x, "
                  f"peak memory {ref['peak_gib'] / r['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
