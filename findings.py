"""The paper's findings as verdicts a reader can check, with their uncertainty.

The miniature (scripts/tiny_summary.py) measures each claim of the paper with one small function
below. A finding is a list of comparisons (one per loss, β, size pair or √KL mark), each an estimate
with its confidence interval, and a comparison *holds* when its whole interval lies on the claim's
side. The verdict follows from the comparisons alone:

    reproduced      every comparison holds
    partly          more than half hold (a majority of significant comparisons), not all
    not reproduced  half of them or fewer hold
    not applicable  the design rules the finding out (the aligned labeller never pays for length)
    not measured    a statistic it needs is missing

A finding returns {"finding", "measured", "verdict", "ci", "ci_of", "level", "comparisons"}: `ci` is
the interval of the comparison nearest to failing (`ci_of` names it), the one that decides.
Thresholds are named here and copied into summary.json["thresholds"].

Uncertainty. Every seed has its own data and eval prompts (scripts/study.py), and all runs of one
seed are judged on the same prompts, so comparisons within a seed are paired. Intervals come from a
two-level bootstrap: draw the seeds with replacement, then within each seed its prompts, with the
same prompt draws for every point of that seed (the pairing), and recompute every statistic, fits
included, on each replicate. A fit's RMSE ratio is the one statistic this biases: a replicate's resampling noise adds to the
points' own, which pulls its ratio toward 1, so the interval sits below the estimate and the
verdict is conservative. Correlations across checkpoints (Fig. 4) take the checkpoints as their
sample: a t-test against zero and Fisher's z interval. A point's (or a paired difference's)
standard error is

    se² = max(var_s(m_s), mean_s(se_s²)) / n_seeds

with m_s the seed's mean over its prompts and se_s its prompt standard error: the variance between
seeds over their number, floored by the prompt variance it must contain (three seeds give it two
degrees of freedom); one seed gives its prompt standard error alone.
"""
import math

import numpy as np

from fit import fit_curve, predict, rmse

VERDICTS = ("reproduced", "partly", "not reproduced", "not applicable", "not measured")
LEVEL = 0.95            # two-sided level of every interval
N_BOOT = 1000           # bootstrap replicates
HALVES = 2.0            # §3.2: R(d) "halves the RMSE" of a quadratic in KL: the ratio's interval above 2
SIMILAR = 1.3           # §3.2: a quadratic in √KL fits with "a similar error": its RMSE ratio within 1/1.3 … 1.3
ALPHA = 0.05            # significance of a correlation against zero (t-test)
Z95 = 1.959964          # the normal quantile of LEVEL, for Fisher's z interval of a correlation
DROP_SE = 2.0           # a drop counts as a collapse at this many standard errors
SQRT_KL_MARKS = (1.0, 2.0, 3.0)  # √KL at which frontiers are compared (the leaderboard's win_at_sqrt_kl)
THRESHOLDS = {"level": LEVEL, "n_boot": N_BOOT, "rmse_halves": HALVES, "rmse_similar": SIMILAR,
              "correlation_alpha": ALPHA, "drop_se": DROP_SE, "sqrt_kl_marks": list(SQRT_KL_MARKS)}

# Per-prompt statistics a sample file gives (x = length in tokens, z = log π/π_ref: Eq. 6's moments).
PROMPT_METRICS = ("win", "z", "x", "length_words", "ood_tokens", "tokens", "gold_reward", "proxy_reward", "hits",
                  "other_words", "xx", "zz", "xz")
SEED_METRICS = ("eval_accuracy", "eval_loss", "forward_kl")  # one number per run and checkpoint (eval.json)


# ---------------------------------------------------------------- uncertainty

def seed_se(vectors):
    """Mean over seeds and standard error (module docstring) of per-prompt vectors, one per seed."""
    means = np.array([v.mean() for v in vectors])
    within = np.array([v.var(ddof=1) / len(v) if len(v) > 1 else 0.0 for v in vectors])
    if len(vectors) == 1:
        return float(means[0]), float(math.sqrt(within[0]))
    return float(means.mean()), float(math.sqrt(max(means.var(ddof=1), within.mean()) / len(vectors)))


def replicates(prompts, n_boot=N_BOOT, seed=0):
    """Bootstrap weights: per seed, its weight [B + 1] and its prompts' counts [P, B + 1]. Column 0 is the
    data itself (weight 1, every prompt once), so column 0 of any statistic is its estimate."""
    rng, seeds = np.random.default_rng(seed), sorted(prompts)
    drawn = rng.multinomial(len(seeds), [1 / len(seeds)] * len(seeds), size=n_boot)
    weights = {s: np.concatenate(([1.0], drawn[:, i])) for i, s in enumerate(seeds)}
    counts = {s: np.concatenate((np.ones((p, 1)), rng.multinomial(p, [1 / p] * p, size=n_boot).T), 1)
              for s, p in prompts.items()}
    return weights, counts


