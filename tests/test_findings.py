"""findings.py: the standard error and the bootstrap, Eq. 6's R² from moments, the t-test, the verdict
rule, and findings on hand-built points whose answer is known."""
import math

import numpy as np
import pytest

import findings
import fit


def test_seed_se_is_the_between_seed_variance_floored_by_the_prompts():
    rng = np.random.default_rng(0)
    one = rng.integers(0, 2, 400).astype(float)
    assert findings.seed_se([one]) == pytest.approx((one.mean(), one.std(ddof=1) / 20))
    far = [np.full(400, 0.2), np.full(400, 0.5), np.full(400, 0.8)]  # no prompt variance, seeds far apart
    assert findings.seed_se(far) == pytest.approx((0.5, math.sqrt(0.09 / 3)))
    same = [rng.integers(0, 2, 400).astype(float) for _ in range(3)]
    means, within = np.array([v.mean() for v in same]), np.mean([v.var(ddof=1) / 400 for v in same])
    assert findings.seed_se(same)[1] == pytest.approx(math.sqrt(max(means.var(ddof=1), within) / 3))


def test_replicate_zero_is_the_data_and_paired_differences_cancel():
    rng = np.random.default_rng(1)
    prompts = {0: 50, 1: 60}
    weights, counts = findings.replicates(prompts, n_boot=200)
    assert all((w[0] == 1) for w in weights.values()) and all((c[:, 0] == 1).all() for c in counts.values())
    assert all(c[:, 1:].sum(0).tolist() == [p] * 200 for c, p in zip(counts.values(), prompts.values()))
    table, scalars = {}, {}
    for s, p in prompts.items():
        win = rng.integers(0, 2, p).astype(float)
        for key in ("a", "b"):  # two points with the same wins on the same prompts
            x, z = rng.integers(1, 9, p).astype(float), rng.normal(2, 1, p)
            table.setdefault(s, {})[key] = {"win": win, "z": z, "x": x, "xx": x * x, "zz": z * z, "xz": x * z,
                                           "length_words": x}
        scalars[s] = {}
    E = findings.estimates(table, scalars, weights, counts)
    assert E["a"]["win"][0] == pytest.approx(np.mean([table[s]["a"]["win"].mean() for s in prompts]))
    diff = findings.compare("a − b", E["a"]["win"] - E["b"]["win"])
    assert diff["ci"] == [0.0, 0.0] and not diff["holds"]  # paired: the same prompts in every replicate
    spread = findings.interval(E["a"]["win"])[1]
    assert spread[0] < E["a"]["win"][0] < spread[1]


def test_eq6_r2_from_moments_equals_the_regression_both_ways():
    rng = np.random.default_rng(2)
    x = rng.integers(1, 30, 300).astype(float)
    z = 0.1 * x + rng.normal(0.5, 1, 300)
    arrays = {"win": np.zeros(300), "z": z, "x": x, "xx": x * x, "zz": z * z, "xz": x * z}
    got = findings.per_seed(arrays, np.ones((300, 1)))
    assert got["length_r2"][0] == pytest.approx(fit.length_regression(x, z)[1], rel=1e-9)
    assert got["length_r2_centred"][0] == pytest.approx(fit.length_regression(x, z, intercept=True)[1], rel=1e-9)
    assert got["kl"][0] == pytest.approx(z.mean()) and got["length_tokens"][0] == pytest.approx(x.mean())


def test_pearson_t_test():
    x = np.arange(24.0)
    r, p = findings.pearson_test(x, x + np.sin(x) * 40)
    t = r * math.sqrt(22 / (1 - r * r))
    assert r == pytest.approx(np.corrcoef(x, x + np.sin(x) * 40)[0, 1])
    # issue 21's example: r 0.49 with n 24 is significant, p ≈ 0.015 (t = 2.64 on 22 degrees of freedom)
    rng = np.random.default_rng(3)
    y = rng.normal(size=24)
    y = 0.49 * (x - x.mean()) / x.std() + math.sqrt(1 - 0.49 ** 2) * (y - y.mean() - np.polyfit(x, y, 1)[0]
                                                                      * (x - x.mean())) / 1.0
    r49, p49 = findings.pearson_test(x, y)
    t49 = r49 * math.sqrt(22 / (1 - r49 ** 2))
    assert 0.3 < r49 < 0.7 and p49 == pytest.approx(_t_sf(t49, 22), abs=2e-4)
    assert findings.pearson_test([0, 1, 2, 3.0], [1, 1, 1, 1.0]) == (pytest.approx(math.nan, nan_ok=True),
                                                                    pytest.approx(math.nan, nan_ok=True))
    assert p == pytest.approx(_t_sf(t, 22), abs=2e-4)


def _t_sf(t, df, n=200000):
    """Two-sided tail of Student's t by a midpoint sum of its density far out (independent of findings.py)."""
    edges = np.linspace(abs(t), abs(t) + 200, n + 1)
    mid = (edges[1:] + edges[:-1]) / 2
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return float(2 * (c * (1 + mid ** 2 / df) ** (-(df + 1) / 2)).sum() * (edges[1] - edges[0]))


