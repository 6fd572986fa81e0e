"""The miniature's task: its posts and summaries, the gold reward, and the proxy labeller.

A miniature TL;DR whose gold reward is known exactly, as Gao et al. (2022) used a gold
reward model: preferences come from a *proxy* labeller, win rates from the *gold* reward.

- A post is `POST:` + 8 words (3 important, 5 filler, shuffled) + ` TLDR:`. The `hard`
  variant (VARIANTS), for a size axis where capacity binds, has 16 words (6 important of
  20, 10 filler).
- Gold reward (`gold_reward`): the important post words a summary names, over the post's
  important words (3), minus 0.25 per other word or repeat. Short and complete wins.
- "Human" summaries (SFT targets, preference candidates, eval references) keep each
  important word with probability 0.6 and add 0-3 of the post's fillers, shuffled.
- The labeller prefers a over b with P = σ(proxy_a − proxy_b), proxy = 3·gold +
  b·words (`proxy_reward`): noisy Bradley–Terry on the gold reward plus a taste for
  length. Two labellers separate the two causes of over-optimization the paper names (§2.2):
    aligned  b = 0.5: proxy = 1.5·hits − 0.25·others. Its optimum is the gold reward's
             own (every important word, nothing else), so whatever a DAA learns beyond
             the data is extrapolation off the data (App. E), not reward hacking.
    length   b = 1.5: proxy = 2.5·hits + 0.75·others. It pays for every extra word,
             which the gold reward penalises: a mis-specified reward, on which a policy
             can raise the proxy while the gold falls (§3.3).

The spec (`gold.json` beside the prepared data, docs/formats.md) holds the important words
and the labeller's weights; data/tiny/prepare.py writes it, sample.py, judge.py and the
frontier (online DPO, best-of-n) read it. Everything here is plain Python, torch-free.
"""
import json
import math
from pathlib import Path

IMPORTANT = ["rent", "job", "exam", "sister", "boss", "car", "doctor", "wedding", "landlord", "visa"]
FILLER = ["really", "just", "very", "so", "maybe", "like", "then", "also", "still", "actually",
          "basically", "honestly", "kind", "sort", "pretty", "quite", "anyway", "literally", "totally", "somehow",
          "apparently", "seriously", "probably", "definitely", "simply", "mostly", "rather", "almost", "lately", "again"]
MORE_IMPORTANT = ["loan", "date", "school", "roommate", "lease", "flight", "surgery", "divorce", "puppy", "mortgage"]
# The words a post draws from, and how many of each kind it has.
VARIANTS = {"base": {"important": IMPORTANT, "filler": FILLER, "post_important": 3, "post_filler": 5},
            "hard": {"important": IMPORTANT + MORE_IMPORTANT, "filler": FILLER, "post_important": 6,
                     "post_filler": 10}}
KEEP, MAX_FILLERS = 0.6, 3  # a human summary keeps an important word w.p. KEEP, adds 0..MAX_FILLERS fillers
LABELLERS = {"aligned": 0.5, "length": 1.5}  # length_bias per word
GOLD_SCALE = 3.0
OTHER_COST = 0.25  # what the gold reward charges per word that is not a new important one


def make_spec(labeller, variant="base", seed=0):
    """gold.json: the variant's words and counts, the labeller's weights, and the data seed."""
    return {"variant": variant, **VARIANTS[variant], "labeller": labeller, "gold_scale": GOLD_SCALE,
            "length_bias": LABELLERS[labeller], "seed": seed}


def read_spec(path, required=("important", "gold_scale", "length_bias")):
    """The miniature's gold.json: the gold reward's important words and the labeller's weights."""
    spec = json.loads(Path(path).read_text())
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: prepare the data again with data/tiny/prepare.py")
    return spec


# ---------------------------------------------------------------- generating the data

