"""One optimizer step, the evaluation and the sample completions, as every rank runs them (the collectives in
the same order on every rank): the pieces of the recipe that bench/ and the test workers reuse."""
from __future__ import annotations

import math

import torch

from peft_dist.adapters.base import float_dtype
from peft_dist.adapters.inject import trainable_parameters
from peft_dist.data import Split
from peft_dist.distributed.zero3 import optimizer_state, restore_optimizer_state, zero_gradients
from peft_dist.model import generate_ids, packed_inputs
from peft_dist.train import faults


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (one small collective)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def forward_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean loss of one batch of packed blocks, each document attending only to itself; ``model`` is a
    DeepSpeed engine or the Hugging Face model itself."""
    module = getattr(model, "module", model)
    inputs = {name: tensor.to(model.device) for name, tensor in batch.items()}
    # The compute dtype: that of the embedding's float tensors (an int8 table's scales).
    return model(**packed_inputs(module.config, inputs, float_dtype(module.get_input_embeddings()))).loss


def evaluate(engine, split: Split, micro: int, batches: int, rank: int = 0, world_size: int = 1) -> float:
    """Token-weighted mean loss over the first ``batches`` micro-batches of ``split`` (``eval_sums``)."""
    total, tokens = eval_sums(engine, split, micro, batches, rank, world_size)
    return total / max(tokens, 1.0)


def evaluate_sources(engine, splits: dict[str, Split], micro: int, batches: int, rank: int = 0,
                     world_size: int = 1) -> dict[str, float]:
    """``eval/loss``: the token-weighted mean loss over the first ``batches`` micro-batches of every source's
    evaluation split together (of one source, ``evaluate``'s); with several sources also ``eval/<name>/loss``
    of each, whose mean weighted by their evaluated loss tokens is ``eval/loss``."""
    sums = {name: eval_sums(engine, split, micro, batches, rank, world_size) for name, split in splits.items()}
    total, tokens = sum(t for t, _ in sums.values()), sum(n for _, n in sums.values())
    metrics = {"eval/loss": total / max(tokens, 1.0)}
    if len(splits) > 1:
        metrics.update({f"eval/{name}/loss": t / max(n, 1.0) for name, (t, n) in sums.items()})
    return metrics


@torch.no_grad()
def eval_sums(engine, split: Split, micro: int, batches: int, rank: int = 0,
              world_size: int = 1) -> tuple[float, float]:
    """The loss times the loss tokens, and the loss tokens, over the first ``batches`` micro-batches of ``split``.

    The evaluated blocks do not depend on the world size (so a reloaded adapter can be checked in one
    process). Batches are dealt round-robin; under ZeRO-3 every rank must run the same number of
    forwards (each gathers parameters), so a rank short of a batch repeats one with weight zero.
    """
    count = min(len(split), batches * micro)
    chunks = [range(start, min(start + micro, count)) for start in range(0, count, micro)]
    mine = chunks[rank::world_size]
    engine.eval()
    total, tokens_seen = 0.0, 0.0
    for i in range(math.ceil(len(chunks) / world_size)):
        batch = split.batch(mine[i] if i < len(mine) else chunks[0])
        weight = 1.0 if i < len(mine) else 0.0
        loss = forward_loss(engine, batch).float().item()
        tokens = weight * (batch["labels"][:, 1:] != -100).sum().item()
        total += loss * tokens
        tokens_seen += tokens
    engine.train()
    if world_size > 1:  # (world_size 1: this process evaluates alone, even inside a distributed job)
        total, tokens_seen = all_reduce_sum([total, tokens_seen], engine.device)
    return total, tokens_seen


def sample_completions(engine, tokenizer, prompts: list[str], max_new_tokens: int, world_size: int = 1) -> list[str]:
    """What the model adds to each prompt, greedily (``generate_ids``, as ``peft_dist.generate``). Under ZeRO-3
    every rank must call this with the same prompts: each forward gathers parameters collectively."""
    engine.eval()
    completions = []
    for prompt in prompts:
        _, new_ids = generate_ids(getattr(engine, "module", engine), tokenizer, prompt, max_new_tokens,
                                  synced=world_size > 1)
        completions.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    engine.train()
    return completions


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    return all_reduce_sum([0.0 if flag else 1.0], device)[0] == 0.0


def train_step(engine, split: Split, micro_batches: list[torch.Tensor], hooks: list, step: int,
               rank: int) -> float | None:
    """One optimizer step over this rank's micro-batches.

    If the loss of any micro-batch is non-finite on any rank (ranks agree through one tiny
    all-reduce), the step is skipped: DeepSpeed counts micro-steps and ZeRO-3 needs every backward,
    so both still happen and ``engine.step()`` still runs, with zeroed gradients and learning rate 0
    (parameters stay) and the optimizer state put back afterwards (Adam's moments and step counts are
    exactly as before: a true skip); the method hooks do not run. Returns the mean micro-batch loss,
    or None for a skipped step.
    """
    loss_sum, finite, saved = 0.0, True, None
    for index, micro in enumerate(micro_batches):
        loss = forward_loss(engine, split.batch(micro))
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
                saved = optimizer_state(engine)
        engine.step()  # steps the optimizer and the LR schedule only at the accumulation boundary
    if not finite:
        restore_optimizer_state(engine, saved)
        return None
    for hook in hooks:
        hook.after_step(engine, step)
    return loss_sum / len(micro_batches)
