"""What a run records about itself: parameters (config, DeepSpeed config, code, packages, hardware,
Slurm), per-rank peak memory, and estimated model FLOPs utilization (MFU).

Everything here is a plain function of its inputs (``environ`` is passed in so tests need no real
Slurm job), except ``gather_peak_memory``, a collective every rank must call.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from peft_dist.config.load import flatten
from peft_dist.distributed.memory import peak_rss_bytes
from peft_dist.distributed.zero3 import full_numel
from peft_dist.targets import QuantizedEmbedding, QuantizedLinear

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "deepspeed", "transformers", "bitsandbytes", "mlflow", "peft-dist")
SLURM_JOB_IDS_TAG = "slurm.job_ids"
SLURM_VARIABLES = {"SLURM_JOB_ID": "job_id", "SLURM_JOB_NAME": "job_name", "SLURM_JOB_PARTITION": "partition",
                   "SLURM_JOB_NUM_NODES": "num_nodes", "SLURM_JOB_NODELIST": "nodelist", "SLURM_NTASKS": "ntasks",
                   "SLURM_CPUS_PER_TASK": "cpus_per_task", "SLURM_SUBMIT_DIR": "submit_dir"}


def run_params(cfg_dict: dict, ds_config: dict, world_size: int,
               environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything that defines the run, as flat MLflow params.

    Keys: the resolved config (``train.lr``, ``adapters.0.r``...), the DeepSpeed config under
    ``ds_config.``, ``world_size``, ``git.commit``/``git.dirty``, ``version.<package>``, ``hardware.*``
    and, on Slurm, ``slurm.*`` of the job that started the run (later jobs go to the
    ``slurm.job_ids`` tag: params cannot change once logged).
    """
    env = os.environ if environ is None else environ
    params = flatten(cfg_dict)
    params.update(flatten(ds_config, "ds_config"))
    params["world_size"] = world_size
    params.update(git_info())
    params.update({f"version.{name}": version for name, version in package_versions().items()})
    params.update(hardware_info())
    params.update({f"slurm.{short}": env[var] for var, short in SLURM_VARIABLES.items() if var in env})
    return params


def git_info(repo: Path = REPO_ROOT) -> dict[str, str]:
    """The commit the code ran from, and whether the checkout had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown (not a git checkout)"}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hardware_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {"hardware.host": socket.gethostname(), "hardware.platform": platform.platform(),
                            "hardware.cpu_count": os.cpu_count(),
                            "hardware.memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    if torch.cuda.is_available():
        info["hardware.accelerator"] = torch.cuda.get_device_name(0)
        info["hardware.accelerators_per_node"] = torch.cuda.device_count()
    else:
        info["hardware.accelerator"] = "cpu"
    return info


def slurm_job_entry(environ: dict[str, str] | None = None) -> str | None:
    """This job's entry in the ``slurm.job_ids`` tag: ``123``, or ``123 (restart 2)`` after a requeue
    (a requeued job keeps its id); None when not on Slurm."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    return f"{job} (restart {restarts})" if restarts else job


def sbatch_script(environ: dict[str, str] | None = None) -> str | None:
    """The batch script of the running Slurm job, as Slurm stored it (None when unavailable)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        proc = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 and proc.stdout.strip() else None


def write_run_files(run_dir: str | Path, ds_config: dict, environ: dict[str, str] | None = None) -> list[Path]:
    """Write the DeepSpeed config (and, on Slurm, the sbatch script) into the run directory; returns
    the files to log as artifacts, next to ``run_config.yaml``."""
    run_dir = Path(run_dir)
    files = [run_dir / "ds_config.json"]
    files[0].write_text(json.dumps(ds_config, indent=2, default=str))
    script = sbatch_script(environ)
    if script is not None:  # one file per job: a resubmission may use another script
        files.append(run_dir / f"sbatch_{(os.environ if environ is None else environ)['SLURM_JOB_ID']}.sh")
        files[1].write_text(script)
    return files


# --- model summary and memory ----------------------------------------------------------------------

def weight_counts(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Every parameter with the number of model weights it stands for: its full size (also where ZeRO-3
    already partitioned it), except that a quantized linear's or embedding's stored tensors (codes, scales,
    block statistics) stand for its ``in x out`` (rows x width) weights together, counted on the first of
    them (4-bit codes are packed two a byte, so their size is half the weights)."""
    weights = {id(m): m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)}
    weights |= {id(m): m.num_embeddings * m.embedding_dim for m in model.modules()
                if isinstance(m, QuantizedEmbedding)}
    stored: dict[int, int] = {id(p): id(m) for m in model.modules() if id(m) in weights
                              for p in m.parameters(recurse=False) if p is not getattr(m, "bias", None)}
    counted: set[int] = set()
    counts = []
    for p in model.parameters():
        layer = stored.get(id(p))
        if layer is None:
            counts.append((p, full_numel(p)))
        else:
            counts.append((p, 0 if layer in counted else weights[layer]))
            counted.add(layer)
    return counts


