"""Streaming quantize-and-shard loading of the frozen base: no rank ever holds the whole model.

The model skeleton is built on the meta device (no weight memory) and its targeted linears are swapped
for quantized linears there (``Int8Linear``, or ``FourBitLinear`` with ``quantization.bits: 4``). Then each
module, innermost first, gets real tensors: read one tensor at a time from the safetensors checkpoint (or
initialised the way transformers initialises that module, for a config-only model), quantized when it
belongs to a quantized linear (on the rank's accelerator when training: a GPU quantizes a weight in
milliseconds where one CPU thread takes seconds), and, under ZeRO-3, immediately handed to
``deepspeed.zero.Init(module=...)``, which broadcasts rank 0's values and keeps 1/N on each rank. Under
ZeRO-3 the ranks take turns: of every N consecutive modules, rank i reads and quantizes the i-th (all N at
once), then sends it to rank 0 for ``zero.Init`` to broadcast, so the job reads and quantizes each tensor
once, N ranks at a time. Peak host memory per rank is therefore about (quantized model / N) + one module,
measured and reported.
"""
from __future__ import annotations

import json
import math
import os
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.pytorch_utils import Conv1D

from peft_dist.config.schema import ConfigError, ModelConfig, QuantizationConfig
from peft_dist.distributed.memory import resident_bytes
from peft_dist.distributed.zero3 import full_numel
from peft_dist.model import BUILTIN_TINY_LLAMA, DTYPES, load_model_config, load_tokenizer, local_path
from peft_dist.quant.model import QUANTIZED_TYPES, QuantReport, float_twin, quantization_error, quantize_model