def make_post(rng, spec):
    words = rng.sample(spec["important"], spec["post_important"]) + rng.sample(spec["filler"], spec["post_filler"])
    rng.shuffle(words)
    return words


def human_summary(rng, post, spec):
    important = [w for w in post if w in spec["important"]]
    fillers = [w for w in post if w not in spec["important"]]
    words = [w for w in important if rng.random() < KEEP] + rng.sample(fillers, rng.randint(0, MAX_FILLERS))
    rng.shuffle(words)
    return words


def prompt_text(post):
    return "POST: " + " ".join(post) + " TLDR:"


def response_text(words):
    return "".join(" " + w for w in words)  # leading space, as TL;DR responses


def summary_entropy(spec):
    """H(summary | post) in nats, exactly: the generator's own uncertainty, the floor of any model's
    NLL. A summary is a Bernoulli(KEEP) subset of the post's important words, f ~ U{0..MAX_FILLERS}
    of its fillers (a uniform f-subset), in a uniform order of the i + f distinct words."""
    n_imp, n_fill, h = spec["post_important"], spec["post_filler"], 0.0
    for i in range(n_imp + 1):
        p_i = math.comb(n_imp, i) * KEEP ** i * (1 - KEEP) ** (n_imp - i)
        for f in range(MAX_FILLERS + 1):
            log_p = (i * math.log(KEEP) + (n_imp - i) * math.log(1 - KEEP) - math.log(MAX_FILLERS + 1)
                     - math.log(math.comb(n_fill, f)) - math.lgamma(i + f + 1))
            h -= p_i / (MAX_FILLERS + 1) * log_p
    return h


def summary_tokens(spec):
    """E[tokens of a summary], EOS included: every word is one token of the task's tokenizer."""
    return spec["post_important"] * KEEP + MAX_FILLERS / 2 + 1


def entropy_per_token(spec):
    """The floor of a model's held-out NLL per token (sft.py's eval/nll_per_token): H / E[tokens]."""
    return summary_entropy(spec) / summary_tokens(spec)


# ---------------------------------------------------------------- the rewards

def _post_important(prompt, spec):
    """The important words of the post: those between "POST:" and "TLDR:" in the prompt."""
    return set(spec["important"]) & set(prompt.split("POST:", 1)[-1].split("TLDR:", 1)[0].split())


def gold_parts(prompt, response, spec):
    """(hits, other_words): the distinct important post words the response names, and every
    other response word (repeats of important words included)."""
    important = _post_important(prompt, spec)
    words = response.split()
    hits = len({w for w in words if w in important})
    return hits, len(words) - hits


def gold_reward(prompt, response, spec):
    """What a perfect judge scores: hits / (the post's important words) − 0.25 × other words."""
    hits, others = gold_parts(prompt, response, spec)
    return hits / max(1, len(_post_important(prompt, spec))) - OTHER_COST * others


def proxy_reward(prompt, response, spec):
    """The labeller's Bradley–Terry score: P(a ≻ b) = σ(proxy(a) − proxy(b)).

    proxy = gold_scale · gold + length_bias · (words in the response). With gold =
    hits/3 − 0.25·others this is (gold_scale/3 + length_bias)·hits + (length_bias −
    gold_scale/4)·others: a length bias below gold_scale/4 keeps the gold reward's
    optimum (all important words, nothing else); above it, every extra word pays.
    """
    return spec["gold_scale"] * gold_reward(prompt, response, spec) + spec["length_bias"] * len(response.split())


def preference_probability(prompt, a, b, spec):
    """P(a ≻ b) under the labeller, for response texts a and b."""
    return 1 / (1 + math.exp(proxy_reward(prompt, b, spec) - proxy_reward(prompt, a, spec)))


def labeller_prefers_first(rng, prompt, a, b, spec):
    """The labeller's draw for texts a and b: a ≻ b with probability σ(proxy(a) − proxy(b))."""
    return rng.random() < preference_probability(prompt, a, b, spec)
