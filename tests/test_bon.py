"""bon.py: the best-of-n estimator and its KL against brute-force enumeration (ties included), the
tilted optimum's limits, and a run on the miniature whose results file fit.py reads."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bon  # noqa: E402
import fit  # noqa: E402
import rm  # noqa: E402
import sft  # noqa: E402

# 7 samples, scores with ties (two at 1, three at 3), two values each
SCORES = np.array([3.0, 1.0, 0.5, 3.0, 2.0, 1.0, 3.0])
VALUES = np.array([[1.0, 0.0], [0.2, 1.0], [0.9, 1.0], [0.0, 0.5], [0.4, 0.0], [0.7, 1.0], [0.3, 1.0]])


def brute_force_best_of_n(scores, values, n):
    """The mean over every n-subset of the value of its top-scoring sample, a tied top picked uniformly."""
    picks = []
    for subset in itertools.combinations(range(len(scores)), n):
        top = max(scores[i] for i in subset)
        picks.append(np.mean([values[i] for i in subset if scores[i] == top], axis=0))
    return np.mean(picks, axis=0)


def test_best_of_n_equals_enumeration_of_every_subset_with_ties():
    ns = list(range(1, 8))
    got = bon.best_of_n(SCORES, VALUES, ns)
    for n, row in zip(ns, got):
        np.testing.assert_allclose(row, brute_force_best_of_n(SCORES, VALUES, n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[0], VALUES.mean(0), atol=1e-12)  # best of 1: a sample of π_ref
    np.testing.assert_allclose(got[-1], VALUES[[0, 3, 6]].mean(0), atol=1e-12)  # best of all: the tied top, uniformly
    untied = SCORES + np.arange(7) * 1e-3  # the tie rule matters: breaking the ties moves the estimate
    assert np.abs(bon.best_of_n(untied, VALUES, [7]) - got[-1]).max() > 0.1


def test_best_of_n_kl_equals_the_distribution_of_the_pick_enumerated():
    """KL(π_n‖π_ref) over the empirical π_ref (each sample 1/N): enumerate every draw of n with replacement,
    pick the top (a tied top uniformly), and compare the pick's distribution with uniform."""
    N = len(SCORES)
    for n in (1, 2, 3):
        pick = np.zeros(N)
        for draw in itertools.product(range(N), repeat=n):
            top = max(SCORES[i] for i in draw)
            tied = [i for i in draw if SCORES[i] == top]
            for i in tied:
                pick[i] += 1 / len(tied) / N ** n
        kl = float(sum(p * math.log(p * N) for p in pick if p > 0))
        assert bon.bon_kl(SCORES, [n])[0] == pytest.approx(kl, abs=1e-12)
    assert bon.bon_kl(SCORES, [1])[0] == 0
    # Untied, N = 256: within 1 % of Gao et al.'s log n − (n − 1)/n (measured: 0.9 % at n = 256), never above it
    untied = np.random.default_rng(0).normal(size=256)
    for n in (2, 16, 256):
        bound = math.log(n) - (n - 1) / n
        assert 0.99 * bound <= bon.bon_kl(untied, [n])[0] <= bound
    # Ties lower it: three levels of equal mass cap it at log 3 whatever n is
    assert bon.bon_kl(np.repeat([0.0, 1.0, 2.0], 50), [256])[0] == pytest.approx(math.log(3), abs=1e-9)


def test_tilted_optimum_runs_from_pi_ref_to_the_tied_top():
    values, kl, ess = bon.tilted(SCORES, VALUES, beta=1e6)  # β → ∞: π_ref itself
    np.testing.assert_allclose(values, VALUES.mean(0), atol=1e-5)
    assert kl == pytest.approx(0, abs=1e-9) and ess == pytest.approx(7, rel=1e-6)
    values, kl, ess = bon.tilted(SCORES, VALUES, beta=1e-3)  # β → 0: the top score, its ties uniformly
    np.testing.assert_allclose(values, VALUES[[0, 3, 6]].mean(0), atol=1e-12)
    assert kl == pytest.approx(math.log(7 / 3)) and ess == pytest.approx(3)
    w = np.exp(SCORES / 0.7) / np.exp(SCORES / 0.7).sum()  # in between, by hand
    values, kl, ess = bon.tilted(SCORES, VALUES, beta=0.7)
    np.testing.assert_allclose(values, w @ VALUES, atol=1e-12)
    assert kl == pytest.approx(float(w @ np.log(7 * w))) and ess == pytest.approx(1 / float(w @ w))


# ---------------------------------------------------------------- a run on the miniature

