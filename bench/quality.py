"""Adaptation quality at CPU size: every method at matched parameter budgets (0.1% and 1%), 5 seeds each.

    python bench/quality.py --write docs/RESULTS.md   # the table (about 35 minutes on 2 cores; +4 to pretrain)
    python bench/quality.py --quick                   # 2 seeds, 0.1%, 5 methods, short runs (a few minutes)
    python bench/quality.py --sweep                   # the learning-rate sweep behind LEARNING_RATES (~30 min)
    python bench/quality.py --bases --write docs/RESULTS.md  # LoRA on fp32, bf16, int8 and NF4 bases (~30 min)

Verdicts (bench/stats.py, fixed before the numbers): each claim "x beats y" is a paired comparison by seed (the
two runs of a seed share data order and seed), judged by a paired t test with a 95% CI; the p-values of all
compared claims are Holm-Bonferroni adjusted. A claim holds when the adjusted p < 0.05, the CI excludes 0 on the
claimed side and x is at least 0.01 nats better; "reversed" is the same the other way; anything else is "not
shown". A paired bootstrap over test blocks is reported beside it. A pair whose kept parameters differ by more
than 2% is not judged: the claims say "not compared" with both counts.

Corpora (offline, from this Python's standard library, split by module so that A and B share no file): A is
the source code of the even-numbered modules (sorted by path), B the docstrings of the odd-numbered ones
(module, class and function docstrings, one document per module): English prose about code instead of
code. B's documents are split 80/10/10 into train, validation (for the learning-rate sweep) and test
(the reported loss).

1. Pretraining, cached under ``--cache``: a 4-layer Llama (hidden 256, FFN 768, vocab 512 of the shipped
   tokenizer; 3.67M parameters) trained from scratch on A, 1,200 steps of 8 x 128 tokens (~4 minutes).
2. Adaptation to B: each method from the same base, fp32, plain PyTorch in this process (the quality of a
   method does not depend on ZeRO sharding, and full fine-tuning needs a trainable base), 96 steps of
   8 x 128 tokens, AdamW with the trainer's warm-up/cosine schedule, gradient clipping 1.0. Each method's
   learning rate is the best of a sweep on B's validation split with SWEEP_SEED (0), which is not one of the
   reported SEEDS (1-5), so the reported losses are not those the rate was picked on; the sweep's grid grows past
   whichever end holds the best value until the best is strictly inside (``best_learning_rate``; recorded in
   LEARNING_RATES). AdaLoRA's hook is driven as the trainer drives it (``engine=None``).

Budgets: each method's size knob (rank, bottleneck width, prefix length, Kronecker factor shape, target
modules) is picked by ``match_budgets``, counted on the real injected model: the methods a claim compares share
an anchor count within a factor 2 of 0.1% or 1% of the base, chosen so that as many compared pairs as possible
have kept parameters (what the adapter checkpoint stores) within 2% of each other, then as near the target as
possible; the table's "% of base" column shows where each landed.
Kept equals trained except for AdaLoRA, matched on its final budget (``target_r``) with ``init_r = 1.5 x
target_r`` rounded up (the AdaLoRA paper's ratio), and for the reparameterized prefix, matched on its
vectors as the prefix-tuning papers count it (its training MLP is discarded). Plain prefix tuning trains
its vectors directly. BitFit on a Llama (no biases) trains the norm weights: a fixed 0.06%. MAM splits its
budget between its prefix and its scaled FFN adapter, neither part more than twice the other.

Bases (``--bases``, QLoRA's claim that NF4 + LoRA matches LoRA on a 16-bit base): the LoRA rows of the table
(same configurations, learning rates, seeds and data order) adapt copies of the same pretrained base whose
decoder linears are kept as fp32, rounded to bfloat16, or quantized by peft_dist's own ``quantize_model`` as
the trainer does it (int8 row-wise; NF4 with blocksize 64, with and without double quantization). Embeddings,
norms and lm_head stay fp32 in every base, and every base computes in fp32, so the bases differ only in how
the decoder linears' weights are stored (bf16 compute is emulated on CPUs without native bf16, and would add
its own rounding of activations to the comparison). Each base is compared with the bf16 one by
``stats.equivalence``: the paired differences by seed must lie within +-MIN_EFFECT (TOST, Holm-adjusted over
the section's claims) to "match". The section is written between BASES_BEGIN and BASES_END, below
HAND_WRITTEN, so that ``--write`` keeps it and ``--bases --write`` replaces only it.
"""
from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_dist.plan.models import ModelShape  # noqa: E402

