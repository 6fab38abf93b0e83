"""Export a trained adapter for ordinary serving tools.

    python -m peft_dist.export runs/tiny-lora/adapter --out exports/tiny-lora            # merged model
    python -m peft_dist.export runs/tiny-lora/adapter --out exports/tiny-lora-peft --format peft

``merged``: the adapters folded into the dequantized base, written as a standard Hugging Face model
directory (weights + config + tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads with no
peft-dist installed; zero inference overhead. Only weight-space methods merge (LoRA, AdaLoRA, KronA,
BitFit); the others change the computation and need peft-dist at inference.
``peft``: ``OUT/base`` (the dequantized base, unmerged) and ``OUT/adapter`` in the ``peft`` library's
LoRA format, for ``peft.PeftModel.from_pretrained(base, OUT/adapter)`` (one LoRA adapter only).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_dist.adapters.base import AdaptedLinear, AdapterModule, dense_weight
from peft_dist.adapters.lora import LoraDelta
from peft_dist.config.load import build_dataclass
from peft_dist.config.schema import ModelConfig
from peft_dist.quant.loader import build_model
from peft_dist.quant.int8 import Int8Linear
from peft_dist.tracking.offline import record_export
from peft_dist.train.checkpoint import CheckpointError, read_metadata
from peft_dist.inference import load_for_inference


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format; the message says why and what to do."""


def dense_linears(model: nn.Module, merge: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``name -> ((d_out, d_in) float weight, bias)`` for every int8 or adapted linear of ``model``.

    With ``merge`` every linear delta is folded in (and must be mergeable); without, deltas are ignored.
    """
    dense = {}
    adapted = {name for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            weight = dense_weight(module.base).detach().float().clone()
            for delta_name, delta in module.deltas.items():
                if merge:
                    if not delta.mergeable:
                        raise ExportError(f"adapter {delta_name!r} on {name} cannot be merged into a weight")
                    weight += delta.delta_weight().detach().float()
            dense[name] = (weight, module.base.bias)
        elif isinstance(module, Int8Linear) and name.rpartition(".")[0] not in adapted:
            dense[name] = (module.dequantized_weight().detach().float(), module.bias)
    return dense


def check_mergeable(model: nn.Module) -> None:
    """Refuse adapters that are modules in the forward path (prefix, bottleneck, KronA^B)."""
    in_linears = {id(d) for m in model.modules() if isinstance(m, AdaptedLinear) for d in m.deltas.values()}
    blocking = sorted(name for name, m in model.named_modules()
                      if isinstance(m, AdapterModule) and id(m) not in in_linears)
    if blocking:
        raise ExportError(f"{blocking[0]} is an adapter in the forward path, not a weight update, so it cannot be "
                          "merged into a plain transformers model; serve it with peft-dist "
                          "(peft_dist.inference.load_for_inference) or export a weight-space method")


@torch.no_grad()
def plain_model(adapted: nn.Module, model_cfg: ModelConfig, merge: bool) -> tuple[nn.Module, list[str]]:
    """A fresh, un-quantized base with the adapted model's dense (optionally merged) weights, and the linears
    that had to be untied from the input embeddings because merging changed them (e.g. a LoRA on a tied
    ``lm_head``): they get their own weight and the config says ``tie_word_embeddings: false``."""
    if merge:
        check_mergeable(adapted)
    plain, _ = build_model(model_cfg)
    # Embeddings, norms and other float tensors come from the adapted model too, not from a fresh init of
    # the base (whose values depend on how it was built); BitFit's trained ones only when merging. They go
    # first, so that a tied embedding cannot overwrite a merged linear written below.
    params = dict(plain.named_parameters())
    for name, param in adapted.named_parameters():
        if name in params and param.is_floating_point() and (merge or not param.requires_grad):
            params[name].copy_(param)
    shared = Counter(id(p) for _, p in plain.named_parameters(remove_duplicate=False))
    modules = dict(plain.named_modules())
    untied = []
    for name, (weight, bias) in dense_linears(adapted, merge).items():
        target = modules[name]
        weight = weight.t() if isinstance(target, Conv1D) else weight
        if shared[id(target.weight)] > 1 and not torch.equal(target.weight, weight.to(target.weight.dtype)):
            target.weight = nn.Parameter(torch.empty_like(target.weight), requires_grad=False)
            untied.append(name)
        target.weight.copy_(weight)
        if bias is not None:
            target.bias.copy_(bias)
    if untied:
        plain.config.tie_word_embeddings = False
    return plain, untied


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


def export(adapter_dir: str | Path, out: str | Path, fmt: str = "merged") -> Path:
    """Write the export and return its directory (see the module docstring)."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out directory")
    metadata = read_metadata(adapter_dir)
    model_cfg = build_dataclass(ModelConfig, metadata["model"], "model")
    model_cfg.gradient_checkpointing = False
    adapted, tokenizer = load_for_inference(adapter_dir)
    if fmt == "merged":
        plain, untied = plain_model(adapted, model_cfg, merge=True)
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        for name in untied:
            print(f"peft-dist export: {name} was tied to the input embeddings and its adapter changed it: "
                  "exported with its own weight (tie_word_embeddings: false)", file=sys.stderr)
    elif fmt == "peft":
        state, lora, targets = peft_lora_state(adapted)
        config = next(a for a in metadata["adapters"] if a["method"] == "lora")
        base, _ = plain_model(adapted, model_cfg, merge=False)
        base.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        (out / "adapter").mkdir(parents=True)
        save_file(state, str(out / "adapter" / "adapter_model.safetensors"))
        (out / "adapter" / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.A.shape[0], "lora_alpha": config["alpha"],
            "use_rslora": config["rslora"], "lora_dropout": config["dropout"], "target_modules": targets,
            "fan_in_fan_out": any(isinstance(m, Conv1D) for m in base.modules()), "bias": "none",
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
    args = parser.parse_args(argv)
    try:
        print(export(args.adapter_dir, args.out, args.format))
    except (ExportError, CheckpointError) as err:
        print(f"peft-dist export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
