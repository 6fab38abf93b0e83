"""peft-dist against Hugging Face peft on the Llama-2-7B-shaped checkpoint of bench/seven_b.py: per-rank memory
on 2 CPU ranks under ZeRO-3, each setup stopped at a time limit that reports how far it got.

    python bench/seven_b_peft.py                   # about 70 minutes: 3 jobs of up to --limit-s each
    python bench/seven_b_peft.py --limit-s 900
    python bench/seven_b_peft.py --baselines        # peft-dist's row alone (about 10 minutes)
    python bench/seven_b_peft.py --steps 2          # every job 2 steps: the second prefetches, as later ones do

1. ``python -m peft_dist.plan --model DIR --config 7b.yaml --nodes 1 --gpus-per-node 2 ... --write P`` writes
   the run config and DeepSpeed config (ZeRO-3, two layers live, and on these CPU ranks one parameter gathered at
   a time, ``stage3_allgather_sequential``) that all three setups use:
   the same data (the 100M-token corpus of bench/data.py, block 64), micro-batch, LoRA r=8 on q,v, bf16.
2. ``peft-dist``: ``torchrun --nproc_per_node 2 launcher/train.py --config P.yaml --set train.max_steps=STEPS``,
   the user's flow; its memory is what the run logged to MLflow (``memory/peak_rss_gib/rank*``). Its base is
   int8 with the (untied) token embedding and output head quantized too (``--tables bf16``: both in bf16, as
   ``all-linear`` leaves them).
3. ``peft+bf16``: ``from_pretrained`` of the bf16 base under ``HfDeepSpeedConfig`` (partitioned while it loads,
   as the HF Trainer does), ``get_peft_model``, ``deepspeed.initialize``, then ``train_step`` for each of the
   ``--steps`` steps (default 1).
4. ``peft+bnb8``: the same with ``BitsAndBytesConfig(load_in_8bit=True)``: transformers loads a quantized
   model whole on every rank and bitsandbytes keeps its int8 weights where ZeRO-3 does not partition them;
   its head stays bf16 (bitsandbytes' default ``llm_int8_skip_modules``).

Each peft rank writes its phase (loading, forward through layer k, backward at layer k, steps done) and its
peak resident set (``VmHWM``, as the trainer logs it) every few seconds; a job still running at ``--limit-s``
is stopped and reported as far as it got. On a CPU without native bf16 (AVX2) a bf16 step of this model
takes over an hour (its backward GEMMs are emulated), so the peft rows stop inside their step: their peak
is then a lower bound, and a ratio to it an upper bound. All three setups get the trainer's allocator
setting (``return_freed_buffers_to_the_os``), so none pays for glibc's heap, and its process group
(``init_distributed``: on gloo ZeRO-3's gathers are received in place), so none pays for gloo's second copy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.data import machine  # noqa: E402
from bench.seven_b import GIB, MIB, bench_inputs, launch, mlflow_metrics, run_config  # noqa: E402

SETUPS = ("peft+bf16", "peft+bnb8")
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STATUS_EVERY_S = 5


class Progress:
    """This rank's phase and peak memory in ``path``, rewritten on every change and every few seconds."""

    def __init__(self, path: Path) -> None:
        self.path, self.started, self.lock = path, time.monotonic(), threading.Lock()
        self.state: dict = {"phase": "starting"}
        threading.Thread(target=self._tick, daemon=True).start()

    def update(self, **fields) -> None:
        with self.lock:
            self.state.update(fields)
        self.write()

    def write(self) -> None:
        from peft_dist.distributed.memory import peak_rss_bytes

        with self.lock:  # the ticking thread and the hooks both write: one at a time, or a rename finds no file
            state = {**self.state, "peak_rss": peak_rss_bytes(), "elapsed_s": time.monotonic() - self.started}
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(state))
            partial.replace(self.path)

    def _tick(self) -> None:
        while True:
            time.sleep(STATUS_EVERY_S)
            self.write()


def watch_layers(model: torch.nn.Module, progress: Progress) -> None:
    """Report each decoder layer as the forward leaves it and as the backward reaches its output."""
    count = model.config.num_hidden_layers
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count)

    def hook(index: int):
        def after_forward(module, inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            progress.update(phase="forward", layer=f"{index + 1}/{count}")
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: progress.update(phase="backward", layer=f"{index + 1}/{count}"))
        return after_forward

    for index, layer in enumerate(layers):
        layer.register_forward_hook(hook(index))