import stats  # noqa: E402  (bench/stats.py, on sys.path as this script's folder)

SHAPE = ModelShape("quality-llama", "llama", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768, vocab=512,
                   max_positions=512, tied_embeddings=False)
SEQ, BATCH = 128, 8
PRETRAIN = {"steps": 1200, "lr": 3e-3, "modules": 300, "seed": 0}
ADAPT_STEPS, WARMUP_STEPS, EVAL_BLOCKS = 96, 6, 96
BUDGETS = (0.001, 0.01)
SEEDS = (1, 2, 3, 4, 5)  # reported; the learning rates are chosen on SWEEP_SEED, which is not among them
SWEEP_SEED = 0
BUDGET_TOLERANCE = 0.02  # compared pairs' kept parameters may differ by at most 2%
HAND_WRITTEN = "<!-- written by hand from here on; bench/quality.py --write keeps it -->"
BASES_BEGIN = "<!-- written by bench/quality.py --bases from here to the end mark -->"
BASES_END = "<!-- end of bench/quality.py --bases -->"
PREFIX_MLP = 64  # hidden width of the reparameterized prefix's training MLP
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("full", "bitfit", "lora", "adalora", "krona", "krona_block", "krona_block_res", "parallel",
           "scaled_parallel", "prefix", "prefix_reparam", "mam")
NAMES = {"full": "full fine-tuning", "bitfit": "BitFit (norms)", "lora": "LoRA", "adalora": "AdaLoRA",
         "krona": "KronA", "krona_block": "KronA^B", "krona_block_res": "KronA^B_res", "parallel": "parallel adapter",
         "scaled_parallel": "scaled parallel adapter (s=4)", "prefix": "prefix tuning",
         "prefix_reparam": f"prefix tuning, reparameterized (MLP {PREFIX_MLP})", "mam": "MAM"}
