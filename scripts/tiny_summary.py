"""Summarise the miniature study (scripts/tiny_study.sh) into OUT_DIR/summary.json.

Reads what fit.py wrote (fit/results.csv, fit/fits.json) and checks, per loss,
the two signs of over-optimization the paper reports (Sec. 3.1, Fig. 1): the
best DAA checkpoint beats SFT, and the highest-KL checkpoint falls below the
best by at least two standard errors of their difference.

    python scripts/tiny_summary.py OUT_DIR
"""
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from fit import is_sft, read_results  # noqa: E402


def check(points, sft):
    best = max(points, key=lambda p: p["win_rate"])
    highest_kl = max(points, key=lambda p: p["kl"])
    drop_se = math.hypot(best["win_rate_se"], highest_kl["win_rate_se"])
    return {"best": best, "highest_kl": highest_kl,
            "best_beats_sft": best["win_rate"] > sft["win_rate"],
            "highest_kl_below_best_by_2se": best["win_rate"] - highest_kl["win_rate"] >= 2 * drop_se}


def main(out):
    rows = read_results(out / "fit" / "results.csv")
    fits = json.loads((out / "fit" / "fits.json").read_text())
    sft_row = next(r for r in rows if is_sft(r))
    sft = {"win_rate": sft_row["win_rate"], "win_rate_se": sft_row["win_rate_se"]}
    keys = ("loss", "beta", "fraction", "win_rate", "win_rate_se", "kl", "length")
    points = sorted(({k: r[k] for k in keys} for r in rows if not is_sft(r)),
                    key=lambda p: (p["loss"], p["beta"], p["fraction"]))
    summary = {"sft": sft, "points": points, "fits": {}, "checks": {}}
    for loss in sorted({p["loss"] for p in points}):
        by_model = fits["scaling_law"]["all"].get(loss, {})  # fit.py skips a loss with too few points
        fit = next(iter(by_model.values()), None)  # one model size in the miniature
        summary["fits"][loss] = fit and {k: fit[k] for k in ("alpha", "beta", "rmse", "rmse_quadratic_kl", "rmse_quadratic_d")}
        summary["checks"][loss] = check([p for p in points if p["loss"] == loss], sft)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")

    print(f"SFT win rate {sft['win_rate']:.3f} ± {sft['win_rate_se']:.3f}")
    print(f"{'loss':<5} {'best (β, frac): win':<26} {'highest KL (β, frac): win, KL':<36} {'beats SFT':>9} {'drop ≥ 2se':>10}"
          f" {'rmse R(d)':>9} {'rmse quad KL':>12}")
    for loss, c in summary["checks"].items():
        b, h = c["best"], c["highest_kl"]
        f = summary["fits"][loss] or {"rmse": math.nan, "rmse_quadratic_kl": math.nan}
        print(f"{loss:<5} ({b['beta']:g}, {b['fraction']:g}): {b['win_rate']:.3f}{'':<9} "
              f"({h['beta']:g}, {h['fraction']:g}): {h['win_rate']:.3f}, {h['kl']:.1f}{'':<12} "
              f"{str(c['best_beats_sft']):>9} {str(c['highest_kl_below_best_by_2se']):>10} "
              f"{f['rmse']:>9.3f} {f['rmse_quadratic_kl']:>12.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_summary.py OUT_DIR")
    try:
        main(Path(sys.argv[1]))
    except (OSError, ValueError, KeyError, StopIteration) as e:
        sys.exit(f"error: cannot summarise {sys.argv[1]}: {type(e).__name__}: {e} (did every stage of tiny_study.sh finish?)")