def parameter_summary(model: nn.Module) -> dict[str, float]:
    """Counts for the summary table: trainable, total (weights, whatever their storage), and base bytes as
    stored vs in bf16 (whole tensors, also where ZeRO-3 already partitioned the base)."""
    counts = weight_counts(model)
    trainable = sum(n for p, n in counts if p.requires_grad)
    total = sum(n for _, n in counts)
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1),
            "base_bytes": sum(full_numel(p) * p.element_size() for p, _ in counts if not p.requires_grad),
            "base_bytes_bf16": sum(n * 2 for p, n in counts if not p.requires_grad)}


def summary_table(model: nn.Module, injected: dict[str, list[str]]) -> str:
    s = parameter_summary(model)
    rows = [("adapters", ", ".join(f"{k} ({len(v)} modules)" for k, v in injected.items()) or "none"),
            ("trainable params", f"{s['trainable']:,}"),
            ("total params", f"{s['total']:,}"),
            ("trainable %", f"{s['trainable_pct']:.4f}%"),
            ("frozen base bytes (as stored)", f"{s['base_bytes'] / 2**20:,.2f} MiB"),
            ("frozen base bytes (if bf16)", f"{s['base_bytes_bf16'] / 2**20:,.2f} MiB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}} | {v}" for k, v in rows)


def gather_peak_memory(device: torch.device | str = "cpu") -> dict[str, float]:
    """Peak host memory (and accelerator memory, if any) of every rank, as metrics.

    Collective: every rank must call it (the result is the same on all). ``device`` is where the
    communication backend wants tensors (``engine.device``: CPU for gloo, the GPU for NCCL).
    """
    accelerator = get_accelerator()
    on_device = accelerator.device_name() != "cpu"  # this rank's GPU (or other accelerator) through DeepSpeed
    local = [float(peak_rss_bytes()), float(accelerator.max_memory_allocated()) if on_device else 0.0]
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        rows = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(rows, mine)
    else:
        rows = [mine]
    metrics: dict[str, float] = {}
    for rank, row in enumerate(rows):
        metrics[f"memory/peak_rss_gib/rank{rank}"] = row[0].item() / 2**30
        if on_device:
            metrics[f"memory/peak_accelerator_gib/rank{rank}"] = row[1].item() / 2**30
    metrics["memory/peak_rss_gib/max"] = max(row[0].item() for row in rows) / 2**30
    return metrics


# --- model FLOPs utilization ------------------------------------------------------------------------

def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in a matmul per token: all of them, less an untied input embedding
    (a lookup). Counts full sizes under ZeRO-3 (``ds_numel``), where local tensors are empty, and the
    weights of a quantized linear, not its stored elements."""
    total = sum(n for _, n in weight_counts(model))
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or not any(p is embedding for p in output.parameters()):  # untied (or adapted) head
        total -= full_numel(embedding)
    return total


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L d s`` (PaLM, appendix B).

    6N: 2N in the forward matmuls, 4N in the backward (input and weight gradients). With a frozen base
    the weight gradients of the base are never computed, so the real work is nearer 4N; we keep the
    standard 6N so MFU stays comparable with other systems and across adapter methods. 12 L d s is
    attention's score and value matmuls (forward and backward) at sequence length s.
    """
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """``flops_per_token`` for a Hugging Face decoder (reads layers and hidden size from its config;
    a config without them gets 6N alone)."""
    config = model.config
    return flops_per_token(matmul_parameters(model), getattr(config, "num_hidden_layers", 0),
                           getattr(config, "hidden_size", 0), seq_len)


def throughput_metrics(tokens_per_s: float, flops_per_token: float, world_size: int,
                       peak_tflops: float = 0.0) -> dict[str, float]:
    """Achieved TFLOP/s per device and, given the device's peak (``peak_tflops`` > 0), MFU in [0, 1]."""
    achieved = tokens_per_s * flops_per_token / world_size / 1e12
    metrics = {"train/tflops_per_device": achieved}
    if peak_tflops > 0:
        metrics["train/mfu"] = achieved / peak_tflops
    return metrics