# The best validation loss of the grid in ``sweep`` (python bench/quality.py --sweep, SWEEP_SEED 0). Recorded before
# budgets were matched pairwise and before the grid widened itself: several configurations changed since (e.g.
# LoRA at 1% is now r=8) and some optima sit on the grid's edge (prefix 0.1%, parallel 0.1%); rerun --sweep
# before the next --write.
LEARNING_RATES: dict[tuple[str, float | None], float] = {
    ('full', None): 0.003,  # 0.0003: 3.871, 0.001: 3.811, 0.003: 3.782, 0.01: 3.961
    ('bitfit', None): 0.03,  # 0.003: 4.052, 0.01: 4.010, 0.03: 3.980, 0.1: 3.981, 0.3: 3.998
    ('lora', 0.001): 0.03,  # 0.003: 4.056, 0.01: 4.043, 0.03: 4.030, 0.1: 5.365, 0.3: 6.337
    ('lora', 0.01): 0.01,  # 0.003: 4.016, 0.01: 3.999, 0.03: 4.055, 0.1: 5.726, 0.3: 5.965
    ('adalora', 0.001): 0.1,  # 0.003: 4.121, 0.01: 4.112, 0.03: 4.048, 0.1: 4.035, 0.3: 4.049
    ('adalora', 0.01): 0.03,  # 0.003: 4.116, 0.01: 4.052, 0.03: 4.007, 0.1: 4.017, 0.3: 4.915
    ('krona', 0.001): 0.03,  # 0.003: 4.074, 0.01: 4.035, 0.03: 4.007, 0.1: 4.028, 0.3: 5.328
    ('krona', 0.01): 0.03,  # 0.003: 4.060, 0.01: 4.019, 0.03: 3.992, 0.1: 4.018, 0.3: 5.377
    ('krona_block', 0.001): 0.1,  # 0.003: 4.104, 0.01: 4.040, 0.03: 3.972, 0.1: 3.953, 0.3: 3.955
    ('krona_block', 0.01): 0.1,  # 0.003: 4.083, 0.01: 3.993, 0.03: 3.950, 0.1: 3.937, 0.3: 3.948
    ('krona_block_res', 0.001): 0.1,  # 0.003: 4.108, 0.01: 4.041, 0.03: 3.975, 0.1: 3.954, 0.3: 3.954
    ('krona_block_res', 0.01): 0.1,  # 0.003: 4.086, 0.01: 3.993, 0.03: 3.946, 0.1: 3.940, 0.3: 3.942
    ('parallel', 0.001): 0.3,  # 0.003: 4.078, 0.01: 4.036, 0.03: 3.995, 0.1: 3.982, 0.3: 3.975
    ('parallel', 0.01): 0.1,  # 0.003: 3.995, 0.01: 3.961, 0.03: 3.937, 0.1: 3.933, 0.3: 3.992
    ('scaled_parallel', 0.001): 0.1,  # 0.003: 4.051, 0.01: 4.005, 0.03: 3.981, 0.1: 3.970, 0.3: 3.979
    ('scaled_parallel', 0.01): 0.03,  # 0.003: 3.970, 0.01: 3.942, 0.03: 3.921, 0.1: 3.969, 0.3: 4.112
    ('prefix', 0.001): 3.0,  # 0.03: 4.115, 0.1: 4.110, 0.3: 4.083, 1: 4.064, 3: 4.049
    ('prefix', 0.01): 1.0,  # 0.03: 4.114, 0.1: 4.109, 0.3: 4.082, 1: 4.046, 3: 4.237
    ('prefix_reparam', 0.001): 0.03,  # 0.003: 4.103, 0.01: 4.072, 0.03: 4.043, 0.1: 4.056, 0.3: 5.029
    ('prefix_reparam', 0.01): 0.03,  # 0.003: 4.097, 0.01: 4.064, 0.03: 4.053, 0.1: 4.054, 0.3: 4.935
    ('mam', 0.001): 0.03,  # 0.003: 4.041, 0.01: 3.993, 0.03: 3.974, 0.1: 3.977, 0.3: 3.987
    ('mam', 0.01): 0.03,  # 0.003: 3.978, 0.01: 3.949, 0.03: 3.930, 0.1: 3.950, 0.3: 4.063
}

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


def docstrings(source: str) -> str:
    """Module, class and function docstrings of a Python source, in order, one paragraph each."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


def build_corpora(tokenizer) -> Corpora:
    from peft_dist.data import stdlib_documents
    from peft_dist.data.packing import pack_documents, tokenize_documents

    def pack(texts: list[str]) -> torch.Tensor:
        """The documents' tokens (EOS after each) concatenated and cut into SEQ-token blocks (only the ids:
        this bench's blocks are plain windows of the stream)."""
        return torch.from_numpy(pack_documents(tokenize_documents({"text": texts}, tokenizer), SEQ)["input_ids"]).long()

    modules = stdlib_documents()
    a = modules[0::2][: PRETRAIN["modules"]]
    b = [d for d in (docstrings(t) for t in modules[1::2]) if d]
    order = torch.randperm(len(b), generator=torch.Generator().manual_seed(0)).tolist()
    tenth = len(b) // 10
    split = {"test": order[:tenth], "val": order[tenth: 2 * tenth], "train": order[2 * tenth:]}
    blocks = {k: pack([b[i] for i in idx]) for k, idx in split.items()}
    return Corpora(pack(a), blocks["train"], blocks["val"][:EVAL_BLOCKS], blocks["test"][:EVAL_BLOCKS])


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
def block_losses(model: torch.nn.Module, blocks: torch.Tensor) -> list[float]:
    """Each block's mean next-token loss: the units the paired bootstrap resamples."""
    model.eval()
    losses = []
    for x in blocks.split(BATCH):
        logits = model(input_ids=x).logits[:, :-1]
        token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        losses += token.mean(dim=1).tolist()
    model.train()
    return losses


