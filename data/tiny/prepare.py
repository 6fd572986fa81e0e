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
- The proxy labeller prefers a over b with P = σ(3·(gold_a − gold_b) +
  0.5·(len_a − len_b)): noisy Bradley-Terry on the gold reward plus a spurious
  taste for length (Sec. 3.3). A DAA that fits these preferences too hard
  learns to pad, and the gold reward falls: over-optimization.

Writes the standard prepared files (DESIGN.md), `gold.json` (what the gold
judge needs) and `gpt-neox-tiny/`: a tiny GPT-NeoX config plus the task's word-level
tokenizer (a tiktoken encoding over a 44-word vocabulary), ready for
`sft.py --model DIR/gpt-neox-tiny`.
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
from judge import gold_reward  # noqa: E402
from model import Config  # noqa: E402
from tokenizer import EOS, save_tiktoken  # noqa: E402

IMPORTANT = ["rent", "job", "exam", "sister", "boss", "car", "doctor", "wedding", "landlord", "visa"]
FILLER = ["really", "just", "very", "so", "maybe", "like", "then", "also", "still", "actually",
          "basically", "honestly", "kind", "sort", "pretty", "quite", "anyway", "literally", "totally", "somehow",
          "apparently", "seriously", "probably", "definitely", "simply", "mostly", "rather", "almost", "lately", "again"]
SPLIT = r" ?[^\s]+|\s+"  # a piece is one word with its leading space (or whitespace)
MODEL_DIR = "gpt-neox-tiny"  # config.json + tokenizer.json: sft.py starts it from a random init


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


def proxy_prefers_first(rng, prompt, a, b, gold_scale, length_bias):
    """The biased labeller: Bradley-Terry on 3·Δgold plus 0.5 per extra word."""
    spec = {"important": IMPORTANT}
    logit = (gold_scale * (gold_reward(prompt, response_text(a), spec) - gold_reward(prompt, response_text(b), spec))
             + length_bias * (len(a) - len(b)))
    return rng.random() < 1 / (1 + math.exp(-logit))


def preference_rows(rng, n, gold_scale, length_bias):
    rows = []
    while len(rows) < n:
        post = make_post(rng)
        a, b = human_summary(rng, post), human_summary(rng, post)
        if a == b:
            continue  # identical pair: no preference to learn
        prompt = prompt_text(post)
        chosen, rejected = (a, b) if proxy_prefers_first(rng, prompt, a, b, gold_scale, length_bias) else (b, a)
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


def write_model_dir(out, args):
    """A random-init-ready GPT-NeoX config and the task's tokenizer: every word is one token."""
    words = [b"POST:", b" TLDR:"] + [(" " + w).encode() for w in IMPORTANT + FILLER]
    words += [bytes([b]) for b in range(256)]  # byte fallback: any text encodes
    ranks = {w: i + 1 for i, w in enumerate(words)}  # id 0 is <|endoftext|>
    save_tiktoken(out / "tokenizer.json", SPLIT, ranks, {EOS: 0})
    config = Config(vocab_size=len(ranks) + 1, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size, rotary_pct=1.0,
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
    p.add_argument("--gold-scale", type=float, default=3.0, help="labeller's weight on the gold reward difference")
    p.add_argument("--length-bias", type=float, default=0.5, help="labeller's spurious bonus per extra word")
    p.add_argument("--hidden-size", type=int, default=64, help=f"width of the tiny GPT-NeoX in {MODEL_DIR}/")
    p.add_argument("--layers", type=int, default=2, help="layers of the tiny GPT-NeoX")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the tiny GPT-NeoX")
    args = p.parse_args()
    out_dir = Path(args.out_dir) if args.out_dir else cache_dir() / "data" / "tiny"
    rng = random.Random(args.seed)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "sft_train.jsonl", sft_rows(rng, args.sft_examples))
        write_jsonl(tmp / "sft_valid.jsonl", sft_rows(rng, 500))
        write_jsonl(tmp / "pref_train.jsonl", preference_rows(rng, args.pref_examples, args.gold_scale, args.length_bias))
        write_jsonl(tmp / "pref_eval.jsonl", preference_rows(rng, args.eval_pairs, args.gold_scale, args.length_bias))
        write_jsonl(tmp / "eval_prompts.jsonl", eval_rows(rng, args.eval_prompts))
        (tmp / "gold.json").write_text(json.dumps({"important": IMPORTANT}) + "\n")
        (tmp / MODEL_DIR).mkdir()
        write_model_dir(tmp / MODEL_DIR, args)
    print(f"wrote {out_dir}: {args.sft_examples} SFT rows, {args.pref_examples} preference pairs, "
          f"{args.eval_prompts} eval prompts; model config and tokenizer in {out_dir / MODEL_DIR}")


if __name__ == "__main__":
    main()
