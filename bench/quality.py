"""Adaptation quality at CPU size: every method at matched parameter budgets (0.1% and 1%), 5 seeds each.

    python bench/quality.py --write docs/RESULTS.md   # the table (170 runs, about an hour on 2 cores)
    python bench/quality.py --quick                   # 2 seeds, 0.1%, 6 methods, short runs (a few minutes)
    python bench/quality.py --sweep                   # LEARNING_RATES, ADALORA_SCHEDULES (~170 runs, ~90 min)
    python bench/quality.py --sweep --only lora krona  # the sweep of some methods' rows only (a sweep in parts)
    python bench/quality.py --sweep --missing          # the sweep of the rows LEARNING_RATES has no entry for
    python bench/quality.py --bases --write docs/RESULTS.md  # LoRA on fp32, bf16, int8 and NF4 bases (~30 min)
    python bench/quality.py --make-base               # pretrain the shipped base anew, print its sha256 (~10 min)
    python bench/quality.py --base-model large --make-base  # the second base (6 layers, hidden 384), ~1 hour
    python bench/quality.py --base-model large --sweep      # its rates, from around the small base's (~2 hours)
    python bench/quality.py --base-model large --write docs/RESULTS_LARGE.md  # its table (~2 hours)
    python bench/quality.py --across-bases --write docs/RESULTS.md  # each claim's verdict on both bases

Every run's result is recorded (RUNS_DIR, one file per base's weights): a sweep or table that is stopped resumes
where it stopped when started again (the table prints its progress and an ETA on stderr after each row), so the
large base's hours can be spread over several sittings, and ``--across-bases`` (both tables, then one row per
claim with its verdict on each base, written between ACROSS_MARKS below the hand-written reading) reruns nothing
that the two tables have recorded.

Verdicts (bench/stats.py, fixed before the numbers): each claim "x beats y" is a paired comparison by seed (the
two runs of a seed share data order and seed), judged by a paired t test with a 95% CI; the p-values of all
compared claims are Holm-Bonferroni adjusted. A claim holds when the adjusted p < 0.05, the CI excludes 0 on the
claimed side and x is at least 0.01 nats better; "reversed" is the same the other way; anything else is "not
shown". A paired bootstrap over test documents is reported beside it (``stats.document_bootstrap``: each test
token's loss belongs to the document it comes from, a block of the stream can hold parts of several; the
documents are resampled and the statistic is the token-weighted mean difference, the same mean the reported
losses take). A pair whose kept parameters differ by more than 2% is not judged: the claims say "not compared"
with both counts.

Corpora (offline, from this Python's standard library, split by module so that A and B share no file): A is
the source code of the even-numbered modules (sorted by path), B the docstrings of the odd-numbered ones
(module, class and function docstrings, one document per module; the builtin corpus
``builtin:python-docstrings``, peft_dist/data/sources.py): English prose about code instead of code. B's
documents are split 80/10/10 into train, validation (for the learning-rate sweep) and test (the reported loss).

1. Pretraining, once, by ``--make-base``: a 4-layer Llama (hidden 256, FFN 768, vocab 512 of the shipped
   tokenizer; 3.67M parameters) trained from scratch on A, 1,200 steps of 8 x 128 tokens on one thread (~10
   minutes; one thread gives the same bytes on every run with the same Python, torch and CPU). It ships as
   ``builtin:stdlib-llama`` (peft_dist/assets/stdlib_llama: what the default training job adapts), and every
   other mode reads that file, its sha256 checked against the one recorded in peft_dist/model.py. The second
   base (``--base-model large``: 6 layers, hidden 384, FFN 1152; 11.9M parameters) is pretrained the same way
   for 3,000 steps into LARGE_DIR, its sha256 recorded in LARGE_SHA256; both print their loss on held-out A
   (the even-numbered modules after A's 300) as they train. Each claim is then judged on each base.
2. Adaptation to B: each method from the same base, fp32, plain PyTorch in this process (the quality of a
   method does not depend on ZeRO sharding, and full fine-tuning needs a trainable base), 96 steps of
   8 x 128 tokens, AdamW with the trainer's warm-up/cosine schedule, gradient clipping 1.0. Each method's
   learning rate is the best of a sweep on B's validation split with SWEEP_SEED (0), which is not one of the
   reported SEEDS (1-5), so the reported losses are not those the rate was picked on; the sweep's grid grows past
   whichever end holds the best value until the best is strictly inside (``best_learning_rate``; recorded in
   LEARNING_RATES; ``--write`` refuses rows without one). The validation and test losses are taken on every
   block of their split (a tenth of B's documents each; evaluating one costs about 10 training steps).
   AdaLoRA's hook is driven as the trainer drives it (``engine=None``). Two AdaLoRA rows: "adalora_paper" keeps
   the paper's schedule (ADALORA_PAPER: init_r = 1.5 x target_r, the final budget for the last third of the
   steps); "adalora" has its schedule chosen on validation like a learning rate, by coordinate steps that keep
   the sweep small: the paper row's learning rate first, then the best schedule of ADALORA_GRID (init_r of 1.5,
   2 or 4 x target_r; tfinal of 12 or 32 steps) at that rate, then the row's own learning rate at that schedule
   (recorded in ADALORA_SCHEDULES). ``--quick`` only checks that the script runs: 16 steps at the middle of
   each method's starting grid, nothing recorded needed.

Budgets: each method's size knob (rank, bottleneck width, prefix length, Kronecker factor shape) is picked by
``match_budgets``, counted on the real injected model: the methods a claim compares share an anchor count
within a factor 2 of 0.1% or 1% of the base, chosen so that as many compared pairs as possible have kept
parameters (what the adapter checkpoint stores) within 2% of each other, then as near the target as possible;
the table's "% of base" column shows where each landed (pairs left apart get rows of their own: Placement).
Kept equals trained except for AdaLoRA, matched on its final budget (``target_r``; the schedule changes only
what it trains), and for the reparameterized prefix, matched on its vectors as the prefix-tuning papers count
it (its training MLP is discarded). Plain prefix tuning trains its vectors directly; the gated prefix
("prefix_gated", ``gate: true``) adds one zero-initialised gate per head and layer, so that it starts as an
exact no-op: does prefix tuning's start explain its weakness? BitFit on a Llama (no biases) trains the norm
weights: a fixed 0.06%. MAM splits its budget between its prefix and its scaled FFN adapter, neither part more
than twice the other.

Placement: LoRA, AdaLoRA and KronA sit on q,v (their papers' setting), the parallel adapter, KronA^B and MAM's
adapter at the FFN. The controls "lora_ffn", "lora_all", "krona_ffn" and "krona_all" put LoRA and KronA on the
FFN linears (gate, up, down) and on all linears, and the claims compare one method at two placements (LoRA on
q,v vs FFN vs all; KronA likewise) and two methods at one placement (KronA^B vs KronA on the FFN, the parallel
adapter vs LoRA on the FFN, KronA vs LoRA on the FFN and on all linears), so that the placement effect and the
method effect are told apart. The controls exist at 1% only: at 0.1% their smallest configuration is 2.9 to
5.6 times the budget (``reachable``). Some compared pairs are more than 2% apart in their methods' rows, because
one row serves several claims (at 1% LoRA on q,v meets KronA at r = 8 or 16, both its placement controls at
r = 15). Such a pair gets rows sized for it (``resized``; "sized for" in the table): one side re-sized to the
other's row where a configuration matches, else both re-sized within the window; each such row has its own
learning rate from the sweep. Pairs that no two configurations in the window match (KronA's Kronecker shapes
give few counts) are reported "not compared" with both counts.

Bases (``--bases``, QLoRA's claim that NF4 + LoRA matches LoRA on a 16-bit base): the LoRA rows of the table
(same configurations, learning rates, seeds and data order) adapt copies of the same pretrained base whose
decoder linears are kept as fp32, rounded to bfloat16, or quantized by peft_dist's own ``quantize_model`` as
the trainer does it (int8 row-wise; NF4 with blocksize 64, with and without double quantization). Embeddings,
norms and lm_head stay fp32 in every base, and every base computes in fp32, so the bases differ only in how
the decoder linears' weights are stored (bf16 compute is emulated on CPUs without native bf16, and would add
its own rounding of activations to the comparison). Each base is compared with the bf16 one by
``stats.equivalence``: the paired differences by seed must lie within +-MIN_EFFECT (TOST, Holm-adjusted over
the section's claims) to "match". The section is written between BASES_MARKS, below
HAND_WRITTEN, so that ``--write`` keeps it and ``--bases --write`` replaces only it.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_dist.model import STDLIB_LLAMA, STDLIB_LLAMA_SHA256  # noqa: E402
from peft_dist.plan.models import ModelShape  # noqa: E402

import stats  # noqa: E402  (bench/stats.py, on sys.path as this script's folder)

SHAPE = ModelShape("quality-llama", "llama", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768, vocab=512,
                   max_positions=512, tied_embeddings=False)
SEQ, BATCH = 128, 8
PRETRAIN = {"steps": 1200, "lr": 3e-3, "modules": 300, "seed": 0}
# The second base (--base-model large): 1.5x deeper and wider, 3.2x the parameters and the compute per token of
# the small one, pretrained on the same A for longer. It does not ship (48 MB); --make-base writes it here.
LARGE_SHAPE = ModelShape("quality-llama-large", "llama", hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1152,
                         vocab=512, max_positions=512, tied_embeddings=False)
LARGE_PRETRAIN = {"steps": 3000, "lr": 2e-3, "modules": 300, "seed": 0}
LARGE_DIR = Path(os.path.expanduser("~/.cache/peft-dist/bench/quality-large"))
# What --make-base --base-model large printed (2026-12-01, an AVX-512 CPU; another CPU kind makes another base).
LARGE_SHA256 = "cd6f49a47c2f69e80a88c20638e718b5af90d9259e68b2e7b1f2736164709727"
# Every adaptation run's result, by its configuration, seed and learning rate, one file per pretrained base (its
# weights' sha256): an interrupted sweep or table resumes where it stopped (``adapt``). None: not kept (tests).
RUNS_DIR = Path(os.path.expanduser("~/.cache/peft-dist/bench/quality-runs"))
RUNS: Path | None = None
ADAPT_STEPS, WARMUP_STEPS, EVAL_BLOCKS = 96, 6, 96
BUDGETS = (0.001, 0.01)
SEEDS = (1, 2, 3, 4, 5)  # reported; the learning rates are chosen on SWEEP_SEED, which is not among them
SWEEP_SEED = 0
BUDGET_TOLERANCE = 0.02  # compared pairs' kept parameters may differ by at most 2%
BUDGET_WINDOW = 2.0  # a row's budget is met within this factor (the anchors ``match_budgets`` tries)
HAND_WRITTEN = "<!-- written by hand from here on; bench/quality.py --write keeps it -->"
BASES_MARKS = ("<!-- written by bench/quality.py --bases from here to the end mark -->",
               "<!-- end of bench/quality.py --bases -->")
ACROSS_MARKS = ("<!-- written by bench/quality.py --across-bases from here to the end mark -->",
                "<!-- end of bench/quality.py --across-bases -->")
PREFIX_MLP = 64  # hidden width of the reparameterized prefix's training MLP
QV = ["q_proj", "v_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Where each linear-delta method sits: fixed, so that a row's placement is part of its name (placement controls).
PLACEMENT = {"lora": QV, "lora_ffn": FFN, "lora_all": ALL, "krona": QV, "krona_ffn": FFN, "krona_all": ALL,
             "adalora": QV, "adalora_paper": QV}
METHODS = ("full", "bitfit", "lora", "lora_ffn", "lora_all", "adalora", "adalora_paper", "krona", "krona_ffn",
           "krona_all", "krona_block", "krona_block_res", "parallel", "scaled_parallel", "prefix", "prefix_gated",
           "prefix_reparam", "mam")
NAMES = {"full": "full fine-tuning", "bitfit": "BitFit (norms)", "lora": "LoRA on q,v",
         "lora_ffn": "LoRA on FFN linears", "lora_all": "LoRA on all linears", "adalora": "AdaLoRA on q,v (schedule tuned)",
         "adalora_paper": "AdaLoRA on q,v (paper's schedule)", "krona": "KronA on q,v",
         "krona_ffn": "KronA on FFN linears", "krona_all": "KronA on all linears", "krona_block": "KronA^B",
         "krona_block_res": "KronA^B_res", "parallel": "parallel adapter",
         "scaled_parallel": "scaled parallel adapter (s=4)", "prefix": "prefix tuning",
         "prefix_gated": "prefix tuning, gated", "prefix_reparam": f"prefix tuning, reparameterized (MLP {PREFIX_MLP})",
         "mam": "MAM"}
# The best validation loss of the grid in ``sweep`` (SWEEP_SEED 0), pasted from its output: every optimum strictly
# inside its grid. The sweep of 2026-11-30 ran in two parts on 2 cores, `python bench/quality.py --sweep --only lora
# lora_ffn lora_all adalora adalora_paper krona krona_ffn krona_all prefix prefix_gated` (43 min), then `--sweep
# --only full bitfit krona_block krona_block_res parallel scaled_parallel prefix_reparam mam` (44 min, other work
# running alongside).
LEARNING_RATES: dict[tuple, float] = {  # by Row.key
    ('lora', 0.001): 0.03,  # 0.003: 3.890, 0.01: 3.866, 0.03: 3.853, 0.1: 4.126, 0.3: 6.264
    ('lora', 0.01): 0.01,  # 0.003: 3.828, 0.01: 3.816, 0.03: 4.207, 0.1: 5.682, 0.3: 5.705
    ('lora_ffn', 0.01): 0.01,  # 0.003: 3.764, 0.01: 3.720, 0.03: 3.729, 0.1: 4.778, 0.3: 4.939
    ('lora_all', 0.01): 0.01,  # 0.003: 3.764, 0.01: 3.716, 0.03: 3.904, 0.1: 5.249, 0.3: 5.181
    ('adalora', 0.001): 0.1,  # 0.003: 3.945, 0.01: 3.943, 0.03: 3.878, 0.1: 3.861, 0.3: 3.887
    ('adalora', 0.01): 0.03,  # 0.003: 3.931, 0.01: 3.876, 0.03: 3.827, 0.1: 3.849, 0.3: 5.256
    ('adalora_paper', 0.001): 0.1,  # 0.003: 3.945, 0.01: 3.943, 0.03: 3.878, 0.1: 3.864, 0.3: 3.874
    ('adalora_paper', 0.01): 0.03,  # 0.003: 3.940, 0.01: 3.884, 0.03: 3.834, 0.1: 3.841, 0.3: 4.653
    ('krona', 0.001): 0.03,  # 0.003: 3.918, 0.01: 3.877, 0.03: 3.835, 0.1: 3.838, 0.3: 5.144
    ('krona', 0.01): 0.03,  # 0.003: 3.896, 0.01: 3.840, 0.03: 3.812, 0.1: 3.818, 0.3: 5.389
    ('krona_ffn', 0.01): 0.03,  # 0.003: 3.789, 0.01: 3.734, 0.03: 3.713, 0.1: 3.730, 0.3: 3.974
    ('krona_all', 0.01): 0.03,  # 0.003: 3.783, 0.01: 3.719, 0.03: 3.697, 0.1: 3.816, 0.3: 4.939
    ('prefix', 0.001): 1,  # 0.03: 3.942, 0.1: 3.939, 0.3: 3.923, 1: 3.905, 3: 3.914
    ('prefix', 0.01): 1,  # 0.03: 3.941, 0.1: 3.937, 0.3: 3.910, 1: 3.872, 3: 3.997
    ('prefix_gated', 0.001): 0.3,  # 0.03: 3.907, 0.1: 3.882, 0.3: 3.877, 1: 3.879, 3: 3.880
    ('prefix_gated', 0.01): 0.3,  # 0.03: 3.890, 0.1: 3.862, 0.3: 3.858, 1: 3.874, 3: 3.960
    ('full', None): 0.003,  # 0.0003: 3.688, 0.001: 3.634, 0.003: 3.618, 0.01: 3.822
    ('bitfit', None): 0.1,  # 0.003: 3.894, 0.01: 3.854, 0.03: 3.820, 0.1: 3.806, 0.3: 3.817
    ('krona_block', 0.001): 0.3,  # 0.003: 3.933, 0.01: 3.887, 0.03: 3.822, 0.1: 3.790, 0.3: 3.789, 0.9: 3.805
    ('krona_block', 0.01): 0.1,  # 0.003: 3.909, 0.01: 3.822, 0.03: 3.777, 0.1: 3.764, 0.3: 3.771
    ('krona_block_res', 0.001): 0.3,  # 0.003: 3.937, 0.01: 3.887, 0.03: 3.820, 0.1: 3.787, 0.3: 3.780, 0.9: 3.807
    ('krona_block_res', 0.01): 0.1,  # 0.003: 3.913, 0.01: 3.828, 0.03: 3.777, 0.1: 3.762, 0.3: 3.767
    ('parallel', 0.001): 0.1,  # 0.003: 3.903, 0.01: 3.848, 0.03: 3.814, 0.1: 3.812, 0.3: 3.825
    ('parallel', 0.01): 0.1,  # 0.003: 3.830, 0.01: 3.787, 0.03: 3.759, 0.1: 3.744, 0.3: 3.848
    ('scaled_parallel', 0.001): 0.03,  # 0.003: 3.872, 0.01: 3.820, 0.03: 3.811, 0.1: 3.819, 0.3: 3.830
    ('scaled_parallel', 0.01): 0.03,  # 0.003: 3.800, 0.01: 3.767, 0.03: 3.747, 0.1: 3.798, 0.3: 3.971
    ('prefix_reparam', 0.001): 0.03,  # 0.003: 3.936, 0.01: 3.918, 0.03: 3.899, 0.1: 3.922, 0.3: 4.652
    ('prefix_reparam', 0.01): 0.03,  # 0.003: 3.933, 0.01: 3.902, 0.03: 3.884, 0.1: 3.946, 0.3: 5.082
    ('mam', 0.001): 0.1,  # 0.003: 3.892, 0.01: 3.842, 0.03: 3.821, 0.1: 3.810, 0.3: 3.852
    ('mam', 0.01): 0.03,  # 0.003: 3.824, 0.01: 3.788, 0.03: 3.773, 0.1: 3.789, 0.3: 3.878
    # The rows sized for one claim, from `python bench/quality.py --sweep --missing` (2026-12-01, 14 min)
    ('lora', 0.01, 'krona'): 0.01,  # 0.003: 3.828, 0.01: 3.809, 0.03: 4.702, 0.1: 5.909, 0.3: 6.256
    ('lora_ffn', 0.01, 'krona_ffn'): 0.01,  # 0.003: 3.772, 0.01: 3.736, 0.03: 3.747, 0.1: 4.768, 0.3: 5.031
    ('lora_all', 0.01, 'krona_all'): 0.01,  # 0.003: 3.792, 0.01: 3.751, 0.03: 3.754, 0.1: 5.236, 0.3: 5.296
    ('krona_all', 0.01, 'lora_all'): 0.03,  # 0.003: 3.839, 0.01: 3.763, 0.03: 3.711, 0.1: 3.965, 0.3: 5.014
}
# AdaLoRA's schedules. ADALORA_PAPER is the paper's own setting (init_r = 1.5 x target_r, the final budget for the
# last third of training), the "adalora_paper" row. The "adalora" row's schedule is the best of ADALORA_GRID on
# validation (``sweep``) at the learning rate chosen for the paper row, recorded per budget in ADALORA_SCHEDULES
# (pasted from --sweep's output).
ADALORA_PAPER = {"init_ratio": 1.5, "tfinal": ADAPT_STEPS // 3}
ADALORA_GRID = tuple({"init_ratio": ratio, "tfinal": tfinal}
                     for ratio in (1.5, 2.0, 4.0) for tfinal in (ADAPT_STEPS // 8, ADAPT_STEPS // 3))
ADALORA_SCHEDULES: dict[float, dict] = {
    0.001: {'init_ratio': 1.5, 'tfinal': 12},  # at lr 0.1: init_r 1.5 x, tfinal 12: 3.861, init_r 1.5 x, tfinal 32: 3.864, init_r 2 x, tfinal 12: 3.861, init_r 2 x, tfinal 32: 3.864, init_r 4 x, tfinal 12: 3.876, init_r 4 x, tfinal 32: 3.870
    0.01: {'init_ratio': 4.0, 'tfinal': 12},  # at lr 0.03: init_r 1.5 x, tfinal 12: 3.833, init_r 1.5 x, tfinal 32: 3.834, init_r 2 x, tfinal 12: 3.831, init_r 2 x, tfinal 32: 3.834, init_r 4 x, tfinal 12: 3.827, init_r 4 x, tfinal 32: 3.829
}

# The large base's, from its own sweep (``--base-model large --sweep``: each grid starts around the small base's
# rate for the same row, ``initial_grid``), 2026-12-01 on an AVX-512 CPU: 18 rows in 64 minutes alongside other
# work, then the other 15 (``--sweep --missing``) in 42 minutes.
LARGE_LEARNING_RATES: dict[tuple, float] = {  # by Row.key
    ('full', None): 0.001,  # 0.000333333: 3.038, 0.001: 3.030, 0.003: 3.097, 0.01: 3.429
    ('bitfit', None): 0.03,  # 0.009: 3.146, 0.03: 3.129, 0.1: 3.138, 0.3: 3.191
    ('lora', 0.001): 0.01,  # 0.00333333: 3.157, 0.01: 3.139, 0.03: 3.189, 0.1: 5.445
    ('lora', 0.01): 0.003,  # 0.0009: 3.164, 0.003: 3.141, 0.01: 3.192, 0.03: 5.256
    ('lora', 0.01, 'krona'): 0.003,  # 0.0009: 3.170, 0.003: 3.136, 0.01: 3.145, 0.03: 5.194
    ('lora_ffn', 0.01): 0.01,  # 0.003: 3.071, 0.01: 3.057, 0.03: 3.110
    ('lora_all', 0.01): 0.003,  # 0.0009: 3.117, 0.003: 3.070, 0.01: 3.079, 0.03: 5.141
    ('lora_all', 0.01, 'krona_all'): 0.01,  # 0.003: 3.075, 0.01: 3.057, 0.03: 3.798
    ('adalora', 0.001): 0.03,  # 0.009: 3.202, 0.03: 3.159, 0.1: 3.160, 0.3: 4.873
    ('adalora', 0.01): 0.03,  # 0.01: 3.171, 0.03: 3.141, 0.1: 3.162
    ('adalora_paper', 0.001): 0.1,  # 0.03: 3.167, 0.1: 3.162, 0.3: 3.192
    ('adalora_paper', 0.01): 0.03,  # 0.01: 3.177, 0.03: 3.145, 0.1: 3.162
    ('krona', 0.001): 0.03,  # 0.01: 3.162, 0.03: 3.135, 0.1: 3.182
    ('krona', 0.01): 0.03,  # 0.01: 3.142, 0.03: 3.135, 0.1: 3.188
    ('krona_ffn', 0.01): 0.03,  # 0.01: 3.076, 0.03: 3.060, 0.1: 3.085
    ('krona_all', 0.01): 0.03,  # 0.01: 3.054, 0.03: 3.052, 0.1: 3.870
    ('krona_all', 0.01, 'lora_all'): 0.03,  # 0.01: 3.069, 0.03: 3.059, 0.1: 3.385
    ('krona_block', 0.001): 0.1,  # 0.0333333: 3.123, 0.1: 3.105, 0.3: 3.108, 1: 3.145
    ('krona_block', 0.01): 0.1,  # 0.03: 3.100, 0.1: 3.089, 0.3: 3.094
    ('krona_block_res', 0.001): 0.1,  # 0.0333333: 3.121, 0.1: 3.101, 0.3: 3.104, 1: 3.139
    ('krona_block_res', 0.01): 0.1,  # 0.03: 3.101, 0.1: 3.086, 0.3: 3.093
    ('parallel', 0.001): 0.1,  # 0.03: 3.124, 0.1: 3.122, 0.3: 3.127
    ('parallel', 0.01): 0.03,  # 0.009: 3.101, 0.03: 3.084, 0.1: 3.090, 0.3: 3.173
    ('scaled_parallel', 0.001): 0.03,  # 0.01: 3.126, 0.03: 3.115, 0.1: 3.133
    ('scaled_parallel', 0.01): 0.03,  # 0.01: 3.090, 0.03: 3.075, 0.1: 3.127
    ('prefix', 0.001): 1,  # 0.3: 3.215, 1: 3.187, 3: 3.189
    ('prefix', 0.01): 1,  # 0.3: 3.209, 1: 3.181, 3: 3.234
    ('prefix_gated', 0.001): 1,  # 0.1: 3.178, 0.3: 3.174, 1: 3.172, 3.33333: 3.376
    ('prefix_gated', 0.01): 0.3,  # 0.1: 3.167, 0.3: 3.165, 1: 3.186
    ('prefix_reparam', 0.001): 0.03,  # 0.01: 3.199, 0.03: 3.184, 0.1: 3.201
    ('prefix_reparam', 0.01): 0.03,  # 0.01: 3.198, 0.03: 3.173, 0.1: 3.203
    ('mam', 0.001): 0.1,  # 0.03: 3.126, 0.1: 3.118, 0.3: 3.141
    ('mam', 0.01): 0.03,  # 0.01: 3.102, 0.03: 3.090, 0.1: 3.114
}
LARGE_ADALORA_SCHEDULES: dict[float, dict] = {
    0.001: {'init_ratio': 4.0, 'tfinal': 12},  # at lr 0.1: init_r 1.5 x, tfinal 12: 3.167, init_r 1.5 x, tfinal 32: 3.162, init_r 2 x, tfinal 12: 3.161, init_r 2 x, tfinal 32: 3.164, init_r 4 x, tfinal 12: 3.160, init_r 4 x, tfinal 32: 3.164
    0.01: {'init_ratio': 4.0, 'tfinal': 32},  # at lr 0.03: init_r 1.5 x, tfinal 12: 3.148, init_r 1.5 x, tfinal 32: 3.145, init_r 2 x, tfinal 12: 3.144, init_r 2 x, tfinal 32: 3.143, init_r 4 x, tfinal 12: 3.151, init_r 4 x, tfinal 32: 3.141
}


class PretrainedBase(NamedTuple):
    """A base the study adapts: its shape, how --make-base pretrains it, its recorded rates and schedules, where
    --make-base writes it and the sha256 recorded from its output (``where``: the constant that holds it)."""

    shape: ModelShape
    pretrain: dict
    learning_rates: dict[tuple, float]
    adalora_schedules: dict[float, dict]
    directory: Path
    sha256: str
    where: str


BASE_MODELS = {"small": PretrainedBase(SHAPE, PRETRAIN, LEARNING_RATES, ADALORA_SCHEDULES, STDLIB_LLAMA,
                                       STDLIB_LLAMA_SHA256, "STDLIB_LLAMA_SHA256 in peft_dist/model.py"),
               "large": PretrainedBase(LARGE_SHAPE, LARGE_PRETRAIN, LARGE_LEARNING_RATES, LARGE_ADALORA_SCHEDULES,
                                       LARGE_DIR, LARGE_SHA256, "LARGE_SHA256 in bench/quality.py")}


def use_base(name: str) -> None:
    """Point the study at base ``name`` of BASE_MODELS: SHAPE, PRETRAIN, LEARNING_RATES and ADALORA_SCHEDULES,
    which the functions below read, become that base's (the module starts on "small")."""
    global SHAPE, PRETRAIN, LEARNING_RATES, ADALORA_SCHEDULES
    base = BASE_MODELS[name]
    SHAPE, PRETRAIN, LEARNING_RATES, ADALORA_SCHEDULES = (base.shape, base.pretrain, base.learning_rates,
                                                          base.adalora_schedules)