def mean_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token loss over ``blocks`` (equal-length blocks, so the mean of block means)."""
    return statistics.fmean(block_losses(model, blocks))


def train(model: torch.nn.Module, blocks: torch.Tensor, steps: int, lr: float, seed: int, hooks: list) -> list[float]:
    """AdamW over the trainable parameters, warm-up then cosine, clipping 1.0; returns each step's seconds."""
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
    return times


def pretrained_base(cache: Path, corpora: Corpora) -> tuple[dict, float, Path]:
    """The base's state dict, its loss on B's test split, and where it is cached (trained on a miss)."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([asdict(SHAPE), PRETRAIN, SEQ, BATCH], sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"quality-base-{key}.safetensors"
    if not path.is_file():
        torch.manual_seed(PRETRAIN["seed"])
        model = new_model()
        began = time.perf_counter()
        train(model, corpora.a, PRETRAIN["steps"], PRETRAIN["lr"], PRETRAIN["seed"], [])
        print(f"pretrained on A: {PRETRAIN['steps']} steps in {time.perf_counter() - began:.0f} s, "
              f"loss on A's last blocks {mean_loss(model, corpora.a[-EVAL_BLOCKS:]):.3f}", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    state = load_file(str(path))
    model = new_model()
    model.load_state_dict(state)
    return state, mean_loss(model, corpora.b_test), path


# ---- methods and budgets --------------------------------------------------------------------------

def candidates(method: str) -> list[list[dict]]:
    """Every configuration ``match_budgets`` may pick for a method: each is an ``adapters`` list."""
    # Kronecker factors: a1, a2 divide 256 and 768, with a1/a2 in {1/2, 1, 2} so that A and B stay near square
    # and kron(A, B) can reach (at least half of) full rank; 1 x n factors would make it a rank-1 update.
    factors = [(2**i, 2**j) for i in range(9) for j in range(9) if abs(i - j) <= 1]
    adalora_schedule = {"tinit": ADAPT_STEPS // 8, "tfinal": ADAPT_STEPS // 4, "delta_t": 2}
    if method == "lora":
        return [[{"method": "lora", "r": r, "alpha": 2 * r, "target_modules": t}] for t in (QV, ALL) for r in range(1, 33)]
    if method == "adalora":
        return [[{"method": "adalora", "init_r": math.ceil(1.5 * r), "target_r": r, "alpha": 2 * math.ceil(1.5 * r),
                  "target_modules": t, **adalora_schedule}] for t in (QV, ALL) for r in range(1, 33)]
    if method == "krona":
        return [[{"method": "krona", "a1": a1, "a2": a2, "target_modules": t}] for t in (QV, ALL) for a1, a2 in factors]
    if method in ("krona_block", "krona_block_res"):
        return [[{"method": "krona_block", "a1": a1, "a2": a2, "residual": method == "krona_block_res"}]
                for a1, a2 in factors]
    if method in ("parallel", "scaled_parallel"):
        scale = 4.0 if method == "scaled_parallel" else 1.0
        return [[{"method": "parallel_adapter", "sublayer": "ffn", "r": r, "scale": scale}] for r in range(1, 65)]
    if method == "prefix":
        return [[{"method": "prefix", "length": n, "reparameterize": False}] for n in range(1, 33)]
    if method == "prefix_reparam":
        return [[{"method": "prefix", "length": n, "hidden": PREFIX_MLP}] for n in range(1, 33)]
    if method == "bitfit":
        return [[{"method": "bitfit", "norm": True}]]
    raise ValueError(f"no size knob for {method!r}")


@functools.cache
def _counts(key: str) -> tuple[int, int]:
    """``parameter_counts`` memoized by the configuration's JSON (the planner asks for the same parts many times)."""
    from peft_dist.adapters.inject import adapter_state_dict
    from peft_dist.adapters.registry import build_adapter_config
    from peft_dist.plan.dryrun import build_meta_model

    adapters = json.loads(key)
    configs = [build_adapter_config(dict(a), f"adapters.{i}") for i, a in enumerate(adapters)]
    model = build_meta_model(SHAPE, configs, None, "float32")
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
    return _counts(json.dumps(adapters, sort_keys=True))


Counter = Callable[[list[dict]], tuple[int, int]]
Option = tuple[list[dict], int, int]  # (adapters, kept, trained)


