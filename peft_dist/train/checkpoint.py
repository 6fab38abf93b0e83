"""Adapter-only checkpoints: safetensors of the adapter tensors plus the config that recreates them.

A checkpoint directory holds ``adapter_model.safetensors`` and ``adapter_config.json`` (the adapter
and quantization configs, the base model's identity, the step). It is written to a temporary
directory on rank 0 and renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peft_dist import __version__
from peft_dist.adapters.inject import adapter_state_dict, load_adapter_state_dict
from peft_dist.config.load import config_to_dict, json_sha256
from peft_dist.config.schema import CheckpointConfig, ConfigError, ModelConfig, QuantizationConfig
from peft_dist.distributed.zero3 import gathered
from peft_dist.model import file_sha256
from peft_dist.train import faults
from peft_dist.train.files import fsync_dir, fsync_tree, write_atomically

log = logging.getLogger("peft_dist")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not belong to this model / adapter config."""


def save_adapter(model: nn.Module, directory: str | Path, metadata: dict, is_main: bool) -> None:
    """Gather adapter tensors (collective under ZeRO-3: every rank must call) and write on rank 0.

    ``metadata`` must hold ``adapters``, ``quantization`` and ``base_model`` (see ``adapter_metadata``).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers()]
    with gathered(trainable + buffers):
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    if not is_main:
        return

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS))
        recorded = {**metadata, "weights_sha256": file_sha256(tmp / WEIGHTS)}  # checked by load_adapter_weights
        (tmp / CONFIG).write_text(json.dumps(recorded, indent=2, sort_keys=True, default=str))

    write_atomically(Path(directory), write)


def adapter_metadata(adapters: list, quantization: QuantizationConfig, model_cfg: ModelConfig,
                     base_identity: dict, step: int) -> dict:
    return {"peft_dist_version": __version__, "adapters": config_to_dict(adapters),
            "quantization": config_to_dict(quantization), "model": config_to_dict(model_cfg),
            "base_model": base_identity, "step": step}


def read_metadata(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"{directory}: not an adapter checkpoint (needs {CONFIG} and {WEIGHTS})")
    return json.loads((directory / CONFIG).read_text())


def check_base(metadata: dict, base_identity: dict, directory: Path, force: bool = False) -> None:
    """Refuse an adapter or checkpoint of another base: another config, or (recorded since checkpoints carry
    it) other weights of the same architecture, e.g. another fine-tune; ``force`` accepts the latter."""
    saved = metadata["base_model"]
    if saved["config_sha256"] not in (base_identity["config_sha256"], base_identity["config_sha256_as_loaded"]):
        raise CheckpointError(
            f"{directory}: adapter was trained on {saved['name_or_path']!r} ({saved['model_type']}) whose "
            f"config differs from this base {base_identity['name_or_path']!r}; load it onto the same base model")
    if not force and saved.get("weights_sha256", base_identity["weights_sha256"]) != base_identity["weights_sha256"]:
        raise CheckpointError(
            f"{directory}: adapter was trained on {saved['name_or_path']!r}, whose weights differ from those of "
            f"{base_identity['name_or_path']!r} (another fine-tune of the same architecture?); load it onto the "
            "same weights, or pass --force to load it anyway")


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load saved tensors into an already injected (not yet DeepSpeed-wrapped) model, after checking them
    against the checksum the checkpoint recorded."""
    path = Path(directory) / WEIGHTS
    recorded = read_metadata(directory).get("weights_sha256")
    if recorded is not None and file_sha256(path) != recorded:
        raise CheckpointError(f"{path}: damaged (its sha256 differs from the one recorded in {CONFIG}); use "
                              "another checkpoint, e.g. one of the run's checkpoints/step-N/adapter")
    try:
        state = load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); use another checkpoint") from None
    try:
        load_adapter_state_dict(model, state)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"{directory}: does not match this adapter config: {err}") from None


# --- resumable training checkpoints -------------------------------------------------------------

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
HOOK_STATE = "hooks.pt"  # method hook state (e.g. AdaLoRA's schedule and importance); weights_only load