def per_seed(arrays, counts):
    """One seed's statistics of one point on every replicate, from its per-prompt arrays."""
    sums = {m: arrays[m] @ counts for m in PROMPT_METRICS if m in arrays}
    n = counts.sum(0)
    out = {m: sums[m] / n for m in ("win", "length_words", "gold_reward", "proxy_reward", "hits", "other_words")
           if m in sums}
    out["kl"], out["length_tokens"] = sums["z"] / n, sums["x"] / n
    if "ood_tokens" in sums:
        out["ood_token_rate"] = sums["ood_tokens"] / sums["tokens"]
    with np.errstate(divide="ignore", invalid="ignore"):  # Eq. 6 both ways, from its moments
        out["length_r2"] = sums["xz"] ** 2 / (sums["xx"] * sums["zz"])
        sxz, sxx, szz = (sums["xz"] - sums["x"] * sums["z"] / n, sums["xx"] - sums["x"] ** 2 / n,
                         sums["zz"] - sums["z"] ** 2 / n)
        out["length_r2_centred"] = sxz ** 2 / (sxx * szz)
    return out


def estimates(table, scalars, weights, counts):
    """{point key: {statistic: [B + 1]}}: each point's statistics on every replicate, the seeds' values
    averaged with the replicate's seed weights (a seed drawn twice counts twice).
    table[seed][key]: per-prompt arrays; scalars[seed][key]: SEED_METRICS values."""
    out = {}
    for key in {k for t in table.values() for k in t}:
        seeds = [s for s in table if key in table[s]]
        vals = [per_seed(table[s][key], counts[s]) for s in seeds]
        for s, v in zip(seeds, vals):
            v.update({m: np.full(weights[s].shape, x) for m, x in scalars[s].get(key, {}).items()})
        w = np.stack([weights[s] for s in seeds])
        with np.errstate(invalid="ignore"):
            out[key] = {m: (w * np.stack([v[m] for v in vals])).sum(0) / w.sum(0) for m in vals[0]
                        if all(m in v for v in vals)}
    return out


def interval(x):
    """(estimate, [lo, hi]) of a statistic's replicates at LEVEL; None where it is undefined."""
    reps = x[1:][np.isfinite(x[1:])]
    if not math.isfinite(x[0]) or len(reps) < 0.9 * (len(x) - 1):
        return (float(x[0]) if math.isfinite(x[0]) else None), None
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(x[0]), [float(lo), float(hi)]


def pearson_test(x, y):
    """Pearson r and the two-sided p-value of its t-test against r = 0 (Student's t, by numerical
    integration: no scipy at runtime)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < 4 or x[keep].std() == 0 or y[keep].std() == 0:
        return math.nan, math.nan
    r = float(np.corrcoef(x[keep], y[keep])[0, 1])
    t, df = abs(r) * math.sqrt((n - 2) / max(1e-300, 1 - r * r)), n - 2
    grid = np.linspace(0, t, 4001)  # P(|T| > t) = 1 − 2∫₀ᵗ f
    dens = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * \
        (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    return r, float(max(0.0, 1 - 2 * np.trapezoid(dens, grid)))


# ---------------------------------------------------------------- comparisons and verdicts

def compare(label, x, side=1):
    """A comparison: the statistic's replicates `x`, and whether its interval lies above 0 (side +1)
    or below 0 (side −1)."""
    est, ci = interval(np.asarray(x, float))
    ok = ci is not None and (ci[0] > 0 if side > 0 else ci[1] < 0)
    return {"label": label, "estimate": est, "ci": ci, "holds": bool(ok), "side": side}


def verdict(comparisons):
    if not comparisons or any(c["estimate"] is None for c in comparisons):
        return "not measured"
    held = sum(c["holds"] for c in comparisons)
    return "reproduced" if held == len(comparisons) else "partly" if held > len(comparisons) / 2 \
        else "not reproduced"


def margin(c):
    """How far a comparison's interval stays on the claim's side (negative: it crosses); for a test's
    comparison (a correlation), how far its p-value stays on the claim's side of ALPHA."""
    if "p" in c:
        return -math.inf if not math.isfinite(c["p"]) else (c["p"] - ALPHA) * (1 if c["side"] == 0 else -1)
    if c["ci"] is None:
        return -math.inf
    return c["ci"][0] if c["side"] > 0 else -c["ci"][1]


def finding(claim, measured, comparisons, fixed=None):
    """The record of one finding; `fixed` overrides the verdict (not applicable, not measured)."""
    weakest = min(comparisons, key=margin) if comparisons else None
    return {"finding": claim, "measured": measured, "verdict": fixed or verdict(comparisons),
            "ci": weakest["ci"] if weakest else None, "ci_of": weakest["label"] if weakest else None,
            "level": LEVEL, "comparisons": comparisons}


