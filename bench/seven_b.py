"""A Llama-2-7B-shaped model trained on this machine (2 CPU ranks, ZeRO-3, int8 base), through the user's flow.

    python bench/seven_b.py                 # writes the checkpoint once (~13.5 GB), then about 30 minutes
    python bench/seven_b.py --steps 3 --block 64
    python bench/seven_b.py --shape 13b     # Llama-2-13B's shape (~26 GB checkpoint, ~12 GiB of int8)

1. A Llama-2-7B-shaped checkpoint (hidden 4096, 32 layers, FFN 11008, vocabulary 32000; ``--shape 13b``:
   hidden 5120, 40 layers, FFN 13824): random bf16 weights in 2 GB safetensors shards with an index, written
   once under ``--work`` and reused.
2. ``torchrun --nproc_per_node 2 launcher/train.py --config 7b.yaml`` (written next to it): streams the base
   in as int8 under ZeRO-3, prepares the 100M-token corpus of bench/data.py once, trains LoRA (q, v) in bf16
   and stops after ``--steps - 1`` steps with a checkpoint (``checkpoint.exit_interval``, as a preemption
   does); a second launch resumes it and trains the last step; MLflow records both (its default store).
3. ``python -m peft_dist.export`` writes the merged model, streamed into shards with an index.

Printed from what the runs logged (each rank's load line, MLflow's metrics): per-rank peak resident memory,
private memory growth while loading, checkpoint bytes read, load time, step time and tokens/s, and the
export's peak memory and size.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.data import machine, write_corpus  # noqa: E402

GIB, MIB = 2**30, 2**20
SHARD_BYTES = 2 * 10**9
EXPORT = ("import sys; from peft_dist.export import main; from peft_dist.distributed.memory import peak_rss_bytes; "
          "code = main(sys.argv[1:]); print('export peak RSS', peak_rss_bytes()); sys.exit(code)")


SHAPES = {  # Llama-2's published shapes (hidden, layers, FFN)
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008},
    "13b": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824},
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    heads = SHAPES[shape]["hidden_size"] // 128
    return LlamaConfig(vocab_size=32000, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0, torch_dtype="bfloat16", **SHAPES[shape])


def write_checkpoint(directory: Path, shape: str) -> None:
    """Random bf16 weights (N(0, 0.02), norms 1) named as transformers names them, sharded, with an index."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from peft_dist.model import TINY_TOKENIZER

    config = llama_config(shape)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, files, total = {}, {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(partial / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for index, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)
        if shard_bytes + tensor.nbytes > SHARD_BYTES and shard:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
        print(f"\rwriting the checkpoint: tensor {index + 1}/{len(shapes)}", end="", flush=True)
    flush()
    count = len(files)
    for i, name in enumerate(files):  # the conventional names: model-0000i-of-0000n.safetensors
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        (partial / name).rename(partial / final)
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(partial)
    for file in TINY_TOKENIZER.iterdir():
        shutil.copy(file, partial / file.name)
    partial.rename(directory)
    print(f"\ncheckpoint: {total / GIB:.1f} GiB in {count} shards at {directory}")


def bench_inputs(work: Path, runs: str, shape: str = "7b") -> tuple[Path, Path, Path]:
    """The checkpoint of ``shape`` and the 100M-token corpus cached under ``work`` (written on first use), and an
    empty ``work/runs`` for this bench's runs."""
    model, corpus, out = work / f"llama-{shape}-random", work / "stdlib-1e+08.jsonl", work / runs
    if not model.is_dir():
        write_checkpoint(model, shape)
    if not corpus.exists():
        write_corpus(corpus, 1e8)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return model, corpus, out


def run_config(work: Path, model: Path, corpus: Path, steps: int, block: int) -> Path:
    import yaml

    config = {
        "model": {"name_or_path": str(model), "dtype": "bfloat16"},
        "adapters": [{"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}],
        "data": {"path": str(corpus), "block_size": block, "max_documents": 0},
        "train": {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": steps, "lr": 1e-4,
                  "warmup_steps": 0, "precision": "bf16", "eval_batches": 1, "log_interval": 1},
        "checkpoint": {"output_dir": str(work / "run"), "save_interval": 1, "keep_last": 1,
                       "exit_interval": steps - 1},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-7b"},
    }
    path = work / "7b.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(config: Path, log: Path, *overrides: str) -> tuple[int, float]:
    """``torchrun --nproc_per_node 2 launcher/train.py``; returns the exit code and the wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launcher/train.py",
           "--config", str(config), *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with open(log, "w") as handle:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - started


def load_lines(log: str) -> list[str]:
    return re.findall(r"\[rank \d/2\] load_quantized_base.*", log)


def mlflow_metrics(work: Path, experiment: str) -> dict[str, list[float]]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    names = ["train/tokens_per_s", "memory/peak_rss_gib/rank0", "memory/peak_rss_gib/rank1", "train/loss"]
    return {n: [m.value for m in client.get_metric_history(run.info.run_id, n)] for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/peft-dist/bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    args = parser.parse_args()
    model, corpus, runs = bench_inputs(Path(args.work), f"{args.shape}-runs", args.shape)
    stored = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(machine())
    print(f"model: Llama-2-{args.shape.upper()} shape, {stored / GIB:.1f} GiB of bf16 safetensors; 2 ranks, "
          f"ZeRO-3, int8 base, LoRA r=8 on q,v, bf16, block {args.block}, micro-batch 1\n")
    config = run_config(runs, model, corpus, args.steps, args.block)
    first, first_s = launch(config, runs / "first.log")
    second, second_s = launch(config, runs / "second.log", "checkpoint.resume=true")
    logs = [(runs / n).read_text(errors="replace") for n in ("first.log", "second.log")]
    print(f"job 1: exit {first} after {first_s:.0f} s (75: stopped with a checkpoint after {args.steps - 1} steps)")
    print(f"job 2: exit {second} after {second_s:.0f} s (resumed: "
          f"{'yes' if re.search(r'resumed from step', logs[1]) else 'NO'})")
    for line in load_lines(logs[0]):
        print("  " + line.split("] ", 1)[1] if "] " in line else line)
    metrics = mlflow_metrics(runs, "bench-7b")
    tokens = metrics["train/tokens_per_s"]
    print(f"\nsteps logged: {len(tokens)}; losses {[round(v, 4) for v in metrics['train/loss']]}")
    if tokens:
        print(f"tokens/s: median {sorted(tokens)[len(tokens) // 2]:.1f} (2 ranks); step time "
              f"{2 * args.block / sorted(tokens)[len(tokens) // 2]:.0f} s")
    # The same flow on the 0.3M-parameter builtin model: what Python, torch, DeepSpeed and gloo cost a rank.
    launch(config, runs / "overhead.log", "model.name_or_path=builtin:tiny-llama", "tracking.experiment=overhead",
           f"checkpoint.output_dir={runs / 'overhead'}")
    overhead = mlflow_metrics(runs, "overhead")
    plan = subprocess.run([sys.executable, "-m", "peft_dist.plan", "--model", str(model), "--config", str(config),
                           "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "24", "--seq-len", str(args.block),
                           "--global-batch", "2", "--tokens", "1e6"], cwd=REPO, capture_output=True, text=True)
    memory = re.search(r"memory per GPU\n(.*?)\n\n", plan.stdout, re.S)
    print("\nthe planner (python -m peft_dist.plan --model DIR --config 7b.yaml --nodes 1 --gpus-per-node 2 ...):")
    print(memory.group(1) if memory else plan.stdout[-2000:] + plan.stderr[-2000:])
    predicted = sum(float(v) for k, v in re.findall(r"^\s+(.+?)\s+([\d.]+) GiB$", memory.group(1) if memory else "",
                                                       re.M) if k not in ("reserved", "total"))
    for rank in (0, 1):
        peak = max(metrics[f"memory/peak_rss_gib/rank{rank}"], default=float("nan"))
        fixed = max(overhead[f"memory/peak_rss_gib/rank{rank}"], default=float("nan"))
        print(f"rank {rank}: peak RSS {peak:.2f} GiB (MLflow memory/peak_rss_gib), of which the builtin model's run "
              f"{fixed:.2f} GiB; the model's part {peak - fixed:.2f} GiB vs the planner's {predicted:.2f} GiB "
              f"({(peak - fixed) / predicted:.2f}x)")
    export = runs / "export"
    started = time.monotonic()
    code = subprocess.run([sys.executable, "-c", EXPORT, str(runs / "run" / "adapter"), "--out", str(export)],
                          cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True)
    peak = re.search(r"export peak RSS (\d+)", code.stdout)
    index = json.loads((export / "model.safetensors.index.json").read_text()) if code.returncode == 0 else {}
    print(f"\nexport (python -m peft_dist.export, merged): exit {code.returncode} in {time.monotonic() - started:.0f} s, "
          f"peak RSS {int(peak.group(1)) / GIB if peak else float('nan'):.2f} GiB; "
          f"{len(set(index.get('weight_map', {}).values()))} shards, "
          f"{index.get('metadata', {}).get('total_size', 0) / GIB:.1f} GiB")
    if code.returncode != 0:
        print(code.stderr[-3000:])
    shutil.rmtree(export, ignore_errors=True)


if __name__ == "__main__":
    main()
