"""Summarise the miniature study (scripts/tiny_study.sh) into OUT/summary.json and OUT/summary.md.

Reads what fit.py wrote (fit/results.csv: one row per run and sampled checkpoint;
fit/fits.json) and the task's data/gold.json. summary.json holds

    sft     {win_rate, win_rate_se}: the SFT policy of the main model (seeds pooled);
            sft_models has the same per model size
    runs    one row per seed and checkpoint, as fit.py read it
    points  the means over seeds per (model, series, β, fraction of the epoch): loss, beta,
            fraction, model, params, length_alpha, nll_alpha, n_seeds, win_rate, win_rate_se,
            kl, kl_sd, length, ood_token_rate, gold_reward, proxy_reward, length_words, ...
    beta_control, findings: the checks summary.md prints

win_rate_se combines both sources of noise: with n seeds whose win rates w_s were each
measured on the same P prompts with binomial standard error se_s,
    win_rate_se² = var_s(w_s) / n + mean_s(se_s²),
the between-seed variance over n (0 for one seed) plus the prompts' variance, which does not
shrink with n since every seed is judged on the same prompts. It is conservative (the
between-seed variance already holds the sampling part of se_s²); one seed gives the prompt
standard error alone.

    python scripts/tiny_summary.py OUT_DIR
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import files  # noqa: E402
from fit import arm as series, is_sft, pearson, predict, read_results  # noqa: E402

MEANS = ("win_rate", "kl", "length_tokens", "ood_token_rate", "gold_reward", "proxy_reward", "length_words",
         "length_r2", "forward_kl", "eval_accuracy", "eval_loss")
MAIN_MODEL = "tiny-m"  # the default study's size; --scaling adds tiny-s and tiny-l


def num(row, key):
    return row.get(key, math.nan)  # fit.py's rows are floats, NaN where a run has no such statistic


def mean_se(wins, ses):
    """Mean win rate over seeds and its standard error (module docstring)."""
    wins, ses = np.asarray(wins, float), np.asarray(ses, float)
    between = wins.var(ddof=1) if len(wins) > 1 else 0.0
    return float(wins.mean()), float(math.sqrt(between / len(wins) + (ses ** 2).mean()))


def mean_points(runs):
    """One point per (model, series, β, fraction): means over its seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["model"], series(r), r["beta"], r["fraction"]), []).append(r)
    points = []
    for (model, name, beta, fraction), rs in sorted(groups.items()):
        win, se = mean_se([r["win_rate"] for r in rs], [num(r, "win_rate_se") for r in rs])
        p = {"model": model, "params": num(rs[0], "params"), "series": name, "loss": rs[0]["loss"], "beta": beta,
             "fraction": fraction, "length_alpha": num(rs[0], "length_alpha"), "nll_alpha": num(rs[0], "nll_alpha"),
             "n_seeds": len(rs), "win_rate": win, "win_rate_se": se,
             "kl_sd": float(np.std([r["kl"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0}
        p.update({k: float(np.mean([num(r, k) for r in rs])) for k in MEANS if k != "win_rate"})
        points.append(p)
    return points


def sft_points(rows):
    by_model = {}
    for r in rows:
        if is_sft(r):
            by_model.setdefault(r["model"], []).append(r)
    out = {}
    for model, rs in by_model.items():
        win, se = mean_se([r["win_rate"] for r in rs], [num(r, "win_rate_se") for r in rs])
        out[model] = {"win_rate": win, "win_rate_se": se, "n_seeds": len(rs), "params": num(rs[0], "params"),
                      **{k: float(np.mean([num(r, k) for r in rs])) for k in MEANS if k != "win_rate"}}
    return out


# ---------------------------------------------------------------- checks

def beta_control(points):
    """Per series: do final KLs fall monotonically with β, over how wide a range, and without clusters
    (the largest gap between consecutive final KLs in log space, as a share of the log range)?"""
    out = {}
    for name in sorted({p["series"] for p in points}):
        final = sorted((p for p in points if p["series"] == name and p["fraction"] == 1.0), key=lambda p: p["beta"])
        kls = [p["kl"] for p in final]
        if len(kls) < 2 or min(kls) <= 0:
            continue
        logs = np.log(sorted(kls))
        out[name] = {"betas": [p["beta"] for p in final], "final_kl": kls,
                     "monotone": all(a > b for a, b in zip(kls, kls[1:])), "span": max(kls) / min(kls),
                     "max_gap_share": float(np.diff(logs).max() / (logs[-1] - logs[0]))}
    return out


def hump(pts, sft):
    """The best checkpoint against SFT, and the highest-KL checkpoint against the best (Fig. 1)."""
    best = max(pts, key=lambda p: p["win_rate"])
    top = max(pts, key=lambda p: p["kl"])
    gain_se = math.hypot(best["win_rate_se"], sft["win_rate_se"])
    drop_se = math.hypot(best["win_rate_se"], top["win_rate_se"])
    return {"best": best, "highest_kl": top, "gain": best["win_rate"] - sft["win_rate"], "gain_se": gain_se,
            "drop": best["win_rate"] - top["win_rate"], "drop_se": drop_se,
            "beats_sft": best["win_rate"] - sft["win_rate"] >= 2 * gain_se,
            "falls": best["win_rate"] - top["win_rate"] >= 2 * drop_se}


def in_se(x, se):
    """x in standard errors (NaN when the error is 0 or unknown)."""
    return x / se if se > 0 else math.nan


def verdict(flags, values=()):
    """All checks hold, some, or none; "not measured" when a statistic is missing (NaN)."""
    if any(math.isnan(v) for v in values):
        return "not measured"
    return "reproduced" if all(flags) else "partly" if any(flags) else "not reproduced"


def fmt_point(p, key="win_rate"):
    return f"{p[key]:.3f} (β {p['beta']:g}, {p['fraction']:.0%})"


def findings(points, sft, fits, model):
    """Each finding of the paper, what the main model's plain runs measured, and a verdict."""
    plain = [p for p in points if p["model"] == model and p["series"] == p["loss"]]
    losses = sorted({p["loss"] for p in plain})
    by_loss = {l: [p for p in plain if p["loss"] == l] for l in losses}
    final = {l: {p["beta"]: p for p in by_loss[l] if p["fraction"] == 1.0} for l in losses}
    rows = []

    humps = {l: hump(by_loss[l], sft) for l in losses}
    rows.append(("The hump (Fig. 1, §3.1): win rate rises with KL, then falls",
                 "; ".join(f"{l}: best {fmt_point(h['best'])} vs SFT {sft['win_rate']:.3f}, highest KL "
                           f"{h['highest_kl']['kl']:.1f} → {h['highest_kl']['win_rate']:.3f} "
                           f"(drop {in_se(h['drop'], h['drop_se']):.1f} SE)" for l, h in humps.items()),
                 verdict([h["beats_sft"] and h["falls"] for h in humps.values()])))

    early = {}
    for l in losses:  # the widest KL budget: the smallest β
        run = sorted((p for p in by_loss[l] if p["beta"] == min(final[l])), key=lambda p: p["fraction"])
        peak = max(run, key=lambda p: p["win_rate"])
        early[l] = (peak, run[-1], peak["fraction"] < 1 and peak["win_rate"] - run[-1]["win_rate"]
                    >= 2 * math.hypot(peak["win_rate_se"], run[-1]["win_rate_se"]))
    rows.append(("Wide-KL runs peak early in the epoch, then degrade as KL grows (Fig. 2; paper: after 25 %)",
                 "; ".join(f"{l} β {pk['beta']:g}: peak {pk['win_rate']:.3f} at {pk['fraction']:.0%} (KL "
                           f"{pk['kl']:.1f}) → {end['win_rate']:.3f} at 100 % (KL {end['kl']:.1f})"
                           for l, (pk, end, _) in early.items()),
                 verdict([ok for *_, ok in early.values()])))

    if "ipo" in final and "dpo" in final:
        shared = sorted(set(final["ipo"]) & set(final["dpo"]))
        lower = [final["ipo"][b]["kl"] < final["dpo"][b]["kl"] for b in shared]
        rows.append(("IPO reaches lower KL than DPO at equal β (§3.1)",
                     ", ".join(f"β {b:g}: IPO {final['ipo'][b]['kl']:.2f} vs DPO {final['dpo'][b]['kl']:.2f}"
                               for b in shared) or "no β in both grids",
                     verdict(lower) if shared else "not measured"))
        others = [l for l in ("dpo", "slic") if l in humps]
        rows.append(("IPO is less prone to over-optimization (§3.1)",
                     "; ".join(f"{l}: drop from best to highest-KL point {humps[l]['drop']:.3f} at KL "
                               f"{humps[l]['highest_kl']['kl']:.1f}" for l in ["ipo"] + others),
                     verdict([humps["ipo"]["drop"] < humps[l]["drop"] for l in others])))

    law = {l: fits.get(l, {}).get(model) for l in losses}
    law = {l: f for l, f in law.items() if f}
    rows.append(("R(d) = d(α − β log d) halves the RMSE of a quadratic in KL (§3.2)",
                 "; ".join(f"{l}: RMSE R(d) {f['rmse']:.3f}, quadratic in KL {f['rmse_quadratic_kl']:.3f} "
                           f"({f['rmse_quadratic_kl'] / f['rmse']:.1f}×)" for l, f in law.items()),
                 verdict([f["rmse_quadratic_kl"] >= 2 * f["rmse"] for f in law.values()]) if law else "not measured"))
    rows.append(("A quadratic in √KL fits about as well as R(d) (§3.2; here: RMSE within 30 %)",
                 "; ".join(f"{l}: RMSE R(d) {f['rmse']:.3f}, quadratic in √KL {f['rmse_quadratic_d']:.3f}"
                           for l, f in law.items()),
                 verdict([f["rmse_quadratic_d"] <= 1.3 * f["rmse"] for f in law.values()]) if law else "not measured"))

    rows.append(("Length exploitation: samples grow longer as KL grows (§3.3)",
                 "; ".join(f"{l}: {humps[l]['highest_kl']['length_words']:.2f} words at KL "
                           f"{humps[l]['highest_kl']['kl']:.1f} vs SFT {sft['length_words']:.2f}" for l in losses),
                 verdict([humps[l]["highest_kl"]["length_words"] > 1.2 * sft["length_words"] for l in losses])))

    r2 = {l: (final[l][max(final[l])]["length_r2"], final[l][min(final[l])]["length_r2"]) for l in losses}
    rows.append(("A smaller KL budget extrapolates more on length: higher R² of Eq. 6 (Fig. 3 right)",
                 "; ".join(f"{l}: R² {hi:.2f} at β {max(final[l]):g} vs {lo:.2f} at β {min(final[l]):g}"
                           for l, (hi, lo) in r2.items()),
                 verdict([hi > lo for hi, lo in r2.values()], [v for c in r2.values() for v in c])))

    corr = {l: (pearson([p["eval_accuracy"] for p in by_loss[l]], [p["win_rate"] for p in by_loss[l]]),
                pearson([p["eval_loss"] for p in by_loss[l]], [p["win_rate"] for p in by_loss[l]])) for l in losses}
    rows.append(("Held-out reward accuracy and DAA loss say little about win rate (Fig. 4, §3.4)",
                 "; ".join(f"{l}: r(accuracy, win) {a:.2f}, r(loss, win) {b:.2f}" for l, (a, b) in corr.items()),
                 verdict([abs(a) < 0.5 and abs(b) < 0.5 for a, b in corr.values()], [v for c in corr.values() for v in c])))

    fwd = {l: hump([dict(p, kl=p["forward_kl"]) for p in by_loss[l]], sft) for l in losses}
    rows.append(("The hump also against √(forward KL), −E[log-ratio of chosen] (Fig. 5, Eq. 7)",
                 "; ".join(f"{l}: best at forward KL {h['best']['kl']:.2f}, highest {h['highest_kl']['kl']:.2f} → "
                           f"{h['highest_kl']['win_rate']:.3f}" for l, h in fwd.items()),
                 verdict([h["falls"] for h in fwd.values()], [h["best"]["kl"] for h in fwd.values()])))

    ood = {l: (humps[l]["highest_kl"]["ood_token_rate"],
               pearson([p["ood_token_rate"] for p in by_loss[l]], [p["win_rate"] for p in by_loss[l]]))
           for l in losses}
    rows.append(("Mass moves off the data (App. E): the share of sampled tokens never seen in a training response "
                 "grows as the win rate falls",
                 f"SFT {sft['ood_token_rate']:.3f}; " + "; ".join(
                     f"{l}: {o:.3f} at the highest-KL point, r(OOD, win) {r:.2f}" for l, (o, r) in ood.items()),
                 verdict([o >= 0.05 and r < -0.5 for o, r in ood.values()])))

    # Among the final checkpoints whose proxy (labeller) reward rose above SFT's, the lowest gold reward.
    gp = {}
    for l in losses:
        up = [p for p in final[l].values() if p["proxy_reward"] > sft["proxy_reward"]]
        gp[l] = min(up, key=lambda p: p["gold_reward"]) if up else None
    rows.append(("Proxy up, gold down (§2.2, reward mis-specification): a final checkpoint whose proxy (labeller) "
                 "reward is above SFT's has a gold reward below SFT's",
                 f"SFT gold {sft['gold_reward']:.3f}, proxy {sft['proxy_reward']:.2f}; " + "; ".join(
                     f"{l}: no final checkpoint above SFT's proxy" if p is None else
                     f"{l} β {p['beta']:g}: gold {p['gold_reward']:.3f}, proxy {p['proxy_reward']:.2f}"
                     for l, p in gp.items()),
                 verdict([p is not None and p["gold_reward"] < sft["gold_reward"] for p in gp.values()])))
    return [{"finding": f, "measured": m, "verdict": v} for f, m, v in rows]


def increasing(values):
    return all(a < b for a, b in zip(values, values[1:]))


def scaling_findings(points, sft_models, fits, main):
    """Model size (§3.1, §3.3) across the sizes, smallest first, and the regularised arms at `main` (Fig. 3 left)."""
    rows = []
    plain = [p for p in points if p["series"] == p["loss"]]
    models = sorted({p["model"] for p in plain}, key=lambda m: next(p["params"] for p in plain if p["model"] == m))
    if len(models) > 1:
        losses = sorted({p["loss"] for p in plain})
        best = {(m, l): max((p for p in plain if (p["model"], p["loss"]) == (m, l)), key=lambda p: p["win_rate"])
                for m in models for l in losses}
        rows.append(("Larger models reach a higher peak win rate (§3.1)",
                     "; ".join(f"{l}: " + " / ".join(f"{m} {best[m, l]['win_rate']:.3f}" for m in models)
                               for l in losses),
                     verdict([increasing([best[m, l]["win_rate"] for m in models]) for l in losses])))
        final = {(m, l, p["beta"]): p["kl"] for p in plain if p["fraction"] == 1.0 for m, l in [(p["model"], p["loss"])]}
        shared = {l: sorted({b for (_, l2, b) in final if l2 == l and all((m, l, b) in final for m in models)})
                  for l in losses}
        rows.append(("Smaller models reach higher KL at equal β (§3.1: the 1B model's much higher KL)",
                     f"final KL, {' / '.join(models)}: " + "; ".join(
                         f"{l} β {b:g}: " + " / ".join(f"{final[m, l, b]:.2f}" for m in models)
                               for l in losses for b in shared[l][:3]),
                     verdict([increasing([final[m, l, b] for m in reversed(models)]) for l in losses for b in shared[l]])))
        rows.append(("Smaller models over-optimize sooner: their best checkpoint sits at lower KL (§3.1)",
                     "; ".join(f"{l}: " + " / ".join(f"{m} {best[m, l]['kl']:.2f}" for m in models) for l in losses),
                     verdict([increasing([best[m, l]["kl"] for m in models]) for l in losses])))
        # At equal KL: each size's R(d) fit at the largest √KL that every size reached (its plain runs).
        d = min(math.sqrt(max(p["kl"] for p in plain if p["model"] == m)) for m in models)
        law = {(m, l): fits[l][m] for m in models for l in losses if m in fits.get(l, {})}
        at_d = {k: float(predict("r_d", (f["y0"], f["rd_alpha"], f["rd_beta"]), d)) for k, f in law.items()}
        rows.append((f"Larger models lose less win rate at equal KL: the R(d) fits at √KL = {d:.2f}, the largest every "
                     "size reached (§3.1: the 6.9B model is less prone to over-optimization)",
                     "; ".join(f"{l}: " + " / ".join(f"{m} {at_d[m, l]:.3f}" for m in models) for l in losses
                               if all((m, l) in at_d for m in models)),
                     verdict([increasing([at_d[m, l] for m in models]) for l in losses
                              if all((m, l) in at_d for m in models)])))
        r2 = {m: float(np.nanmean([p["length_r2"] for p in plain if p["model"] == m])) for m in models}
        rows.append(("Weaker models extrapolate more on length: higher R² of Eq. 6 (§3.3, Fig. 3 right)",
                     "mean R² over all checkpoints: " + " / ".join(f"{m} {r2[m]:.2f}" for m in models),
                     verdict([increasing([r2[m] for m in reversed(models)])], list(r2.values()))))
    sft = sft_models[main]
    base = [p for p in points if p["model"] == main and p["series"] == "dpo"]
    for name in sorted({p["series"] for p in points if p["model"] == main and p["series"] != p["loss"]}):
        if not base:
            break
        h, h0 = hump([p for p in points if p["model"] == main and p["series"] == name], sft), hump(base, sft)
        claim = ("length-regularised DPO changes the frontier but still over-optimizes (Fig. 3 left, §3.3)"
                 if "+len" in name else "RPO's SFT term regularises DPO against over-optimization (RPO, not the paper)")
        top = h["highest_kl"]["kl"]
        # A fix is tested only up to the KL it reaches: plain DPO must over-optimize within that range too.
        within = [p for p in base if p["kl"] <= top]
        tested = bool(within) and hump(within, sft)["falls"]
        rows.append((f"{name} against dpo at {main}: {claim}",
                     f"{name}: best {fmt_point(h['best'])}, at highest KL {top:.2f} → "
                     f"{h['highest_kl']['win_rate']:.3f} (drop {in_se(h['drop'], h['drop_se']):.1f} SE); dpo: best "
                     f"{fmt_point(h0['best'])}, at highest KL {h0['highest_kl']['kl']:.1f} → "
                     f"{h0['highest_kl']['win_rate']:.3f} (drop {in_se(h0['drop'], h0['drop_se']):.1f} SE)",
                     verdict([h["falls"]]) if "+len" in name else
                     verdict([not h["falls"]]) if tested else
                     f"not measured: it stays within KL {top:.2f}, where DPO does not over-optimize either"))
    return [{"finding": f, "measured": m, "verdict": v} for f, m, v in rows]


# ---------------------------------------------------------------- summary.md

def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def pm(p, key, sd_key=None):
    return f"{p[key]:.2f}" + (f" ± {p[sd_key]:.2f}" if sd_key and p["n_seeds"] > 1 else "")


def markdown(summary, model):
    spec, pts = summary["task"], [p for p in summary["points"] if p["model"] == model]
    sft = summary["sft_models"][model]
    n_seeds = max(p["n_seeds"] for p in pts)
    out = [f"# The miniature study: {spec['labeller']} labeller, {n_seeds} seed(s), model {model}",
           "",
           f"SFT: win rate {sft['win_rate']:.3f} ± {sft['win_rate_se']:.3f}, {sft['length_words']:.2f} words, "
           f"OOD token rate {sft['ood_token_rate']:.4f}, gold {sft['gold_reward']:.3f}, proxy "
           f"{sft['proxy_reward']:.2f}. Win rates are means over seeds ± the standard error of "
           "scripts/tiny_summary.py's docstring; KL is mean ± sd over seeds.", "",
           "**Each run over the epoch (win rate and KL at 25 / 50 / 75 / 100 %)**", ""]
    rows = []
    for name in sorted({p["series"] for p in pts}):
        for beta in sorted({p["beta"] for p in pts if p["series"] == name}):
            run = sorted((p for p in pts if p["series"] == name and p["beta"] == beta), key=lambda p: p["fraction"])
            end = run[-1]
            rows.append([name, f"{beta:g}", " / ".join(f"{p['win_rate']:.2f}" for p in run),
                         " / ".join(f"{p['kl']:.2f}" for p in run), f"{end['win_rate_se']:.3f}", pm(end, "kl", "kl_sd"),
                         f"{end['ood_token_rate']:.3f}", f"{end['gold_reward']:.3f}", f"{end['proxy_reward']:.2f}",
                         f"{end['length_words']:.2f}"])
    out += [md_table(["series", "β", "win rate", "KL", "SE (100 %)", "final KL", "OOD (100 %)", "gold (100 %)",
                      "proxy (100 %)", "words (100 %)"], rows), "", "**β sets the KL budget (final checkpoints)**", ""]
    out += [md_table(["series", "final KL, β ascending", "monotone", "span", "largest log gap / log range"],
                     [[n, " / ".join(f"{k:.2f}" for k in c["final_kl"]), c["monotone"], f"{c['span']:.1f}×",
                       f"{c['max_gap_share']:.0%}"] for n, c in summary["beta_control"].items()
                      if n in {p["series"] for p in pts}]), "", "**The paper's findings in miniature**", ""]
    out += [md_table(["finding (paper)", "measured", "verdict"],
                     [[f["finding"], f["measured"], f["verdict"]] for f in summary["findings"]])]
    if summary["scaling_findings"]:
        sizes = sorted(summary["sft_models"].items(), key=lambda kv: kv[1]["params"])
        out += ["", "**Model size and the regularised arms**", "",
                md_table(["model", "parameters", "seeds", "SFT win rate", "SFT words"],
                         [[m, f"{s['params']:,.0f}", s["n_seeds"], f"{s['win_rate']:.3f} ± {s['win_rate_se']:.3f}",
                           f"{s['length_words']:.2f}"] for m, s in sizes]), "",
                md_table(["finding", "measured", "verdict"],
                         [[f["finding"], f["measured"], f["verdict"]] for f in summary["scaling_findings"]])]
    return "\n".join(out) + "\n"


def main(out):
    rows = read_results(out / "fit" / "results.csv")
    fits = json.loads((out / "fit" / "fits.json").read_text())["scaling_law"]["all"]
    spec = json.loads((out / "data" / "gold.json").read_text())
    sft_models = sft_points(rows)
    model = MAIN_MODEL if MAIN_MODEL in sft_models else next(iter(sft_models))
    runs = sorted((r for r in rows if not is_sft(r)),
                  key=lambda r: (r["model"], series(r), r["beta"], num(r, "seed"), r["fraction"]))
    points = mean_points(runs)
    sft = sft_models[model]
    summary = {"task": {k: spec.get(k) for k in ("labeller", "gold_scale", "length_bias")},
               "sft": {"win_rate": sft["win_rate"], "win_rate_se": sft["win_rate_se"]}, "sft_models": sft_models,
               "runs": runs, "points": points, "beta_control": beta_control([p for p in points if p["model"] == model]),
               "findings": findings(points, sft, fits, model),
               "scaling_findings": scaling_findings(points, sft_models, fits, model)}
    files.write_json(out / "summary.json", summary, indent=1)
    files.write_text(out / "summary.md", markdown(summary, model))
    print(markdown(summary, model))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_summary.py OUT_DIR")
    try:
        main(Path(sys.argv[1]))
    except (OSError, ValueError, KeyError, StopIteration) as e:
        sys.exit(f"error: cannot summarise {sys.argv[1]}: {type(e).__name__}: {e} (did every stage of tiny_study.sh finish?)")
