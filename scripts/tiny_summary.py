"""Summarise the miniature study (scripts/tiny_study.sh) into OUT/summary.json and OUT/summary.md.

Reads what fit.py wrote (fit/results.csv: one row per run and sampled checkpoint, with the run
directory each came from), every row's per-prompt samples and judgments, and the task's gold.json;
means the seeds into points; and hands them to findings.py, which measures each claim of the paper
with its confidence interval and verdict. summary.json's schema is docs/formats.md's.

    python scripts/tiny_summary.py OUT_DIR
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
import files  # noqa: E402
import findings  # noqa: E402
from data.tiny import task  # noqa: E402
from fit import arm, is_sft, read_results  # noqa: E402

MEANS = ("win_rate", "kl", "length_tokens", "length_words", "ood_token_rate", "gold_reward", "proxy_reward", "hits",
         "other_words", "length_r2", "length_r2_centred", "forward_kl", "eval_accuracy", "eval_loss")
MAIN_MODEL = "tiny-m"  # the default study's size (scripts/study.py); --scaling adds tiny-s and tiny-l


def key_of(row):
    """A point: model, series, β and fraction of the epoch (SFT: the start of every series)."""
    return ("sft", row["model"], 0.0, 0.0) if is_sft(row) else (arm(row), row["model"], row["beta"], row["fraction"])


def prompt_arrays(row):
    """The per-prompt statistics of one row's samples and judgments, in prompt-id order (findings.PROMPT_METRICS)."""
    run, ckpt = Path(row["run"]), row["ckpt"]
    samples = {s["id"]: s for s in files.read_jsonl(run / f"samples-{ckpt}.jsonl")}
    wins = {j["id"]: j["win"] for j in files.read_jsonl(run / f"judgments-{ckpt}.jsonl")}
    ids = sorted(samples)
    col = lambda f: np.array([f(samples[i]) for i in ids], float)
    out = {"win": np.array([wins[i] for i in ids], float), "z": col(lambda s: s["policy_logp"] - s["ref_logp"]),
           "x": col(lambda s: s["length_tokens"]), "length_words": col(lambda s: s["length_words"]),
           "tokens": col(lambda s: len(s["sample_tokens"]))}
    out.update({k: col(lambda s, k=k: s[k]) for k in ("ood_tokens", "gold_reward", "proxy_reward", "hits",
                                                       "other_words") if k in samples[ids[0]]})
    out.update(xx=out["x"] ** 2, zz=out["z"] ** 2, xz=out["x"] * out["z"])
    return out