# --bases: how each base keeps its decoder linears; the quantized ones as QuantizationConfig fields.
BASES = {"fp32": "fp32, as pretrained", "bf16": "rounded to bfloat16 (a 16-bit base)",
         "int8": "int8, one absmax per row", "nf4": "NF4, one absmax per 64 weights",
         "nf4 + double quant": "NF4, blocksize 64, absmax in 8 bits"}
QUANTIZED = {"int8": {"bits": 8}, "nf4": {"bits": 4, "quant_type": "nf4", "blocksize": 64},
             "nf4 + double quant": {"bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": True}}
REFERENCE = "bf16"  # the 16-bit base of QLoRA's claim


@dataclass
class Corpora:
    """Packed blocks: ``a`` for pretraining, B's train / validation / test splits for adaptation."""

    a: torch.Tensor
    b_train: torch.Tensor
    b_val: torch.Tensor
    b_test: torch.Tensor
    test_documents: torch.Tensor  # b_test's shape: the test document each token comes from (0, 1, ...)
    a_held: torch.Tensor  # the even-numbered modules after A's: how far pretraining got on A's kind of text


def pack_blocks(texts: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents' tokens (EOS after each) concatenated and cut into SEQ-token blocks (only the ids: this
    bench's blocks are plain windows of the stream), and the index in ``texts`` of the document each token comes
    from: a block can hold parts of several documents, and the bootstrap resamples documents. ``pack_documents``
    cuts the stream in order and drops the tail, so the ids are the documents' lengths laid end to end."""
    from peft_dist.data.packing import pack_documents, tokenize_documents

    rows = tokenize_documents({"text": texts}, tokenizer)
    blocks = torch.from_numpy(pack_documents(rows, SEQ)["input_ids"]).long()
    lengths = torch.tensor([len(ids) for ids in rows["input_ids"]])
    return blocks, torch.arange(len(texts)).repeat_interleave(lengths)[: blocks.numel()].view_as(blocks)


def build_corpora(tokenizer) -> Corpora:
    from peft_dist.data import docstring_documents, stdlib_documents

    even = stdlib_documents()[0::2]
    a, a_held = even[: PRETRAIN["modules"]], even[PRETRAIN["modules"]:]
    b = docstring_documents()
    order = torch.randperm(len(b), generator=torch.Generator().manual_seed(0)).tolist()
    tenth = len(b) // 10
    split = {"test": order[:tenth], "val": order[tenth: 2 * tenth], "train": order[2 * tenth:]}
    blocks = {k: pack_blocks([b[i] for i in idx], tokenizer) for k, idx in split.items()}
    return Corpora(pack_blocks(a, tokenizer)[0], blocks["train"][0], blocks["val"][0], *blocks["test"],
                   pack_blocks(a_held, tokenizer)[0][:EVAL_BLOCKS])


def new_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from peft_dist.plan.models import hf_config

    config = hf_config(SHAPE, "float32")
    config.attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def base_model(state: dict, base: str = "fp32") -> torch.nn.Module:
    """The pretrained base with its decoder linears kept as ``base`` (a key of BASES) says: the linears the
    trainer's ``all-linear`` quantization targets, quantized through ``quantize_model`` as the trainer calls it,
    or rounded to bfloat16 (what a 16-bit base holds). Embeddings, norms and lm_head stay fp32, as the trainer
    leaves them in an fp32 run."""
    from peft_dist.config.schema import QuantizationConfig
    from peft_dist.quant.model import quantize_model
    from peft_dist.targets import find_modules

    model = new_model()
    model.load_state_dict(state)
    if base in QUANTIZED:
        quant = QuantizationConfig(**QUANTIZED[base])
        quantize_model(model, quant.target_modules, torch.float32, quant)
    elif base == "bf16":
        for _, linear in find_modules(model, QuantizationConfig().target_modules,
                                      lambda m: isinstance(m, torch.nn.Linear), "linear layer", "bases"):
            linear.weight.copy_(linear.weight.bfloat16())
    elif base != "fp32":
        raise ValueError(f"unknown base {base!r}; one of {', '.join(BASES)}")
    return model


def batches(blocks: torch.Tensor, steps: int, seed: int):
    """``steps`` batches of ``BATCH`` blocks, a fresh permutation per epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < BATCH:
            order += torch.randperm(len(blocks), generator=generator).tolist()
        chosen, order = order[:BATCH], order[BATCH:]
        yield blocks[chosen]


@torch.no_grad()
def token_losses(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """The next-token loss of every token of ``blocks`` after each block's first: ``(blocks, SEQ - 1)``."""
    model.eval()
    losses = []
    for x in blocks.split(BATCH):
        logits = model(input_ids=x).logits[:, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"))
    model.train()
    return torch.cat(losses)


def mean_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token loss over ``blocks``."""
    return token_losses(model, blocks).mean().item()


def document_losses(model: torch.nn.Module, blocks: torch.Tensor, documents: torch.Tensor) -> list[float]:
    """Each document's next-token losses summed (``documents``: the document of every token of ``blocks``; a loss
    counts for the document of the token predicted): what the test-document bootstrap resamples."""
    losses = token_losses(model, blocks).double().flatten()
    return torch.bincount(documents[:, 1:].flatten(), weights=losses).tolist()


def document_tokens(documents: torch.Tensor) -> list[int]:
    """How many tokens of each document ``document_losses`` sums: every token after a block's first."""
    return torch.bincount(documents[:, 1:].flatten()).tolist()


def train(model: torch.nn.Module, blocks: torch.Tensor, steps: int, lr: float, seed: int, hooks: list,
          progress: Callable[[int], None] | None = None) -> list[float]:
    """AdamW over the trainable parameters, warm-up then cosine, clipping 1.0; returns each step's seconds.
    ``progress`` is called with each step's number once it is done."""
    from peft_dist.adapters.inject import trainable_parameters
    from peft_dist.train.schedule import warmup_cosine

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, WARMUP_STEPS, steps, 0.1))
    times = []
    for step, x in enumerate(batches(blocks, steps, seed), start=1):
        began = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        for hook in hooks:
            extra = hook.extra_loss(model)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for hook in hooks:
            hook.before_step(None, step)
        optimizer.step()
        schedule.step()
        for hook in hooks:
            hook.after_step(None, step)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        if progress is not None:
            progress(step)
    return times


