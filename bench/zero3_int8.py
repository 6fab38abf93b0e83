"""ZeRO-3 int8 base vs a bf16 base, and our int8 LoRA layer vs peft LoRA on bitsandbytes' Linear8bitLt.

    python bench/zero3_int8.py            # (a) and (b) on 2 CPU ranks, (c) in this process

(a) all-gather bytes per training step under ZeRO-3, int8 base vs the same model in bf16 (target <= 0.5x);
(b) per-rank bytes of the frozen base (DeepSpeed's local partitions), int8 vs bf16 (target <= 0.55x);
(c) forward+backward time of one LoRA-adapted int8 linear, fp32 and bf16 activations: ours (the packed
    int8 kernel for bf16, the cast path for fp32; the input gradient in the forward's layout) vs the
    previous cast path and vs peft LoRA on ``bnb.nn.Linear8bitLt``, same shape and batch on CPU (targets:
    no slower than either).
(a) and (b) count what really happens: every ``all_gather_into_tensor`` is wrapped to add up its
output bytes, and (b) reads the engine's partitions with ``measured_model_state_bytes``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = 3
# A Llama with hidden 512 (4 layers, vocab 512), so that the linears, not the embeddings, are the base.
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8)


def write_bench_model(directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_dist.model import TINY_TOKENIZER, tiny_llama_config

    config = tiny_llama_config()
    for key, value in SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(directory)


def worker(variant: str, model_dir: str, out: str) -> None:
    """One rank: build the tiny Llama as the trainer does, count all-gather bytes over STEPS steps."""
    import deepspeed.comm.comm as deepspeed_comm

    from peft_dist.adapters import inject_adapters
    from peft_dist.train.config import load_config
    from peft_dist.data import GlobalBatchSampler, build_blocks
    from peft_dist.distributed.env import init_distributed, resolve_env
    from peft_dist.distributed.memory import measured_model_state_bytes
    from peft_dist.distributed.zero3 import build_ds_config
    from peft_dist.quant.loader import build_model
    from peft_dist.quant import quantize_model
    from peft_dist.train.step import train_step
    from peft_dist.train.trainer import build_engine

    overrides = ["deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0",
                 "train.precision=bf16", "model.dtype=bfloat16", f"model.name_or_path={model_dir}",
                 "train.micro_batch_size=2", "data.path=builtin:python-stdlib", "data.block_size=64",
                 "data.max_documents=60"]
    if variant == "bf16":
        overrides.append("quantization.enabled=false")
    cfg = load_config(None, overrides)
    env = resolve_env()
    init_distributed(env)
    model, tokenizer = build_model(cfg.model)
    if cfg.quantization.enabled:
        quantize_model(model, cfg.quantization.target_modules, model.dtype)
    inject_adapters(model, cfg.adapters)
    blocks = build_blocks(cfg.data, tokenizer)
    sampler = GlobalBatchSampler(len(blocks.train), cfg.train.micro_batch_size, 1, env.world_size, env.rank, 0)
    engine = build_engine(cfg, model, build_ds_config(cfg, env.world_size))
    backend = deepspeed_comm.cdb  # ZeRO-3 gathers through DeepSpeed's backend, which holds this function
    gathered = [0]
    original = backend.all_gather_function

    def counting(output_tensor, *args, **kwargs):
        gathered[0] += output_tensor.numel() * output_tensor.element_size()
        return original(output_tensor, *args, **kwargs)

    backend.all_gather_function = counting
    for step in range(1, STEPS + 1):
        train_step(engine, blocks.train, sampler.micro_batches(step - 1), [], step, env.rank)
    backend.all_gather_function = original
    state = measured_model_state_bytes(engine)
    linears = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for n, p in engine.module.named_parameters()
                  if not p.requires_grad and ".layers." in n and "_proj." in n)
    if env.rank == 0:
        Path(out).write_text(json.dumps({"allgather_bytes_per_step": gathered[0] / STEPS,
                                         "frozen_bytes_per_rank": state.frozen,
                                         "linear_bytes_per_rank": linears}))


def run_variant(variant: str, model_dir: Path) -> dict:
    from tests.multiproc import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        run_distributed([__file__, "--worker", variant, str(model_dir), str(out)], 2)
        return json.loads(out.read_text())


def time_layers(layers: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median forward+backward seconds of each layer on ``x`` (input gradient and adapter gradients), the
    layers timed in turn within each round so that machine load falls on all of them alike."""
    from deepspeed.accelerator import get_accelerator

    times: list[list[float]] = [[] for _ in layers]
    for _ in range(repeats):
        for layer, own in zip(layers, times):
            xi = x.detach().requires_grad_()
            get_accelerator().synchronize()  # on a GPU, time the kernels, not their launches
            began = time.perf_counter()
            layer(xi).float().sum().backward()
            get_accelerator().synchronize()
            own.append(time.perf_counter() - began)
    return [sorted(own)[len(own) // 2] for own in times]


class CastPath(torch.autograd.Function):
    """The int8 matmul before the packed kernel and the transposed backward (kept here as the baseline):
    cast the int8 weight, scale the product; backward ``(grad_y * scale) @ w8`` in the weight's layout."""

    @staticmethod
    def forward(ctx, x, w8, scale):
        ctx.save_for_backward(w8, scale)
        return (x @ w8.to(x.dtype).t()).mul_(scale.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        w8, scale = ctx.saved_tensors
        return (grad_y * scale.to(grad_y.dtype)) @ w8.to(grad_y.dtype), None, None


class PreviousPath(torch.nn.Module):
    """The same LoRA-adapted int8 linear (same tensors) through ``CastPath``."""

    def __init__(self, adapted: torch.nn.Module) -> None:
        super().__init__()
        self.adapted = adapted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.adapted.base
        return CastPath.apply(x, base.weight, base.weight_scale) + self.adapted.deltas["lora"](x)


def layer_step_times(dtype: torch.dtype, d: int = 2048, tokens: int = 512) -> tuple[float, float, float]:
    """(ours, the previous cast path, peft on Linear8bitLt) for one d x d linear with LoRA r=8 on CPU."""
    import bitsandbytes as bnb
    import peft

    from peft_dist.adapters.base import AdaptedLinear
    from peft_dist.adapters.lora import LoraDelta
    from peft_dist.quant import quantize_linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(d, d, bias=False)
    ours = AdaptedLinear(quantize_linear(dense, dtype))
    ours.add_delta("lora", LoraDelta(d, d, r=8, alpha=16).to(dtype))
    previous = PreviousPath(ours)

    int8 = bnb.nn.Linear8bitLt(d, d, bias=False, has_fp16_weights=False, threshold=0.0)
    int8.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    int8 = int8.to("cpu")  # quantizes on placement
    holder = torch.nn.Sequential()
    holder.add_module("proj", int8)
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])).to(dtype)
    x = torch.randn(tokens, d, dtype=dtype)
    repeats = 15 if dtype == torch.float32 else 5  # the previous bf16 backward takes many seconds a step
    time_layers([ours, previous, theirs], x, 1)  # warm-up
    return tuple(time_layers([ours, previous, theirs], x, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # variant, model dir, output file
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_model(Path(tmp))
        int8, bf16 = run_variant("int8", Path(tmp)), run_variant("bf16", Path(tmp))
    times = {dtype: layer_step_times(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"(a) all-gather bytes / step, ZeRO-3, 2 ranks: int8 {int8['allgather_bytes_per_step']:,.0f}  "
          f"bf16 {bf16['allgather_bytes_per_step']:,.0f}")
    print(f"(b) frozen base bytes / rank: int8 {int8['frozen_bytes_per_rank']:,.0f}  "
          f"bf16 {bf16['frozen_bytes_per_rank']:,.0f}  (decoder linears alone: int8 "
          f"{int8['linear_bytes_per_rank']:,.0f}, bf16 {bf16['linear_bytes_per_rank']:,.0f})")
    for dtype, (ours, previous, theirs) in times.items():
        print(f"(c) LoRA r=8 on an int8 2048x2048 linear, 512 tokens, {str(dtype)[6:]}, fwd+bwd: ours "
              f"{ours * 1e3:.2f} ms  previous cast path {previous * 1e3:.2f} ms  peft+Linear8bitLt {theirs * 1e3:.2f} ms")
    print(f"ratio (a) all-gather int8/bf16: {int8['allgather_bytes_per_step'] / bf16['allgather_bytes_per_step']:.3f}"
          " (target <= 0.5)")
    print(f"ratio (b) base memory int8/bf16: {int8['frozen_bytes_per_rank'] / bf16['frozen_bytes_per_rank']:.3f}"
          f" (target <= 0.55); linears alone {int8['linear_bytes_per_rank'] / bf16['linear_bytes_per_rank']:.3f}")
    for dtype, (ours, previous, theirs) in times.items():
        print(f"ratio (c) {str(dtype)[6:]} step time ours/peft: {ours / theirs:.3f} (target <= 1.0), "
              f"ours/previous path: {ours / previous:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
