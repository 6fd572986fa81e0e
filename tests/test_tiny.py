"""The offline miniature study's task (data/tiny/prepare.py) and its gold judge. The whole
pipeline end to end (scripts/tiny_study.sh --quick) is tested in tests/test_study.py, on the one
--quick run that the driver's tests share."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from judge import gold_reward, judge_gold

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
    from model import Config
    from tokenizer import load_tokenizer
    assert len(rows(task / "sft_train.jsonl")) == 200 and len(rows(task / "pref_train.jsonl")) == 4000
    assert {"id", "prompt", "reference"} <= set(rows(task / "eval_prompts.jsonl")[0])
    tok = load_tokenizer(task / "gpt-neox-tiny")
    config = Config.from_dict(json.loads((task / "gpt-neox-tiny/config.json").read_text()))
    assert tok.eos_id == 0 and tok.vocab_size == config.vocab_size
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


def test_the_labeller_prefers_length_beyond_the_gold_reward(task):
    """Fit the labeller's choices by logistic regression on (Δgold, Δlength) of a random
    orientation of each pair: the gold weight comes out near 3 and the spurious length
    weight near 0.5, clearly above the 0 of an unbiased labeller."""
    spec = json.loads((task / "gold.json").read_text())
    rng = np.random.default_rng(0)
    x, y = [], []
    for r in rows(task / "pref_train.jsonl"):
        a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
        x.append([gold_reward(r["prompt"], a, spec) - gold_reward(r["prompt"], b, spec),
                  len(a.split()) - len(b.split())])
        y.append(float(a == r["chosen"]))
    x, y, w = np.array(x), np.array(y), np.zeros(2)
    for _ in range(25):  # Newton's method on the logistic log-likelihood
        p = 1 / (1 + np.exp(-x @ w))
        w += np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x, x.T @ (y - p))
    gold_weight, length_weight = w
    assert 2.0 < gold_weight < 4.0
    assert 0.25 < length_weight < 0.75