@dataclass(frozen=True)
class LoadReport:
    """What loading cost this rank: RSS before and at its peak, and the parameter bytes held.

    ``*_private`` is RSS minus its file-backed shared pages (libraries; the checkpoint itself is read, not
    mapped, since 2026-11-30).
    """

    rank: int
    world_size: int
    zero3: bool
    rss_before: int
    peak_rss: int
    private_before: int
    peak_private: int
    local_param_bytes: int  # this rank's share after loading (the ds_tensor partitions under ZeRO-3)
    full_param_bytes: int  # the whole (quantized + float) model
    bytes_read: int  # checkpoint tensor bytes this rank read (about 1/N of them under ZeRO-3)
    seconds: float  # wall time of the streaming loop (read, quantize, send to rank 0, partition)
    quantization: tuple[QuantReport, ...]  # one per linear quantized on this rank, in load order
    quantized_on: str  # the device that quantized them: the rank's accelerator when training, else cpu

    @property
    def quantize_seconds(self) -> float:
        """Of ``seconds``, this rank's quantizing and error measurement."""
        return math.fsum(q.seconds for q in self.quantization)

    def line(self) -> str:
        mib = 2 ** 20
        return (f"[rank {self.rank}/{self.world_size}] load_quantized_base zero3={self.zero3}: "
                f"peak RSS {self.peak_rss / mib:.1f} MiB (+{(self.peak_rss - self.rss_before) / mib:.1f} MiB "
                f"while loading; private +{(self.peak_private - self.private_before) / mib:.1f} MiB), "
                f"parameters held {self.local_param_bytes / mib:.2f} MiB of {self.full_param_bytes / mib:.2f} MiB, "
                f"checkpoint read {self.bytes_read / mib:.2f} MiB in {self.seconds:.1f} s "
                f"({self.quantize_seconds:.1f} s quantizing on {self.quantized_on})")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries (``dtype``, ``shape``, ``data_offsets``) and where its data starts:
    the format is an 8-byte little-endian header length, a JSON header, then the raw tensor bytes."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_tensor(path: Path, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory of its own."""
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ConfigError(f"model.name_or_path: {path.name} stores a tensor of dtype {entry['dtype']}, which the "
                          f"loader does not read; supported: {', '.join(SAFETENSORS_DTYPES)}")
    begin, end = entry["data_offsets"]
    buffer = bytearray(end - begin)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(data_start + begin)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            count = handle.readinto(view[done:])
            if not count:
                raise ConfigError(f"model.name_or_path: {path} ends inside a tensor; the file is truncated")
            done += count
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    if not buffer:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class CheckpointReader:
    """One tensor at a time from a local safetensors checkpoint, single file or sharded with an index, by the
    model's own parameter names.

    Checkpoint keys are mapped to module names the way ``from_pretrained`` maps them, through transformers'
    own conversion mapping for the architecture (e.g. GPT-NeoX stores ``embed_out.weight`` for the module
    ``lm_head``; a checkpoint of the base model alone lacks the ``model.`` prefix), so any checkpoint that
    transformers loads by renaming keys streams here too. Conversions that merge or split tensors (fused
    experts) are refused when a tensor needs one.

    Tensors are read with plain file reads, not through a memory map: a mapped checkpoint's pages count in
    the reading rank's resident set (and in its logged peak) for as long as the file stays mapped, although
    they are only page cache; read, a tensor costs its own bytes until it is quantized and dropped.
    """

    def __init__(self, directory: str | os.PathLike, model: nn.Module) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
        elif single.is_file():
            files = {name: single for name in safetensors_header(single)[0]}
        else:
            raise ConfigError(f"model.name_or_path: no model.safetensors or model.safetensors.index.json in "
                              f"{str(directory)!r}; save the model with save_pretrained(safe_serialization=True)")
        self.files, self.keys, self.converted = files, {}, {}
        self.bytes_read = 0
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        names = model.state_dict()
        for key in files:
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
            (self.converted if converter else self.keys)[name] = key
        self._headers: dict[Path, tuple[dict, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def get(self, name: str) -> torch.Tensor:
        """The tensor of the model's parameter or buffer ``name``."""
        if name in self.converted:
            raise ConfigError(f"model.name_or_path: the checkpoint stores {name!r} in a form that transformers "
                              f"converts while loading (from {self.converted[name]!r}); the streaming loader only "
                              "renames keys, so this architecture is not supported (docs/COMPATIBILITY.md)")
        if name not in self.keys:
            raise ConfigError(f"model.name_or_path: the checkpoint has no tensor {name!r} that the model "
                              "needs; is it a checkpoint of this architecture?")
        key = self.keys[name]
        path = self.files[key]
        if path not in self._headers:
            self._headers[path] = safetensors_header(path)
        header, data_start = self._headers[path]
        tensor = read_tensor(path, header[key], data_start)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def _param_bytes(model: nn.Module, local: bool) -> int:
    """Bytes of all parameters; with ``local``, only this rank's ZeRO-3 partition where there is one."""
    return sum((p.ds_tensor.numel() if local and hasattr(p, "ds_tensor") else full_numel(p)) * p.element_size()
               for p in model.parameters())


def _zero3_enabled(ds_config: dict | None) -> bool:
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return False
    if not dist.is_initialized():
        raise RuntimeError("load_quantized_base: the DeepSpeed config is ZeRO-3 but no process group exists; "
                           "call deepspeed.init_distributed() before loading")
    return True


def _zero3_dtype(ds_config: dict) -> torch.dtype:
    """The float dtype ZeRO-3 keeps parameters in: ``zero.Init`` creates them in the engine's precision,
    and a DeepSpeed engine does not cast parameters that are already partitioned."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


@torch.no_grad()
def _fill(model: nn.Module, name: str, module: nn.Module, reader: CheckpointReader | None, reads: bool,
          transposed: set[str], names_of: dict[int, list[str]], done: dict[int, nn.Parameter],
          errors: list[QuantReport], quantize_on: torch.device) -> list[nn.Parameter]:
    """Give ``module``'s own parameters and buffers real tensors holding checkpoint (or init) values and
    return the parameters created (not those tied to one already loaded); a quantized linear's quantization
    error goes to ``errors``.

    A quantized linear's parameters are made on ``quantize_on``, and its dense weight (read, or drawn on the
    CPU) is moved there to be quantized and measured; every other tensor is made on the CPU, so that the
    config-only init draws the same numbers on every machine.

    Without ``reads`` (under ZeRO-3, the ranks that do not read this module) parameters stay uninitialised
    until the reading rank's values arrive. Buffers are not broadcast: every rank computes (or reads) its
    own, and only they run transformers' init here when a checkpoint gives the parameters.
    """
    prefix = f"{name}." if name else ""
    needs_buffers = any(b is not None and b.is_meta for b in module.buffers(recurse=False))
    for key, buf in module.named_buffers(recurse=False):
        if buf is not None and buf.is_meta:
            module._buffers[key] = torch.empty_like(buf, device="cpu")
    fresh = {}  # key -> (new parameter, the checkpoint names it may be stored under)
    device = quantize_on if isinstance(module, QUANTIZED_TYPES) else torch.device("cpu")
    for key, meta in module.named_parameters(recurse=False):
        if id(meta) in done:  # tied to a parameter already loaded (e.g. lm_head and embed_tokens)
            module._parameters[key] = done[id(meta)]
            module._parameters[key]._is_hf_initialized = True  # transformers' init functions then skip it
            continue
        param = nn.Parameter(torch.empty_like(meta, device=device), requires_grad=meta.requires_grad)
        module._parameters[key] = done[id(meta)] = param
        fresh[key] = (param, names_of.get(id(meta), [prefix + key]))
    created = [param for param, _ in fresh.values()]
    if isinstance(module, QUANTIZED_TYPES):
        if not reads:
            return created
        if reader is None:  # config-only: the float module transformers would have built, then quantized
            # Built on meta so that only _init_weights draws random numbers, exactly as for an unquantized
            # base: the builtin model has the same values with and without quantization.
            dense = float_twin(module).to_empty(device="cpu")
            model._init_weights(dense)
            weight, bias = dense.weight, getattr(dense, "bias", None)
        else:
            weight = reader.get(prefix + "weight")
            weight = weight.t() if name in transposed else weight
            bias = reader.get(prefix + "bias") if getattr(module, "bias", None) is not None else None
        began = time.perf_counter()
        weight = weight.to(quantize_on)
        module.load_weight(weight)
        error = quantization_error(name, weight, module)  # its .item() calls wait for the device: timed in full
        errors.append(replace(error, seconds=time.perf_counter() - began))
        if bias is not None:
            module.bias.copy_(bias)
        return created
    if (reader is None and reads) or needs_buffers:  # also computes non-persistent buffers (rotary inv_freq)
        model._init_weights(module)
    if reader is None:
        return created
    for key, (param, candidates) in fresh.items() if reads else ():
        param.copy_(reader.get(next((n for n in candidates if n in reader), prefix + key)))
    for key, buf in module.named_buffers(recurse=False):
        if buf is not None and prefix + key in reader:
            buf.copy_(reader.get(prefix + key))
    return created


def _send_to_rank_0(params: list[nn.Parameter], reader_rank: int, rank: int, device: torch.device) -> None:
    """Rank 0 receives the parameters ``reader_rank`` filled: ``zero.Init`` always broadcasts rank 0's
    values. Each goes to ``device`` (where ``zero.Init`` puts it anyway) first, so that NCCL can carry it."""
    for param in params:
        param.data = param.data.to(device)
        if rank == reader_rank:
            dist.send(param.data, dst=0)
        elif rank == 0:
            dist.recv(param.data, src=reader_rank)


def load_quantized_base(model_cfg: ModelConfig, quant_cfg: QuantizationConfig,
                        ds_config: dict | None = None) -> tuple[nn.Module, LoadReport]:
    """Build the quantized base from ``model_cfg`` without ever materialising the float model on any rank.

    ``builtin:tiny-llama`` is initialised from seed 0 as transformers would (step-0 loss near ln(vocab));
    ``builtin:stdlib-llama`` reads the shipped pretrained checkpoint (``model.local_path``, its sha256 checked);
    any other ``name_or_path`` must be a local safetensors checkpoint. Under a ZeRO-3 ``ds_config`` (with
    an initialized process group) every parameter ends ZeRO-3 partitioned, and the float tensors (int8
    scales included; 4-bit block statistics stay float32) take the config's precision as with ``zero.Init``;
    otherwise ``model_cfg.dtype``.
    """
    zero3 = _zero3_enabled(ds_config)
    config: PretrainedConfig = load_model_config(model_cfg.name_or_path)
    dtype = _zero3_dtype(ds_config) if zero3 else DTYPES[model_cfg.dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reader = (None if model_cfg.name_or_path == BUILTIN_TINY_LLAMA
              else CheckpointReader(local_path(model_cfg.name_or_path), model))
    transposed = {name for name, m in model.named_modules() if isinstance(m, Conv1D)}
    if quant_cfg.enabled:
        quantize_model(model, quant_cfg.target_modules, dtype, quant_cfg)
    model.requires_grad_(False)
    if quant_cfg.enabled and quant_cfg.bits == 4:
        import bitsandbytes  # noqa: F401  (quant/nf4.py imports it on first use; here, so the line below counts it)
    rss_before, private_before = resident_bytes()  # after the imports and the meta skeleton: what follows is weights
    began = time.perf_counter()
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    done: dict[int, nn.Parameter] = {}
    errors: list[QuantReport] = []
    peak, peak_private = rss_before, private_before
    modules = [(name, module) for name, module in reversed(list(model.named_modules()))  # children first
               if any(True for _ in module.parameters(recurse=False))
               or any(b is not None and b.is_meta for b in module.buffers(recurse=False))]
    rank = dist.get_rank() if zero3 else 0
    # Config-only, rank 0 draws every init value, in the order a single process draws them.
    readers = dist.get_world_size() if zero3 and reader is not None else 1
    device = torch.device("cpu")
    if ds_config:  # training: quantize on the rank's accelerator, where the engine puts the parameters anyway
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().current_device_name())
    if zero3:
        import deepspeed
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for start in range(0, len(modules), readers):
            turn = modules[start:start + readers]  # rank i reads the i-th module of the turn
            created = [_fill(model, name, module, reader, i == rank, transposed, names_of, done, errors, device)
                       for i, (name, module) in enumerate(turn)]
            rss, private = resident_bytes()
            peak, peak_private = max(peak, rss), max(peak_private, private)
            if not zero3:
                continue
            for i, ((_, module), params) in enumerate(zip(turn, created)):
                if i != 0:
                    _send_to_rank_0(params, i, rank, device)
                    rss, private = resident_bytes()
                    peak, peak_private = max(peak, rss), max(peak_private, private)
                deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = LoadReport(dist.get_rank() if dist.is_initialized() else 0,
                        dist.get_world_size() if dist.is_initialized() else 1, zero3, rss_before, peak,
                        private_before, peak_private, _param_bytes(model, local=True),
                        _param_bytes(model, local=False), reader.bytes_read if reader else 0,
                        time.perf_counter() - began, tuple(errors), str(device))
    return model, report


def build_model(cfg: ModelConfig):
    """Return ``(model, tokenizer)``: the float base, whole in this process, through the same loader the
    trainer uses (so the builtin model, initialised from seed 0, has the same values everywhere)."""
    model, _ = load_quantized_base(cfg, QuantizationConfig(enabled=False))
    return model, load_tokenizer(cfg.name_or_path)