def counted(method: str, count: Counter) -> list[Option]:
    """Every configuration of ``method`` with its counts. MAM pairs a prefix with a scaled FFN adapter, each part
    at most twice the other (an even split of its budget, loose enough to match a compared pair within 2%)."""
    if method != "mam":
        return [(adapters, *count(adapters)) for adapters in candidates(method)]
    return [([{"method": "mam", "prefix_length": p[0]["length"], "reparameterize": False, "r": a[0]["r"],
               "scale": 4.0}], pk + ak, pt + at)
            for p, pk, pt in counted("prefix", count) for a, ak, at in counted("scaled_parallel", count)
            if 0.5 <= pk / ak <= 2.0]


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

        anchors = {o[1] for m in group for o in options[m] if 0.5 <= o[1] / target <= 2.0} or {target}
        chosen.update(pick(min(anchors, key=score)))
    return chosen


def describe(adapters: list[dict]) -> str:
    """A short config string for the table: the keys that set the size."""
    a = dict(adapters[0])
    targets = a.pop("target_modules", None)
    keep = {k: v for k, v in a.items()
            if k in ("r", "target_r", "init_r", "a1", "a2", "length", "hidden", "prefix_length", "scale", "norm")}
    where = {None: "", str(QV): " on q,v", str(ALL): " on all linears"}[None if targets is None else str(targets)]
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()) + where


# ---- runs -----------------------------------------------------------------------------------------

def adapt(method: str, adapters: list[dict], state: dict, corpora: Corpora, lr: float, seed: int, steps: int,
          validate: bool = False, base: str = "fp32") -> dict:
    """Adapt a fresh copy of the base (its decoder linears kept as ``base`` says) to B; B's test loss (and
    validation loss) and the median step time."""
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
    blocks = block_losses(model, corpora.b_test)
    result = {"test": statistics.fmean(blocks), "blocks": blocks, "step_s": statistics.median(times[1:])}
    if validate:
        result["val"] = mean_loss(model, corpora.b_val)
    return result


def plan(methods: tuple[str, ...], budgets: tuple[float, ...],
         count: Counter = parameter_counts) -> list[tuple[str, float | None, list[dict], int, int]]:
    """(method, budget, adapters, kept, trained) of every row: full fine-tuning and BitFit have one size; the
    others are matched per budget by ``match_budgets`` over the pairs the claims compare."""
    sized = tuple(m for m in methods if m not in ("full", "bitfit"))
    pairs = compared_pairs(budgets)
    matched = {b: match_budgets(sized, b, [(x, y) for x, y, c in pairs if c == b and {x, y} <= set(sized)], count)
               for b in budgets}
    rows = []
    for method in methods:
        if method == "full":
            rows.append((method, None, [], SHAPE.total_params(), SHAPE.total_params()))
        elif method == "bitfit":
            (adapters,) = candidates("bitfit")
            rows.append((method, None, adapters, *count(adapters)))
        else:
            rows += [(method, b, *matched[b][method]) for b in budgets]
    return rows


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


def sweep(rows: list, state: dict, corpora: Corpora) -> None:
    """Each row's validation loss over a widening learning-rate grid (seed SWEEP_SEED, never a reported seed);
    prints the LEARNING_RATES entries."""
    for method, budget, adapters, *_ in rows:
        grid = {"full": (3e-4, 1e-3, 3e-3, 1e-2), "prefix": (3e-2, 1e-1, 3e-1, 1.0, 3.0)}.get(
            method, (3e-3, 1e-2, 3e-2, 1e-1, 3e-1))  # plain prefix vectors need far larger steps
        best, scores = best_learning_rate(
            lambda lr: adapt(method, adapters, state, corpora, lr, SWEEP_SEED, ADAPT_STEPS, validate=True)["val"], grid)
        print(f"    ({method!r}, {budget}): {best:g},  # "
              + ", ".join(f"{lr:g}: {scores[lr]:.3f}" for lr in sorted(scores)), flush=True)


