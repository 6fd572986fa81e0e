"""A miniature TL;DR with a known gold reward, generated offline from a seed.

The paper cannot be run without GPUs, Pythia and a GPT-4 budget; this task can,
on a CPU in minutes, and it keeps the mechanism the paper describes. As Gao et
al. (2022) did with a gold reward model, the preferences come from a *proxy*
labeller, while win rates come from a *gold* reward the judge computes exactly:

- A post is `POST:` + 8 words (3 important, 5 filler, shuffled) + `TLDR:`.
- Gold reward (`judge.gold_reward`): the important post words a summary names,
  over 3, minus 0.25 per other word or repeat. Short and complete wins.
- "Human" summaries (SFT targets, preference candidates, eval references) keep
  each important word with probability 0.6 and add 0-3 of the post's fillers.
- The proxy labeller prefers a over b with P = σ(proxy_a − proxy_b), proxy =
  3·gold + b·words (`judge.proxy_reward`): noisy Bradley-Terry on the gold
  reward plus a taste for length. Two labellers separate the two causes of
  over-optimization the paper names (§2.2):
    aligned  b = 0.5: proxy = 1.5·hits − 0.25·others. Its optimum is the gold
             reward's own (every important word, nothing else), so whatever a
             DAA learns beyond the data is extrapolation off the data (App. E),
             not reward hacking.
    length   b = 1.5: proxy = 2.5·hits + 0.75·others. It pays for every extra
             word, which the gold reward penalises: a mis-specified reward, on
             which a policy can raise the proxy while the gold falls (§3.3).

Writes the standard prepared files (DESIGN.md), `gold.json` (the gold reward's
important words and the labeller's weights) and `models/<size>/` for each of
MODEL_SIZES: a tiny GPT-NeoX config plus the task's word-level tokenizer (a
tiktoken encoding over its 42 words and EOS, plus the 256 bytes unless
--no-byte-fallback), ready for `sft.py --model DIR/models/tiny-m`.
"""
import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: nanoDAA's modules
from data.common import atomic_dir, write_jsonl  # noqa: E402
from download import cache_dir  # noqa: E402
from judge import proxy_reward  # noqa: E402
from model import Config  # noqa: E402
from tokenizer import EOS, save_tiktoken  # noqa: E402

IMPORTANT = ["rent", "job", "exam", "sister", "boss", "car", "doctor", "wedding", "landlord", "visa"]
FILLER = ["really", "just", "very", "so", "maybe", "like", "then", "also", "still", "actually",
          "basically", "honestly", "kind", "sort", "pretty", "quite", "anyway", "literally", "totally", "somehow",
          "apparently", "seriously", "probably", "definitely", "simply", "mostly", "rather", "almost", "lately", "again"]
SPLIT = r" ?[^\s]+|\s+"  # a piece is one word with its leading space (or whitespace)
LABELLERS = {"aligned": 0.5, "length": 1.5}  # length_bias per word; the gold scale is 3
GOLD_SCALE = 3.0
# (hidden, layers, heads), widened and deepened together as Pythia scales; tiny-m is the default study's.
MODEL_SIZES = {"tiny-s": (32, 2, 2), "tiny-m": (64, 2, 4), "tiny-l": (96, 4, 4)}


def make_post(rng):
    words = rng.sample(IMPORTANT, 3) + rng.sample(FILLER, 5)
    rng.shuffle(words)
    return words


def human_summary(rng, post, keep=0.6, max_fillers=3):
    important = [w for w in post if w in IMPORTANT]
    fillers = [w for w in post if w not in IMPORTANT]
    words = [w for w in important if rng.random() < keep] + rng.sample(fillers, rng.randint(0, max_fillers))
    rng.shuffle(words)
    return words


def prompt_text(post):
    return "POST: " + " ".join(post) + " TLDR:"


def response_text(words):
    return "".join(" " + w for w in words)  # leading space, as TL;DR responses


def proxy_prefers_first(rng, prompt, a, b, spec):
    """The labeller's draw: a ≻ b with probability σ(proxy(a) − proxy(b))."""
    logit = proxy_reward(prompt, response_text(a), spec) - proxy_reward(prompt, response_text(b), spec)
    return rng.random() < 1 / (1 + math.exp(-logit))


