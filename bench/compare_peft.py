"""peft-dist against Hugging Face peft: the same model, data, batch, ZeRO-3 config and steps, per method.

    python bench/compare_peft.py            # 2 CPU ranks, 10 steps per run (about 8 minutes)
    python bench/compare_peft.py --quick    # 1 rank, 4 steps, LoRA and KronA/LoKr only (about 1.5 minutes)

Model: an 8-layer Llama, hidden 512, FFN 1536, vocab 512 (27M parameters in its linears), written to a
temporary directory as a bf16 safetensors checkpoint with the shipped tiny tokenizer. Every run is
``--world`` real CPU processes started by torchrun (gloo, one thread each) with DeepSpeed ZeRO-3, bf16
training, ``stage3_param_persistence_threshold: 0`` and the planner's bucket bounds (one layer prefetched,
two live, reuse distance one layer); micro-batch 2 x 128 tokens of Python stdlib source per rank; AdamW
over the adapter parameters with the trainer's warm-up/cosine schedule; the step of
``peft_dist.train.trainer.train_step`` on both sides. Three setups per method:

* ``peft-dist``: the trainer's own setup: streaming int8 loader (each rank quantizes and keeps only its
  ZeRO-3 shard), adapter injection, engine.
* ``peft+bnb8``: ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True))``,
  ``get_peft_model``, ``deepspeed.initialize``. It runs under ZeRO-3, but transformers loads a quantized
  model whole on every rank (no ``zero.Init`` for quantized models) and bitsandbytes keeps the int8
  weight in ``Linear8bitLt.state.CB``, a reference ZeRO-3 does not partition: the int8 base stays whole
  on every rank (the bytes are printed).
* ``peft+bf16``: the nearest setup whose base ZeRO-3 does shard: a bf16 base loaded under
  ``HfDeepSpeedConfig`` (partitioned while loading), then ``get_peft_model``.

A peft setup that fails under ZeRO-3 is run again under ZeRO-2 (gradients and optimizer state sharded,
base whole on every rank), and both rows are printed.

Methods, same hyperparameters on both sides: LoRA r=8 on every decoder linear; AdaLoRA init_r=12 ->
target_r=8 (peft's ``update_and_allocate`` runs where our hook reads gradients: after the last backward,
before ``engine.step()`` zeroes them); KronA vs peft's LoKr with the same full (not low-rank) factor
shapes; prefix tuning with 16 vectors per layer, no reparameterization (both train ``layers x 2 x 16 x
hidden`` parameters).

Reported per run: median step time after two warm-up steps (rank 0); peak resident memory a rank added
while training (``VmHWM`` reset once the model is loaded and the engine built, minus the resident set
before loading; the maximum over ranks) and while loading; the loss on 8 held-out micro-batches after
training; for AdaLoRA the non-zero singular values left in DeepSpeed's fp32 master copy. Ratios are
peft-dist / peft.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_dist.plan.models import ModelShape  # noqa: E402

SHAPE = ModelShape("bench-llama", "llama", hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1536,
                   vocab=512, max_positions=512, tied_embeddings=False)
MICRO, SEQ, PREFIX_LENGTH = 2, 128, 16
WARMUP_STEPS = 2
EVAL_BATCHES = 8  # held-out micro-batches for the final loss
METHODS = ("lora", "adalora", "krona", "prefix")
SETUPS = ("peft-dist", "peft+bnb8", "peft+bf16")
PEFT_NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "krona": "LoKr", "prefix": "prefix tuning"}
OURS_NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "krona": "KronA", "prefix": "prefix"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def write_bench_model(directory: Path) -> None:
    """The bench Llama as a bf16 safetensors checkpoint plus the shipped tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_dist.model import TINY_TOKENIZER
    from peft_dist.plan.models import hf_config

    torch.manual_seed(0)
    config = hf_config(SHAPE, "bfloat16")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(directory)


