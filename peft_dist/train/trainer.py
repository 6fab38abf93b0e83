"""The training recipe in phases: ``setup(cfg) -> Run``, ``Run.train_steps()``, ``Run.finish()``,
``Run.close()``; one code path for any world size.

World size 1 (``python launcher/train.py``) is the degenerate case of the distributed run, not a
second script. Every rank runs the same collectives in the same order; only rank 0 writes files,
prints progress and talks to the tracker.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from peft_dist.adapters.inject import inject_adapters, trainable_parameters
from peft_dist.config.load import config_to_dict
from peft_dist.config.schema import RunConfig
from peft_dist.data import GlobalBatchSampler, Mixture, MixtureSampler, build_mixture
from peft_dist.distributed.env import DistEnv, init_distributed, resolve_env, setup_logging, watch_launchers
from peft_dist.distributed.hooks import TrainHook, make_hooks
from peft_dist.distributed.memory import return_freed_buffers_to_the_os
from peft_dist.distributed.zero3 import build_ds_config, full_numel, scalars_as_vectors, with_gradient_bucket
from peft_dist.model import base_identity, load_model_config, load_tokenizer, max_positions
from peft_dist.quant.loader import LoadReport, load_quantized_base
from peft_dist.train import checkpoint as ckpt
from peft_dist.train import faults
from peft_dist.train.files import lock_run_dir, unlock_run_dirs
from peft_dist.train.preflight import preflight
from peft_dist.train.step import all_reduce_sum, evaluate_sources, sample_completions, train_step
from peft_dist.train.schedule import warmup_cosine
from peft_dist.tracking import Tracker, create_tracker
from peft_dist.tracking.plots import write_plots
from peft_dist.tracking.run_info import (SLURM_JOB_IDS_TAG, gather_peak_memory, model_flops_per_token, run_params,
                                         slurm_job_entry, summary_table, throughput_metrics, write_run_files)

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


class TrainingAborted(RuntimeError):
    """Training cannot usefully continue (e.g. too many non-finite steps in a row)."""


@dataclass
class Run:
    """A set-up training job: what ``setup`` built and the phases that use it (``train_steps``,
    ``finish``, ``close``). Every rank holds one; only rank 0's writes files and tracks."""

    cfg: RunConfig
    dist: DistEnv
    log: logging.Logger
    run_dir: Path
    engine: Any
    tokenizer: Any
    data: Mixture
    sampler: GlobalBatchSampler | MixtureSampler
    hooks: list[TrainHook]
    tracker: Tracker
    metadata: dict  # the adapter checkpoint's metadata (its step set at each save)
    flops_per_token: float
    result: TrainResult
    stop: StopFlag
    interactive: bool = field(default_factory=sys.stderr.isatty)  # a live bar on a terminal, else log lines
    bar: Any = None

    def train_steps(self) -> bool:
        """Train from the step after the resumed one to ``max_steps``; True if it stopped early to be
        requeued (a signal or ``checkpoint.exit_interval``), with a checkpoint written."""
        cfg, start = self.cfg, self.result.step
        self.bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True,
                        disable=not (self.dist.is_main and self.interactive))
        if all_reduce_sum([float(self.stop.requested)], self.engine.device)[0] > 0:  # signalled while loading
            self.log.warning("stopping (signal during setup): nothing new to checkpoint, exiting for requeue")
            self.result.preempted = True
            self._write_result()
            return True
        nonfinite_in_a_row = 0
        for step in range(start + 1, cfg.train.max_steps + 1):
            began = time.perf_counter()
            faults.inject("kill", self.dist.rank, step)
            faults.inject("signal", self.dist.rank, step)
            # Seeded per step and rank: dropout differs across ranks and a resumed run draws the same masks.
            torch.manual_seed(cfg.train.seed + 1_000_003 * self.dist.rank + step)
            local_loss = train_step(self.engine, self.data.train, self.sampler.micro_batches(step - 1), self.hooks,
                                    step, self.dist.rank)
            mean_loss, stop_votes = all_reduce_sum([local_loss or 0.0, float(self.stop.requested)],
                                                   self.engine.device)
            mean_loss = mean_loss / self.dist.world_size if local_loss is not None else float("nan")
            self.result.losses.append(mean_loss)
            self.result.step = step
            nonfinite_in_a_row = self._count_nonfinite(step, local_loss is None, nonfinite_in_a_row)
            self._report(step, mean_loss, time.perf_counter() - began)
            if self._checkpoint_or_stop(step, stop_votes > 0):
                return True
        return False

    def _count_nonfinite(self, step: int, skipped: bool, in_a_row: int) -> int:
        """Non-finite steps in a row after ``step``; aborts past ``train.max_nonfinite_steps``."""
        if not skipped:
            return 0
        self.result.skipped_steps += 1
        in_a_row += 1
        self.log.warning("step %d: non-finite loss, step skipped (%d in a row, %d in all)", step, in_a_row,
                         self.result.skipped_steps)
        limit = self.cfg.train.max_nonfinite_steps
        if in_a_row >= limit:
            raise TrainingAborted(
                f"{in_a_row} steps in a row had a non-finite loss (train.max_nonfinite_steps={limit}); the last "
                f"complete checkpoint in {self.run_dir / 'checkpoints'} is intact. Lower train.lr, check the "
                "data, or resume from that checkpoint")
        return in_a_row

    def _report(self, step: int, mean_loss: float, elapsed: float) -> None:
        """Progress bar, metrics at each logging interval, and the periodic eval."""
        cfg = self.cfg
        tokens_per_step = self.sampler.global_batch * cfg.data.block_size
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
        if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
            metrics = {"train/loss": mean_loss, "train/lr": self.engine.get_lr()[0],
                       "train/tokens_per_s": tokens_per_step / elapsed,
                       "train/samples_per_s": self.sampler.global_batch / elapsed}
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            for hook in self.hooks:
                metrics.update(hook.metrics())
            metrics.update(throughput_metrics(metrics["train/tokens_per_s"], self.flops_per_token,
                                              self.dist.world_size, cfg.tracking.peak_tflops))
            metrics.update(gather_peak_memory(self.engine.device))  # a collective: every rank logs
            self.tracker.log_metrics(metrics, step)
            if not self.interactive:
                self.log.info("step %d/%d loss %.4f, %.3g tokens/s, eta %.0fs", step, cfg.train.max_steps,
                              mean_loss, tokens_per_step / elapsed, (cfg.train.max_steps - step) * elapsed)
        if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.max_steps:
            self.log.info("step %d eval loss %.4f", step, self.evaluate(step))

    def _checkpoint_or_stop(self, step: int, stop_requested: bool) -> bool:
        """Write a resumable checkpoint when one is due; True (after writing one) when the job must stop
        for a requeue."""
        ckpt_cfg, last = self.cfg.checkpoint, step == self.cfg.train.max_steps
        save_now = ckpt_cfg.save_interval and step % ckpt_cfg.save_interval == 0
        exit_now = ckpt_cfg.exit_interval and (step - self.result.first_step + 1) % ckpt_cfg.exit_interval == 0
        stop_now = (stop_requested or exit_now) and not last
        if stop_now or (save_now and not last):
            saved = ckpt.save_training_checkpoint(self.engine, self.run_dir, step, self.hooks, self.tracker.run_id,
                                                  {**self.metadata, "step": step}, self.dist.is_main,
                                                  ckpt_cfg.keep_last)
            self.tracker.log_artifact(saved / "adapter", f"checkpoints/{saved.name}")
        if stop_now:
            self.log.warning("stopping (%s): checkpoint at step %d written, exiting for requeue",
                             "signal" if stop_requested else "checkpoint.exit_interval", step)
            self.result.preempted = True
            self._write_result()
        return bool(stop_now)

    def evaluate(self, step: int) -> float:
        """Log the eval losses (each source's too, with several) and perplexity at ``step``, and the sample
        completions; return ``eval/loss``. Every rank runs it: each forward is a collective under ZeRO-3."""
        train = self.cfg.train
        metrics = evaluate_sources(self.engine, self.data.evals, train.micro_batch_size, train.eval_batches,
                                   self.dist.rank, self.dist.world_size)
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50))
        self.tracker.log_metrics(metrics, step)
        self._log_samples(step)
        return metrics["eval/loss"]

    def _log_samples(self, step: int) -> None:
        """The model's greedy continuation of each ``tracking.sample_prompts`` as the table
        ``samples/step-<step>.json``; generated on every rank, logged by rank 0."""
        tracking = self.cfg.tracking
        if not tracking.sample_prompts or tracking.backend == "none":
            return
        completions = sample_completions(self.engine, self.tokenizer, tracking.sample_prompts,
                                         tracking.sample_max_new_tokens, self.dist.world_size)
        self.tracker.log_table({"step": [step] * len(completions), "prompt": list(tracking.sample_prompts),
                                "completion": completions}, f"samples/step-{step:08d}.json")

    def finish(self) -> None:
        """Final eval, the adapter-only checkpoint, ``result.json`` and the loss plots."""
        result = self.result
        result.eval_loss = self.evaluate(result.step)
        result.eval_perplexity = math.exp(min(result.eval_loss, 50))
        adapter_dir = self.run_dir / "adapter"
        ckpt.save_adapter(self.engine.module, adapter_dir, {**self.metadata, "step": result.step}, self.dist.is_main)
        result.adapter_dir = str(adapter_dir)
        if self.dist.is_main:
            self._write_result()
            self.tracker.log_artifact(adapter_dir, "adapter")
            for path in write_plots(self.tracker.metric_history(), self.run_dir / "plots"):
                self.tracker.log_artifact(path, "plots")
        self.log.info("done: %d steps, final train loss %.4f, eval loss %.4f (perplexity %.2f), adapter at %s",
                      result.step, result.losses[-1] if result.losses else float("nan"), result.eval_loss,
                      result.eval_perplexity, adapter_dir)

    def _write_result(self) -> None:
        if self.dist.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(dataclasses.asdict(self.result), indent=2))

    def close(self, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tracker.close(status)
        unlock_run_dirs()


def train(cfg: RunConfig) -> TrainResult:
    """Run one training job as configured; returns the losses and where the adapter was saved."""
    run = setup(cfg)
    status = "FAILED"
    try:
        if run.train_steps():
            status = "KILLED"
        else:
            run.finish()
            status = "FINISHED"
        return run.result
    finally:
        run.close(status)


def setup(cfg: RunConfig) -> Run:
    """Checks, process group, run directory, model (streamed in, adapted), data, engine, resume, tracker."""
    return_freed_buffers_to_the_os()  # before loading: the planner's memory assumes freed buffers leave
    dist = resolve_env()
    log = setup_logging(dist.rank)
    stop = StopFlag()  # from the start: a signal while the base loads (minutes at 175B) must count too
    watch_launchers()
    faults.inject("signal", dist.rank, 0)  # step 0: a signal during setup
    run_dir = Path(cfg.checkpoint.output_dir)
    preflight(cfg)  # these checks run before any process group starts
    if dist.is_main:
        lock_run_dir(run_dir)  # held for the life of the job: one job per run directory
    ckpt.check_run_dir(run_dir, cfg.checkpoint)
    ds_config = build_ds_config(cfg, dist.world_size)
    init_distributed(dist)
    torch.distributed.barrier()
    if dist.is_main:
        start_run_dir(run_dir, cfg)
    # Tokenized once per source (by the first rank to get there; the others wait, then reuse it), memory-mapped.
    # The rank that prepares the data may be another than 0: only rank 0 shows progress bars.
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = build_mixture(cfg.data, tokenizer, max_positions(load_model_config(cfg.model.name_or_path)),
                         progress=dist.is_main)
    prepared_by_rank: list = [None] * dist.world_size
    torch.distributed.all_gather_object(prepared_by_rank, [part.prepared_here for part in data.parts])
    for line in data.lines(prepared_by_rank):
        log.info(line)
    sampler = data.sampler(cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, dist.world_size,
                           dist.rank, cfg.data.seed)
    # Streamed in one tensor at a time and, under ZeRO-3, partitioned module by module as it loads.
    model, load_report, injected = adapted_model(cfg, ds_config)
    load_reports = log_load_report(log, load_report, dist.world_size, cfg.quantization.bits)
    hooks = make_hooks(model, cfg.adapters, cfg.train.max_steps)
    log.info("model summary\n%s", summary_table(model, injected))
    engine = build_engine(cfg, model, ds_config)
    metadata = ckpt.adapter_metadata(cfg.adapters, cfg.quantization, cfg.model,
                                     base_identity(cfg.model, model.config), 0)
    start_step, run_id = 0, None
    if cfg.checkpoint.resume:
        state = ckpt.load_training_checkpoint(engine, run_dir, hooks, metadata)
        if state is not None:
            start_step, run_id = state["step"], state.get("tracker_run_id")
            log.info("resumed from step %d", start_step)
    tracker = start_tracking(cfg, run_dir, ds_config, dist, run_id, fresh=start_step == 0)
    tracker.log_metrics(load_metrics(load_reports), start_step)
    return Run(cfg, dist, log, run_dir, engine, tokenizer, data, sampler, hooks, tracker, metadata,
               model_flops_per_token(engine.module, cfg.data.block_size),
               TrainResult(step=start_step, first_step=start_step + 1), stop)


def start_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Rank 0: create the run directory (clearing old checkpoints on ``overwrite``) and record the config."""
    if cfg.checkpoint.overwrite and not cfg.checkpoint.resume:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def log_load_report(log: logging.Logger, report: LoadReport, world_size: int, bits: int) -> list[LoadReport]:
    """Rank 0 logs every rank's peak memory while loading and the quantization error; every rank's report
    (a collective)."""
    reports: list = [None] * world_size
    torch.distributed.all_gather_object(reports, report)
    log.info("base loaded\n%s", "\n".join(r.line() for r in reports))
    errors = [error for r in reports for error in r.quantization]  # each rank quantized the layers it read
    if errors:
        worst = max(errors, key=lambda r: r.rel_error)
        log.info("%d-bit base: %d layers quantized, relative error mean %.4f, worst %.4f (%s)", bits, len(errors),
                 sum(r.rel_error for r in errors) / len(errors), worst.rel_error, worst.name)
    return reports


def load_metrics(reports: list[LoadReport]) -> dict[str, float]:
    """What this job start cost, as metrics to set against the plan's "job start" lines: the load time and of
    it the quantizing (the slowest rank's) and the checkpoint bytes each rank read."""
    metrics = {"load/seconds": max(r.seconds for r in reports),
               "load/quantize_seconds": max(r.quantize_seconds for r in reports)}
    metrics.update({f"load/checkpoint_read_gib/rank{r.rank}": r.bytes_read / 2**30 for r in reports})
    return metrics


def start_tracking(cfg: RunConfig, run_dir: Path, ds_config: dict, dist: DistEnv, run_id: str | None,
                   fresh: bool) -> Tracker:
    """The tracker (a resumed job continues ``run_id``); rank 0 logs params (``fresh`` runs only), the run
    files and, on Slurm, this job's id."""
    tracker = create_tracker(cfg.tracking, run_dir, dist.is_main, run_id)
    if dist.is_main:
        run_files = write_run_files(run_dir, ds_config)  # ds_config.json (+ the sbatch script on Slurm)
        if fresh:
            tracker.log_params(run_params(config_to_dict(cfg), ds_config, dist.world_size))
        for path in [run_dir / "run_config.yaml", *run_files]:
            tracker.log_artifact(path, "config")
        job = slurm_job_entry()
        if job:
            tracker.append_tag(SLURM_JOB_IDS_TAG, job)
    return tracker


def adapted_model(cfg: RunConfig, ds_config: dict) -> tuple[torch.nn.Module, LoadReport, dict[str, list[str]]]:
    """The base, streamed in (and under ZeRO-3 partitioned) quantized, with the configured adapters
    initialised alike on every rank; also the load report and adapter name -> adapted modules."""
    model, report = load_quantized_base(cfg.model, cfg.quantization, ds_config)
    torch.manual_seed(cfg.train.seed)
    return model, report, inject_adapters(model, cfg.adapters)


def build_engine(cfg: RunConfig, model: torch.nn.Module, ds_config: dict):
    """Wrap the model in a DeepSpeed engine whose optimizer sees only the adapter parameters, and whose gradient
    bucket holds only their elements (``with_gradient_bucket``)."""
    import deepspeed

    scalars_as_vectors(model)
    params = trainable_parameters(model)
    ds_config = with_gradient_bucket(ds_config, sum(full_numel(p) for p in params))
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    train = cfg.train

    def scheduler(opt):  # built by DeepSpeed around its wrapped optimizer
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(
            s, train.warmup_steps, train.max_steps, train.min_lr_ratio))

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                      lr_scheduler=scheduler, config=ds_config)
    return engine