def preference_rows(rng, n, spec):
    rows = []
    while len(rows) < n:
        post = make_post(rng)
        a, b = human_summary(rng, post), human_summary(rng, post)
        if a == b:
            continue  # identical pair: no preference to learn
        prompt = prompt_text(post)
        chosen, rejected = (a, b) if proxy_prefers_first(rng, prompt, a, b, spec) else (b, a)
        rows.append({"prompt": prompt, "chosen": response_text(chosen), "rejected": response_text(rejected)})
    return rows


def sft_rows(rng, n):
    rows = []
    for _ in range(n):
        post = make_post(rng)
        rows.append({"prompt": prompt_text(post), "response": response_text(human_summary(rng, post))})
    return rows


def eval_rows(rng, n):
    rows = []
    for i in range(n):
        post = make_post(rng)
        rows.append({"id": f"tiny-{i}", "prompt": prompt_text(post), "reference": response_text(human_summary(rng, post))})
    return rows


def write_model_dir(out, size, byte_fallback):
    """A random-init-ready GPT-NeoX config and the task's tokenizer: every word is one token.

    With the byte fallback any text encodes, and the model has 256 byte tokens that no
    training text ever uses: room for a policy to put mass where the data never went.
    """
    words = [b"POST:", b" TLDR:"] + [(" " + w).encode() for w in IMPORTANT + FILLER]
    if byte_fallback:
        words += [bytes([b]) for b in range(256)]
    ranks = {w: i + 1 for i, w in enumerate(words)}  # id 0 is <|endoftext|>
    out.mkdir(parents=True)
    save_tiktoken(out / "tokenizer.json", SPLIT, ranks, {EOS: 0})
    hidden, layers, heads = MODEL_SIZES[size]
    config = Config(vocab_size=len(ranks) + 1, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=1.0,
                    max_position_embeddings=64)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=None, help="output directory (default: $NANODAA_CACHE/data/tiny)")
    p.add_argument("--seed", type=int, default=0, help="everything is generated from this seed")
    p.add_argument("--sft-examples", type=int, default=30000, help="rows of sft_train.jsonl")
    p.add_argument("--pref-examples", type=int, default=20000, help="preference pairs in pref_train.jsonl")
    p.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs in pref_eval.jsonl")
    p.add_argument("--eval-prompts", type=int, default=600, help="rows of eval_prompts.jsonl")
    p.add_argument("--labeller", choices=LABELLERS, default="aligned", help="who labels the pairs (module "
                   "docstring): aligned keeps the gold optimum, length pays for padding (default: %(default)s)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false", help="a vocabulary of the "
                   "task's words only (the ablation of the out-of-distribution byte tokens)")
    args = p.parse_args()
    out_dir = Path(args.out_dir) if args.out_dir else cache_dir() / "data" / "tiny"
    spec = {"important": IMPORTANT, "labeller": args.labeller, "gold_scale": GOLD_SCALE,
            "length_bias": LABELLERS[args.labeller]}
    rng = random.Random(args.seed)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "sft_train.jsonl", sft_rows(rng, args.sft_examples))
        write_jsonl(tmp / "sft_valid.jsonl", sft_rows(rng, 500))
        write_jsonl(tmp / "pref_train.jsonl", preference_rows(rng, args.pref_examples, spec))
        write_jsonl(tmp / "pref_eval.jsonl", preference_rows(rng, args.eval_pairs, spec))
        write_jsonl(tmp / "eval_prompts.jsonl", eval_rows(rng, args.eval_prompts))
        (tmp / "gold.json").write_text(json.dumps(spec) + "\n")
        for size in MODEL_SIZES:
            write_model_dir(tmp / "models" / size, size, args.byte_fallback)
    print(f"wrote {out_dir}: {args.sft_examples} SFT rows, {args.pref_examples} preference pairs ({args.labeller} "
          f"labeller), {args.eval_prompts} eval prompts; model configs and tokenizer in {out_dir / 'models'}")


if __name__ == "__main__":
    main()
