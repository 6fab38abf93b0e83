"""One-rank jobs on this machine's accelerator (run by tests/gpu/test_gpu.py, NCCL on a GPU, gloo on the CPU),
with every ``torch.distributed`` collective checked to receive tensors on that device.

For each precision asked: every method trains a few steps of ZeRO-3 on the int8 tiny Llama; AdaLoRA stops
after a checkpoint and resumes (its masks and importance travel through the checkpoint); the LoRA run is
tracked in a local MLflow store, generated from and exported. Then a checkpoint is loaded under ZeRO-3 as int8
and NF4, quantized on the device. Writes ``OUT/gpu.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM

from peft_dist.adapters.registry import methods
from peft_dist.config.schema import ModelConfig, QuantizationConfig
from peft_dist.distributed.env import exit_process
from peft_dist.export import export
from peft_dist.generate import generate
from peft_dist.inference import load_for_inference
from peft_dist.model import tiny_llama_config
from peft_dist.quant.loader import load_quantized_base
from peft_dist.quant.model import quantize_model
from peft_dist.train.config import build_run_config
from peft_dist.train.trainer import train
from tests.collectives import collectives_on
from tests.compat.zero_worker import SETTINGS, write_corpus

STEPS = 4


def job(method: str, precision: str, out: Path, corpus: Path, **checkpoint) -> dict:
    return {"model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32" if precision == "fp32" else "bfloat16"},
            "adapters": [{"method": method, **SETTINGS.get(method, {})}],
            "data": {"path": str(corpus), "block_size": 64},
            "train": {"max_steps": STEPS, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "eval_batches": 2,
                      "log_interval": 1, "precision": precision},
            "deepspeed": {"zero_stage": 3, "overrides": {"zero_optimization.stage3_param_persistence_threshold": 0}},
            "tracking": {"backend": "none"},
            "checkpoint": {"output_dir": str(out / f"{precision}-{method}"), "overwrite": True, **checkpoint}}


def every_method(precision: str, out: Path, corpus: Path) -> dict:
    runs = {}
    for method in sorted(methods()):
        result = train(build_run_config(job(method, precision, out, corpus)))
        runs[method] = {"losses": result.losses, "eval_loss": result.eval_loss}
    return runs


def adalora_resumed(precision: str, out: Path, corpus: Path) -> list[float]:
    """AdaLoRA stopped after step 2 with a checkpoint, then resumed to the end: its step losses."""
    cfg = job("adalora", precision, out / "resumed", corpus, exit_interval=2)
    first = train(build_run_config(cfg))
    cfg["checkpoint"].update(overwrite=False, resume=True, exit_interval=0)
    return first.losses + train(build_run_config(cfg)).losses


def tracked_lora(precision: str, out: Path, corpus: Path) -> dict:
    """LoRA tracked in a local MLflow store; then generate and a merged export, both on this device."""
    cfg = job("lora", precision, out / "tracked", corpus)
    cfg["tracking"] = {"backend": "mlflow", "uri": f"sqlite:///{out / 'mlflow.db'}"}
    result = train(build_run_config(cfg))
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    text = generate(result.adapter_dir, "the cat", max_new_tokens=8)
    merged = AutoModelForCausalLM.from_pretrained(export(result.adapter_dir, out / f"merged-{precision}"))
    adapted, _ = load_for_inference(result.adapter_dir)
    ids = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max().item()
    return {"metrics": sorted(run.data.metrics), "generated": text, "export_gap": gap}


def loaded_on_the_device(out: Path) -> dict:
    """A saved checkpoint streamed in under ZeRO-3 as int8 and as NF4 (the loader quantizes on the rank's
    accelerator): where it quantized, and for each parameter the fraction of its elements equal to quantizing the
    same weights on the CPU."""
    import deepspeed

    directory = out / "checkpoint"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(directory)
    zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    loaded = {}
    for quant in (QuantizationConfig(), QuantizationConfig(bits=4, double_quant=True)):
        model, report = load_quantized_base(ModelConfig(name_or_path=str(directory)), quant, zero3)
        want = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        quantize_model(want, "all-linear", torch.float32, quant)
        expected, same = dict(want.named_parameters()), {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                same[name] = (param.data.cpu() == expected[name].data).double().mean().item()
        loaded[quant.bits] = {"quantized_on": report.quantized_on, "same": same}
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--precisions", nargs="+", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    corpus = write_corpus(out / "corpus.txt")
    device = get_accelerator().current_device_name()
    record = {"device": device}
    with collectives_on(device):
        for precision in args.precisions:
            record[precision] = {"methods": every_method(precision, out, corpus),
                                 "adalora_resumed": adalora_resumed(precision, out, corpus),
                                 "tracked": tracked_lora(precision, out, corpus)}
        record["loaded"] = loaded_on_the_device(out)
    (out / "gpu.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
    exit_process(0)
