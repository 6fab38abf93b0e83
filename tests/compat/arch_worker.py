"""Every adapter method on every architecture of ``tests/architectures.py`` (or those ``--archs`` names), end to
end, in one process.

Each cell is a real job through ``peft_dist.train.trainer.train`` (world size 1, DeepSpeed ZeRO-3 with every
parameter partitioned, int8 base, fp32), on a local checkpoint written by ``save_pretrained``:

1. the CLI's pre-flight check (a meta-device build of the adapted model); a refusal is the cell's verdict;
2. the loss of step 1 against the base's loss on the same batch (equal for methods that start as a no-op);
3. the saved adapter, reloaded with ``load_for_inference``, lowers the eval loss below the base's and
   changes the logits of a probe batch (so an adapter that silently stopped applying, e.g. a prefix that
   never reaches the attention, fails);
4. for weight-space methods, the merged export loaded with plain transformers against ``load_for_inference``.

Run by tests/distributed/test_compat_matrix.py and by ``python -m tests.compat``; writes ``arch_cells.json``.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from peft_dist.adapters.registry import methods
from peft_dist.train.config import build_run_config
from peft_dist.config.schema import ConfigError
from peft_dist.data import GlobalBatchSampler, build_blocks
from peft_dist.distributed.env import exit_process
from peft_dist.export import ExportError, export
from peft_dist.model import load_tokenizer, max_positions
from peft_dist.quant.loader import load_quantized_base
from peft_dist.inference import load_for_inference
from peft_dist.train.preflight import preflight
from peft_dist.train.trainer import train
from peft_dist.train.step import forward_loss
from tests.architectures import ARCHITECTURES, write_checkpoint
from tests.compat.zero_worker import eval_loss, write_corpus

STEPS = 3
# Settings that hold on every architecture (hidden 64, FFN 176); a method not listed runs with its defaults.
SETTINGS = {
    "adalora": {"init_r": 8, "target_r": 4, "alpha": 32, "tinit": 1, "tfinal": 1},
    "bitfit": {"norm": True},
    "mam": {"prefix_length": 4, "hidden": 32, "r": 16, "scale": 2.0},
    "parallel_adapter": {"r": 16, "scale": 4.0},
    "prefix": {"length": 4, "hidden": 32},
    "sequential_adapter": {"r": 16, "placement": "houlsby"},
}
NOT_NOOP_AT_INIT = {"prefix", "mam"}  # random prefix vectors change the model from the start
STEP0_RTOL = 1e-5  # step-1 loss vs the base's loss on the same batch
EXPORT_ATOL = 1e-4  # merged export vs load_for_inference, logits
PROBE = torch.randint(1, 500, (2, 16), generator=torch.Generator().manual_seed(7))


def cell_config(arch: str, method: str, checkpoint: Path, corpus: Path, out: Path) -> dict:
    return {
        "model": {"name_or_path": str(checkpoint)},
        "adapters": [{"method": method, **SETTINGS.get(method, {})}],
        "data": {"path": str(corpus), "block_size": 32},
        "train": {"max_steps": STEPS, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "eval_batches": 2,
                  "log_interval": STEPS},
        "deepspeed": {"zero_stage": 3, "overrides": {"zero_optimization.stage3_param_persistence_threshold": 0}},
        "tracking": {"backend": "none"},
        "checkpoint": {"output_dir": str(out / f"{arch}-{method}"), "overwrite": True},
    }


@torch.no_grad()
def first_step_loss(base: torch.nn.Module, tokenizer, cfg) -> float:
    """The loss on the batch the trainer's first step trains on (world size 1, one micro-batch)."""
    blocks = build_blocks(cfg.data, tokenizer, max_positions(base.config))
    sampler = GlobalBatchSampler(len(blocks.train), cfg.train.micro_batch_size, 1, 1, 0, cfg.data.seed)
    (batch,) = sampler.micro_batches(0)
    return forward_loss(base, blocks.train.batch(batch)).item()


@torch.no_grad()
def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=PROBE).logits.float()


def run_cell(arch: str, method: str, checkpoint: Path, corpus: Path, out: Path) -> dict:
    record: dict = {"arch": arch, "method": method}
    began = time.perf_counter()
    try:
        cfg = build_run_config(cell_config(arch, method, checkpoint, corpus, out))
        try:
            preflight(cfg)
        except ConfigError as err:
            record["refused"] = str(err)
            return record
        base, _ = load_quantized_base(cfg.model, cfg.quantization)
        tokenizer = load_tokenizer(cfg.model.name_or_path)
        record.update(base_loss=first_step_loss(base, tokenizer, cfg), base_eval_loss=eval_loss(base, tokenizer, cfg))
        result = train(cfg)
        record.update(first_loss=result.losses[0], last_loss=result.losses[-1])
        record["step0_equal"] = abs(result.losses[0] - record["base_loss"]) <= STEP0_RTOL * record["base_loss"]
        adapted, _ = load_for_inference(result.adapter_dir)
        record["eval_loss"] = eval_loss(adapted, tokenizer, cfg)
        reloaded = probe_logits(adapted)
        record["adapter_effect"] = (reloaded - probe_logits(base)).abs().max().item()
        try:
            merged = AutoModelForCausalLM.from_pretrained(export(result.adapter_dir, out / f"{arch}-{method}-merged"))
            record["export_gap"] = (probe_logits(merged) - reloaded).abs().max().item()
        except ExportError as err:
            record["export_refused"] = str(err)
    except Exception as err:  # recorded as the cell's reason
        lines = [line for line in str(err).splitlines() if line.strip()] or [""]
        record["error"] = f"{type(err).__name__}: {lines[0][:300]}"
        record["traceback"] = traceback.format_exc()[-3000:]
    finally:
        record["seconds"] = round(time.perf_counter() - began, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--archs", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    corpus = write_corpus(out / "corpus.txt")
    records = []
    for arch in args.archs:
        checkpoint = write_checkpoint(arch, out / "checkpoints" / arch)
        records += [run_cell(arch, method, checkpoint, corpus, out) for method in (args.methods or sorted(methods()))]
    (out / "arch_cells.json").write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
    exit_process(0)
