"""The training recipe: setup -> train -> evaluate -> save -> cleanup, one code path for any world size.

World size 1 (``python launcher/train.py``) is the degenerate case of the distributed run, not a
second script. Every rank runs the same collectives in the same order; only rank 0 writes files,
prints progress and talks to the tracker.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from peft_dist.adapters.inject import inject_adapters, summary_table, trainable_parameters
from peft_dist.adapters.registry import make_hooks
from peft_dist.config.load import config_to_dict
from peft_dist.config.schema import RunConfig
from peft_dist.data import GlobalBatchSampler, build_blocks
from peft_dist.distributed.env import DistEnv, init_distributed, resolve_env, setup_logging
from peft_dist.distributed.zero3 import build_ds_config, zero_gradients
from peft_dist.model import base_identity, load_tokenizer, max_positions
from peft_dist.quant.loader import LoadReport, load_quantized_base
from peft_dist.train import checkpoint as ckpt
from peft_dist.train import faults
from peft_dist.train.preflight import preflight
from peft_dist.train.schedule import warmup_cosine
from peft_dist.tracking import create_tracker
from peft_dist.tracking.plots import write_plots
from peft_dist.tracking.run_info import (SLURM_JOB_IDS_TAG, gather_peak_memory, model_flops_per_token, run_params,
                                         slurm_job_entry, throughput_metrics, write_run_files)

# torch 2.13 deprecates collectives DeepSpeed's ZeRO uses; one warning per step drowns the progress bar.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written, requeue me
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # global mean loss of steps first_step, first_step+1, ...
    first_step: int = 1
    eval_loss: float = float("nan")
    eval_perplexity: float = float("nan")
    step: int = 0
    adapter_dir: str = ""
    preempted: bool = False
    skipped_steps: int = 0  # steps skipped for a non-finite loss


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the trainer agrees on it across ranks once per step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.requested = True


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (one small collective)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(engine, ids: torch.Tensor, labels: torch.Tensor, micro: int, batches: int,
             dist: DistEnv) -> float:
    """Token-weighted mean loss over the first ``batches`` micro-batches of the eval split.

    The evaluated blocks do not depend on the world size (so a reloaded adapter can be checked in one
    process). Batches are dealt round-robin; under ZeRO-3 every rank must run the same number of
    forwards (each gathers parameters), so a rank short of a batch repeats one with weight zero.
    """
    chunks = list(zip(ids[: batches * micro].split(micro), labels[: batches * micro].split(micro)))
    mine = chunks[dist.rank::dist.world_size]
    engine.eval()
    total, count = 0.0, 0.0
    for i in range(math.ceil(len(chunks) / dist.world_size)):
        x, y = mine[i] if i < len(mine) else chunks[0]
        weight = 1.0 if i < len(mine) else 0.0
        loss = engine(input_ids=x.to(engine.device), labels=y.to(engine.device)).loss.float().item()
        tokens = weight * (y[:, 1:] != -100).sum().item()
        total += loss * tokens
        count += tokens
    engine.train()
    total, count = all_reduce_sum([total, count], engine.device)
    return total / max(count, 1.0)


class TrainingAborted(RuntimeError):
    """Training cannot usefully continue (e.g. too many non-finite steps in a row)."""


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    return all_reduce_sum([0.0 if flag else 1.0], device)[0] == 0.0


def train_step(engine, blocks, micro_batches: list[torch.Tensor], hooks: list, step: int,
               rank: int) -> float | None:
    """One optimizer step over this rank's micro-batches.

    If the loss of any micro-batch is non-finite on any rank (ranks agree through one tiny
    all-reduce), the step is skipped: gradients are zeroed and the optimizer runs with learning
    rate 0, so parameters stay as they were (DeepSpeed counts micro-steps and ZeRO-3 needs every
    backward, so both still happen); the method hooks do not run. Returns the mean micro-batch
    loss, or None for a skipped step.
    """
    loss_sum, finite = 0.0, True
    for index, micro in enumerate(micro_batches):
        x = blocks.train_ids[micro].to(engine.device)
        y = blocks.train_labels[micro].to(engine.device)
        loss = engine(input_ids=x, labels=y).loss
        if faults.planned("nan", rank, step):
            loss = loss * float("nan")
        finite = all_ranks_true(bool(torch.isfinite(loss.detach()).item()), engine.device) and finite
        loss_sum += loss.detach().float().item()
        for hook in hooks:
            extra = hook.extra_loss(engine.module)
            if extra is not None:
                loss = loss + extra
        engine.backward(loss)  # DeepSpeed divides by the accumulation steps
        if index == len(micro_batches) - 1:  # gradients of the whole step are reduced now
            if finite:
                for hook in hooks:
                    hook.before_step(engine, step)
            else:
                zero_gradients(trainable_parameters(engine.module))
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0  # the LR schedule sets it again after this step
        engine.step()  # steps the optimizer and the LR schedule only at the accumulation boundary
    if not finite:
        return None
    for hook in hooks:
        hook.after_step(engine, step)
    return loss_sum / len(micro_batches)


def train(cfg: RunConfig) -> TrainResult:
    """Run one training job as configured; returns the losses and where the adapter was saved."""
    dist = resolve_env()
    log = setup_logging(dist.rank)
    run_dir = Path(cfg.checkpoint.output_dir)
    ckpt.check_run_dir(run_dir, cfg.checkpoint)  # these checks run before any process group starts
    preflight(cfg)
    ds_config = build_ds_config(cfg, dist.world_size)
    init_distributed(dist)
    torch.distributed.barrier()
    if dist.is_main:
        if cfg.checkpoint.overwrite and not cfg.checkpoint.resume:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    # --- setup: base model, 8-bit, adapters, data, engine
    # Streamed in one tensor at a time and, under ZeRO-3, partitioned module by module as it loads.
    model, load_report, injected = adapted_model(cfg, ds_config)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    identity = base_identity(cfg.model, model.config)
    lines = [""] * dist.world_size  # every rank's peak memory while loading, printed by rank 0
    torch.distributed.all_gather_object(lines, load_report.line())
    log.info("base loaded\n%s", "\n".join(lines))
    if load_report.quantization:
        errors = load_report.quantization
        worst = max(errors, key=lambda r: r.rel_error)
        log.info("int8 base: %d layers quantized, relative error mean %.4f, worst %.4f (%s)", len(errors),
                 sum(r.rel_error for r in errors) / len(errors), worst.rel_error, worst.name)
    hooks = make_hooks(model, cfg.adapters, cfg.train.max_steps)
    log.info("model summary\n%s", summary_table(model, injected))
    blocks = build_blocks(cfg.data, tokenizer, max_positions(model.config))
    sampler = GlobalBatchSampler(len(blocks.train_ids), cfg.train.micro_batch_size,
                                 cfg.train.gradient_accumulation_steps, dist.world_size, dist.rank, cfg.data.seed)
    engine = build_engine(cfg, model, ds_config)
    metadata = ckpt.adapter_metadata(cfg.adapters, cfg.quantization, cfg.model, identity, 0)

    start_step, run_id = 0, None
    if cfg.checkpoint.resume:
        state = ckpt.load_training_checkpoint(engine, run_dir, hooks, metadata)
        if state is not None:
            start_step, run_id = state["step"], state.get("tracker_run_id")
            log.info("resumed from step %d", start_step)
    tracker = create_tracker(cfg.tracking, run_dir, dist.is_main, run_id)
    if dist.is_main:
        run_files = write_run_files(run_dir, ds_config)  # ds_config.json (+ the sbatch script on Slurm)
        if start_step == 0:
            tracker.log_params(run_params(config_to_dict(cfg), ds_config, dist.world_size))
        for path in [run_dir / "run_config.yaml", *run_files]:
            tracker.log_artifact(path, "config")
        job = slurm_job_entry()
        if job:
            tracker.append_tag(SLURM_JOB_IDS_TAG, job)
    flops_per_token = model_flops_per_token(engine.module, cfg.data.block_size)

    # --- train
    result = TrainResult(step=start_step, first_step=start_step + 1)
    stop = StopFlag()
    tokens_per_step = sampler.global_batch * cfg.data.block_size
    # A live bar on a terminal; in log files (Slurm, CI) a log line per logging interval instead.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not (dist.is_main and interactive),
               desc="train", dynamic_ncols=True)
    status = "FINISHED"
    nonfinite_in_a_row = 0
    try:
        for step in range(start_step + 1, cfg.train.max_steps + 1):
            began = time.perf_counter()
            faults.inject("kill", dist.rank, step)
            faults.inject("signal", dist.rank, step)
            # Seeded per step and rank: dropout differs across ranks and a resumed run draws the same masks.
            torch.manual_seed(cfg.train.seed + 1_000_003 * dist.rank + step)
            local_loss = train_step(engine, blocks, sampler.micro_batches(step - 1), hooks, step, dist.rank)
            mean_loss, stop_votes = all_reduce_sum([local_loss or 0.0, float(stop.requested)], engine.device)
            mean_loss = mean_loss / dist.world_size if local_loss is not None else float("nan")
            result.losses.append(mean_loss)
            result.step = step
            if local_loss is None:
                result.skipped_steps += 1
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in all)", step,
                            nonfinite_in_a_row, result.skipped_steps)
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise TrainingAborted(
                        f"{nonfinite_in_a_row} steps in a row had a non-finite loss (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}); the last complete checkpoint in {run_dir / 'checkpoints'} "
                        "is intact. Lower train.lr, check the data, or resume from that checkpoint")
            else:
                nonfinite_in_a_row = 0
            elapsed = time.perf_counter() - began
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                metrics = {"train/loss": mean_loss, "train/lr": engine.get_lr()[0],
                           "train/tokens_per_s": tokens_per_step / elapsed,
                           "train/samples_per_s": sampler.global_batch / elapsed}
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["train/grad_norm"] = float(grad_norm)
                for hook in hooks:
                    metrics.update(hook.metrics())
                metrics.update(throughput_metrics(metrics["train/tokens_per_s"], flops_per_token,
                                                  dist.world_size, cfg.tracking.peak_tflops))
                metrics.update(gather_peak_memory(engine.device))  # a collective: every rank logs
                tracker.log_metrics(metrics, step)
                if not interactive:
                    eta = (cfg.train.max_steps - step) * elapsed
                    log.info("step %d/%d loss %.4f, %.0f tokens/s, eta %.0fs", step, cfg.train.max_steps,
                             mean_loss, tokens_per_step / elapsed, eta)
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.max_steps:
                eval_loss = evaluate(engine, blocks.eval_ids, blocks.eval_labels, cfg.train.micro_batch_size,
                                     cfg.train.eval_batches, dist)
                tracker.log_metrics({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))},
                                    step)
                log.info("step %d eval loss %.4f", step, eval_loss)
            save_now = cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0
            exit_now = cfg.checkpoint.exit_interval and (step - start_step) % cfg.checkpoint.exit_interval == 0
            stop_now = (stop_votes > 0 or exit_now) and step < cfg.train.max_steps
            if stop_now or (save_now and step < cfg.train.max_steps):
                saved = ckpt.save_training_checkpoint(engine, run_dir, step, hooks, tracker.run_id,
                                                      {**metadata, "step": step}, dist.is_main,
                                                      cfg.checkpoint.keep_last)
                tracker.log_artifact(saved / "adapter", f"checkpoints/{saved.name}")
            if stop_now:
                log.warning("stopping (%s): checkpoint at step %d written, exiting for requeue",
                            "signal" if stop_votes > 0 else "checkpoint.exit_interval", step)
                result.preempted = True
                status = "KILLED"
                if dist.is_main:
                    (run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
                return result

        # --- evaluate and save
        result.eval_loss = evaluate(engine, blocks.eval_ids, blocks.eval_labels, cfg.train.micro_batch_size,
                                    cfg.train.eval_batches, dist)
        result.eval_perplexity = math.exp(min(result.eval_loss, 50))
        tracker.log_metrics({"eval/loss": result.eval_loss, "eval/perplexity": result.eval_perplexity},
                            result.step)
        adapter_dir = run_dir / "adapter"
        ckpt.save_adapter(engine.module, adapter_dir, {**metadata, "step": result.step}, dist.is_main)
        result.adapter_dir = str(adapter_dir)
        if dist.is_main:
            (run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
            tracker.log_artifact(adapter_dir, "adapter")
            for path in write_plots(tracker.metric_history(), run_dir / "plots"):
                tracker.log_artifact(path, "plots")
        log.info("done: %d steps, final train loss %.4f, eval loss %.4f (perplexity %.2f), adapter at %s",
                 result.step, result.losses[-1] if result.losses else float("nan"), result.eval_loss,
                 result.eval_perplexity, adapter_dir)
        return result
    except BaseException:
        status = "FAILED"
        raise
    finally:
        bar.close()
        tracker.close(status)


def adapted_model(cfg: RunConfig, ds_config: dict) -> tuple[torch.nn.Module, LoadReport, dict[str, list[str]]]:
    """The base, streamed in (and under ZeRO-3 partitioned) as int8, with the configured adapters
    initialised alike on every rank; also the load report and adapter name -> adapted modules."""
    model, report = load_quantized_base(cfg.model, cfg.quantization, ds_config)
    torch.manual_seed(cfg.train.seed)
    return model, report, inject_adapters(model, cfg.adapters)


def build_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict):
    """Wrap the model in a DeepSpeed engine whose optimizer sees only the adapter parameters."""
    import deepspeed

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    train = cfg.train

    def scheduler(opt):  # built by DeepSpeed around its wrapped optimizer
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
            s, train.warmup_steps, train.max_steps, train.min_lr_ratio))

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                      lr_scheduler=scheduler, config=ds_config)
    return engine