def make_base(corpora: Corpora, name: str) -> None:
    """Pretrain base ``name`` on A from its PRETRAIN seed, printing the loss on held-out A every tenth of the steps
    with an ETA, and write it: "small" where the package ships it (builtin:stdlib-llama), "large" to LARGE_DIR.
    Config, fp32 weights and the tokenizer it was trained on (a copy, so that rebuilding the tiny tokenizer never
    changes what the base reads); prints the weights' sha256 to record (STDLIB_LLAMA_SHA256 in peft_dist/model.py,
    LARGE_SHA256 here)."""
    from safetensors.torch import save_file

    from peft_dist.model import TINY_TOKENIZER, file_sha256

    base = BASE_MODELS[name]
    directory, recorded, where = base.directory, base.sha256, base.where
    torch.set_num_threads(1)  # whatever --threads says: one thread sums in a fixed order, the same bytes every time
    torch.manual_seed(PRETRAIN["seed"])
    model = new_model()
    steps, began = PRETRAIN["steps"], time.perf_counter()

    def progress(step: int) -> None:
        if step % (steps // 10) == 0 or step == steps:
            elapsed = time.perf_counter() - began
            print(f"step {step}/{steps}: loss on held-out A {mean_loss(model, corpora.a_held):.3f}, "
                  f"{elapsed / 60:.1f} min, ETA {elapsed * (steps - step) / step / 60:.1f} min", flush=True)

    train(model, corpora.a, steps, PRETRAIN["lr"], PRETRAIN["seed"], [], progress)
    print(f"pretrained on A: {steps} steps in {time.perf_counter() - began:.0f} s, "
          f"loss on A's last blocks {mean_loss(model, corpora.a[-EVAL_BLOCKS:]):.3f}, "
          f"on held-out A {mean_loss(model, corpora.a_held):.3f}, "
          f"on B's test blocks {mean_loss(model, corpora.b_test):.3f}", flush=True)
    shutil.copytree(TINY_TOKENIZER, directory, dirs_exist_ok=True)
    weights = directory / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    config = model.config
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0  # the tokenizer's <|endoftext|>
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    digest = file_sha256(weights)
    print(f"{weights}: sha256 {digest}")
    print(f"the same as {where}" if digest == recorded
          else f"differs from the recorded one; set {where} to \"{digest}\"")


def pretrained_base(corpora: Corpora, name: str) -> tuple[dict, float, Path]:
    """Base ``name``'s state dict (its sha256 checked), its loss on B's test split, and its file (relative to the
    repository for the shipped base: what RESULTS.md names)."""
    from safetensors.torch import load_file

    from peft_dist.model import file_sha256

    base = BASE_MODELS[name]
    directory, recorded, where = base.directory, base.sha256, base.where
    path = directory / "model.safetensors"
    actual = file_sha256(path) if path.is_file() else "(no such file)"
    if actual != recorded:
        raise SystemExit(f"{path}: sha256 {actual}, {where} is {recorded!r}: make it with python bench/quality.py "
                         f"--make-base --base-model {name} and record what it prints")
    state = load_file(str(path))
    model = new_model()
    model.load_state_dict(state)
    return state, mean_loss(model, corpora.b_test), path.relative_to(REPO) if path.is_relative_to(REPO) else path


def shown(path: Path) -> str:
    """A base's file as the results name it: relative to the repository (the shipped base) or to ~ (the large
    base's cache), not this machine's home directory."""
    return f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)