def compared_pairs(budgets: tuple[float, ...]) -> list[tuple[str, str, float]]:
    """The papers' claims as (x, y, budget): "x reaches a lower held-out loss than y at budget"."""
    pairs = [("krona", "lora", b) for b in budgets] + [("krona_block", "krona", b) for b in budgets]
    pairs += [("krona_block_res", "krona_block", b) for b in budgets] + [("adalora", "lora", min(budgets))]
    pairs += [("scaled_parallel", "parallel", b) for b in budgets]
    pairs += [("mam", part, b) for b in budgets for part in ("prefix", "scaled_parallel")]
    pairs += [("prefix_reparam", "parallel", min(budgets))]
    return pairs


def seed_averaged(blocks: list[list[float]]) -> list[float]:
    """Each test block's loss averaged over the seeds (``blocks[seed][block]``): one paired unit per block."""
    return [statistics.fmean(losses) for losses in zip(*blocks)]


def claims(results: dict, budgets: tuple[float, ...]) -> list[str]:
    """Each claim judged by bench/stats.py's rule, Holm-adjusted over the claims whose budgets match.

    ``results[method, budget]`` holds ``kept`` (parameters), ``seeds`` (test loss per seed, in SEEDS order: runs
    of one seed share data order, so they are paired by seed) and ``blocks`` (per-test-block loss per seed)."""
    pairs = [(x, y, b) for x, y, b in compared_pairs(budgets) if (x, b) in results and (y, b) in results]
    tests = {}
    for x, y, b in pairs:
        rx, ry = results[x, b], results[y, b]
        if mismatch(rx["kept"], ry["kept"]) <= BUDGET_TOLERANCE and len(rx["seeds"]) > 1:
            tests[x, y, b] = (stats.paired_t(rx["seeds"], ry["seeds"]),
                              stats.paired_bootstrap(seed_averaged(rx["blocks"]), seed_averaged(ry["blocks"])))
    adjusted = dict(zip(tests, stats.holm([t.p for t, _ in tests.values()])))
    lines = []
    for x, y, b in pairs:
        rx, ry = results[x, b], results[y, b]
        head = (f"{NAMES[x]} vs {NAMES[y]} at {b:.1%}: {statistics.fmean(rx['seeds']):.3f} vs "
                f"{statistics.fmean(ry['seeds']):.3f}")
        if (x, y, b) not in tests:
            why = (f"budgets not matched within {BUDGET_TOLERANCE:.0%} ({rx['kept']:,} vs {ry['kept']:,})"
                   if mismatch(rx["kept"], ry["kept"]) > BUDGET_TOLERANCE else "one seed, nothing to pair")
            lines.append(f"{head}: not compared, {why}")
            continue
        (test, (low, high)), p = tests[x, y, b], adjusted[x, y, b]
        lines.append(f"{head}; paired difference {test.mean:+.3f} (95% CI {test.low:+.3f} to {test.high:+.3f}, "
                     f"p {test.p:.3g}, Holm {p:.3g}; test-block bootstrap {low:+.3f} to {high:+.3f}): "
                     f"{stats.outcome(test, p)}")
    return lines


# ---- bases (--bases) ------------------------------------------------------------------------------