def check_run_dir(run_dir: Path, cfg: CheckpointConfig) -> None:
    """Refuse to reuse a run directory unless ``overwrite`` or ``resume`` says so (called before init)."""
    if (run_dir / "run_config.yaml").exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"checkpoint.output_dir: {run_dir} already holds a run. Choose another directory, "
                          "or set checkpoint.resume=true to continue it, or checkpoint.overwrite=true "
                          "to replace it")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_training_checkpoint(engine, run_dir: Path, step: int, hooks: list, tracker_run_id: str | None,
                             metadata: dict, is_main: bool, keep_last: int) -> Path:
    """Everything needed to resume exactly, written to a temporary directory and renamed when complete.

    Collective: every rank calls it. DeepSpeed writes each rank's optimizer shard (frozen base
    parameters are excluded: they come from the base model), rank 0 adds the adapter, the trainer
    state and a manifest with checksums, then renames ``.step-N.tmp`` to ``step-N``.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / "engine"), tag="state", exclude_frozen_parameters=True, save_latest=False)
    faults.inject("kill-in-checkpoint", engine.global_rank, step)
    save_adapter(engine.module, tmp / "adapter", metadata, is_main)
    hook_states = [h.state_dict() for h in hooks]  # may be a collective (AdaLoRA gathers its EMAs)
    _barrier()
    if is_main:
        state = {"step": step, "tracker_run_id": tracker_run_id}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, default=str))
        torch.save(hook_states, tmp / HOOK_STATE)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "world_size": torch.distributed.get_world_size() if
                    torch.distributed.is_initialized() else 1,
                    "base_model": metadata["base_model"], "adapters": metadata["adapters"],
                    "files": {str(p.relative_to(tmp)): file_sha256(p) for p in files}}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        fsync_tree(tmp)  # every file on disk before the manifest's directory takes its final name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
        complete = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())
        for old in complete[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's own content (everything but this digest), so the manifest is checked too."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return json_sha256(content)


def damaged_file(checkpoint: Path) -> str | None:
    """The first file of ``checkpoint`` that does not match the manifest (or is missing), the manifest itself
    included; None when all are intact."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return MANIFEST
    if manifest_digest(manifest) != manifest.get("manifest_sha256", manifest_digest(manifest)):
        return MANIFEST
    for name, digest in manifest["files"].items():
        if not (checkpoint / name).is_file() or file_sha256(checkpoint / name) != digest:
            return name
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that is complete (its manifest exists; ``.tmp`` directories are partial) and
    intact (every file matches its checksum). A damaged one is skipped with a warning naming the file, so
    resume falls back to the previous checkpoint."""
    complete = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / MANIFEST).is_file())
    for path in reversed(complete):
        damaged = damaged_file(path)
        if damaged is None:
            return path
        log.warning("%s: %s does not match its checksum; skipping this checkpoint", path, damaged)
    return None


def chosen_checkpoint(run_dir: Path) -> Path | None:
    """``latest_checkpoint`` as rank 0 sees it, broadcast so that every rank resumes from the same one."""
    choice = [str(latest_checkpoint(run_dir)) if not torch.distributed.is_initialized()
              or torch.distributed.get_rank() == 0 else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    return None if choice[0] == "None" else Path(choice[0])


def load_training_checkpoint(engine, run_dir: Path, hooks: list, metadata: dict) -> dict | None:
    """Restore engine, optimizer, scheduler and hook state from the newest complete checkpoint.

    Refuses a checkpoint of another base model, adapter config or world size.
    """
    path = chosen_checkpoint(run_dir)
    if path is None:
        return None
    manifest = json.loads((path / MANIFEST).read_text())
    check_base(manifest, metadata["base_model"], path)
    if manifest["adapters"] != metadata["adapters"]:
        raise CheckpointError(f"{path}: saved with adapters {manifest['adapters']}, but this run configures "
                              f"{metadata['adapters']}; resume with the same adapter config or use a new "
                              "checkpoint.output_dir")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if manifest["world_size"] != world:
        raise CheckpointError(f"{path}: written by {manifest['world_size']} ranks, resumed on {world}. Resume on "
                              f"{manifest['world_size']} ranks (adapter-only checkpoints load on any number)")
    engine.load_checkpoint(str(path / "engine"), tag="state", load_module_strict=False)
    state = json.loads((path / TRAINER_STATE).read_text())
    for hook, hook_state in zip(hooks, torch.load(path / HOOK_STATE, weights_only=True)):
        hook.load_state_dict(hook_state)
    return state