def mean_points(rows, table):
    """One point per key: the seeds' means, n_seeds, kl_sd, and win_rate_se by findings.seed_se."""
    groups = {}
    for r in rows:
        groups.setdefault(key_of(r), []).append(r)
    points = []
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][3])):
        p = {"key": key, "series": key[0], "model": key[1], "beta": None if key[0] == "sft" else key[2],
             "fraction": key[3], "loss": rs[0]["loss"], "params": rs[0].get("params"),
             "length_alpha": rs[0].get("length_alpha"), "nll_alpha": rs[0].get("nll_alpha"), "n_seeds": len(rs),
             "seeds": sorted(r["seed"] for r in rs), "data_seeds": sorted({r.get("data_seed") for r in rs}),
             "kl_sd": float(np.std([r["kl"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0}
        p.update({k: float(np.mean([r.get(k, math.nan) for r in rs])) for k in MEANS})
        p["win_rate_se"] = findings.seed_se([table[r["seed"]][key]["win"] for r in rs])[1]
        points.append(p)
    return points


def sft_model_info(rows, spec):
    """Per size: the SFT learning rate, its held-out NLL per token and the excess over the generator's
    entropy (task.entropy_per_token), mean over seeds; the lr grid when the study chose among several."""
    out = {}
    for r in (r for r in rows if is_sft(r)):
        run = Path(r["run"]).resolve()
        ev = json.loads((run / "latest" / "eval.json").read_text()) if (run / "latest" / "eval.json").is_file() else {}
        choice = run.parent / "sft-choice.json"
        info = out.setdefault(r["model"], {"lr": [], "valid_nll": [], "grid": []})
        info["lr"].append(json.loads((run / "args.json").read_text())["lr"])
        info["valid_nll"].append(ev.get("eval/nll_per_token", math.nan))
        if choice.is_file():
            info["grid"].append(json.loads(choice.read_text()))
    floor = task.entropy_per_token(spec)
    return {m: {"lr": i["lr"][0] if len(set(i["lr"])) == 1 else i["lr"], "valid_nll": float(np.mean(i["valid_nll"])),
                "excess_nll": float(np.mean(i["valid_nll"])) - floor, "entropy_per_token": floor,
                "lr_grid": i["grid"]} for m, i in out.items()}


def beta_control(points, model):
    """Per series: do final KLs fall monotonically with β, over how wide a range, and without clusters
    (the largest gap between consecutive final KLs in log space, as a share of the log range)?"""
    out = {}
    for name in sorted({p["series"] for p in points if p["model"] == model} - {"sft"}):
        final = sorted((p for p in points if p["model"] == model and p["series"] == name and p["fraction"] == 1.0),
                       key=lambda p: p["beta"])
        kls = [p["kl"] for p in final]
        if len(kls) < 2 or min(kls) <= 0:
            continue
        logs = np.log(sorted(kls))
        out[name] = {"betas": [p["beta"] for p in final], "final_kl": kls, "span": max(kls) / min(kls),
                     "monotone": all(a > b for a, b in zip(kls, kls[1:])),
                     "max_gap_share": float(np.diff(logs).max() / (logs[-1] - logs[0]))}
    return out


def analyse(out):
    rows = read_results(out / "fit" / "results.csv")
    spec = task.read_spec(next(out.joinpath("data").glob("**/gold.json")))
    table, scalars = {}, {}
    for r in rows:
        table.setdefault(r["seed"], {})[key_of(r)] = prompt_arrays(r)
        scalars.setdefault(r["seed"], {})[key_of(r)] = {m: r.get(m, math.nan) for m in findings.SEED_METRICS}
    weights, counts = findings.replicates({s: len(next(iter(t.values()))["win"]) for s, t in table.items()})
    points = mean_points(rows, table)
    sfts = {p["model"]: p for p in points if p["series"] == "sft"}
    models = sorted(sfts, key=lambda m: sfts[m]["params"])
    model = MAIN_MODEL if MAIN_MODEL in sfts else models[0]
    S = {"points": [p for p in points if p["series"] != "sft"], "sft": sfts, "models": models, "model": model,
         "table": table, "labeller": spec["labeller"], "E": findings.estimates(table, scalars, weights, counts)}
    info = sft_model_info(rows, spec)
    for m, p in sfts.items():
        p.update(info.get(m, {}))
    summary = {"task": {k: spec.get(k) for k in ("variant", "labeller", "gold_scale", "length_bias")},
               "thresholds": findings.THRESHOLDS, "seeds": sorted(table), "model": model,
               "sft": {k: sfts[model][k] for k in ("win_rate", "win_rate_se")}, "sft_models": sfts,
               "runs": [r for r in rows if not is_sft(r)], "points": S["points"],
               "beta_control": beta_control(points, model), "findings": findings.paper_findings(S),
               "scaling_findings": findings.scaling_findings(S), "leaderboard": findings.leaderboard(S)}
    for p in points:
        del p["key"]
    return summary


# ---------------------------------------------------------------- summary.md

def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def f3(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def ci_text(f):
    return "" if f["ci"] is None else f"{f['ci'][0]:.3g} … {f['ci'][1]:.3g} ({f['ci_of']})"


def findings_table(rows):
    return md_table(["finding (paper)", "measured", f"{findings.LEVEL:.0%} interval of the deciding comparison",
                     "verdict"], [[f["finding"], f["measured"], ci_text(f), f["verdict"]] for f in rows])


def runs_table(points, model):
    rows = []
    for name in sorted({p["series"] for p in points if p["model"] == model}):
        for beta in sorted({p["beta"] for p in points if p["model"] == model and p["series"] == name}):
            run = sorted((p for p in points if p["model"] == model and p["series"] == name and p["beta"] == beta),
                         key=lambda p: p["fraction"])
            end = run[-1]
            rows.append([name, f"{beta:g}", " / ".join(f"{p['win_rate']:.2f}" for p in run),
                         " / ".join(f"{p['kl']:.2f}" for p in run), f"{end['win_rate_se']:.3f}",
                         f"{end['kl']:.2f}" + (f" ± {end['kl_sd']:.2f}" if end["n_seeds"] > 1 else ""),
                         f3(end["ood_token_rate"]), f3(end["gold_reward"]), f"{end['hits']:.2f}",
                         f"{end['other_words']:.2f}", f"{end['proxy_reward']:.2f}", f"{end['length_tokens']:.2f}",
                         f"{end['length_words']:.2f}"])
    return md_table(["series", "β", "win rate", "KL", "SE (100 %)", "final KL", "OOD", "gold", "hits",
                     "other words", "proxy", "tokens", "words"], rows)


def leaderboard_table(board):
    rows = [[r["series"], f"{r['peak_win_rate']:.3f} ± {r['peak_win_rate_se']:.3f}", f"{r['peak_kl']:.2f}",
             f"{r['max_kl']:.2f}", f"{r['drop_se']:.1f}",
             " / ".join(f3(r["win_at_sqrt_kl"][d]) for d in r["win_at_sqrt_kl"]), r["hump"],
             " / ".join(str(v) for v in r.get("vs_dpo", {}).values()) or "—"] for r in board["rows"]]
    marks = " / ".join(board["rows"][0]["win_at_sqrt_kl"]) if board["rows"] else ""
    return md_table(["series", "peak win rate", "peak KL", "max KL", "drop (SE)", f"win at √KL {marks}",
                     f"hump (DPO collapses at KL {board['collapse_kl']:.1f})", f"vs DPO at √KL {marks}"], rows)


def markdown(s):
    model, sft = s["model"], s["sft_models"][s["model"]]
    out = [f"# The miniature study: {s['task']['variant']} task, {s['task']['labeller']} labeller, "
           f"{len(s['seeds'])} seed(s), model {model}", "",
           f"SFT: win rate {sft['win_rate']:.3f} ± {sft['win_rate_se']:.3f}, {sft['length_tokens']:.2f} tokens "
           f"({sft['length_words']:.2f} words), OOD token rate {sft['ood_token_rate']:.4f}, gold {sft['gold_reward']:.3f}"
           f", proxy {sft['proxy_reward']:.2f}. Means over seeds ± standard errors (findings.py's docstring); "
           f"intervals at {findings.LEVEL:.0%} from {findings.N_BOOT} bootstrap replicates over seeds and prompts.",
           "", "**Each run over the epoch (win rate and KL at each checkpoint; the rest at the last)**", "",
           runs_table(s["points"], model), "", "**β sets the KL budget (final checkpoints)**", "",
           md_table(["series", "final KL, β ascending", "monotone", "span", "largest log gap / log range"],
                    [[n, " / ".join(f"{k:.2f}" for k in c["final_kl"]), c["monotone"], f"{c['span']:.1f}×",
                      f"{c['max_gap_share']:.0%}"] for n, c in s["beta_control"].items()]),
           "", "**The paper's findings in miniature**", "", findings_table(s["findings"])]
    if len(s["sft_models"]) > 1 or s["scaling_findings"]:
        sizes = sorted(s["sft_models"].items(), key=lambda kv: kv[1]["params"])
        out += ["", "**Model size**", "",
                md_table(["model", "parameters", "seeds", "SFT win rate", "SFT lr", "held-out NLL / token",
                          "excess over the task's entropy"],
                         [[m, f"{v['params']:,.0f}", v["n_seeds"], f"{v['win_rate']:.3f} ± {v['win_rate_se']:.3f}",
                           v.get("lr"), f3(v.get("valid_nll")), f3(v.get("excess_nll"))] for m, v in sizes]),
                "", findings_table(s["scaling_findings"])]
    if len(s["leaderboard"]["rows"]) > 3 or any("+" in r["series"] for r in s["leaderboard"]["rows"]):
        out += ["", f"**The over-optimization bench at {model}**", "", leaderboard_table(s["leaderboard"])]
    return "\n".join(out) + "\n"


def main(out):
    summary = analyse(out)
    files.write_json(out / "summary.json", summary, indent=1)
    text = markdown(summary)
    files.write_text(out / "summary.md", text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_summary.py OUT_DIR")
    try:
        main(Path(sys.argv[1]))
    except (OSError, ValueError, KeyError, StopIteration) as e:
        sys.exit(f"error: cannot summarise {sys.argv[1]}: {type(e).__name__}: {e} (did every stage of "
                 "tiny_study.sh finish?)")
