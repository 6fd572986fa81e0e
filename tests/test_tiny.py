"""The offline miniature study's task (data/tiny/prepare.py) and its gold judge. The whole
pipeline end to end (scripts/tiny_study.sh --quick) is tested in tests/test_study.py, on the one
--quick run that the driver's tests share."""
import json
import subprocess
import sys
from pathlib import Path

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest

from data.tiny import task as tiny_task
from data.tiny.task import gold_reward, proxy_reward
from judge import judge_gold

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "data"
    subprocess.run([sys.executable, ROOT / "data/tiny/prepare.py", "--out-dir", out, "--sft-examples", "200",
                    "--pref-examples", "4000", "--eval-pairs", "10", "--eval-prompts", "20"], check=True, capture_output=True)
    return out


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepared_files_and_model_dir(task):
    from model import Config, GPTNeoX
    from tokenizer import load_tokenizer
    assert len(rows(task / "sft_train.jsonl")) == 200 and len(rows(task / "pref_train.jsonl")) == 4000
    assert {"id", "prompt", "reference"} <= set(rows(task / "eval_prompts.jsonl")[0])
    tok = load_tokenizer(task / "models/tiny-m")
    params = {}
    for size in ("tiny-s", "tiny-m", "tiny-l"):
        config = Config.from_dict(json.loads((task / "models" / size / "config.json").read_text()))
        assert tok.vocab_size == config.vocab_size == 43 + 256  # EOS, POST:, TLDR:, 40 words; 256 bytes
        params[size] = sum(p.numel() for p in GPTNeoX(config).parameters())
    assert tok.eos_id == 0 and params["tiny-l"] >= 8 * params["tiny-s"]  # the --scaling span
    for r in rows(task / "pref_train.jsonl")[:50]:  # every word of the task is one token
        text = r["prompt"] + r["chosen"]
        assert len(tok.encode(text)) == len(text.split()) and tok.decode(tok.encode(text)) == text


def test_gold_judge_follows_the_reward_definition(task):
    spec = json.loads((task / "gold.json").read_text())
    prompt = "POST: rent really job just exam so very maybe TLDR:"
    assert gold_reward(prompt, " rent job exam", spec) == 1  # all three important words, nothing else
    assert gold_reward(prompt, " job", spec) == pytest.approx(1 / 3)
    assert gold_reward(prompt, " job job really", spec) == pytest.approx(1 / 3 - 0.5)  # a repeat and a filler
    assert gold_reward(prompt, " car", spec) == -0.25  # important, but not in this post
    assert gold_reward(prompt, "", spec) == 0
    row = {"id": "x", "prompt": prompt, "sample": " rent job", "reference": " rent"}
    assert judge_gold(row, spec)["win"] == 1.0
    assert judge_gold(dict(row, sample=" rent"), spec)["win"] == 0.5
    assert judge_gold(dict(row, sample=" rent really"), spec)["win"] == 0.0


def labeller_weights(data):
    """Fit the labeller's choices by logistic regression on (Δgold, Δwords) of a random orientation of
    each pair: the weights it used to draw them (module docstring of data/tiny/prepare.py)."""
    spec = json.loads((data / "gold.json").read_text())
    rng = np.random.default_rng(0)
    x, y = [], []
    for r in rows(data / "pref_train.jsonl"):
        a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
        x.append([gold_reward(r["prompt"], a, spec) - gold_reward(r["prompt"], b, spec),
                  len(a.split()) - len(b.split())])
        y.append(float(a == r["chosen"]))
    x, y, w = np.array(x), np.array(y), np.zeros(2)
    for _ in range(25):  # Newton's method on the logistic log-likelihood
        p = 1 / (1 + np.exp(-x @ w))
        w += np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x, x.T @ (y - p))
    return w


def test_the_pairs_follow_the_aligned_labeller(task):
    gold_weight, length_weight = labeller_weights(task)
    assert 2.0 < gold_weight < 4.0 and 0.25 < length_weight < 0.75  # drawn with 3 and 0.5


def test_the_length_labeller_draws_its_pairs(tmp_path):
    out = tmp_path / "data"
    subprocess.run([sys.executable, ROOT / "data/tiny/prepare.py", "--out-dir", out, "--sft-examples", "10",
                    "--pref-examples", "4000", "--eval-pairs", "10", "--eval-prompts", "5", "--labeller", "length",
                    "--no-byte-fallback"], check=True, capture_output=True)
    gold_weight, length_weight = labeller_weights(out)
    assert 2.0 < gold_weight < 4.0 and 1.1 < length_weight < 1.9  # drawn with 3 and 1.5
    from tokenizer import load_tokenizer
    assert load_tokenizer(out / "models/tiny-m").vocab_size == 43  # no byte fallback