def bases_study(rows: list, state: dict, corpora: Corpora, seeds: tuple[int, ...], steps: int) -> list[str]:
    """The --bases table, printed row by row, then its claims: every base's held-out loss before adaptation and
    after each LoRA row of ``rows`` (the table's configurations and learning rates), every seed."""
    before = {base: block_losses(base_model(state, base), corpora.b_test) for base in BASES}
    lines = [f"| base | decoder linears | before adaptation | before, minus {REFERENCE} (test-block 95% CI) | "
             + " | ".join(f"after LoRA {b:.1%} ({describe(a)}, lr {LEARNING_RATES[m, b]:g})" for m, b, a, *_ in rows)
             + " |", "|---" * (4 + len(rows)) + "|"]
    print("\n".join(lines), flush=True)
    results = {}
    for base in BASES:
        cells = []
        for method, budget, adapters, *_ in rows:
            runs = [adapt(method, adapters, state, corpora, LEARNING_RATES[method, budget], seed, steps, base=base)
                    for seed in seeds]
            losses = [r["test"] for r in runs]
            results[base, budget] = {"seeds": losses, "blocks": [r["blocks"] for r in runs]}
            cells.append(f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}")
        low, high = stats.paired_bootstrap(before[base], before[REFERENCE])
        shift = (f"{statistics.fmean(before[base]) - statistics.fmean(before[REFERENCE]):+.4f} "
                 f"({low:+.4f} to {high:+.4f})" if base != REFERENCE else "-")
        lines.append(f"| {base} | {BASES[base]} | {statistics.fmean(before[base]):.4f} | {shift} | "
                     f"{' | '.join(cells)} |")
        print(lines[-1], flush=True)
    verdicts = base_claims(results, tuple(b for _, b, *_ in rows))
    lines += ["", f"Claims (lower loss is better; paired by seed over {len(seeds)} seeds; \"matches\" when the "
              f"difference is shown to lie within ±{stats.MIN_EFFECT} nats: the TOST p, Holm-adjusted over these "
              f"claims, < {stats.ALPHA}; \"worse\" / \"better\" when the Holm-adjusted t-test p < {stats.ALPHA}, "
              f"the 95% CI excludes 0 and the difference is at least {stats.MIN_EFFECT} nats; see bench/stats.py):",
              "", *(f"- {v}" for v in verdicts)]
    print("\n".join(lines[-len(verdicts) - 2:]), flush=True)
    return lines


def base_claims(results: dict, budgets: tuple[float, ...]) -> list[str]:
    """Each base against REFERENCE at each budget, judged by ``stats.equivalence``; the t-test and the TOST
    p-values are each Holm-adjusted over these claims.

    ``results[base, budget]`` holds ``seeds`` (test loss per seed, in seed order: the runs of a seed share data
    order and LoRA initialization on every base, so they are paired by seed) and ``blocks`` (per-test-block
    loss per seed)."""
    keys = [(base, b) for b in budgets for base in BASES if base != REFERENCE]
    tests = {(base, b): stats.paired_t(results[base, b]["seeds"], results[REFERENCE, b]["seeds"]) for base, b in keys}
    adjusted = dict(zip(keys, stats.holm([tests[k].p for k in keys])))
    equivalent = dict(zip(keys, stats.holm([stats.equivalence_p(tests[k]) for k in keys])))
    lines = []
    for base, b in keys:
        x, y, test = results[base, b], results[REFERENCE, b], tests[base, b]
        low, high = stats.paired_bootstrap(seed_averaged(x["blocks"]), seed_averaged(y["blocks"]))
        lines.append(f"{base} vs {REFERENCE} at {b:.1%}: {statistics.fmean(x['seeds']):.4f} vs "
                     f"{statistics.fmean(y['seeds']):.4f}; paired difference {test.mean:+.4f} (95% CI "
                     f"{test.low:+.4f} to {test.high:+.4f}, p {test.p:.3g}, Holm {adjusted[base, b]:.3g}; within "
                     f"±{stats.MIN_EFFECT}: TOST p {stats.equivalence_p(test):.3g}, Holm {equivalent[base, b]:.3g}; "
                     f"test-block bootstrap {low:+.4f} to {high:+.4f}): "
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
        f"{', '.join(map(str, seeds))}, {steps} steps, each from the same pretrained base ({path.name}) whose decoder "
        "linears (q, k, v, o, gate, up and down of every layer: what the trainer's `all-linear` quantizes) are kept "
        "as the \"decoder linears\" column says, quantized by peft_dist's `quantize_model` as the trainer calls it. "
        "Embeddings, norms and lm_head stay fp32 and every base computes in fp32, so the bases differ only in how "
        "those weights are stored; \"bf16\" is the fp32 weights rounded to bfloat16, the weights a 16-bit base "
        "holds. \"before adaptation\" is the base's held-out loss on B: the storage's own cost, with a bootstrap "
        "over test blocks of its difference to bf16.", ""]


