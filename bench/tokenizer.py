"""Encode throughput: tokenizer.py (tiktoken) vs HF `tokenizers` (Rust), on the GPT-NeoX-20B tokenizer.

    python bench/tokenizer.py              # >= 5 MB of TL;DR and HH text from tests/fixtures
    python bench/tokenizer.py --mb 20 --rounds 5

The text: every text field of the fixtures (TL;DR queries, references and samples, TL;DR posts, titles and
summaries, HH dialogues), one document each, the list reshuffled and repeated until it holds --mb
megabytes of UTF-8. Every row encodes that same list of documents into one list of ids per document
(`list[int]`, so HF's `Encoding.ids` is part of its cost):
  - "loop": `[encode(d) for d in docs]`, both on one thread;
  - "encode_batch, 1 thread": HF's batch call with TOKENIZERS_PARALLELISM=false against our loop;
  - "encode_batch, N threads": HF's batch call on all cores against our single-thread loop (not a fair
    fight, shown because it is what HF users usually call).
Time is the best of --rounds; each round runs every contender once, so load from other processes
hits all of them alike. The ids are checked equal before anything is timed. Note the repetition
helps HF, which caches the BPE of words it has seen; tiktoken has no such cache.
"""
import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/, which holds this file, also named tokenizer.py
from tokenizer import load_tokenizer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def fixture_documents():
    docs = []
    with open(FIXTURES / "tldr_queries_first300.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            docs += [row["query"], row["postprocessed_response"], row["reference_responses"]]
    with open(FIXTURES / "tldr_comparisons_batch18_first100.jsonl", encoding="utf-8") as f:
        for line in f:
            c = json.loads(line)
            docs += [c["info"]["post"], c["info"]["title"]] + [s["text"] for s in c["summaries"]]
    with open(FIXTURES / "hh_rlhf_harmless_base_test_first100.jsonl", encoding="utf-8") as f:
        for line in f:
            h = json.loads(line)
            docs += [h["chosen"], h["rejected"]]
    return docs


def corpus(mb, seed):
    base, docs, size, rng = fixture_documents(), [], 0, random.Random(seed)
    while size < mb * 1e6:
        rng.shuffle(base)
        docs += base
        size += sum(len(d.encode()) for d in base)
    return docs, size


def timed(fn, rounds_out, key):
    t = time.perf_counter()
    out = fn()
    rounds_out.setdefault(key, []).append(time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=5.0, help="megabytes of UTF-8 text to encode")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    p.add_argument("--tokenizer", default=str(FIXTURES / "gpt-neox-20b-tokenizer.json"), help="tokenizer.json to use")
    args = p.parse_args()

    docs, size = corpus(args.mb, args.seed)
    t = time.perf_counter()
    ours = load_tokenizer(args.tokenizer)
    build_ours = time.perf_counter() - t
    t = time.perf_counter()
    hf = HFTokenizer.from_file(args.tokenizer)
    build_hf = time.perf_counter() - t
    n_tokens = sum(len(ids) for ids in (ours.encode(d) for d in docs))
    mismatched = sum(ours.encode(d) != e.ids for d, e in zip(docs, hf.encode_batch(docs)))
    if mismatched:
        sys.exit(f"error: {mismatched} of {len(docs)} documents encode differently; not timing a wrong tokenizer")

    def hf_batch(parallel):
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
        return [e.ids for e in hf.encode_batch(docs)]

    times = {}
    for _ in range(args.rounds):
        timed(lambda: [ours.encode(d) for d in docs], times, "ours")
        timed(lambda: [hf.encode(d).ids for d in docs], times, "hf loop")
        timed(lambda: hf_batch(False), times, "hf batch 1")
        timed(lambda: hf_batch(True), times, "hf batch N")
    best = {k: min(v) for k, v in times.items()}

    print(f"{len(docs)} documents, {size / 1e6:.2f} MB, {n_tokens} tokens; ids identical in all {len(docs)}; "
          f"best of {args.rounds}; {os.cpu_count()} CPUs")
    print(f"build: ours {build_ours:.2f} s, tokenizers {build_hf:.2f} s")
    print(f"{'comparison':<40} {'ours MB/s':>10} {'HF MB/s':>10} {'ours Mtok/s':>12} {'HF Mtok/s':>10} {'ours/HF':>8}")
    for label, key in [("loop of encode(doc), 1 thread each", "hf loop"),
                       ("ours loop vs HF encode_batch, 1 thread", "hf batch 1"),
                       (f"ours loop vs HF encode_batch, {os.cpu_count()} threads", "hf batch N")]:
        o, h = best["ours"], best[key]
        print(f"{label:<40} {size / 1e6 / o:>10.2f} {size / 1e6 / h:>10.2f} {n_tokens / 1e6 / o:>12.2f} "
              f"{n_tokens / 1e6 / h:>10.2f} {h / o:>7.2f}x")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