# ---- methods and budgets --------------------------------------------------------------------------

def adalora_adapters(method: str, target_r: int, schedule: dict) -> list[dict]:
    """AdaLoRA with final rank ``target_r`` and a ``schedule`` (ADALORA_PAPER's keys): ``init_r = init_ratio x
    target_r`` rounded up, ADAPT_STEPS // 8 steps at init_r before pruning (tinit), then the budget decays until
    the last ``tfinal`` steps, which train at the final budget with the pattern fixed."""
    init_r = math.ceil(schedule["init_ratio"] * target_r)
    return [{"method": "adalora", "init_r": init_r, "target_r": target_r, "alpha": 2 * init_r,
             "target_modules": PLACEMENT[method], "tinit": ADAPT_STEPS // 8, "tfinal": schedule["tfinal"],
             "delta_t": 2}]


def candidates(method: str) -> list[list[dict]]:
    """Every configuration ``match_budgets`` may pick for a method: each is an ``adapters`` list. AdaLoRA's are
    listed with the paper's schedule: its kept count does not depend on the schedule (``plan`` sets the tuned one)."""
    # Kronecker factors: powers of 2 that divide the hidden and FFN widths (256 and 768: up to 256), with a1/a2 in
    # {1/2, 1, 2} so that A and B stay near square and kron(A, B) can reach (at least half of) full rank; 1 x n
    # factors would make it a rank-1 update.
    common = math.gcd(SHAPE.hidden, SHAPE.intermediate)
    widest = common & -common  # its largest power-of-2 divisor
    factors = [(2**i, 2**j) for i in range(widest.bit_length()) for j in range(widest.bit_length()) if abs(i - j) <= 1]
    if method in ("lora", "lora_ffn", "lora_all"):
        return [[{"method": "lora", "r": r, "alpha": 2 * r, "target_modules": PLACEMENT[method]}] for r in range(1, 33)]
    if method in ("adalora", "adalora_paper"):
        return [adalora_adapters(method, r, ADALORA_PAPER) for r in range(1, 33)]
    if method in ("krona", "krona_ffn", "krona_all"):
        return [[{"method": "krona", "a1": a1, "a2": a2, "target_modules": PLACEMENT[method]}] for a1, a2 in factors]
    if method in ("krona_block", "krona_block_res"):
        return [[{"method": "krona_block", "a1": a1, "a2": a2, "residual": method == "krona_block_res"}]
                for a1, a2 in factors]
    if method in ("parallel", "scaled_parallel"):
        scale = 4.0 if method == "scaled_parallel" else 1.0
        return [[{"method": "parallel_adapter", "sublayer": "ffn", "r": r, "scale": scale}] for r in range(1, 65)]
    if method in ("prefix", "prefix_gated"):
        gate = {"gate": True} if method == "prefix_gated" else {}
        return [[{"method": "prefix", "length": n, "reparameterize": False, **gate}] for n in range(1, 33)]
    if method == "prefix_reparam":
        return [[{"method": "prefix", "length": n, "hidden": PREFIX_MLP}] for n in range(1, 33)]
    if method == "bitfit":
        return [[{"method": "bitfit", "norm": True}]]
    raise ValueError(f"no size knob for {method!r}")


