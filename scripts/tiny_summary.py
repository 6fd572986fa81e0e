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
from fit import FRONTIER, arm, is_sft, read_results  # noqa: E402

MEANS = ("win_rate", "kl", "length_tokens", "length_words", "ood_token_rate", "gold_reward", "proxy_reward", "hits",
         "other_words", "length_r2", "length_r2_centred", "forward_kl", "eval_accuracy", "eval_loss")
MAIN_MODEL = "tiny-m"  # the default study's size (scripts/study.py); --scaling adds tiny-s and tiny-l


def key_of(row):
    """A point: series, model, β (best-of-n: n) and fraction of the epoch (SFT: the start of every series;
    best-of-n and the tilted optimum: 1, they have no checkpoints)."""
    if row["loss"] in FRONTIER:
        return arm(row), row["model"], row["n"] if row["loss"] == "bon" else row["beta"], 1.0
    return ("sft", row["model"], 0.0, 0.0) if is_sft(row) else (arm(row), row["model"], row["beta"], row["fraction"])


def frontier_arrays(out, row):
    """bon.py's per-prompt estimates of one best-of-n or tilted point (its per_prompt.jsonl), in prompt-id
    order; the per-prompt KL stands where a checkpoint has its log-ratios."""
    where = out / row["model"] / f"s{row['seed']:g}" / "bon" / "per_prompt.jsonl"
    x = "n" if row["loss"] == "bon" else "beta"
    p = next(p for p in files.read_jsonl(where) if p["loss"] == row["loss"] and p["reward"] == row["reward"]
             and p[x] == row[x])
    order = np.argsort(p["id"])
    arrays = {k: np.array(p[k], float)[order] for k in ("win", "gold_reward", "proxy_reward", "hits",
                                                         "other_words", "length_words", "ood_tokens", "tokens")}
    arrays.update(z=np.array(p["kl"], float)[order], x=arrays["tokens"])
    return dict(arrays, xx=arrays["x"] ** 2, zz=arrays["z"] ** 2, xz=arrays["x"] * arrays["z"])


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
             **({"beta": None, "n": key[2]} if rs[0]["loss"] == "bon" else {}),
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


def beta_control(points):
    """Per model and series: do final KLs fall monotonically with β, over how wide a range, and without
    clusters (the largest gap between consecutive final KLs in log space, as a share of the log range)?
    The rule that chose the DAA regime (docs/study.md), applied to every size."""
    out = {}
    for model, name in sorted({(p["model"], p["series"]) for p in points if p["loss"] not in FRONTIER}):
        final = sorted((p for p in points if p["model"] == model and p["series"] == name and p["fraction"] == 1.0),
                       key=lambda p: p["beta"])
        kls = [p["kl"] for p in final]
        if len(kls) < 2 or min(kls) <= 0:
            continue
        logs = np.log(sorted(kls))
        out.setdefault(model, {})[name] = {
            "betas": [p["beta"] for p in final], "final_kl": kls, "span": max(kls) / min(kls),
            "monotone": all(a > b for a, b in zip(kls, kls[1:])),
            "max_gap_share": float(np.diff(logs).max() / (logs[-1] - logs[0]))}
    return out


def reward_model(out):
    """The reward models' held-out accuracy and the labeller's own on the same pairs (rm.py's eval.json)."""
    evals = [json.loads(p.read_text()) for p in sorted(out.glob("*/s*/rm/latest/eval.json"))]
    keys = {"accuracy": "eval/accuracy", "labeller_accuracy": "eval/labeller_accuracy",
            "ceiling_accuracy": "eval/ceiling_accuracy"}
    return {k: float(np.mean([e.get(v, math.nan) for e in evals])) for k, v in keys.items()} if evals else None


