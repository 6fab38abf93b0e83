"""AdaLoRA vs LoRA at the same initial rank: step-time overhead, and bytes communicated per mask step.

A 2-layer Llama with hidden size 1024 (int8 base, every decoder linear adapted) trains with AdamW on
CPU; LoRA and AdaLoRA steps are interleaved so both see the same machine load, and the median step
time of each is reported. AdaLoRA masks every step here (delta_t = 1, no warmup): its worst case.
The communication figures compare what peft-dist all-reduces per mask step (``4 * b0`` bytes) with
what gathering every adapter gradient whole needs (``safe_get_full_grad``, what peft does), for this
model and for LLaMA-7B with r0 = 12 on its 7 projections x 32 layers.

    python bench/adalora.py [--steps 12] [--rank 12] [--tokens 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_dist.adapters import inject_adapters
from peft_dist.adapters.registry import build_adapter_config
from peft_dist.distributed import importance
from peft_dist.distributed.hooks import make_hooks
from peft_dist.quant.model import quantize_model

D = 1024
LLAMA_7B = {"d": 4096, "ffn": 11008, "layers": 32}


def build(method: dict, steps: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=D, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    quantize_model(model)
    adapter = build_adapter_config(method, "adapters.0")
    inject_adapters(model, [adapter])
    hooks = make_hooks(model, [adapter], steps + 10)
    hook = hooks[0] if hooks else None
    params = [p for p in model.parameters() if p.requires_grad]
    return model, hook, params, torch.optim.AdamW(params, lr=1e-3)


def train_step(model, hook, optimizer, ids: torch.Tensor, step: int) -> tuple[float, float]:
    """One step as the trainer runs it (plain PyTorch: ``engine=None``); returns (step, hook) seconds."""
    began = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    hook_s = 0.0
    if hook is not None:
        t = time.perf_counter()
        loss = loss + hook.extra_loss(model)
        hook_s += time.perf_counter() - t
    loss.backward()
    t = time.perf_counter()
    if hook is not None:
        hook.before_step(None, step)
    hook_s += time.perf_counter() - t
    optimizer.step()
    t = time.perf_counter()
    if hook is not None:
        hook.after_step(None, step)
    hook_s += time.perf_counter() - t
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - began, hook_s


def llama7b_bytes(r0: int) -> tuple[int, int]:
    """(all-reduced bytes, full-gradient-gather bytes) per mask step for LLaMA-7B, fp32."""
    d, f = LLAMA_7B["d"], LLAMA_7B["ffn"]
    shapes = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]  # q, k, v, o, gate, up, down as (d_out, d_in)
    per_layer = sum(r0 * (d_out + d_in + 1) for d_out, d_in in shapes)
    return 4 * r0 * len(shapes) * LLAMA_7B["layers"], 4 * per_layer * LLAMA_7B["layers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method (after 2 warm-up)")
    parser.add_argument("--rank", type=int, default=12, help="LoRA r = AdaLoRA init_r")
    parser.add_argument("--tokens", type=int, default=256, help="sequence length of the single sequence")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lora = build({"method": "lora", "r": args.rank, "alpha": 16}, args.steps)
    adalora = build({"method": "adalora", "init_r": args.rank, "target_r": args.rank // 2, "alpha": 16,
                     "tinit": 0, "tfinal": 0, "delta_t": 1}, args.steps)
    ids = torch.randint(1, 512, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    times, hook_times = {"lora": [], "adalora": []}, []
    for step in range(1, args.steps + 3):
        for name, (model, hook, _, optimizer) in (("lora", lora), ("adalora", adalora)):
            seconds, hook_seconds = train_step(model, hook, optimizer, ids, step)
            if step > 2:
                times[name].append(seconds)
                if hook is not None:
                    hook_times.append(hook_seconds)
    lora_s, adalora_s = statistics.median(times["lora"]), statistics.median(times["adalora"])
    hook, params = adalora[1], [p for p, *_ in adalora[1].params()]
    print(f"d={D}, 2 layers, 7 linears each, int8 base, rank {args.rank}, {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"LoRA    step {lora_s * 1e3:8.1f} ms (median of {args.steps})")
    print(f"AdaLoRA step {adalora_s * 1e3:8.1f} ms (masking every step)")
    print(f"overhead     {adalora_s / lora_s:8.3f}x  (target <= 1.3x); the hook itself (regularizer, "
          f"importance, mask): {statistics.median(hook_times) * 1e3:.1f} ms/step")
    print(f"this model: all-reduce per mask step {4 * hook.b0:,} B (b0 = {hook.b0}); "
          f"full-gradient gather {importance.full_gather_bytes(params):,} B")
    reduced, gathered = llama7b_bytes(args.rank)
    print(f"LLaMA-7B, 7 x 32 matrices, r0 = {args.rank}: all-reduce {reduced:,} B; "
          f"full-gradient gather {gathered:,} B ({gathered / reduced:,.0f}x more)")


if __name__ == "__main__":
    main()