@functools.cache
def _counts(shape: ModelShape, key: str) -> tuple[int, int]:
    """``parameter_counts`` memoized by the base's shape and the configuration's JSON (the planner asks for the same
    parts many times)."""
    from peft_dist.adapters.inject import adapter_state_dict
    from peft_dist.adapters.registry import build_adapter_config
    from peft_dist.plan.dryrun import build_meta_model

    adapters = json.loads(key)
    configs = [build_adapter_config(dict(a), f"adapters.{i}") for i, a in enumerate(adapters)]
    model = build_meta_model(shape, configs, None, "float32")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if any(a["method"] == "adalora" for a in adapters):  # its compact export slices on values, not shapes
        (a,) = adapters
        return trained * a["target_r"] // a["init_r"], trained
    return sum(t.numel() for t in adapter_state_dict(model).values()), trained


def parameter_counts(adapters: list[dict]) -> tuple[int, int]:
    """``(kept, trained)`` parameters of ``adapters`` injected into the base, counted on the meta device.

    kept: what the adapter checkpoint stores after training (``adapter_state_dict``), the budget matched:
    for a reparameterized prefix only the vectors (the papers' count), for AdaLoRA its final budget
    (``target_r`` of every ``init_r`` triplets). trained: what the optimizer updates.
    """
    return _counts(SHAPE, json.dumps(adapters, sort_keys=True))


Counter = Callable[[list[dict]], tuple[int, int]]
Option = tuple[list[dict], int, int]  # (adapters, kept, trained)


class Row(NamedTuple):
    """One row of the table. ``against`` is set on a row that serves one claim: its method re-sized to match the
    claim's other method where the two methods' own rows at this budget are more than BUDGET_TOLERANCE apart."""

    method: str
    budget: float | None
    adapters: list[dict]
    kept: int
    trained: int
    against: str | None = None

    @property
    def key(self) -> tuple:
        """What LEARNING_RATES and the results are keyed by: (method, budget), or (method, budget, against)."""
        return (self.method, self.budget) if self.against is None else (self.method, self.budget, self.against)


def row_name(key: tuple) -> str:
    """The table's name of the row with ``key`` (``Row.key``)."""
    return NAMES[key[0]] + (f" (sized for {NAMES[key[2]]})" if len(key) == 3 else "")


def compared_keys(x: str, y: str, budget: float, keys) -> tuple[tuple, tuple]:
    """The rows the claim "x beats y at budget" compares, among ``keys``: each side's row sized for this claim if
    there is one, else its method's row."""
    return tuple((m, budget, other) if (m, budget, other) in keys else (m, budget) for m, other in ((x, y), (y, x)))


def counted(method: str, count: Counter) -> list[Option]:
    """Every configuration of ``method`` with its counts. MAM pairs a prefix with a scaled FFN adapter, each part
    at most twice the other (an even split of its budget, loose enough to match a compared pair within 2%)."""
    if method != "mam":
        return [(adapters, *count(adapters)) for adapters in candidates(method)]
    return [([{"method": "mam", "prefix_length": p[0]["length"], "reparameterize": False, "r": a[0]["r"],
               "scale": 4.0}], pk + ak, pt + at)
            for p, pk, pt in counted("prefix", count) for a, ak, at in counted("scaled_parallel", count)
            if 0.5 <= pk / ak <= 2.0]


def reachable(method: str, budget: float, count: Counter = parameter_counts) -> bool:
    """Whether some configuration of ``method`` lies within a factor BUDGET_WINDOW of ``budget`` times the base.
    The placement controls cannot reach 0.1% on this base (one rank of LoRA on the FFN linears of 4 layers is
    already 0.33%, KronA there at least 0.29%): they are rows at 1% only, and the table says so."""
    target = budget * SHAPE.total_params()
    return any(1 / BUDGET_WINDOW <= kept / target <= BUDGET_WINDOW for _, kept, _ in counted(method, count))


def mismatch(x: int, y: int) -> float:
    """How far apart two budgets are: larger / smaller - 1."""
    return max(x, y) / min(x, y) - 1.0


def match_budgets(methods: tuple[str, ...], budget: float, pairs: list[tuple[str, str]],
                  count: Counter = parameter_counts) -> dict[str, Option]:
    """One configuration per method near ``budget`` times the base, with every compared pair within BUDGET_TOLERANCE.

    Methods linked by ``pairs`` share an anchor count: each picks its configuration closest (in ratio) to the
    anchor, and the anchor (any candidate's count within a factor 2 of the target) is the one that leaves the
    fewest pairs unmatched, then the one closest to the target. A pair no anchor can match stays unmatched: the
    claims then say so instead of judging it.
    """
    target = budget * SHAPE.total_params()
    options = {m: counted(m, count) for m in methods}
    groups = {m: {m} for m in methods}  # connected components of the pair graph
    for x, y in pairs:
        merged = groups[x] | groups[y]
        for m in merged:
            groups[m] = merged
    chosen: dict[str, Option] = {}
    for group in {frozenset(g) for g in groups.values()}:
        links = [(x, y) for x, y in pairs if x in group]

        def pick(anchor: float) -> dict[str, Option]:
            return {m: min(options[m], key=lambda o: abs(math.log(o[1] / anchor))) for m in group}

        def score(anchor: float) -> tuple[int, float]:
            picked = pick(anchor)
            return (sum(mismatch(picked[x][1], picked[y][1]) > BUDGET_TOLERANCE for x, y in links),
                    abs(math.log(anchor / target)))

        anchors = {o[1] for m in group for o in options[m]
                   if 1 / BUDGET_WINDOW <= o[1] / target <= BUDGET_WINDOW} or {target}
        chosen.update(pick(min(anchors, key=score)))
    return chosen


def resized(x: str, y: str, rows: dict[str, Option], target: float, count: Counter) -> dict[str, Option]:
    """New configurations for a compared pair whose rows (``rows``) are more than BUDGET_TOLERANCE apart: one side
    re-sized to the other's row where a configuration within the window matches it, else both sides re-sized to
    the closest match in the window (then near ``target``). Only the re-sized sides are returned; {} when no two
    configurations match (the claim then says "not compared")."""
    def near(m: str) -> list[Option]:
        return [o for o in counted(m, count) if 1 / BUDGET_WINDOW <= o[1] / target <= BUDGET_WINDOW] + [rows[m]]

    def changed(m: str, o: Option) -> bool:
        return o[0] != rows[m][0]

    fits = [(ox, oy) for ox in near(x) for oy in near(y) if mismatch(ox[1], oy[1]) <= BUDGET_TOLERANCE]
    if not fits:
        return {}
    ox, oy = min(fits, key=lambda p: (changed(x, p[0]) + changed(y, p[1]), mismatch(p[0][1], p[1][1]),
                                      abs(math.log(p[0][1] * p[1][1] / target ** 2))))
    return {m: o for m, o in ((x, ox), (y, oy)) if changed(m, o)}


def describe(adapters: list[dict]) -> str:
    """A short config string for the table: the keys that set the size."""
    a = dict(adapters[0])
    targets = a.pop("target_modules", None)
    keep = {k: v for k, v in a.items()
            if k in ("r", "target_r", "init_r", "tfinal", "a1", "a2", "length", "hidden", "prefix_length", "scale",
                     "norm")}
    where = {None: "", str(QV): " on q,v", str(FFN): " on FFN linears", str(ALL): " on all linears"}[
        None if targets is None else str(targets)]
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()) + where


# ---- runs -----------------------------------------------------------------------------------------

@functools.cache
def recorded_runs(path: Path) -> dict[str, dict]:
    """The runs ``path`` (a RUNS file) holds, by ``run_key``; a run ``adapt`` finishes is added to both."""
    if not path.is_file():
        return {}
    return {entry["key"]: entry["result"] for entry in map(json.loads, path.read_text().splitlines())}


def record_runs(weights: Path, quick: bool) -> None:
    """Record this base's runs (RUNS) in RUNS_DIR, by its weights' sha256; --quick (a check that the script runs,
    not a measurement) keeps none."""
    from peft_dist.model import file_sha256

    global RUNS
    RUNS = None if quick else RUNS_DIR / f"{file_sha256(REPO / weights)[:16]}.jsonl"
    if RUNS is not None:
        print(f"runs recorded in {RUNS} ({len(recorded_runs(RUNS))} so far): an interrupted run resumes", flush=True)


def run_key(method: str, adapters: list[dict], lr: float, seed: int, steps: int, validate: bool, base: str) -> str:
    return json.dumps([method, adapters, lr, seed, steps, validate, base], sort_keys=True)


def is_recorded(method: str, adapters: list[dict], lr: float, seed: int, steps: int) -> bool:
    """Whether ``adapt`` has this methods-table run (test split, fp32 base) in RUNS already."""
    return RUNS is not None and run_key(method, adapters, lr, seed, steps, False, "fp32") in recorded_runs(RUNS)