def tiny_task(tmp):
    """The miniature's data (small), and an SFT model (tiny-s, 16 steps): (data directory, SFT run)."""
    data = tmp / "data"
    subprocess.run([sys.executable, str(ROOT / "data" / "tiny" / "prepare.py"), "--out-dir", str(data),
                    "--sft-examples", "512", "--pref-examples", "256", "--eval-pairs", "64", "--eval-prompts", "6"],
                   check=True, capture_output=True, timeout=120)
    sft.main(["--model", str(data / "models" / "tiny-s"), "--data", str(data), "--out", str(tmp / "sft"),
              "--batch-size", "32", "--micro-batch-size", "32", "--optimizer", "adamw", "--lr", "3e-3", "--warmup", "0",
              "--log-interval", "100", "--eval-examples", "0"])
    return data, tmp / "sft"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bon")
    data, sft_run = tiny_task(tmp)
    rm.main(["--init", str(sft_run), "--data", str(data), "--out", str(tmp / "rm"), "--batch-size", "32",
             "--micro-batch-size", "32", "--lr", "1e-3", "--log-interval", "100", "--eval-examples", "0"])
    bon.main(["--policy", str(sft_run), "--rm", str(tmp / "rm"), "--prompts", str(data / "eval_prompts.jsonl"),
              "--n-samples", "8", "--train-data", str(data), "--gold-spec", str(data / "gold.json"),
              "--max-new-tokens", "12", "--batch-size", "20", "--betas", "0.5,2", "--out", str(tmp / "bon")])
    return tmp


def test_results_follow_from_the_samples_and_fit_reads_them(run):
    samples = [json.loads(line) for line in (run / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["samples"]) == len(s["rm_reward"]) == 8 for s in samples)
    results = fit.read_results(run / "bon" / "bon.jsonl")
    assert [(r["loss"], r["reward"], r["n"] if r["loss"] == "bon" else r["beta"]) for r in results] == \
        [(loss, reward, k) for reward in ("proxy", "rm")
         for loss, k in [("bon", 1), ("bon", 2), ("bon", 4), ("bon", 8), ("tilted", 0.5), ("tilted", 2)]]
    assert {fit.arm(r) for r in results} == {"bon-proxy", "bon-rm", "tilted-proxy", "tilted-rm"}
    for r in results:
        pick = "proxy_reward" if r["reward"] == "proxy" else "rm_reward"
        per_prompt = [bon.best_of_n(np.array(s[pick]), np.array([s["gold_reward"], s["win"]]).T, [int(r["n"])])[0]
                      for s in samples] if r["loss"] == "bon" else None
        if per_prompt:  # the row is the mean over prompts of the per-prompt estimate, recomputed from samples.jsonl
            assert r["gold_reward"] == pytest.approx(np.mean([p[0] for p in per_prompt]))
            assert r["win_rate"] == pytest.approx(np.mean([p[1] for p in per_prompt]))
            assert r["win_rate_se"] == pytest.approx(np.std([p[1] for p in per_prompt], ddof=1) / math.sqrt(6))
            assert r["kl_bound"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"]) and r["kl"] <= r["kl_bound"] + 1e-12
    per_prompt = [json.loads(line) for line in (run / "bon" / "per_prompt.jsonl").read_text().splitlines()]
    assert len(per_prompt) == len(results)
    for r, p in zip(results, per_prompt):  # each point is the mean of its per-prompt estimates
        assert (p["reward"], p["loss"], p.get("n", p.get("beta"))) == (r["reward"], r["loss"], r["n"] if r["loss"] == "bon" else r["beta"])
        assert p["id"] == [s["id"] for s in samples]
        assert (np.mean(p["win"]), np.mean(p["gold_reward"]), np.mean(p["kl"])) == \
            pytest.approx((r["win_rate"], r["gold_reward"], r["kl"]), abs=1e-12)
    one = [r for r in results if r["loss"] == "bon" and r["n"] == 1]
    assert one[0]["kl"] == one[1]["kl"] == 0 and one[0]["win_rate"] == pytest.approx(one[1]["win_rate"])  # π_ref
    assert all(r["ood_token_rate"] >= 0 and r["model"] == "tiny-s" and r["samples"] == 8 for r in results)


def test_fit_draws_fig6_and_fits_the_frontier(run, tmp_path):
    fits, notes = fit.analyze(fit.load([str(run / "bon" / "bon.jsonl")]), tmp_path)
    assert "fig6_frontier.png" in fits["figures"] and (tmp_path / "fig6_frontier.png").stat().st_size > 10_000
    entry = fits["frontier"]["win_rate"]["bon-proxy"]["tiny-s"]
    assert entry["n"] == 4 and len(entry["bon"]) == 3 and not entry["y0_measured"]


def test_bad_input_is_one_line(run, tmp_path):
    args = [sys.executable, str(ROOT / "bon.py"), "--policy", str(run / "sft"), "--prompts",
            str(run / "data" / "eval_prompts.jsonl"), "--gold-spec", str(run / "data" / "gold.json")]
    r = subprocess.run([*args, "--rm", str(run / "sft"), "--n-samples", "2", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and \
        "not a reward model" in r.stderr and not (tmp_path / "o" / "bon.jsonl").exists()
    r = subprocess.run([*args, "--betas", "0,1", "--out", str(tmp_path / "p")], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: --betas must be positive, got 0,1"


def test_every_flag_is_explained():
    for action in bon.get_parser()._actions:
        assert action.help, action.option_strings