def run_overrides(model_dir: str, steps: int, stage: int) -> list[str]:
    """The run config both sides share: data, batch, precision, schedule and the ZeRO settings."""
    layer = sum(o * i for _, o, i, _ in SHAPE.linears(0))
    zero = "deepspeed.overrides.zero_optimization"
    return [f"model.name_or_path={model_dir}", "model.dtype=bfloat16", "train.precision=bf16",
            f"train.micro_batch_size={MICRO}", "data.path=builtin:python-stdlib", f"data.block_size={SEQ}",
            "data.max_documents=60", f"train.max_steps={steps}", "train.warmup_steps=2", "train.lr=1e-3",
            "tracking.backend=none",
            f"deepspeed.zero_stage={stage}", f"{zero}.stage3_param_persistence_threshold=0", f"{zero}.stage3_prefetch_bucket_size={layer}",
            f"{zero}.stage3_max_live_parameters={2 * layer}", f"{zero}.stage3_max_reuse_distance={layer}"]


def adalora_schedule(steps: int) -> dict:
    """Prune from step 2 to two steps before the end, every step (the same numbers on both sides)."""
    return {"init_r": 12, "target_r": 8, "tinit": 2, "tfinal": 2, "total_step": steps}


def ours_adapter(method: str, steps: int) -> str:
    """The ``adapters=[...]`` override for peft-dist."""
    targets = "[" + ", ".join(TARGETS) + "]"
    if method == "lora":
        spec = f"{{method: lora, r: 8, alpha: 16, target_modules: {targets}}}"
    elif method == "adalora":
        s = adalora_schedule(steps)
        spec = (f"{{method: adalora, init_r: {s['init_r']}, target_r: {s['target_r']}, alpha: 16, "
                f"orth_reg_weight: 0.5, tinit: {s['tinit']}, tfinal: {s['tfinal']}, delta_t: 1, "
                f"total_step: {s['total_step']}, target_modules: {targets}}}")
    elif method == "krona":
        spec = f"{{method: krona, scale: 1.0, target_modules: {targets}}}"
    else:
        spec = f"{{method: prefix, length: {PREFIX_LENGTH}, reparameterize: false}}"
    return f"adapters=[{spec}]"


def peft_config(method: str, steps: int):
    """peft's config for the same method and hyperparameters as ``ours_adapter``."""
    import peft

    from peft_dist.adapters.krona import balanced_factors

    if method == "lora":
        return peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGETS)
    if method == "adalora":
        s = adalora_schedule(steps)
        return peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=s["init_r"], target_r=s["target_r"],
                                  lora_alpha=16, orth_reg_weight=0.5, tinit=s["tinit"], tfinal=s["tfinal"],
                                  deltaT=1, total_step=s["total_step"], target_modules=TARGETS)
    if method == "krona":
        # Full factors (no low-rank split of w2) of the balanced shapes KronA uses; alpha = r: scale 1.
        r = max(balanced_factors(n)[1] for n in (SHAPE.hidden, SHAPE.intermediate))
        return peft.LoKrConfig(task_type="CAUSAL_LM", r=r, alpha=r, target_modules=TARGETS)
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LENGTH, prefix_projection=False)


