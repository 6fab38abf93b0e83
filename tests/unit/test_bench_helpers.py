"""Pure helpers of the bench scripts: budget matching, claims and the learning-rate sweep (bench/quality.py), the
scaling fit (bench/scaling.py) and the progress and ratios of bench/seven_b_peft.py."""
import ast
import math
import subprocess
import sys
import types

import pytest
import torch

from tests.multiproc import REPO

sys.path.insert(0, str(REPO / "bench"))

import quality  # noqa: E402
import scaling  # noqa: E402


def kept_by_formula(adapter: dict) -> int:
    """Kept parameters written down from the shape (hidden d, FFN f, L layers), independent of the meta model."""
    d, f, layers = quality.SHAPE.hidden, quality.SHAPE.intermediate, quality.SHAPE.layers
    dims = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d), "gate_proj": (f, d),
            "up_proj": (f, d), "down_proj": (d, f)}
    linears = [dims[t] for t in adapter.get("target_modules", [])] * layers  # (d_out, d_in) of each target
    method = adapter["method"]
    if method == "lora":  # A (r, d_in) and B (d_out, r)
        return sum(adapter["r"] * (o + i) for o, i in linears)
    if method == "adalora":  # the final budget: target_r triplets of each matrix, one singular value each
        return sum(adapter["target_r"] * (o + i + 1) for o, i in linears)
    if method == "krona":  # A (a1, a2) and B (d_out/a1, d_in/a2) per target
        return sum(adapter["a1"] * adapter["a2"] + (o // adapter["a1"]) * (i // adapter["a2"]) for o, i in linears)
    if method == "krona_block":  # A (a1, a2) and B (d/a1, d/a2) per layer, + s_res
        a1, a2 = adapter["a1"], adapter["a2"]
        return layers * (a1 * a2 + (d // a1) * (d // a2) + adapter["residual"])
    if method == "parallel_adapter":  # down (r, d) + bias r, up (d, r) + bias d, per layer
        return layers * (2 * d * adapter["r"] + adapter["r"] + d)
    if method == "prefix":  # P_k and P_v: l vectors of width d per layer, the MLP folded away; a gate per head
        return layers * (2 * adapter["length"] * d + adapter.get("gate", False) * quality.SHAPE.heads)
    if method == "bitfit":  # two RMSNorm weights per layer and the final one
        return (2 * layers + 1) * d
    raise ValueError(method)


def by_formula(adapters: list[dict]) -> tuple[int, int]:
    """A counter for ``quality.plan`` from the formulas (kept only: the planner matches on kept parameters)."""
    (adapter,) = adapters
    kept = kept_by_formula(adapter)
    return kept, kept


@pytest.mark.parametrize("adapters", [
    [{"method": "lora", "r": 3, "alpha": 6, "target_modules": quality.ALL}],
    [{"method": "lora", "r": 2, "alpha": 4, "target_modules": quality.FFN}],
    [{"method": "krona", "a1": 4, "a2": 8, "target_modules": quality.ALL}],
    [{"method": "krona", "a1": 64, "a2": 64, "target_modules": quality.FFN}],
    quality.adalora_adapters("adalora", 5, {"init_ratio": 4.0, "tfinal": 12}),
    [{"method": "parallel_adapter", "sublayer": "ffn", "r": 5, "scale": 4.0}],
    [{"method": "prefix", "length": 3, "reparameterize": False, "gate": True}],
    [{"method": "bitfit", "norm": True}],
])
def test_formulas_agree_with_the_injected_model(adapters):
    assert quality.parameter_counts(adapters)[0] == kept_by_formula(adapters[0])


@pytest.mark.parametrize("budget", [0.001, 0.01])
@pytest.mark.parametrize("method", ["prefix", "krona_block", "prefix_reparam"])
def test_matched_budget_is_near_the_target(method, budget):
    (adapter,), count, _ = quality.match_budgets((method,), budget, [])[method]
    assert count == kept_by_formula(adapter)
    assert 0.8 < count / (budget * quality.SHAPE.total_params()) < 1.25, (adapter, count)


def test_mam_is_counted_as_its_two_parts():
    (mam,), kept, trained = next(o for o in quality.counted("mam", quality.parameter_counts)
                                 if o[0][0]["prefix_length"] == 2 and o[0][0]["r"] == 1)
    prefix = quality.parameter_counts([{"method": "prefix", "length": 2, "reparameterize": False}])
    adapter = quality.parameter_counts([{"method": "parallel_adapter", "sublayer": "ffn", "r": 1, "scale": 4.0}])
    assert quality.parameter_counts([mam]) == (kept, trained) == (prefix[0] + adapter[0], prefix[1] + adapter[1])


# Pairs no two configurations can match: MAM's count is prefixes (2,048 each) plus an adapter (2,052 r + 1,024),
# half a prefix off; KronA^B has 2,048 / 2,560 / 4,352 near 0.1%, KronA 4,096 / 5,120. Near 1% KronA on q,v has
# 32,896 / 65,600, on the FFN 19,968 / 25,728 / 37,632 / 49,728, on all linears 20,480 / 20,992 / 30,208 /
# 32,000 / 55,040 / 59,008, and KronA^B 32,800 / 65,552.
UNMATCHABLE = {("krona_block", "krona", 0.001), ("mam", "prefix", 0.001), ("prefix_reparam", "parallel", 0.001),
               ("krona_ffn", "krona", 0.01), ("krona_all", "krona", 0.01), ("krona_block", "krona_ffn", 0.01)}
# Pairs each matchable alone, not together with the rest: LoRA on q,v is 4,096 r, so it meets KronA (r = 8 or 16),
# LoRA on the FFN (12,288 r: r a multiple of 3) and on all linears (20,480 r: a multiple of 5) at no common r.
# At r = 15 it meets both placement controls, whose 61,440 neither KronA on the FFN nor on all linears can meet:
# these claims get rows sized for them (LoRA r=16 on q,v; LoRA r=4 on the FFN; both at 20,480 on all linears).
CONFLICTING = {("krona", "lora", 0.01), ("krona_ffn", "lora_ffn", 0.01), ("krona_all", "lora_all", 0.01)}
PLACEMENT_CONTROLS = ("lora_ffn", "lora_all", "krona_ffn", "krona_all")


def fewest_unmatched(budget: float) -> int:
    """The fewest compared pairs any choice of configurations (within the factor-2 window) leaves unmatched at
    ``budget``: a depth-first search over the methods, cut off when it cannot beat the best found."""
    target = budget * quality.SHAPE.total_params()
    counts = {m: sorted({k for _, k, _ in quality.counted(m, by_formula) if 0.5 <= k / target <= 2.0})
              for m in quality.METHODS if m not in ("full", "bitfit")}
    counts = {m: c for m, c in counts.items() if c}
    pairs = [(x, y) for x, y, b in quality.compared_pairs(quality.BUDGETS) if b == budget and {x, y} <= set(counts)]
    order = sorted(counts, key=lambda m: (-sum(m in pair for pair in pairs), len(counts[m])))
    best = len(pairs)

    def search(i: int, chosen: dict[str, int], unmatched: int) -> None:
        nonlocal best
        if unmatched >= best:
            return
        if i == len(order):
            best = unmatched
            return
        for count in counts[order[i]]:
            chosen[order[i]] = count
            search(i + 1, chosen, unmatched + sum(quality.mismatch(chosen[x], chosen[y]) > quality.BUDGET_TOLERANCE
                                                  for x, y in pairs if order[i] in (x, y) and {x, y} <= set(chosen)))
            del chosen[order[i]]

    search(0, {}, 0)
    return best


def test_planned_pairs_are_matched_within_two_percent():
    rows = quality.plan(quality.METHODS, quality.BUDGETS, by_formula)
    kept = {row.key: row.kept for row in rows}
    assert not any((m, 0.001) in kept for m in PLACEMENT_CONTROLS)  # their smallest configuration is over 2x
    assert all((m, 0.01) in kept for m in PLACEMENT_CONTROLS)
    planned = [(x, y, b) for x, y, b in quality.compared_pairs(quality.BUDGETS) if (x, b) in kept and (y, b) in kept]
    for key in kept:
        if key[1] is not None:
            target = key[1] * quality.SHAPE.total_params()
            assert 0.5 <= kept[key] / target <= 2.0, key
    unmatched = {(x, y, b) for x, y, b in planned if quality.mismatch(kept[x, b], kept[y, b]) > quality.BUDGET_TOLERANCE}
    assert unmatched == UNMATCHABLE | CONFLICTING
    for b in quality.BUDGETS:  # the methods' own rows leave as few unmatched as any choice of configurations
        assert sum(p[2] == b for p in unmatched) == fewest_unmatched(b)
    for x, y, b in UNMATCHABLE:  # no two configurations in the window match
        target = b * quality.SHAPE.total_params()
        near = {m: [k for _, k, _ in quality.counted(m, by_formula) if 0.5 <= k / target <= 2.0] for m in (x, y)}
        assert min(quality.mismatch(i, j) for i in near[x] for j in near[y]) > quality.BUDGET_TOLERANCE
    # Rows sized for a claim exist only for the conflicting pairs, and they match them.
    sized = {(key[0], key[2], key[1]) for key in kept if len(key) == 3}
    assert {(x, y, b) for x, y, b in CONFLICTING} == {p for p in planned if p in sized or (p[1], p[0], p[2]) in sized}
    for x, y, b in planned:
        kx, ky = quality.compared_keys(x, y, b, kept)
        assert ((x, y, b) in UNMATCHABLE) == (quality.mismatch(kept[kx], kept[ky]) > quality.BUDGET_TOLERANCE)
    # One side re-sized where that suffices (LoRA on q,v to KronA's 65,600; on the FFN to KronA's 49,728).
    assert (kept["lora", 0.01, "krona"], kept["lora_ffn", 0.01, "krona_ffn"]) == (65_536, 49_152)
    assert ("krona", 0.01, "lora") not in kept and kept["krona_all", 0.01, "lora_all"] == kept["lora_all", 0.01, "krona_all"]


def test_adalora_rows_take_the_recorded_schedule(monkeypatch):
    monkeypatch.delitem(quality.ADALORA_SCHEDULES, 0.01, raising=False)
    paper = {r.method: r for r in quality.plan(("adalora", "adalora_paper"), (0.01,), by_formula)}
    assert paper["adalora"][2:] == paper["adalora_paper"][2:]  # before --sweep records a schedule: the paper's
    monkeypatch.setitem(quality.ADALORA_SCHEDULES, 0.01, {"init_ratio": 4.0, "tfinal": 12})
    rows = {r.method: r for r in quality.plan(("adalora", "adalora_paper"), (0.01,), by_formula)}
    (tuned,), kept = rows["adalora"].adapters, rows["adalora"].kept
    (fixed,), paper_kept = rows["adalora_paper"].adapters, rows["adalora_paper"].kept
    assert (tuned["init_r"], tuned["tfinal"]) == (4 * tuned["target_r"], 12) and kept == paper_kept
    assert (fixed["init_r"], fixed["tfinal"]) == (math.ceil(1.5 * fixed["target_r"]), quality.ADAPT_STEPS // 3)


def test_adalora_is_counted_at_its_final_budget():
    lora = [{"method": "lora", "r": 4, "alpha": 8, "target_modules": quality.QV}]
    adalora = [{"method": "adalora", "init_r": 6, "target_r": 4, "target_modules": quality.QV, "tinit": 1, "tfinal": 1}]
    lam = 4 * quality.SHAPE.layers * 2  # one singular value per kept triplet
    kept, trained = quality.parameter_counts(adalora)
    assert kept == quality.parameter_counts(lora)[0] + lam and trained == kept * 6 // 4


def test_reparameterized_prefix_keeps_only_its_vectors():
    kept, trained = quality.parameter_counts([{"method": "prefix", "length": 3, "hidden": 8}])
    assert kept == quality.SHAPE.layers * 2 * 3 * quality.SHAPE.hidden and trained > kept


def test_fitted_exponent_recovers_a_power_law():
    assert scaling.fitted_exponent([1, 2, 4], [8.0, 4.0, 2.0]) == pytest.approx(-1.0)
    assert scaling.fitted_exponent([1, 2, 4], [5.0, 5.0, 5.0]) == pytest.approx(0.0)


def test_writing_results_keeps_the_hand_written_reading():
    old = quality.results_markdown(["| old table |"], "--write docs/RESULTS.md", "")
    assert old.endswith(quality.HAND_WRITTEN + "\n")
    previous = old + "\n## Reading the table\n\nKronA holds at 0.1%.\n"
    new = quality.results_markdown(["| new table |"], "--write docs/RESULTS.md", previous)
    assert "| new table |" in new and "| old table |" not in new
    assert new.endswith(quality.HAND_WRITTEN + "\n\n## Reading the table\n\nKronA holds at 0.1%.\n")


TOKENS = [50, 100, 150, 200]  # 4 test documents


def result(kept: int, seeds: list[float]) -> dict:
    """A ``claims`` entry: each seed's loss, and the summed losses of 4 test documents per seed around it."""
    return {"kept": kept, "seeds": seeds,
            "documents": [[n * (s + e) for n, e in zip(TOKENS, (-0.01, 0.01, -0.02, 0.02))] for s in seeds]}


LORA = [4.00, 4.03, 3.98, 4.01, 4.02]  # seed-to-seed spread larger than the effects below, shared by the pair


@pytest.mark.parametrize("shift, outcome", [(-0.05, "holds"), (+0.05, "reversed"), (-0.002, "not shown")])
def test_claims_pair_by_seed(shift, outcome):
    krona = [v + shift + e for v, e in zip(LORA, [0.001, -0.001, 0.002, 0.0, -0.002])]
    (claim,) = quality.claims({("krona", 0.001): result(4096, krona), ("lora", 0.001): result(4096, LORA)}, (0.001,),
                              TOKENS)
    assert claim.line.endswith(outcome) and "Holm" in claim.line and "test-document bootstrap" in claim.line
    assert claim.outcome == outcome and claim.pair == ("krona", "lora", 0.001)
    assert claim.difference == pytest.approx(shift, abs=1e-9)


def test_claims_skip_unmatched_budgets_and_correct_for_the_family():
    krona = [v - 0.05 for v in LORA]
    results = {("krona", 0.001): result(4096, krona), ("lora", 0.001): result(4096, LORA),
               ("krona_block", 0.001): result(4352, [v - 0.1 for v in LORA])}
    unmatched, matched = sorted((c.line for c in quality.claims(results, (0.001,), TOKENS)),
                                key=lambda line: "not compared" not in line)
    assert unmatched.endswith("not compared, budgets not matched within 2% (4,352 vs 4,096)")
    assert matched.endswith("holds")


def test_claims_compare_the_rows_sized_for_them():
    """KronA vs LoRA compares LoRA's row sized for KronA (better than KronA); AdaLoRA vs LoRA, LoRA's own (worse)."""
    results = {("krona", 0.01): result(65_600, LORA), ("lora", 0.01): result(61_440, [v + 0.1 for v in LORA]),
               ("lora", 0.01, "krona"): result(65_536, [v - 0.05 for v in LORA]),
               ("adalora", 0.01): result(61_560, LORA)}
    lines = {c.line.split(" vs ")[0]: c.line for c in quality.claims(results, (0.01,), TOKENS)}
    assert lines["KronA on q,v"].startswith(
        "KronA on q,v vs LoRA on q,v at 1.0% (LoRA on q,v at 65,536, sized for this claim): 4.008 vs 3.958;")
    assert lines["KronA on q,v"].endswith("reversed")
    assert "sized" not in lines["AdaLoRA on q,v (schedule tuned)"] and lines["AdaLoRA on q,v (schedule tuned)"].endswith("holds")


def test_across_bases_shows_each_claims_verdict_on_each_base():
    """One row per claim, a column per base: its outcome and mean difference, "not compared" as it is, and
    "not run" where a base has no verdict for it (the large base's table lacks some rows)."""
    held = quality.Claim(("krona", "lora", 0.001), "", "holds", -0.026)
    small = [held, quality.Claim(("krona_block", "krona", 0.001), "", "not compared", None)]
    large = [quality.Claim(("krona", "lora", 0.001), "", "not shown", -0.004)]
    assert quality.across_bases({"small": small, "large": large}) == [
        "| claim | budget | small base | large base |", "|---|---|---|---|",
        "| KronA on q,v vs LoRA on q,v | 0.1% | holds (-0.026) | not shown (-0.004) |",
        "| KronA^B vs KronA on q,v | 0.1% | not compared | not run |"]


def test_sweep_widens_the_grid_until_the_optimum_is_inside():
    def loss(lr: float) -> float:  # lowest at lr = 1 (log10 0), beyond the grid's top
        return math.log10(lr) ** 2

    best, scores = quality.best_learning_rate(loss, (1e-3, 1e-2, 1e-1))
    assert best == pytest.approx(1.0) and sorted(scores)[-1] == pytest.approx(10.0)  # grown by x10 twice
    best, _ = quality.best_learning_rate(lambda lr: float("nan") if lr > 0.05 else loss(lr * 100), (1e-3, 1e-2, 1e-1))
    assert best == pytest.approx(1e-2)  # a diverged run (nan) never counts as the best
    with pytest.raises(RuntimeError, match="still on the edge"):
        quality.best_learning_rate(lambda lr: -lr, (1e-3, 1e-2, 1e-1), widenings=2)


def test_sweep_chooses_adalora_schedule_at_the_paper_rate(monkeypatch, capsys):
    runs = []

    def adapt(method, adapters, state, corpora, lr, seed, steps, validate=False):
        """Validation loss lowest at lr 0.03 and at init_r = 2 x target_r with tfinal 12."""
        (a,) = adapters
        runs.append((a["init_r"], a["tfinal"], lr))
        assert seed == quality.SWEEP_SEED and validate
        best = (a["init_r"], a["tfinal"]) == (2 * a["target_r"], quality.ADAPT_STEPS // 8)
        return {"val": math.log10(lr / 0.03) ** 2 + (0.0 if best else 0.1)}

    monkeypatch.setattr(quality, "adapt", adapt)
    rows = [quality.Row(m, 0.01, quality.adalora_adapters(m, 9, quality.ADALORA_PAPER), 0, 0)
            for m in ("adalora", "adalora_paper")]
    quality.sweep(rows, {}, None)
    rates, schedules = capsys.readouterr().out.split("LEARNING_RATES entries:")[1].split("ADALORA_SCHEDULES entries:")
    assert ast.literal_eval("{" + rates + "}") == {("adalora", 0.01): 0.03, ("adalora_paper", 0.01): 0.03}
    assert ast.literal_eval("{" + schedules + "}") == {0.01: {"init_ratio": 2.0, "tfinal": 12}}
    # the paper schedule's 5 rates, the 5 other schedules at its best, 4 more rates at the chosen one: none twice
    assert len(runs) == len(set(runs)) == 14


def test_missing_records_stop_the_run_and_name_each(monkeypatch):
    rows = [quality.Row("lora", 0.001, [], 4096, 4096), quality.Row("lora_ffn", 0.01, [], 36864, 36864),
            quality.Row("adalora", 0.01, [], 1, 1)]
    monkeypatch.setitem(quality.LEARNING_RATES, ("lora", 0.001), 0.05)
    monkeypatch.setitem(quality.LEARNING_RATES, ("adalora", 0.01), 0.1)  # a rate, but no schedule
    monkeypatch.delitem(quality.LEARNING_RATES, ("lora_ffn", 0.01), raising=False)
    monkeypatch.delitem(quality.ADALORA_SCHEDULES, 0.01, raising=False)
    with pytest.raises(SystemExit, match=r"LEARNING_RATES\['lora_ffn', 0.01\], ADALORA_SCHEDULES\[0.01\]: run "
                                         r"python bench/quality.py --sweep"):
        quality.learning_rates(rows, quick=False)
    assert quality.learning_rates(rows[:1], quick=False) == {("lora", 0.001): 0.05}
    # --quick needs nothing recorded: the middle of each method's starting grid
    assert quality.learning_rates(rows + [quality.Row("prefix_gated", 0.001, [], 0, 0)], quick=True) == {
        ("lora", 0.001): 0.03, ("lora_ffn", 0.01): 0.03, ("adalora", 0.01): 0.03, ("prefix_gated", 0.001): 0.3}


def test_runs_are_recorded_and_not_run_again(tmp_path, monkeypatch):
    """``adapt`` keeps each finished run in RUNS: a second call, or a later process reading the file, gets the
    recorded result instead of training again (an interrupted sweep or table resumes)."""
    calls = []

    def run(method, adapters, state, corpora, lr, seed, steps, validate, base):
        calls.append((method, lr, seed))
        return {"val": lr + seed}

    monkeypatch.setattr(quality, "_adapt", run)
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs.jsonl")
    adapters = [{"method": "lora", "r": 1, "alpha": 2, "target_modules": quality.QV}]
    first = quality.adapt("lora", adapters, {}, None, 0.01, 1, 96, validate=True)
    assert quality.adapt("lora", adapters, {}, None, 0.01, 1, 96, validate=True) == first == {"val": 1.01}
    quality.adapt("lora", adapters, {}, None, 0.03, 1, 96, validate=True)  # another rate: another run
    assert calls == [("lora", 0.01, 1), ("lora", 0.03, 1)]
    quality.recorded_runs.cache_clear()  # a new process
    assert quality.adapt("lora", adapters, {}, None, 0.03, 1, 96, validate=True) == {"val": 1.03}
    assert len(calls) == 2 and len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2


@pytest.fixture
def large_base():
    quality.use_base("large")
    yield
    quality.use_base("small")


def test_the_large_base_sweep_starts_around_the_small_base_rate(large_base):
    """On the large base a row's grid is the small base's rate for that row and its neighbours on the 1-3 ladder
    (``best_learning_rate`` widens it where the optimum moved); a row the small base has no rate for starts from
    its method's full grid."""
    assert quality.SHAPE.layers == 6 and quality.LEARNING_RATES is quality.LARGE_LEARNING_RATES
    assert quality.initial_grid("lora", ("lora", 0.001)) == (0.01, 0.03, 0.1)
    assert quality.initial_grid("prefix", ("prefix", 0.01)) == (0.3, 1.0, 3.0)
    assert quality.initial_grid("krona_block", ("krona_block", 0.001)) == (0.1, 0.3, 1.0)
    assert quality.initial_grid("lora", ("lora", 0.5)) == quality.initial_grid("lora")


def test_kronecker_factors_divide_the_large_base(large_base):
    """KronA's factors must divide each linear's widths (384 and 1152: powers of 2 up to 128 only)."""
    for method in ("krona", "krona_block"):
        for (adapter,) in quality.candidates(method):
            assert all(width % adapter["a1"] == 0 and width % adapter["a2"] == 0
                       for width in (quality.SHAPE.hidden, quality.SHAPE.intermediate)), adapter
    assert max(a["a1"] for (a,) in quality.candidates("krona")) == 128


def test_blocks_know_the_document_of_every_token():
    from peft_dist.data.packing import pack_documents, tokenize_documents
    from peft_dist.model import load_tokenizer

    tokenizer = load_tokenizer(str(REPO / "peft_dist" / "assets" / "tiny_tokenizer"))
    texts = ["A short one.", "A longer document, " * 60, "x", "The last one, cut by the tail. " * 40]
    blocks, documents = quality.pack_blocks(texts, tokenizer)
    packed = pack_documents(tokenize_documents({"text": texts}, tokenizer), quality.SEQ)
    assert torch.equal(blocks, torch.from_numpy(packed["input_ids"]).long()) and len(blocks) >= 3
    # a document starts exactly where pack_documents restarts the positions inside a block, and after an EOS
    starts = documents[:, 1:] != documents[:, :-1]
    assert torch.equal(starts, torch.from_numpy(packed["position_ids"])[:, 1:] == 0)
    flat, ids = documents.flatten(), blocks.flatten()
    assert flat[0] == 0 and flat.diff().ge(0).all() and flat[-1] == len(texts) - 1
    assert (ids[:-1][flat.diff() == 1] == tokenizer.eos_token_id).all()


class FixedLogits(torch.nn.Module):
    """The same next-token logits at every position: the loss of predicting token t is -log_softmax(LOGITS)[t]."""

    def forward(self, input_ids: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=LOGITS.expand(*input_ids.shape, -1))


LOGITS = torch.tensor([2.0, 0.0, -1.0])


def test_document_losses_count_each_token_for_its_own_document():
    blocks = torch.tensor([[0, 1, 2, 1], [2, 0, 0, 1], [1, 2, 2, 0]])
    documents = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2], [2, 3, 3, 3]])  # 3 blocks of 4 tokens, 4 documents
    loss = (-torch.log_softmax(LOGITS, 0)).tolist()
    # the first token of a block has no prediction; each other token's loss counts for its own document
    expected = [loss[1], loss[2] + loss[1], loss[0] + loss[0] + loss[1], loss[2] + loss[2] + loss[0]]
    assert quality.document_tokens(documents) == [1, 2, 3, 3]
    assert quality.document_losses(FixedLogits(), blocks, documents) == pytest.approx(expected)


def test_seven_b_peft_reports_how_far_a_stopped_baseline_got():
    """bench/seven_b_peft.py: the layer hooks report the forward and the backward layer by layer, and a ratio
    to a baseline that did not finish its steps is marked as an upper bound."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoModelForCausalLM

    from bench.seven_b_peft import describe, ratios, watch_layers
    from peft_dist.model import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    seen = []
    watch_layers(model, types.SimpleNamespace(update=lambda **fields: seen.append((fields["phase"], fields["layer"]))))
    layers = model.config.num_hidden_layers
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert seen == [("forward", f"{i}/{layers}") for i in range(1, layers + 1)] + \
        [("backward", f"{i}/{layers}") for i in range(layers, 0, -1)]

    gib = 2**30
    ours = [{"peak_rss": 5 * gib, "rss_before_load": 1 * gib, "phase": "steps done", "steps": 2},
            {"peak_rss": 4 * gib, "rss_before_load": 1 * gib, "phase": "steps done", "steps": 2}]
    finished = [{"peak_rss": 10 * gib, "rss_before_load": 2 * gib, "phase": "steps done", "steps": 2},
                {"peak_rss": 20 * gib, "rss_before_load": 2 * gib, "phase": "steps done", "steps": 2}]
    stopped = [{**finished[0], "phase": "backward", "steps": 1}]  # stopped inside its second step
    assert ratios(ours, finished, 2) == "0.50x, 0.20x peak RSS; 0.50x, 0.17x the model's part; the largest rank's 0.25x"
    assert ratios(ours, stopped, 2).endswith("(upper bounds: its steps did not finish)")
    assert ratios(ours, [{"phase": "no report"}], 2) == "not comparable: a job reported no memory"
    assert describe("peft+bf16", [{**finished[0], "exit": 0, "elapsed_s": 60}]).endswith(
        "| step 2 done after 60 s (exit: 0) |")
    killed = {**stopped[0], "layer": "3/32", "exit": "stopped at the time limit", "elapsed_s": 90}
    assert describe("peft+bf16", [killed]).endswith("| backward 3/32 after 90 s (exit: stopped at the time limit) |")


def test_seven_b_peft_refuses_a_job_of_no_steps():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "seven_b_peft.py"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--steps: got 0; a job must run at least 1 step" in proc.stderr