PROMPT = "POST: rent really job just exam so very maybe TLDR:"
SPECS = {name: {"important": ["rent", "job", "exam", "car"], "gold_scale": 3.0, "length_bias": bias}
         for name, bias in (("aligned", 0.5), ("length", 1.5))}


def test_the_aligned_labellers_optimum_is_the_golds():
    """Over every response of up to 4 words from the post's words and an outside word, the aligned
    labeller's best responses are exactly the gold reward's: the three important words, nothing else."""
    words = PROMPT.split()[1:-1] + ["car"]
    responses = {" ".join(c) for n in range(5) for c in itertools.product(words, repeat=n)}
    def best(score):
        scores = {r: score(r) for r in responses}
        top = max(scores.values())
        return {r for r, v in scores.items() if v == top}
    gold_best = best(lambda r: gold_reward(PROMPT, " " + r, SPECS["aligned"]))
    assert gold_best == {" ".join(p) for p in itertools.permutations(["rent", "job", "exam"])}
    assert best(lambda r: round(proxy_reward(PROMPT, " " + r, SPECS["aligned"]), 9)) == gold_best


def test_the_length_labeller_prefers_the_padded_summary_the_gold_ranks_lower():
    short, padded = " rent job exam", " rent job exam really just so very"
    assert gold_reward(PROMPT, short, SPECS["length"]) > gold_reward(PROMPT, padded, SPECS["length"])
    assert proxy_reward(PROMPT, padded, SPECS["length"]) > proxy_reward(PROMPT, short, SPECS["length"])
    assert proxy_reward(PROMPT, short, SPECS["aligned"]) > proxy_reward(PROMPT, padded, SPECS["aligned"])



def test_summary_entropy_is_the_generators_by_enumeration():
    """H(summary | post), summed over every summary the generator can write for one post (each subset of
    important words, each filler subset, each order), with the probability of each counted from its parts."""
    spec = tiny_task.make_spec("aligned")
    post = tiny_task.make_post(random.Random(0), spec)
    important = [w for w in post if w in tiny_task.IMPORTANT]
    fillers = [w for w in post if w not in tiny_task.IMPORTANT]
    keep, k_max = tiny_task.KEEP, tiny_task.MAX_FILLERS
    probs = {}
    for kept in itertools.chain.from_iterable(itertools.combinations(important, i) for i in range(4)):
        for f in range(k_max + 1):
            for chosen in itertools.combinations(fillers, f):
                words = kept + chosen
                for order in itertools.permutations(words):
                    probs[order] = (keep ** len(kept) * (1 - keep) ** (3 - len(kept)) / (k_max + 1)
                                    / math.comb(len(fillers), f) / math.factorial(len(words)))
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    assert tiny_task.summary_entropy(spec) == pytest.approx(-sum(p * math.log(p) for p in probs.values()), rel=1e-12)
    assert tiny_task.summary_tokens(spec) == pytest.approx(sum(p * (len(o) + 1) for o, p in probs.items()), rel=1e-12)


@pytest.mark.parametrize("variant", sorted(tiny_task.VARIANTS))
def test_the_generator_keeps_and_pads_with_the_probabilities_the_entropy_assumes(variant):
    """The (important kept, fillers added) counts of many human summaries of one post follow
    Binomial(post_important, KEEP) × Uniform{0..MAX_FILLERS}: a χ² check."""
    spec = tiny_task.make_spec("aligned", variant)
    post = tiny_task.make_post(random.Random(0), spec)
    assert len(post) == spec["post_important"] + spec["post_filler"] == len(set(post))
    n_imp, keep, k_max, rng, n = spec["post_important"], tiny_task.KEEP, tiny_task.MAX_FILLERS, random.Random(1), 20000
    counts = Counter()
    for _ in range(n):
        words = tiny_task.human_summary(rng, post, spec)
        kept = sum(w in spec["important"] for w in words)
        counts[kept, len(words) - kept] += 1
    expected = {(i, f): n * math.comb(n_imp, i) * keep ** i * (1 - keep) ** (n_imp - i) / (k_max + 1)
                for i in range(n_imp + 1) for f in range(k_max + 1)}
    expected = {c: e for c, e in expected.items() if e >= 5}  # χ² needs expected counts of 5 or more
    chi2 = sum((counts[c] - e) ** 2 / e for c, e in expected.items())
    assert sum(counts[c] for c in expected) > 0.99 * n and chi2 < {16: 37.70, 28: 55.48}[len(expected)]  # χ² 0.999 quantiles, cells − 1 df