class PeftAdaLoraHook:
    """Drives peft's AdaLoRA budget from ``train_step``: ``update_and_allocate`` needs the step's reduced
    gradients (under ZeRO-3 it all-gathers them with ``safe_get_full_grad``), so it runs at the
    accumulation boundary before ``engine.step()`` zeroes them."""

    def __init__(self, model) -> None:
        self.model = model

    def extra_loss(self, model) -> None:
        return None  # peft adds its orthogonality penalty to the loss inside the forward

    def before_step(self, engine, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def after_step(self, engine, step: int) -> None:
        pass


def live_ranks(model: torch.nn.Module) -> int:
    """Non-zero AdaLoRA singular values (ours: ``lam``, peft: ``lora_E``) in DeepSpeed's fp32 master copy, the
    values the next step trains from; a collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = [p for n, p in model.named_parameters() if n.endswith(".lam") or ".lora_E." in n]
    return sum(int(torch.count_nonzero(safe_get_full_fp32_param(p))) for p in params)


def unsharded_int8_bytes(model: torch.nn.Module) -> int:
    """Bytes of bitsandbytes int8 weights held outside DeepSpeed's partitions (``Linear8bitLt.state.CB``)."""
    held = [m.state.CB for m in model.modules() if getattr(getattr(m, "state", None), "CB", None) is not None]
    return sum(t.numel() * t.element_size() for t in held)


def peft_model(setup: str, method: str, model_dir: Path, steps: int, seed: int):
    """``peft``'s model of ``setup`` (``peft+bnb8``: a bitsandbytes int8 base; ``peft+bf16``) and its hooks."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_8bit=True) if setup == "peft+bnb8" else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quantization)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft_config(method, steps))
    return model, [PeftAdaLoraHook(model)] if method == "adalora" else []


def worker(setup: str, method: str, model_dir: str, steps: int, stage: int, out: str) -> None:
    """One rank of one run: build the setup's model, train ``steps`` steps, write its measurements."""
    import bitsandbytes  # noqa: F401  (imported before the baseline in every setup, as peft is)
    import peft  # noqa: F401  (likewise)
    from transformers.integrations import HfDeepSpeedConfig

    from peft_dist.tracking.run_info import parameter_summary
    from peft_dist.distributed.hooks import make_hooks
    from peft_dist.train.config import load_config
    from peft_dist.data import GlobalBatchSampler, build_blocks
    from peft_dist.distributed.env import init_distributed, resolve_env
    from peft_dist.distributed.memory import peak_rss_bytes, reset_peak_rss, settled_rss_bytes
    from peft_dist.distributed.zero3 import build_ds_config
    from peft_dist.model import load_tokenizer
    from peft_dist.train.step import evaluate, train_step
    from peft_dist.train.trainer import adapted_model, build_engine

    env = resolve_env()
    cfg = load_config(None, run_overrides(model_dir, steps, stage) + [ours_adapter(method, steps)])
    ds_config = build_ds_config(cfg, env.world_size)
    init_distributed(env)
    blocks = build_blocks(cfg.data, load_tokenizer(model_dir), SHAPE.max_positions)
    baseline = settled_rss_bytes(ds_config)

    hf_ds_config = None
    if setup == "peft-dist":
        model, *_ = adapted_model(cfg, ds_config)
        hooks = make_hooks(model, cfg.adapters, steps)
    else:
        # Kept alive, as the HF Trainer does: from_pretrained then loads a float base partitioned, and
        # peft's AdaLoRA sees that DeepSpeed is on (it gathers gradients with safe_get_full_grad).
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        model, hooks = peft_model(setup, method, model_dir, steps, cfg.train.seed)
    trainable = parameter_summary(model)["trainable"]
    engine = build_engine(cfg, model, ds_config)
    gc.collect()
    load_peak = peak_rss_bytes()
    # Loading read the checkpoint through mmap: those pages are page cache, not memory the run holds.
    # From here the peak restarts from what the process holds.
    reset_peak_rss()
    sampler = GlobalBatchSampler(len(blocks.train), cfg.train.micro_batch_size, 1, env.world_size, env.rank,
                                 cfg.data.seed)
    times = []
    for step in range(1, steps + 1):
        began = time.perf_counter()
        train_step(engine, blocks.train, sampler.micro_batches(step - 1), hooks, step, env.rank)
        times.append(time.perf_counter() - began)
    peaks = [None] * env.world_size
    torch.distributed.all_gather_object(peaks, (load_peak - baseline, peak_rss_bytes() - baseline))
    # peft's AdaLoRA adds its orthogonality penalty to the loss of every forward, also in eval mode: its
    # held-out loss is taken from the wrapped transformers model (the same modules, without the penalty).
    scored = engine.module.base_model.model if setup != "peft-dist" and method == "adalora" else engine
    loss = evaluate(scored, blocks.eval, MICRO, EVAL_BATCHES, env.rank, env.world_size)
    ranks = live_ranks(engine.module) if method == "adalora" else None
    if env.rank == 0:
        Path(out).write_text(json.dumps({
            "step_s": statistics.median(times[WARMUP_STEPS:]), "loss": loss, "trainable": trainable,
            "load_bytes": max(p[0] for p in peaks), "train_bytes": max(p[1] for p in peaks), "live_ranks": ranks,
            "unsharded_int8": unsharded_int8_bytes(engine.module)}))
    del hf_ds_config


def run(setup: str, method: str, model_dir: Path, steps: int, world: int, stage: int) -> dict:
    """One torchrun job; returns rank 0's measurements or ``{"error": ...}`` with the job's last error line."""
    from tests.multiproc import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = run_distributed([__file__, "--worker", setup, method, str(model_dir), str(steps), str(stage), str(out)],
                               world, env={"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"},
                               timeout=900, returncode=None)
        if proc.returncode != 0 or not out.is_file():
            errors = [line for line in proc.stderr.splitlines() if "Error:" in line]
            return {"error": (errors[0].split("]: ")[-1] if errors else f"exit code {proc.returncode}")[:150]}
        return {**json.loads(out.read_text()), "stage": stage}


def row(method: str, setup: str, stage: int, r: dict) -> str:
    name = OURS_NAMES[method] if setup == "peft-dist" else PEFT_NAMES[method]
    if "error" in r:
        return f"| {name} | {setup} | {stage} | failed: {r['error']} | | | | |"
    ranks = f" ({r['live_ranks']} live ranks)" if r["live_ranks"] is not None else ""
    return (f"| {name} | {setup} | {stage} | {r['trainable']:,} | {r['step_s'] * 1e3:.0f} | "
            f"{r['train_bytes'] / MIB:.1f} | {r['load_bytes'] / MIB:.1f} | {r['loss']:.4f}{ranks} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 rank, 4 steps, LoRA and KronA/LoKr only")
    parser.add_argument("--world", type=int, help="CPU processes per run (default 2; 1 with --quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 10; 4 with --quick)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        setup, method, model_dir, steps, stage, out = args.worker
        worker(setup, method, model_dir, int(steps), int(stage), out)
        from peft_dist.distributed.env import exit_process

        exit_process(0)
    world = args.world or (1 if args.quick else 2)
    steps = args.steps or (4 if args.quick else 10)
    methods = ("lora", "krona") if args.quick else METHODS
    print(f"{SHAPE.layers}-layer Llama, hidden {SHAPE.hidden}, FFN {SHAPE.intermediate}; {world} CPU "
          f"process(es) per run (torchrun, gloo), bf16, micro-batch {MICRO} x {SEQ} tokens per rank, {steps} "
          f"steps, step time = median after {WARMUP_STEPS} warm-up steps; a peft setup that fails under ZeRO-3 "
          "is run again under ZeRO-2 (base not sharded)\n")
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_model(Path(tmp))
        print("| method | setup | ZeRO | trainable | step (ms) | train peak / rank (MiB) | load peak / rank (MiB) "
              "| held-out loss |")
        print("|---|---|---|---|---|---|---|---|")
        for method in methods:
            for setup in SETUPS:
                for stage in (3, 2):
                    r = results[method, setup] = run(setup, method, Path(tmp), steps, world, stage)
                    print(row(method, setup, stage, r), flush=True)
                    if "error" not in r or setup == "peft-dist":
                        break
    print()
    unsharded = [r["unsharded_int8"] for r in results.values() if r.get("unsharded_int8")]
    if unsharded:
        print(f"note: peft+bnb8: each rank holds {max(unsharded) / MIB:.1f} MiB of int8 weights in "
              "Linear8bitLt.state.CB, outside DeepSpeed's partitions (the whole int8 base)")
    for (method, setup), r in results.items():
        if r.get("live_ranks") is not None:
            matrices = len(TARGETS) * SHAPE.layers
            budget = adalora_schedule(steps)["target_r"] * matrices
            print(f"note: AdaLoRA {setup}: {r['live_ranks']} non-zero singular values in the fp32 master after "
                  f"training; the final budget is {budget} of {adalora_schedule(steps)['init_r'] * matrices}")
    for method in methods:
        ours = results[method, "peft-dist"]
        for setup in SETUPS[1:]:
            theirs = results[method, setup]
            label = f"{OURS_NAMES[method]} vs {setup} {PEFT_NAMES[method]}"
            if "error" in ours or "error" in theirs:
                print(f"ratio {label}: not available (a run failed)")
                continue
            print(f"ratio {label} (ZeRO-{theirs['stage']}): step time {ours['step_s'] / theirs['step_s']:.2f}x, "
                  f"train peak memory/rank {ours['train_bytes'] / theirs['train_bytes']:.2f}x, load peak "
                  f"{ours['load_bytes'] / theirs['load_bytes']:.2f}x; held-out loss {ours['loss']:.4f} vs {theirs['loss']:.4f}")


if __name__ == "__main__":
    main()