def worker(setup: str, config_path: str, status_dir: str, steps: int) -> None:
    """One rank of a peft setup: load, wrap, ``steps`` training steps, reporting as it goes."""
    import bitsandbytes  # noqa: F401  (imported before loading, as peft does)
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import HfDeepSpeedConfig

    from peft_dist.data import GlobalBatchSampler, build_blocks
    from peft_dist.distributed.env import init_distributed, resolve_env
    from peft_dist.distributed.memory import resident_bytes, return_freed_buffers_to_the_os
    from peft_dist.distributed.zero3 import build_ds_config
    from peft_dist.model import load_model_config, load_tokenizer, max_positions
    from peft_dist.train.config import load_config
    from peft_dist.train.step import train_step
    from peft_dist.train.trainer import build_engine

    return_freed_buffers_to_the_os()
    env = resolve_env()
    cfg = load_config(config_path)
    ds_config = build_ds_config(cfg, env.world_size)
    init_distributed(env)
    progress = Progress(Path(status_dir) / f"rank{env.rank}.json")
    path = cfg.model.name_or_path
    blocks = build_blocks(cfg.data, load_tokenizer(path), max_positions(load_model_config(path)))
    progress.update(phase="loading", rss_before_load=resident_bytes()[0])
    began = time.monotonic()
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # kept alive, as the HF Trainer does: loads the base partitioned
    quantization = BitsAndBytesConfig(load_in_8bit=True) if setup == "peft+bnb8" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    torch.manual_seed(cfg.train.seed)
    (lora,) = cfg.adapters
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha,
                                                       target_modules=list(lora.target_modules)))
    engine = build_engine(cfg, model, ds_config)
    progress.update(phase="loaded", load_s=time.monotonic() - began)
    watch_layers(model, progress)
    sampler = GlobalBatchSampler(len(blocks.train), cfg.train.micro_batch_size,
                                 cfg.train.gradient_accumulation_steps, env.world_size, env.rank, cfg.data.seed)
    for step in range(1, steps + 1):
        began = time.monotonic()
        train_step(engine, blocks.train, sampler.micro_batches(step - 1), [], step, env.rank)
        progress.update(phase="steps done", steps=step, layer=None, step_s=time.monotonic() - began)
    del hf_ds_config


def kill_job(pid: int) -> None:
    """Kill torchrun and its ranks, which it starts in sessions of their own (a process group kill misses them)."""
    import psutil

    job = psutil.Process(pid)
    processes = [job, *job.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=60)


def run_setup(setup: str, config: Path, out: Path, limit_s: float, steps: int) -> list[dict]:
    """One torchrun job of 2 ranks, stopped at ``limit_s``; each rank's last report."""
    status = out / setup
    status.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
           "--worker", setup, str(config), str(status), str(steps)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(out / f"{setup}.log", "w") as log:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = job.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = "stopped at the time limit"
            kill_job(job.pid)
    reports = [json.loads(p.read_text()) if p.is_file() else {"phase": "no report"}
               for p in (status / f"rank{rank}.json" for rank in (0, 1))]
    return [{**r, "exit": code} for r in reports]


