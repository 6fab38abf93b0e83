"""Export a trained adapter for ordinary serving tools.

    python -m peft_dist.export runs/tiny-lora/adapter --out exports/tiny-lora            # merged model
    python -m peft_dist.export runs/tiny-lora/adapter --out exports/tiny-lora-peft --format peft

``merged``: the adapters folded into the dequantized base, written as a standard Hugging Face model
directory (weights + config + tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads with no
peft-dist installed; zero inference overhead. Only weight-space methods merge (LoRA, AdaLoRA, KronA,
BitFit); the others change the computation and need peft-dist at inference.
``peft``: ``OUT/base`` (the dequantized base, unmerged) and ``OUT/adapter`` in the ``peft`` library's
LoRA format, for ``peft.PeftModel.from_pretrained(base, OUT/adapter)`` (one LoRA adapter only).

Both stream: the weights are written tensor by tensor into safetensors shards (``--max-shard-size``), so
the export holds the quantized model, one layer in float32 and one shard, never a float copy of the model.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from peft_dist.adapters.base import AdaptedLinear, AdapterModule, dense_weight
from peft_dist.adapters.lora import LoraDelta
from peft_dist.config.load import build_dataclass
from peft_dist.config.schema import ConfigError, ModelConfig
from peft_dist.inference import load_for_inference
from peft_dist.model import DTYPES
from peft_dist.targets import QuantizedEmbedding, QuantizedLinear
from peft_dist.tracking.offline import record_export
from peft_dist.train.checkpoint import CheckpointError, read_metadata


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format; the message says why and what to do."""


def check_mergeable(model: nn.Module) -> None:
    """Refuse adapters that are modules in the forward path (prefix, bottleneck, KronA^B)."""
    in_linears = {id(d) for m in model.modules() if isinstance(m, AdaptedLinear) for d in m.deltas.values()}
    blocking = sorted(name for name, m in model.named_modules()
                      if isinstance(m, AdapterModule) and id(m) not in in_linears)
    if blocking:
        raise ExportError(f"{blocking[0]} is an adapter in the forward path, not a weight update, so it cannot be "
                          "merged into a plain transformers model; serve it with peft-dist "
                          "(peft_dist.inference.load_for_inference) or export a weight-space method")


def _dense_weight(module: nn.Module, merge: bool, name: str) -> torch.Tensor:
    """The ``(d_out, d_in)`` float32 weight of a quantized or adapted linear, with every delta folded in when
    ``merge`` (each must be mergeable) or none of them."""
    base = module.base if isinstance(module, AdaptedLinear) else module
    weight = dense_weight(base).detach().float().clone()
    for delta_name, delta in (module.deltas.items() if merge and isinstance(module, AdaptedLinear) else ()):
        if not delta.mergeable:
            raise ExportError(f"adapter {delta_name!r} on {name} cannot be merged into a weight")
        weight += delta.delta_weight().detach().float()
    return weight


def remember(store: dict[str, torch.Tensor], key: str, value: torch.Tensor, keep: bool) -> torch.Tensor:
    if keep:
        store[key] = value
    return value


