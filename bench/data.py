"""A large corpus prepared once and read memory-mapped by every rank: preparation time, disk, per-rank memory.

    python bench/data.py                    # 100M tokens; the corpus is written once under --work
    python bench/data.py --tokens 5e6       # a quick look

The corpus is this Python's standard library as jsonl, repeated with a numbered header per copy until it
holds ``--tokens`` tokens of the builtin tokenizer. ``--ranks`` processes start together on an empty cache
and call the trainer's ``build_blocks`` (exactly what ``launcher/train.py`` does): one prepares, the others
wait on the lock and reuse the blocks. Then each reads ``--steps`` steps of its micro-batches through the
trainer's sampler. Per rank it prints whether it prepared, seconds until its blocks were ready and the
growth of its private memory (resident minus file-backed pages) from before ``build_blocks`` to after the
reads: the data's cost to a training rank. Target: under 100 MiB per rank at 100M tokens.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 2**20
BLOCK, MICRO, ACCUMULATION = 512, 4, 4


def machine() -> str:
    """Cores, the CPU's avx2 / avx512 / amx flags and memory: compare ratios within one run, not times across
    machines (on an AVX2-only CPU bf16 is emulated)."""
    flags = sorted({f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                    for f in line.split() if f.startswith(("avx2", "avx512", "amx"))})
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"cpu: {os.cpu_count()} cores, {' '.join(flags)}; memory {memory:.0f} GiB"


def write_corpus(path: Path, tokens: float) -> None:
    """The stdlib's files as jsonl documents, copied until the builtin tokenizer counts ``tokens`` tokens."""
    from peft_dist.data import stdlib_documents
    from peft_dist.model import load_tokenizer

    documents = stdlib_documents()
    tokenizer = load_tokenizer("builtin:tiny-llama")
    per_copy = sum(len(ids) + 1 for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
    copies = max(1, round(tokens / per_copy))
    partial = path.with_suffix(".partial")
    with open(partial, "w") as handle:
        for copy in range(copies):
            for number, text in enumerate(documents):
                handle.write(json.dumps({"text": f"# copy {copy} document {number}\n{text}"}) + "\n")
    partial.rename(path)
    print(f"corpus: {copies} copies of {len(documents)} stdlib files, about {copies * per_copy / 1e6:.0f}M tokens, "
          f"{path.stat().st_size / MIB:,.0f} MiB")


def rank_worker(rank: int, world: int, corpus: str, cache: str, steps: int, queue) -> None:
    from peft_dist.config import DataConfig
    from peft_dist.data import GlobalBatchSampler, build_blocks
    from peft_dist.distributed.memory import resident_bytes
    from peft_dist.model import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-llama")
    _, private_before = resident_bytes()
    started = time.monotonic()
    blocks = build_blocks(DataConfig(path=corpus, block_size=BLOCK, max_documents=0, cache_dir=cache), tokenizer)
    ready = time.monotonic() - started
    sampler = GlobalBatchSampler(len(blocks.train), MICRO, ACCUMULATION, world, rank, seed=0)
    tokens = 0
    for step in range(steps):
        for micro in sampler.micro_batches(step):
            tokens += blocks.train.batch(micro)["input_ids"].numel()
    _, private_after = resident_bytes()
    queue.put({"rank": rank, "prepared": blocks.prepared_here, "ready_s": ready, "tokens_read": tokens,
               "private_growth": private_after - private_before, "blocks": len(blocks.train),
               "directory": str(blocks.directory)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/peft-dist/bench"))
    args = parser.parse_args()
    corpus = Path(args.work) / f"stdlib-{args.tokens:.0e}.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        write_corpus(corpus, args.tokens)
    print(machine())
    print(f"corpus: {corpus} ({corpus.stat().st_size / MIB:,.0f} MiB); block {BLOCK}, micro-batch {MICRO}, "
          f"{ACCUMULATION} accumulation steps, {args.steps} steps read per rank\n")
    cache = tempfile.mkdtemp(prefix="peft-dist-data-bench-")
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        workers = [context.Process(target=rank_worker, args=(r, args.ranks, str(corpus), cache, args.steps, queue))
                   for r in range(args.ranks)]
        for worker in workers:
            worker.start()
        results = sorted((queue.get() for _ in workers), key=lambda r: r["rank"])
        for worker in workers:
            worker.join()
        directory = Path(results[0]["directory"])
        on_disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        prepared = json.loads((directory / "prepared.json").read_text())
        print(f"prepared once: {prepared['training']['blocks']:,} training blocks "
              f"({prepared['training']['blocks'] * BLOCK / 1e6:.0f}M tokens) in {prepared['seconds']:.0f} s, "
              f"{on_disk / MIB:,.0f} MiB of Arrow on disk\n")
        print("| rank | tokenized here | ready after (s) | tokens read | private memory growth (MiB) |")
        print("|---|---|---|---|---|")
        for r in results:
            print(f"| {r['rank']} | {'yes' if r['prepared'] else 'no'} | {r['ready_s']:.0f} | {r['tokens_read']:,} | "
                  f"{r['private_growth'] / MIB:.1f} |")
        print(f"\nranks that tokenized: {sum(r['prepared'] for r in results)} of {args.ranks}; largest private "
              f"growth {max(r['private_growth'] for r in results) / MIB:.1f} MiB (target < 100 MiB)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
