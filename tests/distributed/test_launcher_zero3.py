"""Real multi-process runs of ``launcher/train.py`` under DeepSpeed ZeRO-3 on CPU (gloo).

Persistence threshold 0 makes ZeRO-3 partition even the tiny test layers, so these runs really
all-gather int8 shards and adapter shards.
"""
import math
import re

import pytest

from peft_dist.train.config import load_config
from peft_dist.data import build_blocks
from peft_dist.inference import load_for_inference
from peft_dist.train.step import evaluate
from tests.distributed.mem_runs import launch, short_run
from tests.multiproc import TINY_JOB

pytestmark = pytest.mark.slow


def test_two_ranks_zero3_loss_falls_and_adapter_reloads(tmp_path):
    result = launch(tmp_path, "run", 2, "train.max_steps=12", "train.eval_batches=4")
    losses = result["losses"]
    assert abs(losses[0] - math.log(512)) < 0.15, losses[0]  # random base: near-uniform predictions
    assert losses[-1] < losses[0] - 0.4, losses
    # The base was streamed in and partitioned while loading: each rank held half of it from the start.
    for rank in (0, 1):
        held, full = map(float, re.search(rf"\[rank {rank}/2\] load_quantized_base zero3=True: .* parameters "
                                          r"held ([\d.]+) MiB of ([\d.]+) MiB", result["log"]).groups())
        assert held == pytest.approx(full / 2, abs=0.01), (rank, held, full)  # printed to 0.01 MiB

    # Reload the adapter onto a fresh base in this single process: same eval loss as the 2-rank run.
    model, tokenizer = load_for_inference(result["adapter_dir"])
    cfg = load_config(None, [*TINY_JOB, "train.eval_batches=4"])
    blocks = build_blocks(cfg.data, tokenizer)
    loss = evaluate(model, blocks.eval, cfg.train.micro_batch_size, cfg.train.eval_batches)
    assert loss == pytest.approx(result["eval_loss"], rel=1e-5)


def test_the_deepspeed_launcher_and_gradient_checkpointing_give_the_same_losses(tmp_path_factory):
    """The same job under the deepspeed launcher as under torchrun, and with each layer recomputed in backward
    (ZeRO-3 gathers the int8 shards again for the recomputation): the same numbers. The torchrun run is
    test_n_invariance.py's 2-rank one (shared), which also checks these losses against 1 and 4 ranks."""
    torchrun = short_run(tmp_path_factory, 2)
    deepspeed = short_run(tmp_path_factory, 2, launcher="deepspeed")
    recomputed = short_run(tmp_path_factory, 2, "model.gradient_checkpointing=true")
    assert deepspeed["losses"] == pytest.approx(torchrun["losses"], rel=1e-6)
    assert recomputed["losses"] == pytest.approx(torchrun["losses"], rel=1e-6)
