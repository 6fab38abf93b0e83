"""The 4-bit (NF4) frozen base against int8 and bf16: per-rank bytes and the step time of one layer.

    python bench/nf4.py

(a) per-rank bytes of the frozen base of a Llama-7B shape (from its config on the meta device: the layers
    the trainer builds, counted as ZeRO-3 partitions them, persistence threshold 0), as ratios of the bf16
    base (target: 4-bit <= 0.3x);
(b) forward + backward time (input gradient only, as in training) of one frozen 2048 x 2048 linear on 512
    tokens: 4-bit NF4 and int8 against a dense linear in the activations' dtype, fp32 and bf16, as ratios.
Prints the CPU's avx2 / avx512 / amx flags: compare ratios within one run, not times across machines.

    python bench/nf4.py --device cuda     # (b) only, on a GPU: bf16 and fp16, the 1B bench's linear shapes
                                          # and 2048 tokens, with bitsandbytes' Linear8bitLt and Linear4bit

On a GPU, (b) adds bitsandbytes' own layers (its int8 and 4-bit kernels) as candidates for the int8 and
4-bit paths: the layer to choose is the fastest one there.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from peft_dist.config.schema import QuantizationConfig  # noqa: E402
from peft_dist.plan.dryrun import meta_inventory  # noqa: E402
from peft_dist.plan.inventory import per_rank  # noqa: E402
from peft_dist.plan.models import PRESETS, hf_config  # noqa: E402
from peft_dist.quant import quantize_linear  # noqa: E402
from peft_dist.train.preflight import meta_model  # noqa: E402
from zero3_int8 import time_layers  # noqa: E402  (bench/ is on the path when run as a script)

BASES = {"bf16": None, "int8": QuantizationConfig(), "nf4": QuantizationConfig(bits=4),
         "nf4 + double quant": QuantizationConfig(bits=4, double_quant=True)}
WORLDS = (1, 8)


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return " ".join(sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*)\b", text)))) or "none"


def base_bytes(quant: QuantizationConfig | None, world: int) -> tuple[int, int]:
    """(frozen base bytes on one of ``world`` ZeRO-3 ranks, of which the decoder linears) for Llama-7B."""
    model = meta_model(hf_config(PRESETS["llama-7b"], "bfloat16"), [], "all-linear" if quant else None,
                       "bfloat16", quant)
    inventory = meta_inventory(model)
    linears = [t for t in inventory if re.search(r"_proj\.", t.name)]
    return per_rank(inventory, world, 0).frozen, per_rank(linears, world, 0).frozen


def bitsandbytes_layers(dense: torch.nn.Linear, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    """bitsandbytes' frozen int8 (threshold 0: no fp16 outlier columns, our scheme) and NF4 layers holding
    ``dense``'s weight, quantized by placement on ``device``."""
    import bitsandbytes as bnb

    out_features, in_features = dense.weight.shape
    int8 = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=0.0)
    int8.weight = bnb.nn.Int8Params(dense.weight.data.float().cpu(), requires_grad=False, has_fp16_weights=False)
    nf4 = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype).cpu(), requires_grad=False, quant_type="nf4")
    return {"bnb int8": int8.to(device), "bnb nf4": nf4.to(device)}


def layer_times(dtype: torch.dtype, d_in: int = 2048, d_out: int = 2048, tokens: int = 512,
                device: str = "cpu") -> dict[str, float]:
    """Median fwd+bwd seconds of a dense, an int8 and an NF4 frozen linear on ``tokens`` x ``d_in``; on a GPU
    also bitsandbytes' int8 and NF4 layers."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype).requires_grad_(False)
    layers = {"dense": dense, "int8": quantize_linear(dense, dtype),
              "nf4": quantize_linear(dense, dtype, QuantizationConfig(bits=4))}
    layers = {name: layer.to(device) for name, layer in layers.items()}
    if device != "cpu":
        layers.update(bitsandbytes_layers(dense, dtype, device))
    x = torch.randn(tokens, d_in, dtype=dtype, device=device)
    time_layers(list(layers.values()), x, 1)  # warm-up
    # A plain bf16 linear's backward takes seconds on a CPU without native bf16: fewer rounds there.
    times = time_layers(list(layers.values()), x, 9 if dtype == torch.float32 or device != "cpu" else 3)
    return dict(zip(layers, times))


def device_layers(device: str) -> None:
    """(b) on an accelerator: the 1B bench's linear shapes (hidden 2048, FFN 5632) on 2048 tokens."""
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else device}")
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for d_in, d_out in ((2048, 2048), (2048, 5632), (5632, 2048)):
            times = layer_times(dtype, d_in, d_out, 2048, device)
            print(f"(b) frozen {d_out}x{d_in} linear, 2048 tokens, {name}, fwd+bwd: "
                  + "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()))
            print(f"ratio (b) {name} {d_out}x{d_in}: " + "  ".join(
                f"{k}/dense {v / times['dense']:.2f}" for k, v in times.items() if k != "dense"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="(b) only, on this accelerator (cuda): the 1B bench's linear shapes, "
                                         "with bitsandbytes' own layers as candidates")
    args = parser.parse_args()
    if args.device:
        device_layers(args.device)
        return
    torch.set_num_threads(1)
    print(f"cpu flags: {cpu_flags()}; torch threads: {torch.get_num_threads()}")
    measured = {world: {name: base_bytes(quant, world) for name, quant in BASES.items()} for world in WORLDS}
    for world, bases in measured.items():
        bf16, bf16_linears = bases["bf16"]
        for name, (held, linears) in bases.items():
            print(f"(a) llama-7b frozen base per rank, N={world}: {name:<18} {held / 2**30:7.3f} GiB "
                  f"= {held / bf16:.3f}x bf16 (decoder linears alone {linears / bf16_linears:.3f}x)")
    for dtype in (torch.float32, torch.bfloat16):
        times = layer_times(dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"(b) frozen 2048x2048 linear, 512 tokens, {name}, fwd+bwd: "
              + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))
        print(f"ratio (b) {name}: nf4/dense {times['nf4'] / times['dense']:.2f}  int8/dense "
              f"{times['int8'] / times['dense']:.2f}  nf4/int8 {times['nf4'] / times['int8']:.2f}")
    one = {name: held / measured[1]["bf16"][0] for name, (held, _) in measured[1].items()}
    print(f"ratio (a) 4-bit base / bf16 base: nf4 {one['nf4']:.3f}, nf4 + double quant "
          f"{one['nf4 + double quant']:.3f} (target <= 0.3); int8 {one['int8']:.3f}")

if __name__ == "__main__":
    main()