@torch.no_grad()
def dense_tensors(adapted: nn.Module, plain: nn.Module, merge: bool,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor in dtype, untied)`` for every tensor of the plain transformers model ``plain`` (a meta
    skeleton: names, ``Conv1D`` layouts, ties), one at a time: quantized and adapted linears dequantized (with
    their deltas when ``merge``), quantized embeddings dequantized, every other parameter and buffer as the
    adapted model holds it (BitFit's trained biases included). ``untied`` marks a linear tied to another
    tensor (a tied ``lm_head``) whose merged weight differs from it: it is written with its own weight."""
    plain_modules = dict(plain.named_modules())
    plain_state = plain.state_dict(keep_vars=True)
    owners = {id(t): n for n, t in reversed(list(plain_state.items()))}  # tied tensors: their first name
    tied = Counter(owners[id(t)] for t in plain_state.values())
    written: dict[str, torch.Tensor] = {}  # what was written under a name other tensors are tied to
    inside = None  # the module whose tensors were just written whole (a linear) or are skipped (an adapter)
    for name, module in adapted.named_modules():
        if inside and name.startswith(inside):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, (AdaptedLinear, QuantizedLinear)):
            inside = prefix
            weight = _dense_weight(module, merge, name)
            weight = weight.t() if isinstance(plain_modules[name], Conv1D) else weight
            key, tied_to = prefix + "weight", owners[id(plain_state[prefix + "weight"])]
            untied = tied_to != key and not torch.equal(written[tied_to], weight.to(dtype))
            if tied_to == key or untied:
                yield key, remember(written, key, weight.to(dtype), tied[key] > 1), untied
            bias = (module.base if isinstance(module, AdaptedLinear) else module).bias
            if bias is not None:
                yield prefix + "bias", bias.detach().to(dtype), False
            continue
        if isinstance(module, AdapterModule):
            inside = prefix
            continue
        if isinstance(module, QuantizedEmbedding):  # never tied (quantize_model refuses a shared table)
            inside = prefix
            yield prefix + "weight", module.dequantized_weight().to(dtype), False
            continue
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            full = prefix + key
            if full in plain_state and owners[id(plain_state[full])] == full:  # tied copies are written once
                value = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype)
                yield full, remember(written, full, value, tied[full] > 1), False


def write_dense_model(adapted: nn.Module, out: Path, merge: bool, dtype: torch.dtype,
                      max_shard_bytes: int) -> list[str]:
    """The plain (optionally merged) model as a Hugging Face directory, streamed tensor by tensor into
    safetensors shards of at most ``max_shard_bytes`` (with an index when there are several): peak memory
    is the adapted model plus one shard. Returns the linears it had to untie (see ``dense_tensors``)."""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(adapted.config)
    out.mkdir(parents=True, exist_ok=True)
    shards, shard, size, weight_map, total, untied = [], {}, 0, {}, 0, []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            shards.append(out / f".shard-{len(shards) + 1}.safetensors")
            save_file(shard, str(shards[-1]), metadata={"format": "pt"})
            shard, size = {}, 0

    for key, tensor, was_tied in dense_tensors(adapted, plain, merge, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[key], size, total = tensor.contiguous(), size + nbytes, total + nbytes
        weight_map[key] = len(shards)
        if was_tied:
            untied.append(key.rpartition(".")[0])
    flush()
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for path, final in zip(shards, names):
        path.rename(out / final)
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}, indent=2))
    config = copy.deepcopy(adapted.config)
    config.use_cache = True  # the loader turns the cache off for training; a served model wants it
    config.dtype = dtype
    if untied:
        config.tie_word_embeddings = False
    config.save_pretrained(out)
    return untied


def peft_lora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], LoraDelta, list[str]]:
    """The single LoRA adapter's tensors under ``peft``'s key names."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            for delta_name, delta in module.deltas.items():
                if not isinstance(delta, LoraDelta) or len(module.deltas) > 1:
                    raise ExportError(f"{name}: the peft format holds exactly one LoRA adapter per layer, found "
                                      f"{list(module.deltas)}; use --format merged")
                found[name] = delta
    if not found:
        raise ExportError("no LoRA adapter in this checkpoint; the peft format is for LoRA, use --format merged")
    state = {}
    for name, delta in found.items():
        state[f"base_model.model.{name}.lora_A.weight"] = delta.A.detach().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = delta.B.detach().contiguous()
    return state, next(iter(found.values())), sorted({n.split(".")[-1] for n in found})


def export(adapter_dir: str | Path, out: str | Path, fmt: str = "merged", max_shard_bytes: int = 2 * 2**30,
           force: bool = False) -> Path:
    """Write the export and return its directory (see the module docstring)."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out directory")
    metadata = read_metadata(adapter_dir)
    model_cfg = build_dataclass(ModelConfig, metadata["model"], "model")
    adapted, tokenizer = load_for_inference(adapter_dir, force)
    dtype = DTYPES[model_cfg.dtype]
    if fmt == "merged":
        check_mergeable(adapted)
        untied = write_dense_model(adapted, out, True, dtype, max_shard_bytes)
        tokenizer.save_pretrained(out)
        for name in untied:
            print(f"peft-dist export: {name} was tied to the input embeddings and its adapter changed it: "
                  "exported with its own weight (tie_word_embeddings: false)", file=sys.stderr)
    elif fmt == "peft":
        state, lora, targets = peft_lora_state(adapted)
        config = next(a for a in metadata["adapters"] if a["method"] == "lora")
        trained = [n for n, p in adapted.named_parameters() if p.requires_grad and ".deltas." not in n]
        if trained:
            raise ExportError(f"{trained[0]} was trained outside the LoRA adapter (BitFit); the peft format "
                              "holds one LoRA adapter and would lose it: use --format merged")
        write_dense_model(adapted, out / "base", False, dtype, max_shard_bytes)
        tokenizer.save_pretrained(out / "base")
        (out / "adapter").mkdir(parents=True)
        save_file(state, str(out / "adapter" / "adapter_model.safetensors"))
        (out / "adapter" / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.A.shape[0], "lora_alpha": config["alpha"],
            "use_rslora": config["rslora"], "lora_dropout": config["dropout"], "target_modules": targets,
            "fan_in_fan_out": adapted.config.model_type == "gpt2", "bias": "none",
            "base_model_name_or_path": str((out / "base").resolve())}, indent=2))
    else:
        raise ExportError(f"--format {fmt!r}: use merged or peft")
    record_export(adapter_dir.parent, out, fmt)  # tags the training run, if it was tracked
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="an adapter checkpoint directory (e.g. runs/tiny-lora/adapter)")
    parser.add_argument("--out", required=True, help="a new directory to write")
    parser.add_argument("--format", default="merged", choices=["merged", "peft"])
    parser.add_argument("--max-shard-size", type=float, default=2.0, metavar="GIB",
                        help="largest safetensors shard; peak memory is the quantized model plus one shard (default 2)")
    parser.add_argument("--force", action="store_true", help="export onto a base whose weights differ from the "
                        "ones the adapter was trained on (same architecture and config)")
    args = parser.parse_args(argv)
    try:
        print(export(args.adapter_dir, args.out, args.format, int(args.max_shard_size * 2**30), args.force))
    except (ExportError, CheckpointError, ConfigError) as err:  # ConfigError: e.g. a damaged shipped base
        print(f"peft-dist export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