def analyse(out):
    rows = read_results(out / "fit" / "results.csv")
    spec = task.read_spec(next(out.joinpath("data").glob("**/gold.json")))
    table, scalars = {}, {}
    for r in rows:
        arrays = frontier_arrays(out, r) if r["loss"] in FRONTIER else prompt_arrays(r)
        table.setdefault(r["seed"], {})[key_of(r)] = arrays
        scalars.setdefault(r["seed"], {})[key_of(r)] = {m: r.get(m, math.nan) for m in findings.SEED_METRICS}
    weights, counts = findings.replicates({s: len(next(iter(t.values()))["win"]) for s, t in table.items()})
    points = mean_points(rows, table)
    sfts = {p["model"]: p for p in points if p["series"] == "sft"}
    models = sorted(sfts, key=lambda m: sfts[m]["params"])
    model = MAIN_MODEL if MAIN_MODEL in sfts else models[0]
    S = {"points": [p for p in points if p["series"] != "sft"], "sft": sfts, "models": models, "model": model,
         "table": table, "labeller": spec["labeller"], "E": findings.estimates(table, scalars, weights, counts),
         "on_board": lambda name: name.split("-")[0] not in FRONTIER and "+insupport" not in name}
    info = sft_model_info(rows, spec)
    for m, p in sfts.items():
        p.update(info.get(m, {}))
    summary = {"task": {k: spec.get(k) for k in ("variant", "labeller", "gold_scale", "length_bias")},
               "thresholds": findings.THRESHOLDS, "seeds": sorted(table), "model": model,
               "sft": {k: sfts[model][k] for k in ("win_rate", "win_rate_se")}, "sft_models": sfts,
               "runs": [r for r in rows if not is_sft(r)], "points": S["points"],
               "beta_control": beta_control(S["points"]), "findings": findings.paper_findings(S),
               "scaling_findings": findings.scaling_findings(S), "leaderboard": findings.leaderboard(S),
               "frontier_findings": findings.frontier_findings(S), "reward_model": reward_model(out)}
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
    for name in sorted({p["series"] for p in points if p["model"] == model and p["loss"] not in FRONTIER}):
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


def frontier_table(s):
    """Best-of-n (by n) and the tilted optimum (by β), with the reward model's held-out accuracy."""
    rows = []
    for name in sorted({p["series"] for p in s["points"] if p["loss"] in FRONTIER}):
        pts = sorted((p for p in s["points"] if p["series"] == name), key=lambda p: p["kl"])
        x = "n" if name.startswith("bon") else "beta"
        rows.append([name, " / ".join(f"{p[x]:g}" for p in pts), " / ".join(f"{p['kl']:.2f}" for p in pts),
                     " / ".join(f"{p['win_rate']:.2f}" for p in pts), " / ".join(f"{p['gold_reward']:.2f}" for p in pts)])
    rm = s.get("reward_model") or {}
    note = (f"Reward model (rm.py): held-out accuracy {rm['accuracy']:.3f}, the labeller's own "
            f"{rm['labeller_accuracy']:.3f} (mean over seeds)." if rm else "")
    return md_table(["series", "n or β", "KL", "win rate", "gold"], rows) + ("\n\n" + note if note else "")


def leaderboard_table(board):
    rows = [[r["series"], f"{r['peak_win_rate']:.3f} ± {r['peak_win_rate_se']:.3f}", f"{r['peak_kl']:.2f}",
             f"{r['max_kl']:.2f}", f"{r['drop_se']:.1f}",
             " / ".join(f3(r["win_at_sqrt_kl"][d]) for d in r["win_at_sqrt_kl"]), r["hump"],
             " / ".join(v or "n/a" for v in r.get("vs_dpo", {}).values()) or "—"] for r in board["rows"]]
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
           md_table(["model", "series", "final KL, β ascending", "monotone", "span", "largest log gap / log range"],
                    [[m, n, " / ".join(f"{k:.2f}" for k in c["final_kl"]), c["monotone"], f"{c['span']:.1f}×",
                      f"{c['max_gap_share']:.0%}"] for m, by in s["beta_control"].items() for n, c in by.items()]),
           "", "**The paper's findings in miniature**", "", findings_table(s["findings"])]
    if len(s["sft_models"]) > 1 or s["scaling_findings"]:
        sizes = sorted(s["sft_models"].items(), key=lambda kv: kv[1]["params"])
        out += ["", "**Model size**", "",
                md_table(["model", "parameters", "seeds", "SFT win rate", "SFT lr", "held-out NLL / token",
                          "excess over the task's entropy"],
                         [[m, f"{v['params']:,.0f}", v["n_seeds"], f"{v['win_rate']:.3f} ± {v['win_rate_se']:.3f}",
                           v.get("lr"), f3(v.get("valid_nll")), f3(v.get("excess_nll"))] for m, v in sizes]),
                "", findings_table(s["scaling_findings"])]
    if s["frontier_findings"]:
        out += ["", f"**The RLHF frontier at {model}**", "", frontier_table(s), "", findings_table(s["frontier_findings"])]
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