def correlate(S, pts, x_name, label, claim):
    """A correlation's comparison across the points (the checkpoints are its sample, as in Fig. 4): r, its
    t-test p-value and Fisher's z interval at LEVEL. The claim "none" holds when r = 0 is not rejected at
    ALPHA; "negative" when r < 0 is significant."""
    x, y = stack(S, pts, x_name)[:, 0], stack(S, pts, "win")[:, 0]
    r, p = pearson_test(x, y)
    n = int((np.isfinite(x) & np.isfinite(y)).sum())
    z, half = math.atanh(max(-0.999999, min(0.999999, r))) if math.isfinite(r) else math.nan, \
        Z95 / math.sqrt(max(n - 3, 1))
    ci = [math.tanh(z - half), math.tanh(z + half)] if math.isfinite(r) else None
    ok = math.isfinite(p) and (p >= ALPHA if claim == "none" else r < 0 and p < ALPHA)
    return {"label": label, "estimate": None if math.isnan(r) else r, "ci": ci, "p": p, "n": len(pts),
            "holds": bool(ok), "side": 0 if claim == "none" else -1}


def num(x, spec=".2f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_ci(c, digits=3):
    if c["ci"] is None:
        return "n/a"
    return f"{c['estimate']:.{digits}f} [{c['ci'][0]:.{digits}f}, {c['ci'][1]:.{digits}f}]"


# ---------------------------------------------------------------- reading the points

def stat(S, p, name):
    return S["E"][p["key"]][name]


def stack(S, pts, name):
    return np.stack([stat(S, p, name) for p in pts])


def series(S, name, model=None):
    model = model or S["model"]
    return [p for p in S["points"] if p["model"] == model and p["series"] == name]


def plain_losses(S, model=None):
    model = model or S["model"]
    return sorted({p["loss"] for p in S["points"] if p["model"] == model and p["series"] == p["loss"]})


def sft(S, model=None):
    return S["sft"][model or S["model"]]


def pick(values, index):
    """values [n, B+1] at a per-replicate row index [B+1]."""
    return values[index, np.arange(values.shape[1])]


def at_sqrt_kl(S, pts, name, d):
    """The statistic interpolated linearly in √KL between the measured points on either side of d, on
    every replicate; NaN where a replicate's points do not reach d."""
    d_all, y_all = np.sqrt(np.maximum(stack(S, pts, "kl"), 0)), stack(S, pts, name)
    out = np.full(d_all.shape[1], math.nan)
    for b in range(d_all.shape[1]):
        order = np.argsort(d_all[:, b])
        x, y = d_all[order, b], y_all[order, b]
        if len(x) and x[0] <= d <= x[-1]:
            out[b] = np.interp(d, x, y)
    return out


def hump_stats(S, pts, x="kl", model=None):
    """Per replicate: the best win rate, its gain over SFT, and the drop from it to the highest-x point."""
    win, xs = stack(S, pts, "win"), stack(S, pts, x)
    best = win.max(0)
    return {"best": best, "gain": best - stat(S, sft(S, model), "win"), "drop": best - pick(win, xs.argmax(0)),
            "best_i": int(win[:, 0].argmax()), "top_i": int(xs[:, 0].argmax())}


def drop_in_se(S, a, b):
    """(win(a) − win(b)) over its paired standard error: a and b share each seed's prompts."""
    if a["key"] == b["key"]:  # the peak is the highest-KL point: it has not fallen at all
        return 0.0
    seeds = [s for s in S["table"] if a["key"] in S["table"][s] and b["key"] in S["table"][s]]
    diff, se = seed_se([S["table"][s][a["key"]]["win"] - S["table"][s][b["key"]]["win"] for s in seeds])
    return diff / se if se > 0 else math.nan


def where(p):
    return f"β {p['beta']:g}, {p['fraction']:.0%}"


# ---------------------------------------------------------------- the paper's findings (main model, plain runs)

def hump(S):
    comps, text = [], []
    for loss in plain_losses(S):
        pts = series(S, loss)
        h = hump_stats(S, pts)
        best, top = pts[h["best_i"]], pts[h["top_i"]]
        comps += [compare(f"{loss}: best − SFT", h["gain"]), compare(f"{loss}: best − highest-KL point", h["drop"])]
        text.append(f"{loss}: best {best['win_rate']:.3f} ({where(best)}) vs SFT {sft(S)['win_rate']:.3f}, highest "
                    f"KL {top['kl']:.1f} → {top['win_rate']:.3f} (drop {drop_in_se(S, best, top):.1f} SE)")
    return finding("The hump (Fig. 1, §3.1): win rate rises with KL, then falls", "; ".join(text), comps)


def early_peak(S):
    comps, text = [], []
    for loss in plain_losses(S):
        pts = series(S, loss)
        run = sorted((p for p in pts if p["beta"] == min(p["beta"] for p in pts)), key=lambda p: p["fraction"])
        win = stack(S, run, "win")
        peak = run[int(win[:-1, 0].argmax())] if len(run) > 1 else run[0]
        comps.append(compare(f"{loss} β {run[0]['beta']:g}: best before the end − end", win[:-1].max(0) - win[-1]))
        text.append(f"{loss} β {run[0]['beta']:g}: {peak['win_rate']:.3f} at {peak['fraction']:.0%} (KL "
                    f"{peak['kl']:.1f}) → {run[-1]['win_rate']:.3f} at 100 % (KL {run[-1]['kl']:.1f})")
    return finding("Wide-KL runs peak early in the epoch, then degrade as KL grows (Fig. 2; paper: after 25 %)",
                   "; ".join(text), comps)


def final_points(S, loss, model=None):
    return {p["beta"]: p for p in series(S, loss, model) if p["fraction"] == 1.0}


def ipo_lower_kl(S):
    dpo, ipo = final_points(S, "dpo"), final_points(S, "ipo")
    shared = sorted(set(dpo) & set(ipo))
    comps = [compare(f"β {b:g}: KL(DPO) − KL(IPO)", stat(S, dpo[b], "kl") - stat(S, ipo[b], "kl")) for b in shared]
    return finding("IPO reaches lower KL than DPO at equal β (§3.1)", ", ".join(
        f"β {b:g}: IPO {ipo[b]['kl']:.2f} vs DPO {dpo[b]['kl']:.2f}" for b in shared) or "no β in both grids", comps)


def ipo_less_prone(S):
    """At matched KL, not at equal β: the win rate interpolated at each √KL mark that both series reach."""
    comps, text = [], []
    for other in (l for l in plain_losses(S) if l != "ipo"):
        for d in SQRT_KL_MARKS:
            diff = at_sqrt_kl(S, series(S, "ipo"), "win", d) - at_sqrt_kl(S, series(S, other), "win", d)
            if math.isfinite(diff[0]):
                c = compare(f"√KL {d:g}: IPO − {other}", diff)
                comps.append(c)
                text.append(f"√KL {d:g}: IPO − {other} {fmt_ci(c)}")
    return finding("IPO is less prone to over-optimization (§3.1): a higher win rate than DPO and SLiC at matched KL",
                   "; ".join(text), comps)


def rmse_ratios(S, pts, model=None):
    """Per replicate: RMSE of the quadratic in KL and in √KL over R(d)'s, fitted to the points with the SFT
    win rate as y0 (fit.py's convention; here on the seeds' mean points)."""
    d, y, y0 = np.sqrt(np.maximum(stack(S, pts, "kl"), 0)), stack(S, pts, "win"), stat(S, sft(S, model), "win")
    out = np.full((2, d.shape[1]), math.nan)
    for b in range(d.shape[1]):
        try:
            err = {s: rmse(y[:, b], predict(s, fit_curve(d[:, b], y[:, b], s, y0[b]), d[:, b]))
                   for s in ("r_d", "quadratic_kl", "quadratic_d")}
        except ValueError:
            continue
        if err["r_d"] > 0:  # an exact fit (as many points as coefficients) has no ratio
            out[:, b] = err["quadratic_kl"] / err["r_d"], err["quadratic_d"] / err["r_d"]
    return out


def scaling_law(S):
    comps, text, similar = [], [], []
    for loss in plain_losses(S):
        ratio = rmse_ratios(S, series(S, loss))
        comps.append(compare(f"{loss}: RMSE(quadratic in KL) / RMSE(R(d)) − {HALVES:g}", ratio[0] - HALVES))
        similar += [compare(f"{loss}: {SIMILAR:g} − RMSE ratio (quadratic in √KL)", SIMILAR - ratio[1]),
                    compare(f"{loss}: RMSE ratio (quadratic in √KL) − 1/{SIMILAR:g}", ratio[1] - 1 / SIMILAR)]
        text.append((loss, compare("", ratio[0]), compare("", ratio[1])))
    return [finding("R(d) = d(α − β log d) halves the RMSE of a quadratic in KL (§3.2)", "; ".join(
                        f"{l}: RMSE ratio quadratic-in-KL / R(d) {fmt_ci(q, 2)}" for l, q, _ in text), comps),
            finding(f"A quadratic in √KL fits about as well as R(d) (§3.2; here: RMSE ratio within 1/{SIMILAR:g}–"
                    f"{SIMILAR:g})", "; ".join(f"{l}: RMSE ratio quadratic-in-√KL / R(d) {fmt_ci(r, 2)}"
                                               for l, _, r in text), similar)]


def length_exploitation(S):
    claim = "Length exploitation (§3.3): samples grow longer (in tokens) as KL grows"
    if S["labeller"] == "aligned":
        return finding(claim, "the aligned labeller's proxy never pays for length (its optimum is the gold "
                       "reward's): the length labeller (--labeller length) is where this is tested", [],
                       "not applicable")
    comps, text = [], []
    for loss in plain_losses(S):
        pts = series(S, loss)
        top = max(pts, key=lambda p: p["kl"])
        comps.append(compare(f"{loss}: tokens at the highest-KL point − SFT's",
                             stat(S, top, "length_tokens") - stat(S, sft(S), "length_tokens")))
        text.append(f"{loss}: {top['length_tokens']:.2f} tokens ({top['length_words']:.2f} words) at KL "
                    f"{top['kl']:.1f} vs SFT {sft(S)['length_tokens']:.2f} ({sft(S)['length_words']:.2f})")
    return finding(claim, "; ".join(text), comps)


def budget_length_r2(S):
    """Fig. 3 right at matched KL: a run with a smaller budget (larger β) against the widest-budget run's
    trajectory, whose centred R² is interpolated at the same KL."""
    comps, text = [], []
    for loss in plain_losses(S):
        pts = series(S, loss)
        wide = sorted((p for p in pts if p["beta"] == min(p["beta"] for p in pts)), key=lambda p: p["kl"])
        for p in sorted(final_points(S, loss).values(), key=lambda p: p["beta"])[1:]:
            if not wide[0]["kl"] <= p["kl"] <= wide[-1]["kl"]:
                continue
            r2 = at_sqrt_kl(S, wide, "length_r2_centred", math.sqrt(max(p["kl"], 0)))
            c = compare(f"{loss} β {p['beta']:g} vs β {wide[0]['beta']:g} at KL {p['kl']:.1f}: centred R² difference",
                        stat(S, p, "length_r2_centred") - r2)
            comps.append(c)
            text.append(f"{c['label']} {fmt_ci(c, 2)} (uncentred R² {p['length_r2']:.2f})")
    return finding("A smaller KL budget extrapolates more on length: a higher R² of Eq. 6 at the same KL (Fig. 3 "
                   "right; centred R², which compares across budgets)", "; ".join(text) or
                   "no smaller-budget run ends inside the widest run's KL range", comps)


def metrics_say_little(S, model=None):
    comps, text = [], []
    for loss in plain_losses(S, model):
        for key, name in (("eval_accuracy", "accuracy"), ("eval_loss", "loss")):
            c = correlate(S, series(S, loss, model), key, f"{loss}{' ' + model if model else ''}: r({name}, win)",
                          "none")
            comps.append(c)
            text.append(f"{c['label']} {num(c['estimate'])} (p {num(c['p'], '.3f')}, n {c['n']})")
    return finding(f"Held-out reward accuracy and DAA loss say little about win rate (Fig. 4, §3.4): no "
                   f"correlation significant at p < {ALPHA:g}" + (f", within {model}" if model else ""),
                   "; ".join(text), comps)


def forward_kl_hump(S):
    comps, text = [], []
    for loss in plain_losses(S):
        pts = [p for p in series(S, loss) if math.isfinite(p.get("forward_kl", math.nan))]
        if len(pts) < 2:
            return finding("The hump also against √(forward KL) (Fig. 5, Eq. 7)", "no forward KL", [], "not measured")
        h = hump_stats(S, pts, "forward_kl")
        comps.append(compare(f"{loss}: best − highest forward-KL point", h["drop"]))
        best, top = pts[h["best_i"]], pts[h["top_i"]]
        text.append(f"{loss}: best {best['win_rate']:.3f} at forward KL {best['forward_kl']:.2f}, highest "
                    f"{top['forward_kl']:.2f} → {top['win_rate']:.3f}")
    return finding("The hump also against √(forward KL), −E[log-ratio of chosen] (Fig. 5, Eq. 7)", "; ".join(text),
                   comps)


def ood_mass(S):
    comps, text = [], []
    for loss in plain_losses(S):
        pts = series(S, loss)
        top = max(pts, key=lambda p: p["kl"])
        r = correlate(S, pts, "ood_token_rate", f"{loss}: r(OOD, win) < 0", "negative")
        comps += [compare(f"{loss}: OOD rate at the highest-KL point − SFT's",
                          stat(S, top, "ood_token_rate") - stat(S, sft(S), "ood_token_rate")), r]
        text.append(f"{loss}: {top['ood_token_rate']:.3f} at KL {top['kl']:.1f}, r(OOD, win) {num(r['estimate'])} "
                    f"(p {num(r['p'], '.2g')})")
    return finding("Mass moves off the data (App. E): the share of sampled tokens never seen in a training "
                   "response grows as the win rate falls", f"SFT {sft(S)['ood_token_rate']:.4f}; " + "; ".join(text),
                   comps)


def proxy_up_gold_down(S):
    comps, text = [], []
    for loss in plain_losses(S):
        up = [p for p in final_points(S, loss).values() if p["proxy_reward"] > sft(S)["proxy_reward"]]
        if not up:
            comps.append({"label": f"{loss}: a final checkpoint above SFT's proxy", "estimate": 0.0, "ci": None,
                          "holds": False, "side": 1})
            text.append(f"{loss}: no final checkpoint above SFT's proxy")
            continue
        p = min(up, key=lambda p: p["gold_reward"])
        comps += [compare(f"{loss} β {p['beta']:g}: proxy − SFT's", stat(S, p, "proxy_reward") -
                          stat(S, sft(S), "proxy_reward")),
                  compare(f"{loss} β {p['beta']:g}: SFT's gold − gold", stat(S, sft(S), "gold_reward") -
                          stat(S, p, "gold_reward"))]
        text.append(f"{loss} β {p['beta']:g}: gold {p['gold_reward']:.3f}, proxy {p['proxy_reward']:.2f}")
    return finding("Proxy up, gold down (§2.2): a final checkpoint whose proxy (labeller) reward is above SFT's "
                   "has a gold reward below SFT's", f"SFT gold {sft(S)['gold_reward']:.3f}, proxy "
                   f"{sft(S)['proxy_reward']:.2f}; " + "; ".join(text), comps)


def paper_findings(S):
    out = [hump(S), early_peak(S)]
    if {"dpo", "ipo"} <= set(plain_losses(S)):
        out += [ipo_lower_kl(S), ipo_less_prone(S)]
    return out + [*scaling_law(S), length_exploitation(S), budget_length_r2(S), metrics_say_little(S),
                  forward_kl_hump(S), ood_mass(S), proxy_up_gold_down(S)]


# ---------------------------------------------------------------- model size (§3.1, §3.3, §3.4) and the length arm

def size_pairs(S):
    return list(zip(S["models"], S["models"][1:]))  # smallest first


def per_size_pairs(S, claim, stat_of, side=1, unit=""):
    """A size finding: for each plain loss and adjacent size pair (small, large), stat_of(loss, model) is
    a statistic's replicates; the comparison is large − small (side +1) or small − large (side −1)."""
    comps, text = [], []
    for loss in plain_losses(S):
        vals = {m: stat_of(loss, m) for m in S["models"]}
        for small, large in size_pairs(S):
            diff = (vals[large] - vals[small]) * side
            comps.append(compare(f"{loss}: {large} − {small}" if side > 0 else f"{loss}: {small} − {large}", diff))
        text.append(f"{loss}: " + " / ".join(f"{m} {vals[m][0]:.3f}{unit}" for m in S["models"]))
    return finding(claim, "; ".join(text), comps)


def larger_higher_peak(S):
    return per_size_pairs(S, "Larger models reach a higher peak win rate (§3.1)",
                          lambda loss, m: stack(S, series(S, loss, m), "win").max(0))


def best_kl(S, loss, m):
    pts = series(S, loss, m)
    return pick(stack(S, pts, "kl"), stack(S, pts, "win").argmax(0))


def smaller_sooner(S):
    return per_size_pairs(S, "Smaller models over-optimize sooner: their best checkpoint sits at lower KL (§3.1)",
                          lambda loss, m: best_kl(S, loss, m))


def smaller_higher_kl(S):
    comps, text = [], []
    for loss in plain_losses(S):
        finals = {m: final_points(S, loss, m) for m in S["models"]}
        for b in sorted(set.intersection(*(set(f) for f in finals.values()))):
            for small, large in size_pairs(S):
                comps.append(compare(f"{loss} β {b:g}: KL({small}) − KL({large})",
                                     stat(S, finals[small][b], "kl") - stat(S, finals[large][b], "kl")))
            text.append(f"{loss} β {b:g}: " + " / ".join(f"{finals[m][b]['kl']:.2f}" for m in S["models"]))
    return finding(f"Smaller models reach higher KL at equal β (§3.1: the 1B model's much higher KL); final KL, "
                   f"{' / '.join(S['models'])}", "; ".join(text), comps)


def at_marks(S, claim, name, side):
    """A size finding at matched KL: each loss's statistic interpolated at every √KL mark both sizes reach."""
    comps, text = [], []
    for loss in plain_losses(S):
        for d in SQRT_KL_MARKS:
            vals = {m: at_sqrt_kl(S, series(S, loss, m), name, d) for m in S["models"]}
            for small, large in size_pairs(S):
                diff = (vals[large] - vals[small]) * side
                if math.isfinite(diff[0]):
                    pair = f"{large} − {small}" if side > 0 else f"{small} − {large}"
                    comps.append(compare(f"{loss} √KL {d:g}: {pair}", diff))
            if any(math.isfinite(v[0]) for v in vals.values()):
                text.append(f"{loss} √KL {d:g}: " + " / ".join(f"{m} {v[0]:.3f}" for m, v in vals.items()
                                                             if math.isfinite(v[0])))
    return finding(claim, "; ".join(text), comps)


def larger_less_loss(S):
    return at_marks(S, "Larger models keep more win rate at equal KL (§3.1: the 6.9B model is less prone to "
                    "over-optimization): the win rate at each √KL mark", "win", 1)


def weaker_length_r2(S):
    return at_marks(S, "Weaker models extrapolate more on length: a higher R² of Eq. 6 at equal KL (§3.3, Fig. 3 "
                    "right; centred R²)", "length_r2_centred", -1)


def within_size_metrics(S):
    """§3.4 as the paper states it: within each size; the pooled correlations are reported beside it."""
    comps, text = [], []
    for m in S["models"]:
        f = metrics_say_little(S, m)
        comps += f["comparisons"]
        text.append(f["measured"])
    pooled = [correlate(S, [p for p in S["points"] if p["loss"] == loss and p["series"] == loss], "eval_accuracy",
                        f"{loss} pooled over sizes: r(accuracy, win)", "none") for loss in plain_losses(S)]
    text.append("pooled over sizes: " + ", ".join(f"{c['label'].split(' ')[0]} r(accuracy, win) {num(c['estimate'])} "
                                                   f"(p {num(c['p'], '.3f')})" for c in pooled))
    return finding(f"Within each model size, held-out accuracy and DAA loss say little about win rate (§3.4; "
                   f"no correlation significant at p < {ALPHA:g})", "; ".join(text), comps)


def length_arm(S):
    """Fig. 3 left: Park et al.'s length-regularised DPO changes the frontier but still over-optimizes."""
    arms = sorted({p["series"] for p in S["points"] if p["model"] == S["model"] and "+len" in p["series"]})
    out = []
    for name in arms:
        pts = series(S, name)
        h = hump_stats(S, pts)
        best, top = pts[h["best_i"]], pts[h["top_i"]]
        out.append(finding(f"{name}: length-regularised DPO still over-optimizes (Fig. 3 left, §3.3)",
                           f"best {best['win_rate']:.3f} ({where(best)}), highest KL {top['kl']:.1f} → "
                           f"{top['win_rate']:.3f} (drop {drop_in_se(S, best, top):.1f} SE)",
                           [compare(f"{name}: best − SFT", h["gain"]),
                            compare(f"{name}: best − highest-KL point", h["drop"])]))
    return out


def scaling_findings(S):
    out = []
    if len(S["models"]) > 1:
        out += [larger_higher_peak(S), smaller_higher_kl(S), smaller_sooner(S), larger_less_loss(S),
                weaker_length_r2(S), within_size_metrics(S)]
    return out + length_arm(S)


# ---------------------------------------------------------------- the over-optimization bench (the leaderboard)

def collapse_kl(S):
    """The KL at which DPO collapses: the lowest KL, beyond its best point's, of a DPO point DROP_SE paired
    SEs below that best."""
    pts = series(S, "dpo")
    if not pts:
        return math.nan
    best = max(pts, key=lambda p: p["win_rate"])
    fallen = [p["kl"] for p in pts if p["kl"] > best["kl"] and drop_in_se(S, best, p) >= DROP_SE]
    return min(fallen) if fallen else math.nan


def leaderboard_row(S, name, kl_collapse):
    pts = series(S, name)
    best, top = max(pts, key=lambda p: p["win_rate"]), max(pts, key=lambda p: p["kl"])
    marks = {d: at_sqrt_kl(S, pts, "win", d) for d in SQRT_KL_MARKS}
    drop_se = drop_in_se(S, best, top)
    # its drop at DPO's collapse KL, in bootstrap standard errors (the verdict of issue 22)
    at = stack(S, pts, "win").max(0) - at_sqrt_kl(S, pts, "win", math.sqrt(kl_collapse)) \
        if math.isfinite(kl_collapse) else np.full(2, math.nan)
    there = at[0] / np.nanstd(at[1:]) if math.isfinite(at[0]) and np.nanstd(at[1:]) > 0 else math.nan
    hump = ("not measured" if math.isnan(kl_collapse) else
            "keeps the hump" if drop_se >= DROP_SE or there >= DROP_SE else
            "never leaves low KL" if top["kl"] < kl_collapse else "removes the hump")
    row = {"series": name, "loss": pts[0]["loss"], "peak_win_rate": best["win_rate"],
           "peak_win_rate_se": best["win_rate_se"], "peak_kl": best["kl"], "max_kl": top["kl"], "drop_se": drop_se,
           "drop_at_collapse_se": there,
           "win_at_sqrt_kl": {f"{d:g}": float(v[0]) if math.isfinite(v[0]) else None for d, v in marks.items()},
           "win_at_sqrt_kl_ci": {f"{d:g}": interval(v)[1] for d, v in marks.items()}, "hump": hump}
    if name != "dpo" and series(S, "dpo"):
        row["vs_dpo"] = {}
        for d, v in marks.items():
            c = compare(f"√KL {d:g}: {name} − dpo", v - at_sqrt_kl(S, series(S, "dpo"), "win", d))
            row["vs_dpo"][f"{d:g}"] = (None if c["estimate"] is None else "higher" if c["holds"] else "lower"
                                       if c["ci"] and c["ci"][1] < 0 else "same")
    return row


def leaderboard(S):
    """One row per series of the main model (docs/formats.md, summary.json["leaderboard"]); the verdicts
    of issue 22: a fix removes the hump only if it reaches DPO's collapse KL and drops there (its win
    rate interpolated at that KL, against its best) by under DROP_SE; one whose drop stays small because
    it never gets there "never leaves low KL"; one that drops by DROP_SE, there or at its highest KL,
    keeps the hump."""
    names = sorted({p["series"] for p in S["points"] if p["model"] == S["model"]} - {"sft"},
                   key=lambda n: (n != "dpo", n))
    kl_collapse = collapse_kl(S)
    return {"collapse_kl": kl_collapse, "rows": [leaderboard_row(S, n, kl_collapse) for n in names
                                                 if S.get("on_board", lambda n: True)(n)]}


# ---------------------------------------------------------------- the RLHF frontier (issue 23)

def rise_and_fall(S, pts, name, start):
    """Per replicate: (the statistic's best over the points − its value at `start`, the best − its value
    at the highest-KL point): a hump has both above 0."""
    vals, kls = stack(S, pts, name), stack(S, pts, "kl")
    return vals.max(0) - start, vals.max(0) - pick(vals, kls.argmax(0))


def like_rlhf(S):
    """DAAs against best-of-n on the learned reward model (Gao et al.'s RLHF arm): both over-optimize the
    gold reward, and how their gold rewards compare at matched KL."""
    bon = series(S, "bon-rm")
    if not bon:
        return None
    sft_gold = stat(S, sft(S), "gold_reward")
    comps, text = [], [f"SFT gold {sft(S)['gold_reward']:.3f}; best-of-n (RM): best gold "
                       f"{max(p['gold_reward'] for p in bon):.3f}, {max(bon, key=lambda p: p['kl'])['gold_reward']:.3f} "
                       f"at n = {max(p['n'] for p in bon):g} (KL {max(p['kl'] for p in bon):.2f})"]
    for name, pts in [("best-of-n (RM)", bon)] + [(loss, series(S, loss)) for loss in plain_losses(S)]:
        rise, fall = rise_and_fall(S, pts, "gold_reward", sft_gold)
        comps += [compare(f"{name}: best gold − SFT's", rise), compare(f"{name}: best gold − gold at the highest KL",
                                                                     fall)]
    for loss in plain_losses(S):
        pts = series(S, loss)
        for d in SQRT_KL_MARKS:
            diff = at_sqrt_kl(S, pts, "gold_reward", d) - at_sqrt_kl(S, bon, "gold_reward", d)
            if math.isfinite(diff[0]):
                text.append(f"{loss} − best-of-n (RM), gold at √KL {d:g}: {fmt_ci(compare('', diff))}")
    return finding("DAAs over-optimize like classical RLHF (§1, Gao et al. 2022): the gold reward rises then falls "
                   "with KL for each DAA and for best-of-n on the learned reward model", "; ".join(text), comps)


def online_reduces_hump(S):
    """Online DPO (its own samples, labelled each round) against offline DPO at matched KL, at the √KL
    marks past offline DPO's best point: where offline DPO has started to fall."""
    online = sorted({p["series"] for p in S["points"] if p["model"] == S["model"] and "+online" in p["series"]
                     and "+insupport" not in p["series"]})
    if not online or not series(S, "dpo"):
        return None
    peak = math.sqrt(max(series(S, "dpo"), key=lambda p: p["win_rate"])["kl"])
    comps, text = [], []
    for name in online:
        for d in (d for d in SQRT_KL_MARKS if d > peak):
            diff = at_sqrt_kl(S, series(S, name), "win", d) - at_sqrt_kl(S, series(S, "dpo"), "win", d)
            if math.isfinite(diff[0]):
                c = compare(f"{name} − dpo, win at √KL {d:g}", diff)
                comps.append(c)
                text.append(f"{c['label']}: {fmt_ci(c)}")
        best = max(series(S, name), key=lambda p: p["win_rate"])
        top = max(series(S, name), key=lambda p: p["kl"])
        text.append(f"{name}: best {best['win_rate']:.3f} at KL {best['kl']:.2f}, highest KL {top['kl']:.2f} → "
                    f"{top['win_rate']:.3f} (drop {drop_in_se(S, best, top):.1f} SE)")
    return finding(f"Online data reduces the hump (§4): online DPO keeps more win rate than offline DPO at matched "
                   f"KL past offline DPO's best (√KL {peak:.2f})", "; ".join(text) or "no √KL mark past offline "
                   "DPO's best that both reach", comps)


def in_support_recovers(S):
    """Each checkpoint whose win rate fell DROP_SE below its series' best, re-sampled with only the tokens
    of the training responses: the share of the lost win rate that comes back is the part of the
    collapse due to token-level OOD mass; the rest is extrapolation inside the vocabulary."""
    comps, shares, text = [], [], []
    for loss in plain_losses(S):
        pts = series(S, loss)
        twins = {(p["beta"], p["fraction"]): p for p in series(S, f"{loss}+insupport")}
        if not twins:
            continue
        best = max(pts, key=lambda p: p["win_rate"])
        for p in pts:
            twin = twins.get((p["beta"], p["fraction"]))
            if twin is None or not drop_in_se(S, best, p) >= DROP_SE:  # NaN (p is the best): not fallen
                continue
            lost, back = stat(S, best, "win") - stat(S, p, "win"), stat(S, twin, "win") - stat(S, p, "win")
            comps.append(compare(f"{loss} {where(p)} (KL {p['kl']:.1f}): in-support − plain", back))
            shares.append(back / lost)
            text.append(f"{loss} {where(p)}: {p['win_rate']:.3f} → {twin['win_rate']:.3f} in support "
                        f"(best {best['win_rate']:.3f}, OOD {p['ood_token_rate']:.2f} → {twin['ood_token_rate']:.2f})")
    if not shares:
        return None
    share = compare("share of the lost win rate recovered", np.nanmean(np.stack(shares), 0))
    return finding("In-support sampling recovers the win rate lost to token-level OOD mass (§4, App. E): "
                   f"it recovers {fmt_ci(share, 2)} of the lost win rate; the rest is extrapolation inside the "
                   "vocabulary", "; ".join(text), comps)


def frontier_findings(S):
    return [f for f in (like_rlhf(S), online_reduces_hump(S), in_support_recovers(S)) if f is not None]