def adapt(method: str, adapters: list[dict], state: dict, corpora: Corpora, lr: float, seed: int, steps: int,
          validate: bool = False, base: str = "fp32") -> dict:
    """Adapt a fresh copy of the base (its decoder linears kept as ``base`` says) to B; B's test loss (the mean
    over every test token), each test document's summed loss and the median step time, or with ``validate`` (the
    sweep) the validation loss instead of the test split's: choosing a rate never scores the test split.
    With RUNS set, a run recorded there is not run again, and a new one is recorded with the CPU's flags."""
    key = run_key(method, adapters, lr, seed, steps, validate, base)
    if RUNS is not None and key in recorded_runs(RUNS):
        return recorded_runs(RUNS)[key]
    result = _adapt(method, adapters, state, corpora, lr, seed, steps, validate, base)
    if RUNS is not None:
        from nf4 import cpu_flags  # bench/nf4.py

        RUNS.parent.mkdir(parents=True, exist_ok=True)
        with open(RUNS, "a") as out:
            out.write(json.dumps({"key": key, "result": result, "cpu": cpu_flags(), "torch": torch.__version__}) + "\n")
        recorded_runs(RUNS)[key] = result
    return result


def _adapt(method: str, adapters: list[dict], state: dict, corpora: Corpora, lr: float, seed: int, steps: int,
           validate: bool, base: str) -> dict:
    from peft_dist.adapters.inject import inject_adapters
    from peft_dist.adapters.registry import build_adapter_config
    from peft_dist.distributed.hooks import make_hooks

    model = base_model(state, base)
    torch.manual_seed(seed)
    hooks = []
    if method == "full":
        model.requires_grad_(True)
    else:
        configs = [build_adapter_config(dict(a), f"adapters.{i}") for i, a in enumerate(adapters)]
        inject_adapters(model, configs)
        hooks = make_hooks(model, configs, steps)
    times = train(model, corpora.b_train, steps, lr, seed, hooks)
    step_s = statistics.median(times[1:])
    if validate:
        return {"val": mean_loss(model, corpora.b_val), "step_s": step_s}
    documents = document_losses(model, corpora.b_test, corpora.test_documents)
    return {"test": math.fsum(documents) / corpora.b_test[:, 1:].numel(), "documents": documents, "step_s": step_s}


def plan(methods: tuple[str, ...], budgets: tuple[float, ...], count: Counter = parameter_counts) -> list[Row]:
    """Every row: full fine-tuning and BitFit have one size; the others are matched per budget by
    ``match_budgets`` over the pairs the claims compare, at the budgets they can reach (``reachable``). A compared
    pair that the methods' rows leave unmatched gets rows sized for it (``resized``), each after its method's row."""
    sized = tuple(m for m in methods if m not in ("full", "bitfit"))
    pairs = compared_pairs(budgets)
    at = {b: tuple(m for m in sized if reachable(m, b, count)) for b in budgets}
    links = {b: [(x, y) for x, y, c in pairs if c == b and {x, y} <= set(at[b])] for b in budgets}
    matched = {b: match_budgets(at[b], b, links[b], count) for b in budgets}
    for_claims = {}  # (method, budget) -> [(against, option)]
    for b in budgets:
        for x, y in links[b]:
            if mismatch(matched[b][x][1], matched[b][y][1]) > BUDGET_TOLERANCE:
                found = resized(x, y, matched[b], b * SHAPE.total_params(), count)
                for m, option in found.items():
                    for_claims.setdefault((m, b), []).append((y if m == x else x, option))

    def row(method: str, budget: float, option: Option, against: str | None = None) -> Row:
        adapters, kept, trained = option
        if method == "adalora" and budget in ADALORA_SCHEDULES:  # the schedule --sweep chose (kept is the same)
            adapters = adalora_adapters(method, adapters[0]["target_r"], ADALORA_SCHEDULES[budget])
            kept, trained = count(adapters)
        return Row(method, budget, adapters, kept, trained, against)

    rows = []
    for method in methods:
        if method == "full":
            rows.append(Row(method, None, [], SHAPE.total_params(), SHAPE.total_params()))
        elif method == "bitfit":
            (adapters,) = candidates("bitfit")
            rows.append(Row(method, None, adapters, *count(adapters)))
        else:
            for b in (b for b in budgets if method in matched[b]):
                rows.append(row(method, b, matched[b][method]))
                rows += [row(method, b, option, against) for against, option in for_claims.get((method, b), [])]
    return rows


