"""Prepare the miniature TL;DR (data/tiny/task.py: its posts, gold reward and labeller), offline, from a seed.

The paper cannot be run without GPUs, Pythia and a GPT-4 budget; this task can, on a CPU in
minutes, and it keeps the mechanism the paper describes (task.py's docstring).

Writes the standard prepared files (docs/formats.md), `gold.json` (the task spec: the gold
reward's important words and the labeller's weights) and `models/<size>/` for each of
MODEL_SIZES: a tiny GPT-NeoX config plus the task's word-level tokenizer (a tiktoken
encoding over its words (42 in the base variant) and EOS, plus the 256 bytes unless --no-byte-fallback), ready
for `sft.py --model DIR/models/tiny-m`.
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: nanoDAA's modules
import files  # noqa: E402
from data.common import write_jsonl  # noqa: E402
from data.tiny import task  # noqa: E402
from download import cache_dir  # noqa: E402
from model import Config  # noqa: E402
from tokenizer import EOS, save_tiktoken  # noqa: E402

SPLIT = r" ?[^\s]+|\s+"  # a piece is one word with its leading space (or whitespace)
# (hidden, layers, heads), widened and deepened together as Pythia scales; tiny-m is the default study's.
MODEL_SIZES = {"tiny-s": (32, 2, 2), "tiny-m": (64, 2, 4), "tiny-l": (96, 4, 4)}


def preference_rows(rng, n, spec):
    rows = []
    while len(rows) < n:
        post = task.make_post(rng, spec)
        a, b = task.human_summary(rng, post, spec), task.human_summary(rng, post, spec)
        if a == b:
            continue  # identical pair: no preference to learn
        prompt, a, b = task.prompt_text(post), task.response_text(a), task.response_text(b)
        chosen, rejected = (a, b) if task.labeller_prefers_first(rng, prompt, a, b, spec) else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def sft_rows(rng, n, spec):
    rows = []
    for _ in range(n):
        post = task.make_post(rng, spec)
        rows.append({"prompt": task.prompt_text(post),
                     "response": task.response_text(task.human_summary(rng, post, spec))})
    return rows


def eval_rows(rng, n, spec):
    rows = []
    for i in range(n):
        post = task.make_post(rng, spec)
        rows.append({"id": f"tiny-{i}", "prompt": task.prompt_text(post),
                     "reference": task.response_text(task.human_summary(rng, post, spec))})
    return rows


def write_model_dir(out, size, byte_fallback, spec):
    """A random-init-ready GPT-NeoX config and the task's tokenizer: every word is one token.

    With the byte fallback any text encodes, and the model has 256 byte tokens that no
    training text ever uses: room for a policy to put mass where the data never went.
    """
    words = [b"POST:", b" TLDR:"] + [(" " + w).encode() for w in spec["important"] + spec["filler"]]
    if byte_fallback:
        words += [bytes([b]) for b in range(256)]
    ranks = {w: i + 1 for i, w in enumerate(words)}  # id 0 is <|endoftext|>
    out.mkdir(parents=True)
    save_tiktoken(out / "tokenizer.json", SPLIT, ranks, {EOS: 0})
    hidden, layers, heads = MODEL_SIZES[size]
    config = Config(vocab_size=len(ranks) + 1, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=1.0,
                    max_position_embeddings=64)
    files.write_json(out / "config.json", config.to_dict())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=None, help="output directory (default: $NANODAA_CACHE/data/tiny)")
    p.add_argument("--seed", type=int, default=0, help="everything is generated from this seed")
    p.add_argument("--sft-examples", type=int, default=30000, help="rows of sft_train.jsonl")
    p.add_argument("--pref-examples", type=int, default=20000, help="preference pairs in pref_train.jsonl")
    p.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs in pref_eval.jsonl")
    p.add_argument("--eval-prompts", type=int, default=600, help="rows of eval_prompts.jsonl")
    p.add_argument("--labeller", choices=task.LABELLERS, default="aligned", help="who labels the pairs (module "
                   "docstring): aligned keeps the gold optimum, length pays for padding (default: %(default)s)")
    p.add_argument("--variant", choices=task.VARIANTS, default="base", help="the task's size (task.py): base has "
                   "8-word posts with 3 important words, hard 16-word posts with 6 of 20 (default: %(default)s)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false", help="a vocabulary of the "
                   "task's words only (the ablation of the out-of-distribution byte tokens)")
    args = p.parse_args()
    out_dir = Path(args.out_dir) if args.out_dir else cache_dir() / "data" / "tiny"
    spec = task.make_spec(args.labeller, args.variant, args.seed)
    rng = random.Random(args.seed)
    with files.atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "sft_train.jsonl", sft_rows(rng, args.sft_examples, spec))
        write_jsonl(tmp / "sft_valid.jsonl", sft_rows(rng, 500, spec))
        write_jsonl(tmp / "pref_train.jsonl", preference_rows(rng, args.pref_examples, spec))
        write_jsonl(tmp / "pref_eval.jsonl", preference_rows(rng, args.eval_pairs, spec))
        write_jsonl(tmp / "eval_prompts.jsonl", eval_rows(rng, args.eval_prompts, spec))
        files.write_json(tmp / "gold.json", spec)
        for size in MODEL_SIZES:
            write_model_dir(tmp / "models" / size, size, args.byte_fallback, spec)
    print(f"wrote {out_dir}: {args.sft_examples} SFT rows, {args.pref_examples} preference pairs ({args.labeller} "
          f"labeller), {args.eval_prompts} eval prompts; model configs and tokenizer in {out_dir / 'models'}")


if __name__ == "__main__":
    main()