def with_bases_section(previous: str, lines: list[str]) -> str:
    """``previous`` with its part from BASES_BEGIN to BASES_END replaced by ``lines``; without one, ``lines`` go
    at the end, below HAND_WRITTEN, where the table's ``--write`` keeps them."""
    section = "\n".join([BASES_BEGIN, *lines, BASES_END])
    if BASES_BEGIN in previous:
        head, rest = previous.split(BASES_BEGIN, 1)
        return head + section + rest.split(BASES_END, 1)[1]
    if HAND_WRITTEN not in previous:
        previous += ("\n" if previous else "") + HAND_WRITTEN
    return previous.rstrip("\n") + "\n\n" + section + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 0.1%% budget, 5 methods, short pretraining")
    parser.add_argument("--sweep", action="store_true", help="learning-rate sweep on B's validation split")
    parser.add_argument("--bases", action="store_true",
                        help="LoRA on fp32, bf16, int8 and NF4 bases instead of the methods table")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "peft-dist-bench",
                        help="where the pretrained base is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods, budgets, seeds, steps = METHODS, BUDGETS, SEEDS, ADAPT_STEPS
    if args.quick:
        methods, budgets, seeds = ("lora", "krona", "parallel", "scaled_parallel", "prefix"), (0.001,), (1, 2)
        steps = 16
        PRETRAIN["steps"] = 60

    from peft_dist.model import load_tokenizer

    began = time.perf_counter()
    corpora = build_corpora(load_tokenizer(str(REPO / "peft_dist" / "assets" / "tiny_tokenizer")))
    state, base_loss, path = pretrained_base(args.cache, corpora)
    rows = plan(methods, budgets)
    if args.sweep:
        sweep(rows, state, corpora)
        return
    if args.bases:
        lines = bases_study([r for r in rows if r[0] == "lora"], state, corpora, seeds, steps)
        minutes = (time.perf_counter() - began) / 60
        print(f"\ntotal {minutes:.0f} min")
        if args.write:
            previous = args.write.read_text() if args.write.is_file() else ""
            header = bases_header(" ".join(sys.argv[1:]), minutes, path, seeds, steps)
            args.write.write_text(with_bases_section(previous, header + lines))
        return
    lines = [f"Base: {SHAPE.layers}-layer Llama, hidden {SHAPE.hidden}, FFN {SHAPE.intermediate}, vocab {SHAPE.vocab}, "
             f"{SHAPE.total_params():,} parameters, pretrained {PRETRAIN['steps']} steps on A ({path}). "
             f"Adaptation: {steps} steps of {BATCH} x {SEQ} tokens of B, seeds {', '.join(map(str, seeds))}; "
             f"{len(corpora.b_train)} training blocks of B, loss on {len(corpora.b_test)} test blocks. "
             f"{torch.get_num_threads()} threads.", "",
             f"Held-out loss on B of the base before adaptation: {base_loss:.3f}", "",
             "| method | budget | configuration | kept params | % of base | trained params | lr "
             "| held-out loss on B (mean ± std) | step (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results = {}
    for method, budget, adapters, kept, trained in rows:
        lr = LEARNING_RATES[method, budget]
        runs = [adapt(method, adapters, state, corpora, lr, seed, steps) for seed in seeds]
        losses = [r["test"] for r in runs]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        results[method, budget] = {"kept": kept, "seeds": losses, "blocks": [r["blocks"] for r in runs]}
        step_ms = 1e3 * statistics.mean(r["step_s"] for r in runs)
        line = (f"| {NAMES[method]} | {'-' if budget is None else f'{budget:.1%}'} | {describe(adapters) if adapters else 'all'} "
                f"| {kept:,} | {100 * kept / SHAPE.total_params():.3f}% | {trained:,} | {lr:g} | "
                f"{statistics.mean(losses):.3f} ± {spread:.3f} | {step_ms:.0f} |")
        lines.append(line)
        print(line, flush=True)
    verdicts = claims(results, budgets)
    lines += ["", f"Claims (lower loss is better; paired by seed over {len(seeds)} seeds, Holm-adjusted over the "
              f"compared claims; holds when Holm p < {stats.ALPHA}, the 95% CI excludes 0 and the difference is at "
              f"least {stats.MIN_EFFECT} nats, see bench/stats.py):", ""]
    lines += [f"- {v}" for v in verdicts]
    print("\n".join(lines[-len(verdicts) - 2:]))
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    if args.write:
        previous = args.write.read_text() if args.write.is_file() else ""
        args.write.write_text(results_markdown(lines, " ".join(sys.argv[1:]), previous))


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
