"""Adapter overhead on CPU: forward+backward time of each method's own contribution, against the frozen
base layer, and KronA against peft's LoKr at the same factor shapes.

For d = 1024 and 4096 and 512 tokens, each case is one forward plus one backward (gradients for the
adapter's parameters and the input; the frozen base gets only the input gradient, as in training). The
unit is the frozen ``d x d`` linear layer; a sub-layer adapter's ratio is relative to that one linear, not
to its whole sub-layer. Prefix tuning's cost is shown as a causal attention over the 512 tokens (heads
of 128) with and without 30 prepended prefix keys and values. Cases are interleaved round-robin
so they share the machine's load, and the minimum over the repeats is reported: on a shared CPU the
fastest run is the one least disturbed by other processes. One thread by default, so that other load does
not stall a multi-threaded GEMM (``--threads`` to change it).

    python bench/adapters.py [--dims 1024 4096] [--tokens 512] [--repeat 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from peft_dist.adapters.bottleneck import Bottleneck, KronaBlock
from peft_dist.adapters.krona import KronaDelta, balanced_factors
from peft_dist.adapters.lora import LoraDelta

PREFIX_LENGTH = 30
HEAD_DIM = 128


def fwd_bwd(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        y = module(x)
        y.backward(torch.ones_like(y))
    return run


def randomized(module: nn.Module) -> nn.Module:
    """Non-zero values in the trainable tensors, as after some training (the frozen base keeps its own)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return module


def peft_lokr(d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """peft's LoKr delta path (``get_delta_weight`` builds ``kron(w1, w2)``, then ``F.linear``) with full
    factors of the same balanced shapes as KronA."""
    from peft import LoKrConfig, get_peft_model

    holder = nn.Module()
    holder.proj = nn.Linear(d, d, bias=False)
    b = balanced_factors(d)[1]
    model = get_peft_model(holder, LoKrConfig(r=b, alpha=b, target_modules=["proj"]))
    layer = randomized(model.base_model.model.proj)
    assert "default" in layer.lokr_w1 and "default" in layer.lokr_w2  # full factors, no low-rank split
    return lambda x: layer._get_delta_activations("default", x)


def attention(d: int, tokens: int, prefix: bool) -> Callable[[], None]:
    heads = d // HEAD_DIM
    q, k, v = (torch.randn(1, heads, tokens, HEAD_DIM, requires_grad=True) for _ in range(3))
    extra = PREFIX_LENGTH if prefix else 0
    pk, pv = (torch.randn(heads, extra, HEAD_DIM, requires_grad=True) for _ in range(2))
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    mask = F.pad(causal, (extra, 0), value=True)

    def run() -> None:
        keys = torch.cat([pk[None], k], dim=2)
        values = torch.cat([pv[None], v], dim=2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y.backward(torch.ones_like(y))
    return run


def cases(d: int, tokens: int) -> dict[str, Callable[[], None]]:
    x = torch.randn(tokens, d, requires_grad=True)
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    a1, _ = balanced_factors(d)
    return {
        "frozen base linear": fwd_bwd(base, x),
        "lora r=8": fwd_bwd(randomized(LoraDelta(d, d, 8, 16.0)), x),
        f"krona {a1}x{a1} (ours)": fwd_bwd(randomized(KronaDelta(d, d, a1, a1, 1.0)), x),
        f"peft LoKr {a1}x{a1}": fwd_bwd(peft_lokr(d), x),
        "parallel/sequential adapter r=64": fwd_bwd(randomized(Bottleneck(d, 64)), x),
        "MAM FFN adapter r=512": fwd_bwd(randomized(Bottleneck(d, 512, scale=4.0)), x),
        "krona_block (res)": fwd_bwd(randomized(KronaBlock(d, a1, a1, 1.0, residual=True)), x),
        "attention (causal, heads of 128)": attention(d, tokens, prefix=False),
        f"attention + prefix l={PREFIX_LENGTH}": attention(d, tokens, prefix=True),
    }


def measure(runs: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeat + 2):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            if round_ >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - began)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.tokens} tokens, "
          f"min of {args.repeat}\n")
    print("| d | case | fwd+bwd ms | / frozen base linear |")
    print("|---|---|---|---|")
    for d in args.dims:
        t = measure(cases(d, args.tokens), args.repeat)
        base = t["frozen base linear"]
        for name, seconds in t.items():
            print(f"| {d} | {name} | {seconds * 1e3:.2f} | {seconds / base:.3f} |")
        with_prefix = t[f"attention + prefix l={PREFIX_LENGTH}"] / t["attention (causal, heads of 128)"]
        print(f"| {d} | **prefix l={PREFIX_LENGTH}: attention time with / without** | | **{with_prefix:.2f}x** |")
        a1 = balanced_factors(d)[0]
        krona, lokr, lora = t[f"krona {a1}x{a1} (ours)"], t[f"peft LoKr {a1}x{a1}"], t["lora r=8"]
        print(f"| {d} | **KronA speed-up over peft LoKr** | | **{lokr / krona:.1f}x** |")
        print(f"| {d} | **KronA overhead / LoRA r=8 overhead** | | **{krona / lora:.2f}x** |")


if __name__ == "__main__":
    main()
