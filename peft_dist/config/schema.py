"""Typed run configuration: one dataclass per section, checked in ``__post_init__``.

Every field has a default so that an empty YAML file is the embedded small CPU run. Checks raise
``ConfigError`` naming the offending key and the fix; the loader adds the section path.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, ill-typed or impossible; the message names key and fix."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError`` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """Which base model to adapt.

    name_or_path: a local Hugging Face model directory, a hub id (only if already cached: nothing is
        downloaded at run time), ``builtin:stdlib-llama`` (the default: a 4-layer, 3.7M-parameter Llama
        pretrained on standard-library source, shipped in ``peft_dist/assets/stdlib_llama``, its sha256 checked)
        or ``builtin:tiny-llama`` (a random 4-layer, 0.3M-parameter Llama built from a config, for fast tests).
    dtype: dtype of the weights that stay in floating point (embeddings, norms, lm_head, adapters are
        trained in the engine's precision).
    gradient_checkpointing: recompute each decoder layer in backward to save activation memory.
    """

    name_or_path: str = "builtin:stdlib-llama"
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        require(self.dtype in ("float32", "bfloat16", "float16"), "dtype",
                f"got {self.dtype!r}; use float32, bfloat16 or float16")


@dataclass
class QuantizationConfig:
    """The frozen base in 8 or 4 bits.

    enabled: replace frozen linear layers by quantized linears.
    target_modules: ``all-linear`` (every linear of the decoder layers; embeddings and lm_head stay in
        floating point), a list of module-name suffixes, or a regex matched against full names. A list may
        name ``embed_tokens`` and ``lm_head`` when they are not tied to each other: int8 tables halve their
        shard and their gather (the embedding is int8 whatever ``bits``).
    bits: 8 (row-wise absmax int8, ``quant/int8.py``) or 4 (block-wise NF4/FP4 through bitsandbytes,
        QLoRA's base, ``quant/nf4.py``).
    quant_type, blocksize, double_quant (bits 4 only): the 4-bit data type (``nf4``: normal-float levels,
        QLoRA's choice for normally distributed weights; ``fp4``), the number of weights sharing one absmax,
        and whether those absmax are themselves quantized to 8 bits (saves ~0.37 bit a weight at blocksize 64).
    """

    enabled: bool = True
    target_modules: Any = "all-linear"
    bits: int = 8
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    # Class attributes, not config fields: the block sizes bitsandbytes' quantize_4bit accepts (it raises
    # "invalid blocksize" for others), and the 4-bit settings with their defaults.
    blocksizes = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    four_bit_defaults = {"quant_type": "nf4", "blocksize": 64, "double_quant": False}

    def __post_init__(self) -> None:
        require(isinstance(self.target_modules, (str, list)), "target_modules",
                "use 'all-linear', a list of module-name suffixes or a regex string")
        require(self.bits in (8, 4), "bits", f"got {self.bits!r}; use 8 (int8) or 4 (NF4/FP4)")
        require(self.quant_type in ("nf4", "fp4"), "quant_type", f"got {self.quant_type!r}; use nf4 or fp4")
        require(self.blocksize in self.blocksizes, "blocksize",
                f"got {self.blocksize!r}; bitsandbytes' 4-bit quantization takes "
                f"{', '.join(map(str, self.blocksizes))} (64 is QLoRA's)")
        for key, default in self.four_bit_defaults.items():  # with bits 8 they would be silently ignored
            require(self.bits == 4 or getattr(self, key) == default, key,
                    f"applies to bits: 4 only; set bits: 4 or leave {key} at {default!r}")


@dataclass
class DataConfig:
    """Training text.

    path: ``builtin:python-docstrings`` (the docstrings of half of this Python's standard-library modules, files
        the default base never saw; what an empty path reads unless ``sources`` is set), ``builtin:python-stdlib``
        (the standard library's source; both without network), a local file / directory / glob of .txt, .jsonl /
        .json (lines or one array) or .parquet files, a ``Dataset.save_to_disk`` directory, or a Hugging Face
        dataset id ``user/name`` already in the local datasets cache (read offline: nothing is downloaded at run
        time).
    sources: a mixture instead of ``path``: a list of ``{path, weight, name, format, text_field, prompt_field,
        response_field, columns, split, eval_path}`` (``path`` required; ``weight`` 1 and ``name`` the file stem
        unless set; the other keys default to this section's). Source s supplies weight_s / sum of the weights of
        the training blocks; each keeps its own evaluation split and reports ``eval/<name>/loss``.
    format: ``auto`` picks the file kind from the extension and the layout of the rows from the fields of
        the first row (``messages``: chat, ``conversations``: sharegpt, ``instruction`` + ``output``: alpaca,
        else text or, with prompt_field, prompt/response pairs); ``text``, ``jsonl``, ``parquet`` force the
        file kind; ``chat``, ``sharegpt``, ``alpaca`` force the layout.
    text_field: jsonl/parquet column holding plain text.
    prompt_field, response_field: used instead of text_field when both are set; loss only on the response.
    columns: names of the chat / sharegpt / alpaca fields in the data, e.g. ``{messages: dialog}`` or
        ``{instruction: question, output: answer}`` (standard name: data name).
    chat_template: the Jinja template conversations are rendered with (the template, or a file holding it);
        empty uses the tokenizer's own.
    split: the split of a saved ``DatasetDict`` or of a hub dataset to read.
    eval_path: evaluation data in the same formats as ``path``; empty holds out ``eval_fraction`` of ``path``.
    packing: ``auto`` (``whole`` for prompt/response, alpaca and conversations, ``cut`` for text), ``cut``
        (documents concatenated and cut at block boundaries) or ``whole`` (a document that does not fit the
        space left in a block starts the next one; the rest is padding without loss).
    overlong: what ``whole`` packing does with a document longer than block_size: ``drop`` (default: every
        trained example keeps its prompt and its end) or ``truncate`` (keep its first block_size tokens).
    block_size: tokens per packed training sequence.
    eval_fraction: share of documents held out for evaluation (deterministic from ``seed``).
    max_documents: cap on documents read (0 = all), to keep quick runs quick.
    cache_dir: where the tokenized, packed blocks are kept, one directory per corpus and setting; the first
        process of a job prepares them, every rank memory-maps them (per node when not on a shared disk).
    num_proc: tokenizing processes; 0 picks up to 8 for corpora of 10,000 documents or more, else 1.
    """

    path: str = ""
    sources: list = field(default_factory=list)
    format: str = "auto"
    text_field: str = "text"
    prompt_field: str = ""
    response_field: str = ""
    columns: dict = field(default_factory=dict)
    chat_template: str = ""
    split: str = "train"
    eval_path: str = ""
    packing: str = "auto"
    overlong: str = "drop"
    block_size: int = 128
    eval_fraction: float = 0.05
    max_documents: int = 400
    seed: int = 1234
    cache_dir: str = "~/.cache/peft-dist/data"
    num_proc: int = 0

    formats = ("auto", "text", "jsonl", "parquet", "chat", "sharegpt", "alpaca")
    column_names = ("messages", "conversations", "instruction", "input", "output")
    source_keys = ("path", "weight", "name", "format", "text_field", "prompt_field", "response_field", "columns",
                   "split", "eval_path")

    def __post_init__(self) -> None:
        require(not (self.path and self.sources), "path",
                "set either data.path or data.sources, not both; move the path into data.sources as "
                "{path: ..., weight: ...}")
        if not self.path and not self.sources:
            self.path = "builtin:python-docstrings"
        require(self.num_proc >= 0, "num_proc", "must be >= 0 (0 picks it)")
        require(self.format in self.formats, "format", f"got {self.format!r}; use {', '.join(self.formats)}")
        require(self.packing in ("auto", "cut", "whole"), "packing", f"got {self.packing!r}; use auto, cut or whole")
        require(self.overlong in ("drop", "truncate"), "overlong", f"got {self.overlong!r}; use drop or truncate")
        require(isinstance(self.columns, dict) and set(self.columns) <= set(self.column_names)
                and all(isinstance(v, str) and v for v in self.columns.values()), "columns",
                f"got {self.columns!r}; map standard names ({', '.join(self.column_names)}) to the data's "
                "field names, e.g. {messages: dialog} (text and prompt/response fields: data.text_field, "
                "data.prompt_field, data.response_field)")
        require(self.block_size >= 2, "block_size", f"got {self.block_size}; must be at least 2")
        require(0.0 < self.eval_fraction < 1.0, "eval_fraction",
                f"got {self.eval_fraction}; must be strictly between 0 and 1")
        require(self.max_documents >= 0, "max_documents", "must be >= 0 (0 reads all)")
        require(bool(self.prompt_field) == bool(self.response_field), "prompt_field",
                "set both prompt_field and response_field, or neither")
        names = [source.name for source in self.mixture()]  # resolving the sources checks each entry
        for i, name in enumerate(names):
            require(name not in names[:i], f"sources.{i}.name", f"{name!r} also names data.sources."
                    f"{names.index(name)} (a name defaults to the file stem); give each source its own name")

    def mixture(self) -> list[DataSource]:
        """The sources to train on: each ``sources`` entry over this section's settings, or ``path`` alone."""
        if not self.sources:
            return [DataSource(source_name(self.path), 1.0, self)]
        return [self._source(f"sources.{i}", entry) for i, entry in enumerate(self.sources)]

    def _source(self, key: str, entry: Any) -> DataSource:
        """One ``sources`` entry, checked like a section: unknown keys, types, the weight, the name."""
        require(isinstance(entry, dict), key, f"got {entry!r}; each source is a mapping such as "
                "{path: data/chat.jsonl, weight: 2}")
        for name, value in entry.items():
            require(name in self.source_keys, f"{key}.{name}", f"unknown key. Valid keys of a source are: "
                    f"{', '.join(self.source_keys)} (the other data settings are shared: set them under data)")
            expected, what = {"weight": ((int, float), "a number"), "columns": (dict, "a mapping")}.get(
                name, (str, "a string"))
            require(isinstance(value, expected) and not isinstance(value, bool), f"{key}.{name}",
                    f"expected {what}, got {value!r}")
        require(bool(entry.get("path")), f"{key}.path", "required: the source's file, directory, glob or hub id")
        weight = entry.get("weight", 1.0)
        require(weight > 0 and math.isfinite(weight), f"{key}.weight",
                f"got {weight!r}; use a number > 0 (the source's share of the training blocks is its weight over "
                "the sum of the weights)")
        name = entry.get("name", source_name(entry["path"]))
        require(re.fullmatch(SOURCE_NAME, name) is not None, f"{key}.name",
                f"got {name!r}; use letters, digits, '_', '.' and '-' (it names the metric eval/<name>/loss)")
        settings = {k: v for k, v in entry.items() if k not in ("weight", "name")}
        try:
            return DataSource(name, float(weight), dataclasses.replace(self, sources=[], **settings))
        except ConfigError as err:
            raise ConfigError(f"{key}.{err}") from None


SOURCE_NAME = r"[A-Za-z0-9_.-]+"  # characters an MLflow metric key can hold, '/' aside (it separates eval/<name>/loss)


def source_name(path: str) -> str:
    """The default name of the source at ``path``: its file stem (a hub id's dataset name), every character
    outside ``SOURCE_NAME`` replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem) or "_"


@dataclass
class DataSource:
    """One source of the training data: its name (``eval/<name>/loss``), its weight and the data settings it is
    read with (one ``data.path`` with the entry's own path, format, fields, split and eval_path)."""

    name: str
    weight: float
    data: DataConfig


@dataclass
class TrainConfig:
    """Optimisation. The global batch is micro_batch_size x gradient_accumulation_steps x world size.

    max_steps: optimizer steps (not micro-batches).
    precision: ``fp32``, ``bf16`` (DeepSpeed's bf16 mode) or ``fp16`` (DeepSpeed's fp16 mode with dynamic
        loss scaling; for GPUs without bf16, e.g. V100 and T4; refused where the accelerator has no fp16).
    max_nonfinite_steps: a step whose loss is NaN/inf on any rank is skipped and counted; this many
        in a row abort the run (the last checkpoint stays intact).
    warmup_steps, min_lr_ratio: linear warmup then cosine decay to ``lr * min_lr_ratio``.
    """

    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 60
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_interval: int = 0
    eval_batches: int = 8
    log_interval: int = 5
    seed: int = 42
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "eval_batches",
                    "log_interval"):
            require(getattr(self, key) >= 1, key, f"got {getattr(self, key)}; must be >= 1")
        require(self.lr > 0, "lr", f"got {self.lr}; must be > 0")
        require(0 <= self.warmup_steps <= self.max_steps, "warmup_steps",
                f"got {self.warmup_steps}; must be between 0 and max_steps ({self.max_steps})")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be between 0 and 1")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.precision in ("fp32", "bf16", "fp16"), "precision",
                f"got {self.precision!r}; use fp32, bf16 or fp16")
        require(self.eval_interval >= 0, "eval_interval", "must be >= 0 (0 = only at the end)")
        require(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")


@dataclass
class DeepSpeedSection:
    """DeepSpeed engine settings.

    config: a DeepSpeed JSON file (relative paths are looked up from the working directory, then from
        the repository root); batch sizes, precision and clipping are filled in from ``train``.
    zero_stage: overrides the file's ZeRO stage when set (0, 1, 2 or 3).
    overrides: extra keys merged into the DeepSpeed config (dotted keys allowed).
    """

    config: str = "ds_configs/zero3.json"
    zero_stage: Any = None
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.zero_stage in (None, 0, 1, 2, 3), "zero_stage",
                f"got {self.zero_stage!r}; use 0, 1, 2, 3 or leave unset")


@dataclass
class TrackingConfig:
    """Experiment tracking (rank 0 only).

    backend: ``mlflow`` or ``none``.
    uri: MLflow tracking URI; empty means ``$MLFLOW_TRACKING_URI`` or, failing that, a SQLite store
        ``mlflow.db`` in the run directory.
    peak_tflops: the device's peak TFLOP/s, to log model FLOPs utilization (0 = do not log MFU).
    sample_prompts: prompts the model continues (greedily) at every evaluation, logged as the table artifact
        ``samples/step-<step>.json`` (step, prompt, completion); empty: none.
    sample_max_new_tokens: tokens generated for each sample prompt.
    """

    backend: str = "mlflow"
    uri: str = ""
    experiment: str = "peft-dist"
    run_name: str = ""
    peak_tflops: float = 0.0
    sample_prompts: list = field(default_factory=list)
    sample_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        require(self.backend in ("mlflow", "none"), "backend",
                f"got {self.backend!r}; use mlflow or none")
        require(self.peak_tflops >= 0, "peak_tflops", "must be >= 0 (0 = do not log MFU)")
        require(all(isinstance(p, str) and p for p in self.sample_prompts), "sample_prompts",
                f"got {self.sample_prompts!r}; use a list of non-empty strings")
        require(self.sample_max_new_tokens >= 1, "sample_max_new_tokens",
                f"got {self.sample_max_new_tokens}; must be >= 1")


@dataclass
class CheckpointConfig:
    """Where a run writes.

    output_dir: the run directory; refused if it already holds a run unless ``overwrite`` or ``resume``.
    save_interval: optimizer steps between resumable checkpoints (0 = only the final adapter).
    keep_last: how many resumable checkpoints to keep (older ones are deleted once a newer is complete).
    overwrite: reuse a run directory that already holds a run (its old checkpoints are deleted).
    resume: continue from the newest complete checkpoint in ``output_dir`` (a fresh start if none).
    exit_interval: stop after this many steps of this job with a checkpoint and exit code 75, like a
        preemption (0 = off); for fixed-length job slots and for testing resume.
    """

    output_dir: str = "runs/tiny-lora"
    save_interval: int = 0
    keep_last: int = 2
    overwrite: bool = False
    resume: bool = False
    exit_interval: int = 0

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be a directory path")
        require(self.save_interval >= 0, "save_interval", "must be >= 0 (0 = only at the end)")
        require(self.keep_last >= 1, "keep_last", f"got {self.keep_last}; keep at least 1 checkpoint")
        require(self.exit_interval >= 0, "exit_interval", "must be >= 0 (0 = off)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedSection,
    "tracking": TrackingConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class RunConfig:
    """The whole run. ``adapters`` holds one method config per injected adapter (see the registry)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    adapters: list = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