def test_the_verdict_rule():
    c = lambda ok: {"label": "", "estimate": 1.0, "ci": [0.1, 2.0] if ok else [-1.0, 2.0], "holds": ok, "side": 1}
    assert findings.verdict([c(True)] * 3) == "reproduced"
    assert findings.verdict([c(True), c(True), c(False)]) == "partly"
    assert findings.verdict([c(True), c(False)]) == "not reproduced"  # half is not a majority
    assert findings.verdict([c(False)] * 9) == "not reproduced"
    assert findings.verdict([]) == "not measured"
    f = findings.finding("claim", "text", [c(True), c(False), c(True)])
    assert f["ci"] == [-1.0, 2.0] and f["verdict"] == "partly" and f["level"] == findings.LEVEL


def hand_study(curves, prompts=400, seeds=(0, 1, 2)):
    """A study context S from curves {series: [(β, fraction, KL, win probability), ...]}: each point's wins
    drawn per prompt, its log-ratios with mean KL; SFT at win 0.4."""
    rng = np.random.default_rng(4)
    table, scalars, points = {}, {}, []
    for s in seeds:
        table[s], scalars[s] = {}, {}
        for name, pts in [("sft", [(None, 0.0, 0.0, 0.4)])] + list(curves.items()):
            for beta, fraction, kl, w in pts:
                key = (name, "m", beta or 0.0, fraction)
                z, x = rng.normal(kl, 0.5, prompts), rng.integers(1, 9, prompts).astype(float)
                table[s][key] = {"win": (rng.random(prompts) < w).astype(float), "z": z, "x": x, "xx": x * x,
                                 "zz": z * z, "xz": x * z, "length_words": x}
                scalars[s][key] = {}
    weights, counts = findings.replicates({s: prompts for s in seeds}, n_boot=300)
    E = findings.estimates(table, scalars, weights, counts)
    for key in table[0]:
        wins = [table[s][key]["win"] for s in seeds]
        points.append({"key": key, "series": key[0], "loss": key[0].split("+")[0], "model": "m", "beta": key[2],
                       "fraction": key[3], "win_rate": float(E[key]["win"][0]), "kl": float(E[key]["kl"][0]),
                       "win_rate_se": findings.seed_se(wins)[1], "n_seeds": len(seeds)})
    sft = next(p for p in points if p["series"] == "sft")
    return {"points": [p for p in points if p is not sft], "sft": {"m": sft}, "models": ["m"], "model": "m",
            "table": table, "labeller": "aligned", "E": E}


HUMP = [(b, f, kl, w) for b, run in ((0.1, [(0.5, 2.0, 0.62), (1.0, 14.0, 0.30)]),
                                      (0.5, [(0.5, 1.0, 0.58), (1.0, 2.0, 0.62)]),
                                      (1.0, [(0.5, 0.3, 0.50), (1.0, 0.6, 0.55)])) for f, kl, w in run]


def test_the_hump_is_found_where_it_is_and_not_where_it_is_not():
    flat = [(b, f, kl, 0.5 + 0.01 * kl) for b, f, kl, _ in HUMP]  # rises and never falls
    S = hand_study({"dpo": HUMP, "ipo": flat})
    h = findings.hump(S)
    held = {c["label"]: c["holds"] for c in h["comparisons"]}
    assert held == {"dpo: best − SFT": True, "dpo: best − highest-KL point": True,
                    "ipo: best − SFT": True, "ipo: best − highest-KL point": False}
    assert h["verdict"] == "partly" and h["ci_of"] == "ipo: best − highest-KL point"


def test_the_leaderboard_tells_a_fix_that_never_leaves_low_kl_from_one_that_removes_the_hump():
    low = [(b, f, kl / 10, 0.6) for b, f, kl, _ in HUMP]  # KL 1.4 at most: never where DPO collapses
    high = [(b, f, 1.2 * kl, 0.6) for b, f, kl, _ in HUMP]  # past KL 14, where DPO collapses, at its win rate
    S = hand_study({"dpo": HUMP, "stays": low, "fixes": high})
    board = findings.leaderboard(S)
    rows = {r["series"]: r for r in board["rows"]}
    assert board["collapse_kl"] == pytest.approx(14.0, abs=0.2)
    assert rows["dpo"]["hump"] == "keeps the hump" and rows["dpo"]["drop_se"] > findings.DROP_SE
    assert rows["stays"]["hump"] == "never leaves low KL" and rows["fixes"]["hump"] == "removes the hump"
    assert rows["stays"]["win_at_sqrt_kl"]["2"] is None and rows["fixes"]["win_at_sqrt_kl"]["3"] == pytest.approx(
        0.6, abs=0.05)
    assert rows["fixes"]["vs_dpo"]["3"] == "higher" and set(rows["dpo"]) >= {
        "series", "loss", "peak_win_rate", "peak_win_rate_se", "peak_kl", "max_kl", "drop_se", "win_at_sqrt_kl"}
