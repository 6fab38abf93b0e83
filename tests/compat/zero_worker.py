"""ZeRO compatibility-matrix cells, all in one process group (run by test_compat_matrix.py and
``python -m tests.compat``).

Every rank runs, for every registered method and each (base, ZeRO stage) column of ``COLUMNS`` (each cell
builds its own engine; the bases: int8 or NF4 weights with fp32 training, or a bf16 base with bf16
training), a short real training job through ``peft_dist.train.trainer.train``. Rank 0 then
reloads the saved adapter onto a fresh base in-process and evaluates the same eval blocks, and writes one
JSON record per cell to ``--out``/zero_cells.json. A cell that raises is recorded with its error (every rank raises the
same configuration or shape error, so the group stays in step).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from peft_dist.adapters.registry import methods
from peft_dist.train.config import build_run_config
from peft_dist.data import build_blocks
from peft_dist.distributed.env import exit_process, resolve_env
from peft_dist.model import max_positions
from peft_dist.inference import load_for_inference
from peft_dist.train.trainer import train
from peft_dist.train.step import evaluate

STEPS = 6
# Small settings for the tiny Llama (hidden 64, FFN 176); a method not listed runs with its defaults.
SETTINGS = {
    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "adalora": {"init_r": 8, "target_r": 4, "alpha": 32, "tinit": 2, "tfinal": 1, "target_modules": "all-linear"},
    "krona": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    "parallel_adapter": {"r": 16, "scale": 4.0},
    "sequential_adapter": {"r": 16, "placement": "houlsby"},
    "krona_block": {"residual": True},
    "prefix": {"length": 8, "hidden": 64},
    "mam": {"prefix_length": 8, "r": 16, "scale": 2.0, "reparameterize": False},  # prefix above covers the MLP
    "bitfit": {"norm": True},
}
BASES = {
    "int8": {"model": {"dtype": "float32"}, "quantization": {"enabled": True}, "precision": "fp32"},
    "bf16": {"model": {"dtype": "bfloat16"}, "quantization": {"enabled": False}, "precision": "bf16"},
    "nf4": {"model": {"dtype": "float32"}, "quantization": {"enabled": True, "bits": 4}, "precision": "fp32"},
}
# (base, ZeRO stage) columns. NF4 runs on ZeRO-3 only, where its packed bytes and absmax are partitioned and
# gathered; ZeRO-2 keeps every tensor whole, which the int8 and bf16 columns already cover.
COLUMNS = (("int8", 2), ("int8", 3), ("bf16", 2), ("bf16", 3), ("nf4", 3))
RELOAD_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # relative eval-loss gap after reloading the adapter


def write_corpus(path: Path) -> Path:
    """A small, very learnable text (rotations of one word cycle), so a few steps show the loss falling
    for every method; reading the standard library would cost seconds per cell. Every rank may write it:
    each writes a file of its own and renames it over ``path``, so readers only ever see a whole file."""
    words = "the cat sat on a mat and the dog ran to the red door while birds sang".split()
    paragraphs = [" ".join(words[(start + j) % len(words)] for j in range(60))
                  for start in (i * 7 % len(words) for i in range(120))]
    path.parent.mkdir(parents=True, exist_ok=True)
    own = path.with_name(f".{path.name}.{os.getpid()}")
    own.write_text("\n\n".join(paragraphs) + "\n")
    os.replace(own, path)
    return path


def cell_config(method: str, base: str, stage: int, out: Path, corpus: Path) -> dict:
    zero = {"zero_stage": stage, "overrides": {}}
    if stage == 3:  # partition even the tiny layers, so every parameter is really gathered
        zero["overrides"] = {"zero_optimization.stage3_param_persistence_threshold": 0}
    return {
        "model": {"name_or_path": "builtin:tiny-llama", **BASES[base]["model"]},
        "quantization": BASES[base]["quantization"],
        "adapters": [{"method": method, **SETTINGS.get(method, {})}],
        "data": {"path": str(corpus), "block_size": 64},
        "train": {"max_steps": STEPS, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "eval_batches": 2,
                  "log_interval": STEPS, "precision": BASES[base]["precision"]},
        "deepspeed": zero, "tracking": {"backend": "none"},
        "checkpoint": {"output_dir": str(out / f"stage{stage}-{method}-{base}"), "overwrite": True},
    }


@torch.no_grad()
def eval_loss(model: torch.nn.Module, tokenizer, cfg) -> float:
    """The trainer's eval (first ``eval_batches`` micro-batches of the eval split) in this one process."""
    blocks = build_blocks(cfg.data, tokenizer, max_positions(model.config))
    return evaluate(model, blocks.eval, cfg.train.micro_batch_size, cfg.train.eval_batches)


def run_cell(method: str, base: str, stage: int, out: Path, corpus: Path) -> dict:
    record = {"method": method, "base": base, "stage": stage}
    began = time.perf_counter()
    try:
        cfg = build_run_config(cell_config(method, base, stage, out, corpus))
        result = train(cfg)
        record.update(losses=result.losses, first_loss=result.losses[0], last_loss=result.losses[-1],
                      eval_loss=result.eval_loss)
        record["loss_fell"] = result.losses[-1] < result.losses[0]
        if resolve_env().rank == 0:
            reloaded = eval_loss(*load_for_inference(result.adapter_dir), cfg)
            record["reloaded_eval_loss"] = reloaded
            gap = abs(reloaded - result.eval_loss) / result.eval_loss
            record["round_trip"] = gap <= RELOAD_TOLERANCE[cfg.train.precision]
        torch.distributed.barrier()
    except Exception as err:  # recorded as the cell's reason
        lines = [line for line in str(err).splitlines() if line.strip()] or [""]
        record["error"] = f"{type(err).__name__}: {lines[0][:300]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.perf_counter() - began, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    corpus = write_corpus(out / "zero_corpus.txt")
    records = [run_cell(method, base, stage, out, corpus) for base, stage in COLUMNS
               for method in (args.methods or sorted(methods()))]
    if resolve_env().rank == 0:
        (out / "zero_cells.json").write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
    exit_process(0)