def learning_rates(rows: list[Row], quick: bool) -> dict[tuple, float]:
    """Each row's learning rate from LEARNING_RATES, by ``Row.key``; with ``quick`` (a check that the script runs,
    not a measurement) the middle of the sweep's starting grid, so that --quick needs nothing recorded. Stops,
    naming each, when --sweep has not recorded a row's rate or the "adalora" row's schedule."""
    if quick:
        return {r.key: initial_grid(r.method)[len(initial_grid(r.method)) // 2] for r in rows}
    missing = [f"LEARNING_RATES[{', '.join(map(repr, r.key))}]" for r in rows if r.key not in LEARNING_RATES]
    missing += [f"ADALORA_SCHEDULES[{r.budget}]" for r in rows
                if r.method == "adalora" and r.budget not in ADALORA_SCHEDULES]
    if missing:
        raise SystemExit(f"nothing recorded for {', '.join(missing)}: run python bench/quality.py --sweep and paste "
                         "the entries it prints into LEARNING_RATES and ADALORA_SCHEDULES (bench/quality.py; with "
                         "--base-model large, LARGE_LEARNING_RATES and LARGE_ADALORA_SCHEDULES)")
    return {r.key: LEARNING_RATES[r.key] for r in rows}


def best_learning_rate(score: Callable[[float], float], grid: tuple[float, ...],
                       widenings: int = 4) -> tuple[float, dict[float, float]]:
    """The learning rate of lowest ``score`` and every score taken. While the best sits on an end of the grid, the
    grid grows past that end by its own end ratio, so the optimum is bracketed, not assumed; a divergence (nan)
    scores as infinity. Raises when ``widenings`` steps do not bracket it (the loss is flat or the grid wrong)."""
    def finite(lr: float) -> float:
        value = score(lr)
        return math.inf if math.isnan(value) else value

    scores = {lr: finite(lr) for lr in grid}
    while True:
        lrs = sorted(scores)
        best = min(lrs, key=scores.__getitem__)
        if lrs[0] < best < lrs[-1]:
            return best, scores
        if len(scores) >= len(grid) + widenings:
            raise RuntimeError(f"best learning rate {best:g} still on the edge of {', '.join(f'{lr:g}' for lr in lrs)}")
        grown = lrs[0] ** 2 / lrs[1] if best == lrs[0] else lrs[-1] ** 2 / lrs[-2]
        scores[grown] = finite(grown)


def initial_grid(method: str, key: tuple | None = None) -> tuple[float, ...]:
    """The learning rates ``sweep`` starts from (``best_learning_rate`` widens them); plain prefix vectors, gated
    or not, need far larger steps. On the large base, the row ``key``'s rate on the small base and its neighbours
    on the grid's 1-3 ladder: three runs where the optimum did not move, more (widening) where it did."""
    small = BASE_MODELS["small"].learning_rates
    if SHAPE != BASE_MODELS["small"].shape and key in small:
        rate = small[key]
        ladder = sorted({float(f"{f * 10.0**e:.3g}") for f in (1, 3) for e in range(-5, 2)} | {rate})
        i = ladder.index(rate)
        return tuple(ladder[i - 1: i + 2])
    if method == "full":
        return 3e-4, 1e-3, 3e-3, 1e-2
    if method in ("prefix", "prefix_gated"):
        return 3e-2, 1e-1, 3e-1, 1.0, 3.0
    return 3e-3, 1e-2, 3e-2, 1e-1, 3e-1


def sweep(rows: list[Row], state: dict, corpora: Corpora) -> None:
    """Each row's validation loss over a widening learning-rate grid (seed SWEEP_SEED, never a reported seed).
    The "adalora" row first gets its schedule: the best of ADALORA_GRID at the learning rate chosen for the paper's
    schedule ("adalora_paper"), then its own learning rate at that schedule. Prints the LEARNING_RATES and
    ADALORA_SCHEDULES entries as they come, then each table's entries together, to paste."""
    seen: dict[tuple[str, float], float] = {}

    def validation(method: str, adapters: list[dict], lr: float) -> float:
        """Memoized by configuration and rate: the AdaLoRA rows meet the paper schedule's runs again."""
        key = (json.dumps(adapters, sort_keys=True), lr)
        if key not in seen:
            seen[key] = adapt(method, adapters, state, corpora, lr, SWEEP_SEED, ADAPT_STEPS, validate=True)["val"]
        return seen[key]

    def tuned(method: str, adapters: list[dict], key: tuple) -> tuple[float, dict[float, float]]:
        return best_learning_rate(lambda lr: validation(method, adapters, lr), initial_grid(method, key))

    rates, schedules = [], []
    for row in rows:
        method, adapters = row.method, row.adapters
        if method == "adalora" and row.against is None:
            target_r = adapters[0]["target_r"]
            paper_lr, _ = tuned("adalora_paper", adalora_adapters("adalora_paper", target_r, ADALORA_PAPER),
                                ("adalora_paper", row.budget))
            losses = [validation(method, adalora_adapters(method, target_r, s), paper_lr) for s in ADALORA_GRID]
            schedule = ADALORA_GRID[losses.index(min(losses))]
            adapters = adalora_adapters(method, target_r, schedule)
            schedules.append(f"    {row.budget}: {schedule},  # at lr {paper_lr:g}: " + ", ".join(
                f"init_r {s['init_ratio']:g} x, tfinal {s['tfinal']}: {v:.3f}" for s, v in zip(ADALORA_GRID, losses)))
            print(schedules[-1], flush=True)
        best, scores = tuned(method, adapters, row.key)
        rates.append(f"    {row.key!r}: {best:g},  # "
                     + ", ".join(f"{lr:g}: {scores[lr]:.3f}" for lr in sorted(scores)))
        print(rates[-1], flush=True)
    print("\nLEARNING_RATES entries:", *rates, "ADALORA_SCHEDULES entries:", *schedules, sep="\n")


def compared_pairs(budgets: tuple[float, ...]) -> list[tuple[str, str, float]]:
    """The claims as (x, y, budget): "x reaches a lower held-out loss than y at budget": the papers', the gated
    prefix's (does prefix tuning's initialization explain its weakness?) and the placement controls'."""
    pairs = [("krona", "lora", b) for b in budgets] + [("krona_block", "krona", b) for b in budgets]
    pairs += [("krona_block_res", "krona_block", b) for b in budgets]
    pairs += [(adalora, "lora", b) for adalora in ("adalora", "adalora_paper") for b in budgets]
    pairs += [("scaled_parallel", "parallel", b) for b in budgets]
    pairs += [("mam", part, b) for b in budgets for part in ("prefix", "scaled_parallel")]
    pairs += [("prefix_reparam", "parallel", min(budgets))] + [("prefix_gated", "prefix", b) for b in budgets]
    # Placement controls: one method at two placements (q,v vs FFN vs all linears), then two methods at one
    # placement (KronA^B and the parallel adapter sit at the FFN), so that placement and method are told apart.
    pairs += [(x, y, b) for b in budgets for x, y in (
        ("lora_ffn", "lora"), ("lora_all", "lora"), ("krona_ffn", "krona"), ("krona_all", "krona"),
        ("krona_block", "krona_ffn"), ("parallel", "lora_ffn"), ("krona_ffn", "lora_ffn"), ("krona_all", "lora_all"))]
    return pairs


def seed_averaged(documents: list[list[float]]) -> list[float]:
    """Each test document's summed loss averaged over the seeds (``documents[seed][document]``): one paired unit
    per document."""
    return [statistics.fmean(losses) for losses in zip(*documents)]


class Claim(NamedTuple):
    """One claim's verdict: ``pair`` is (x, y, budget) of ``compared_pairs``; ``outcome`` is "holds", "reversed",
    "not shown" or "not compared"; ``difference`` the mean paired difference x - y (None when not compared)."""

    pair: tuple[str, str, float]
    line: str
    outcome: str
    difference: float | None


def claims(results: dict, budgets: tuple[float, ...], tokens: list[int]) -> list[Claim]:
    """Each claim judged by bench/stats.py's rule, Holm-adjusted over the claims whose budgets match.

    ``results[key]`` (``Row.key``) holds ``kept`` (parameters), ``seeds`` (test loss per seed, in SEEDS order: runs
    of one seed share data order, so they are paired by seed) and ``documents`` (each test document's summed loss,
    per seed); ``tokens``: each test document's tokens (``document_tokens``). A claim compares the rows sized for it
    where there are some (``compared_keys``)."""
    pairs = [(x, y, b) for x, y, b in compared_pairs(budgets) if (x, b) in results and (y, b) in results]
    tests = {}
    for x, y, b in pairs:
        rx, ry = (results[k] for k in compared_keys(x, y, b, results))
        if mismatch(rx["kept"], ry["kept"]) <= BUDGET_TOLERANCE and len(rx["seeds"]) > 1:
            tests[x, y, b] = (stats.paired_t(rx["seeds"], ry["seeds"]), stats.document_bootstrap(
                seed_averaged(rx["documents"]), seed_averaged(ry["documents"]), tokens))
    adjusted = dict(zip(tests, stats.holm([t.p for t, _ in tests.values()])))
    lines = []
    for x, y, b in pairs:
        kx, ky = compared_keys(x, y, b, results)
        rx, ry = results[kx], results[ky]
        sized = [f"{NAMES[k[0]]} at {results[k]['kept']:,}" for k in (kx, ky) if len(k) == 3]
        head = (f"{NAMES[x]} vs {NAMES[y]} at {b:.1%}" + (f" ({' and '.join(sized)}, sized for this claim)" if sized
                                                          else "")
                + f": {statistics.fmean(rx['seeds']):.3f} vs {statistics.fmean(ry['seeds']):.3f}")
        if (x, y, b) not in tests:
            why = (f"budgets not matched within {BUDGET_TOLERANCE:.0%} ({rx['kept']:,} vs {ry['kept']:,})"
                   if mismatch(rx["kept"], ry["kept"]) > BUDGET_TOLERANCE else "one seed, nothing to pair")
            lines.append(Claim((x, y, b), f"{head}: not compared, {why}", "not compared", None))
            continue
        (test, (low, high)), p = tests[x, y, b], adjusted[x, y, b]
        outcome = stats.outcome(test, p)
        lines.append(Claim((x, y, b), f"{head}; paired difference {test.mean:+.3f} (95% CI {test.low:+.3f} to "
                           f"{test.high:+.3f}, p {test.p:.3g}, Holm {p:.3g}; test-document bootstrap {low:+.3f} to "
                           f"{high:+.3f}): {outcome}", outcome, test.mean))
    return lines


# ---- bases (--bases) ------------------------------------------------------------------------------

def bases_study(rows: list, rates: dict, state: dict, corpora: Corpora, seeds: tuple[int, ...],
                steps: int) -> list[str]:
    """The --bases table, printed row by row, then its claims: every base's held-out loss before adaptation and
    after each LoRA row of ``rows`` (the table's configurations and learning rates, ``rates``), every seed."""
    tokens = document_tokens(corpora.test_documents)
    before = {base: document_losses(base_model(state, base), corpora.b_test, corpora.test_documents) for base in BASES}
    mean = {base: math.fsum(before[base]) / sum(tokens) for base in BASES}
    lines = [f"| base | decoder linears | before adaptation | before, minus {REFERENCE} (test-document 95% CI) | "
             + " | ".join(f"after LoRA {b:.1%} ({describe(a)}, lr {rates[m, b]:g})" for m, b, a, *_ in rows)
             + " |", "|---" * (4 + len(rows)) + "|"]
    print("\n".join(lines), flush=True)
    results = {}
    for base in BASES:
        cells = []
        for method, budget, adapters, *_ in rows:
            runs = [adapt(method, adapters, state, corpora, rates[method, budget], seed, steps, base=base)
                    for seed in seeds]
            losses = [r["test"] for r in runs]
            results[base, budget] = {"seeds": losses, "documents": [r["documents"] for r in runs]}
            cells.append(f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}")
        low, high = stats.document_bootstrap(before[base], before[REFERENCE], tokens)
        shift = f"{mean[base] - mean[REFERENCE]:+.4f} ({low:+.4f} to {high:+.4f})" if base != REFERENCE else "-"
        lines.append(f"| {base} | {BASES[base]} | {mean[base]:.4f} | {shift} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    verdicts = base_claims(results, tuple(b for _, b, *_ in rows), tokens)
    lines += ["", f"Claims (lower loss is better; paired by seed over {len(seeds)} seeds; \"matches\" when the "
              f"difference is shown to lie within ±{stats.MIN_EFFECT} nats: the TOST p, Holm-adjusted over these "
              f"claims, < {stats.ALPHA}; \"worse\" / \"better\" when the Holm-adjusted t-test p < {stats.ALPHA}, "
              f"the 95% CI excludes 0 and the difference is at least {stats.MIN_EFFECT} nats; see bench/stats.py):",
              "", *(f"- {v}" for v in verdicts)]
    print("\n".join(lines[-len(verdicts) - 2:]), flush=True)
    return lines


def base_claims(results: dict, budgets: tuple[float, ...], tokens: list[int]) -> list[str]:
    """Each base against REFERENCE at each budget, judged by ``stats.equivalence``; the t-test and the TOST
    p-values are each Holm-adjusted over these claims.

    ``results[base, budget]`` holds ``seeds`` (test loss per seed, in seed order: the runs of a seed share data
    order and LoRA initialization on every base, so they are paired by seed) and ``documents`` (each test
    document's summed loss, per seed); ``tokens``: each test document's tokens."""
    keys = [(base, b) for b in budgets for base in BASES if base != REFERENCE]
    tests = {(base, b): stats.paired_t(results[base, b]["seeds"], results[REFERENCE, b]["seeds"]) for base, b in keys}
    adjusted = dict(zip(keys, stats.holm([tests[k].p for k in keys])))
    equivalent = dict(zip(keys, stats.holm([stats.equivalence_p(tests[k]) for k in keys])))
    lines = []
    for base, b in keys:
        x, y, test = results[base, b], results[REFERENCE, b], tests[base, b]
        low, high = stats.document_bootstrap(seed_averaged(x["documents"]), seed_averaged(y["documents"]), tokens)
        lines.append(f"{base} vs {REFERENCE} at {b:.1%}: {statistics.fmean(x['seeds']):.4f} vs "
                     f"{statistics.fmean(y['seeds']):.4f}; paired difference {test.mean:+.4f} (95% CI "
                     f"{test.low:+.4f} to {test.high:+.4f}, p {test.p:.3g}, Holm {adjusted[base, b]:.3g}; within "
                     f"±{stats.MIN_EFFECT}: TOST p {stats.equivalence_p(test):.3g}, Holm {equivalent[base, b]:.3g}; "
                     f"test-document bootstrap {low:+.4f} to {high:+.4f}): "
                     f"{stats.equivalence(test, adjusted[base, b], equivalent[base, b])}")
    return lines


def bases_header(argv: str, minutes: float, path: Path, seeds: tuple[int, ...], steps: int) -> list[str]:
    """The section's title, how to reproduce it, the versions and CPU flags it ran with, and its design."""
    import bitsandbytes

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return [
        "## LoRA on quantized bases: NF4 vs int8 vs bf16 (bench/quality.py --bases)", "",
        f"Reproduce: `python bench/quality.py {argv}` (generated by that command down to its end mark; "
        f"{time.strftime('%Y-%m-%d')}, {minutes:.0f} minutes wall time on a {os.cpu_count()}-core CPU, torch threads: "
        f"{torch.get_num_threads()}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}). CPU flags "
        "(`grep -m1 flags /proc/cpuinfo`):", "", "```", flags, "```", "",
        f"LoRA as the methods table sets it (`plan`'s configuration, `LEARNING_RATES`, the same data order), seeds "
        f"{', '.join(map(str, seeds))}, {steps} steps, each from the same pretrained base ({shown(path)}) whose "
        "decoder linears (q, k, v, o, gate, up and down of every layer: what the trainer's `all-linear` quantizes) "
        "are kept as the \"decoder linears\" column says, quantized by peft_dist's `quantize_model` as the trainer "
        "calls it. Embeddings, norms and lm_head stay fp32 and every base computes in fp32, so the bases differ only "
        "in how those weights are stored; \"bf16\" is the fp32 weights rounded to bfloat16, the weights a 16-bit base "
        "holds. \"before adaptation\" is the base's held-out loss on B: the storage's own cost, with a bootstrap "
        "over test documents of its difference to bf16.", ""]


def with_section(previous: str, lines: list[str], marks: tuple[str, str]) -> str:
    """``previous`` with its part between ``marks`` (BASES_MARKS or ACROSS_MARKS) replaced by ``lines``; without
    one, ``lines`` go at the end, below HAND_WRITTEN, where the table's ``--write`` keeps them."""
    begin, end = marks
    section = "\n".join([begin, *lines, end])
    if begin in previous:
        head, rest = previous.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    if HAND_WRITTEN not in previous:
        previous += ("\n" if previous else "") + HAND_WRITTEN
    return previous.rstrip("\n") + "\n\n" + section + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 0.1%% budget, 6 methods, 16 steps, learning rates not from the sweep")
    parser.add_argument("--sweep", action="store_true",
                        help="learning rates (and AdaLoRA's schedule) on B's validation split, to paste")
    parser.add_argument("--only", nargs="+", choices=METHODS, metavar="METHOD",
                        help="with --sweep: only these methods' rows, sized as in the full table (a sweep in parts)")
    parser.add_argument("--missing", action="store_true",
                        help="with --sweep: only the rows LEARNING_RATES has no entry for")
    parser.add_argument("--bases", action="store_true",
                        help="LoRA on fp32, bf16, int8 and NF4 bases instead of the methods table")
    parser.add_argument("--make-base", action="store_true",
                        help="pretrain the base on A, write it (small: as builtin:stdlib-llama) and print its sha256")
    parser.add_argument("--across-bases", action="store_true",
                        help="the methods table on every base (recorded runs are reused), then each claim's verdict "
                             "on each base: a section that --write puts below the hand-written reading")
    parser.add_argument("--base-model", choices=tuple(BASE_MODELS), default="small",
                        help="the pretrained base every mode uses: small (shipped) or large (LARGE_DIR)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_base(args.base_model)
    methods, budgets, seeds, steps = METHODS, BUDGETS, SEEDS, ADAPT_STEPS
    if args.quick:
        methods = ("lora", "krona", "parallel", "scaled_parallel", "prefix", "prefix_gated")
        budgets, seeds = (0.001,), (1, 2)
        steps = 16

    from peft_dist.model import load_tokenizer

    began = time.perf_counter()
    corpora = build_corpora(load_tokenizer(str(REPO / "peft_dist" / "assets" / "tiny_tokenizer")))
    if args.make_base:
        make_base(corpora, args.base_model)
        return
    if args.across_bases:
        verdicts = {}
        for name in BASE_MODELS:
            use_base(name)
            state, base_loss, path = pretrained_base(corpora, name)
            record_runs(path, args.quick)
            _, verdicts[name] = table(methods, budgets, plan(methods, budgets), state, corpora, seeds, steps,
                                      args.quick, base_loss, path)
        lines = ["## Claims on both bases (bench/quality.py --across-bases)", "",
                 f"Each claim's verdict (and its mean paired difference) on each base, by the rule above; "
                 f"`python bench/quality.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d')}.", "",
                 *across_bases(verdicts)]
        print("\n".join(lines), flush=True)
        if args.write:
            previous = args.write.read_text() if args.write.is_file() else ""
            args.write.write_text(with_section(previous, lines, ACROSS_MARKS))
        return
    state, base_loss, path = pretrained_base(corpora, args.base_model)
    record_runs(path, args.quick)
    rows = plan(methods, budgets)
    if args.sweep:
        sweep([r for r in rows if (not args.only or r.method in args.only)
               and not (args.missing and r.key in LEARNING_RATES)], state, corpora)
        return
    if args.bases:
        lora = [r for r in rows if r.method == "lora" and r.against is None]
        lines = bases_study(lora, learning_rates(lora, args.quick), state, corpora, seeds, steps)
        minutes = (time.perf_counter() - began) / 60
        print(f"\ntotal {minutes:.0f} min")
        if args.write:
            previous = args.write.read_text() if args.write.is_file() else ""
            header = bases_header(" ".join(sys.argv[1:]), minutes, path, seeds, steps)
            args.write.write_text(with_section(previous, header + lines, BASES_MARKS))
        return
    lines, verdicts = table(methods, budgets, rows, state, corpora, seeds, steps, args.quick, base_loss, path)
    lines += ["", f"Claims (lower loss is better; paired by seed over {len(seeds)} seeds, Holm-adjusted over the "
              f"compared claims; holds when Holm p < {stats.ALPHA}, the 95% CI excludes 0 and the difference is at "
              f"least {stats.MIN_EFFECT} nats, see bench/stats.py):", ""]
    lines += [f"- {v.line}" for v in verdicts]
    print("\n".join(lines[-len(verdicts) - 2:]))
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    if args.write:
        previous = args.write.read_text() if args.write.is_file() else ""
        args.write.write_text(results_markdown(lines, " ".join(sys.argv[1:]), previous))


def table(methods: tuple[str, ...], budgets: tuple[float, ...], rows: list[Row], state: dict, corpora: Corpora,
          seeds: tuple[int, ...], steps: int, quick: bool, base_loss: float,
          path: Path) -> tuple[list[str], list[Claim]]:
    """The methods table of the current base (``use_base``), printed row by row, and its claims' verdicts."""
    rates, tokens = learning_rates(rows, quick), document_tokens(corpora.test_documents)
    planned = {(m, b) for m, b, *_ in rows}
    unreachable = {b: [NAMES[m] for m in methods if m not in ("full", "bitfit") and (m, b) not in planned]
                   for b in budgets}
    skipped = "".join(f" Not run at {b:.1%} (no configuration within a factor {BUDGET_WINDOW:g} of it): "
                      f"{', '.join(names)}." for b, names in unreachable.items() if names)
    lines = [f"Base: {SHAPE.layers}-layer Llama, hidden {SHAPE.hidden}, FFN {SHAPE.intermediate}, vocab {SHAPE.vocab}, "
             f"{SHAPE.total_params():,} parameters, pretrained {PRETRAIN['steps']} steps on A ({shown(path)}). "
             f"Adaptation: {steps} steps of {BATCH} x {SEQ} tokens of B, seeds {', '.join(map(str, seeds))}; "
             f"{len(corpora.b_train)} training blocks of B, loss on all {len(corpora.b_test)} test blocks "
             f"({len(tokens)} documents, {sum(tokens):,} tokens). {torch.get_num_threads()} threads.{skipped}", "",
             f"Held-out loss on B of the base before adaptation: {base_loss:.3f}", "",
             "| method | budget | configuration | kept params | % of base | trained params | lr "
             "| held-out loss on B (mean ± std) | step (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results = {}
    todo = sum(not is_recorded(row.method, row.adapters, rates[row.key], seed, steps) for row in rows for seed in seeds)
    began, ran = time.perf_counter(), 0
    for number, row in enumerate(rows, 1):
        lr = rates[row.key]
        ran += sum(not is_recorded(row.method, row.adapters, lr, seed, steps) for seed in seeds)
        runs = [adapt(row.method, row.adapters, state, corpora, lr, seed, steps) for seed in seeds]
        losses = [r["test"] for r in runs]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        results[row.key] = {"kept": row.kept, "seeds": losses, "documents": [r["documents"] for r in runs]}
        step_ms = 1e3 * statistics.mean(r["step_s"] for r in runs)
        budget = "-" if row.budget is None else f"{row.budget:.1%}"
        line = (f"| {row_name(row.key)} | {budget} | {describe(row.adapters) if row.adapters else 'all'} "
                f"| {row.kept:,} | {100 * row.kept / SHAPE.total_params():.3f}% | {row.trained:,} | {lr:g} | "
                f"{statistics.mean(losses):.3f} ± {spread:.3f} | {step_ms:.0f} |")
        lines.append(line)
        print(line, flush=True)
        if ran:  # progress on stderr, so that stdout stays the table
            minutes = (time.perf_counter() - began) / 60
            print(f"  row {number}/{len(rows)}: {ran} of {todo} new runs (not recorded before), {minutes:.0f} min; "
                  f"ETA {minutes * (todo - ran) / ran:.0f} min", file=sys.stderr, flush=True)
    return lines, claims(results, budgets, tokens)


def across_bases(verdicts: dict[str, list[Claim]]) -> list[str]:
    """Each claim's verdict on every base (``verdicts[base]``, ``claims``' output), one row per claim: the
    section "Claims on both bases" of RESULTS.md."""
    by_pair = {name: {v.pair: v for v in found} for name, found in verdicts.items()}
    pairs = list(dict.fromkeys(v.pair for found in verdicts.values() for v in found))
    lines = [f"| claim | budget | {' | '.join(f'{name} base' for name in verdicts)} |",
             "|---|---|" + "---|" * len(verdicts)]
    for x, y, b in pairs:
        cells = []
        for name in verdicts:
            v = by_pair[name].get((x, y, b))
            cells.append("not run" if v is None else v.outcome if v.difference is None
                         else f"{v.outcome} ({v.difference:+.3f})")
        lines.append(f"| {NAMES[x]} vs {NAMES[y]} | {b:.1%} | {' | '.join(cells)} |")
    return lines


def results_markdown(lines: list[str], argv: str, previous: str) -> str:
    """The generated table, then whatever ``previous`` holds below ``HAND_WRITTEN`` (the reading of it)."""
    kept = previous.split(HAND_WRITTEN, 1)[1] if HAND_WRITTEN in previous else "\n"
    return "\n".join([
        "# Adaptation quality at CPU size (bench/quality.py)", "",
        f"Reproduce: `python bench/quality.py {argv}` (generated by that command down to the line below; "
        f"{time.strftime('%Y-%m-%d')}, a 2-core CPU).", "",
        *lines, "", HAND_WRITTEN]) + kept


if __name__ == "__main__":
    main()