def ours(config: Path, out: Path, steps: int) -> list[dict]:
    """peft-dist through the CLI for ``steps`` steps; per rank: the peak MLflow logged, load and step time."""
    code, wall = launch(config, out / "peft-dist.log", f"train.max_steps={steps}", "checkpoint.exit_interval=0",
                        f"checkpoint.output_dir={out / 'run'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                        "tracking.experiment=peft-dist")
    log = (out / "peft-dist.log").read_text(errors="replace")
    if code not in (0, 75):
        raise SystemExit(f"peft-dist's job failed (exit {code}); its log ends:\n{log[-3000:]}")
    # load_quantized_base ... peak RSS P MiB (+A MiB while loading; ...) ... in T s: resident before loading = P - A
    loads = [(float(p) - float(a), float(t)) for p, a, t in re.findall(
        r"load_quantized_base.*?peak RSS ([\d.]+) MiB \(\+([\d.]+) MiB while loading.* in ([\d.]+) s", log)]
    metrics = mlflow_metrics(out, "peft-dist")
    done = {"phase": "steps done", "steps": steps} if metrics["train/tokens_per_s"] else {"phase": "no step logged"}
    return [{"exit": code, **done, "peak_rss": max(metrics[f"memory/peak_rss_gib/rank{rank}"]) * GIB,
             "rss_before_load": before * MIB, "load_s": seconds, "elapsed_s": wall}
            for rank, (before, seconds) in enumerate(loads)]


def describe(setup: str, reports: list[dict]) -> str:
    rows = []
    for rank, r in enumerate(reports):
        if "peak_rss" not in r:
            rows.append(f"| {setup} | {rank} | | | | | {r['phase']} (exit: {r['exit']}) |")
            continue
        got = (f"step {r['steps']} done" if r["phase"] == "steps done"
               else r["phase"] + (f" {r['layer']}" if r.get("layer") else ""))
        load = f"{r['load_s']:.0f} s" if "load_s" in r else "-"
        before = f"{r['rss_before_load'] / GIB:.2f}" if "rss_before_load" in r else "-"
        model_part = f"{(r['peak_rss'] - r['rss_before_load']) / GIB:.2f}" if "rss_before_load" in r else "-"
        rows.append(f"| {setup} | {rank} | {r['peak_rss'] / GIB:.2f} | {before} | {model_part} | {load} | "
                    f"{got} after {r['elapsed_s']:.0f} s (exit: {r['exit']}) |")
    return "\n".join(rows)


def ratios(ours: list[dict], theirs: list[dict], steps: int) -> str:
    """Per rank: peak RSS, and peak RSS less the resident set before loading (the model's part); then the job's
    largest peak against the other job's largest, the memory each rank of a job must be given."""
    if not all("rss_before_load" in r for r in ours + theirs):
        return "not comparable: a job reported no memory"
    whole = [o["peak_rss"] / t["peak_rss"] for o, t in zip(ours, theirs)]
    part = [(o["peak_rss"] - o["rss_before_load"]) / max(t["peak_rss"] - t["rss_before_load"], 1)
            for o, t in zip(ours, theirs)]
    bound = "" if all(r.get("steps") == steps for r in theirs) else " (upper bounds: its steps did not finish)"
    largest = max(o["peak_rss"] for o in ours) / max(t["peak_rss"] for t in theirs)
    return (", ".join(f"{x:.2f}x" for x in whole) + " peak RSS; " + ", ".join(f"{x:.2f}x" for x in part)
            + f" the model's part; the largest rank's {largest:.2f}x" + bound)


def with_int8_tables(config: Path) -> None:
    """Quantize the token embedding and the output head with the decoder linears (Llama-2's are untied):
    peft-dist's side only."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["quantization"] = {"target_modules": [*LLAMA_LINEARS, "embed_tokens", "lm_head"]}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/peft-dist/bench"))
    parser.add_argument("--limit-s", type=float, default=1500, help="wall time per peft job (default 1500)")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--tables", choices=("int8", "bf16"), default="int8",
                        help="peft-dist's token embedding and output head (default int8: quantization.target_modules "
                             "lists embed_tokens and lm_head)")
    parser.add_argument("--baselines", nargs="*", choices=SETUPS, default=list(SETUPS),
                        help="the peft setups to run after peft-dist (default both; none: peft-dist's row alone)")
    parser.add_argument("--steps", type=int, default=1,
                        help="training steps of every job (default 1: DeepSpeed records its trace; from the second "
                             "it prefetches by it)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps: got {args.steps}; a job must run at least 1 step")
    if args.worker:
        worker(*args.worker[:3], int(args.worker[3]))
        from peft_dist.distributed.env import exit_process

        exit_process(0)
    model, corpus, out = bench_inputs(Path(args.work), "7b-peft")
    print(f"{machine()}; {args.steps} steps; peft jobs stopped at {args.limit_s:.0f} s; "
          f"peft-dist's embedding and head {args.tables}", flush=True)
    base_config = run_config(out, model, corpus, 2, args.block)
    if args.tables == "int8":
        with_int8_tables(base_config)
    plan = [sys.executable, "-m", "peft_dist.plan", "--model", str(model), "--config", str(base_config),
            "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "24", "--seq-len", str(args.block),
            "--global-batch", "2", "--tokens", "1e6", "--accelerator", "cpu", "--write", str(out / "P")]
    subprocess.run(plan, cwd=REPO, check=True, capture_output=True)
    config = out / "P.yaml"
    print(f"config: {' '.join(plan[1:])}\n")
    results = {"peft-dist": ours(config, out, args.steps)}
    print("| setup | rank | peak RSS (GiB) | before loading (GiB) | model's part (GiB) | load | how far |")
    print("|---|---|---|---|---|---|---|")
    print(describe("peft-dist", results["peft-dist"]), flush=True)
    for setup in args.baselines:
        results[setup] = run_setup(setup, config, out, args.limit_s, args.steps)
        print(describe(setup, results[setup]), flush=True)
    print()
    for setup in args.baselines:
        print(f"peft-dist / {setup}, per rank: {ratios(results['peft-dist'], results[setup], args.steps)}")


if __name__ == "__main__":
    main()
