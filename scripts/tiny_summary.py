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
