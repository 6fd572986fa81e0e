"""A synthetic study for fit.py: the README's figures come from this script.

Nothing here is measured. Win rates are drawn from the law itself,
y0 + d(α − β log d) (Eq. 5), with the binomial noise of 256 judged prompts,
for 3 model sizes × 3 losses × 5 β × 4 checkpoints per epoch. KL grows over
the epoch and falls with β; the implicit reward of each sample is γ·length
plus noise (Eq. 6, through the origin), so length explains more of it as KL
grows and less at larger sizes; eval accuracy and loss follow KL, not the
win rate (Fig. 4). It shows what fit.py draws and that the fit recovers the
law the points came from:

    python scripts/synthetic_fit_example.py                 # writes docs/figures/
    python fit.py docs/figures/results.csv --out /tmp/fit   # the same, from the file
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fit  # noqa: E402

# model: (SFT win rate y0, peak location d*, peak gain h); R(d*) = h needs β = h/d*, α = β(1 + log d*)
MODELS = {"pythia-1b": (0.30, 5.0, 0.25), "pythia-2.8b": (0.36, 6.0, 0.32), "pythia-6.9b": (0.42, 7.0, 0.36)}
# loss: (KL at the end of the epoch for β = 1, scale of the peak location, base eval loss)
LOSSES = {"dpo": (4.0, 1.0, 0.69), "ipo": (2.0, 0.8, 1.0), "slic": (4.5, 1.0, 1.0)}
BETAS = (0.01, 0.05, 0.1, 0.5, 1.0)
FRACTIONS = (0.25, 0.5, 0.75, 1.0)

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="docs/figures", help="directory for results.csv, fits.json and the figures")
p.add_argument("--prompts", type=int, default=256, help="judged prompts (and samples) per checkpoint")
p.add_argument("--seed", type=int, default=0, help="random seed")
p.add_argument("--dpi", type=int, default=80, help="resolution of the PNG figures")
args = p.parse_args()
rng = np.random.default_rng(args.seed)
n = args.prompts


def judged(win_rate):
    """Observed win rate and its standard error over n prompts."""
    w = rng.binomial(n, min(max(win_rate, 0.02), 0.98)) / n
    return w, math.sqrt(max(w * (1 - w), 1 / n) / n)


truth, rows = {}, []
for i, (model, (y0, peak, height)) in enumerate(MODELS.items()):
    w, se = judged(y0)
    rows.append(fit.to_row({"model": model, "loss": "sft", "beta": None, "fraction": 0, "win_rate": w,
                          "win_rate_se": se, "kl": 0, "forward_kl": 0, "length": 25}, "sft"))
    for loss, (kl_end, peak_scale, base_loss) in LOSSES.items():
        d_star = peak * peak_scale
        beta_law = height / d_star
        alpha = beta_law * (1 + math.log(d_star))
        truth[(loss, model)] = (alpha, beta_law)
        for beta in BETAS:
            for fraction in FRACTIONS:
                kl = kl_end * beta ** -0.78 * fraction ** 0.8 * math.exp(rng.normal(0, 0.05))
                d = math.sqrt(kl)
                w, se = judged(y0 + d * (alpha - beta_law * math.log(d)))
                # Eq. 6: each sample's log π/π_ref = γ·length + noise, γ = KL / mean length (so the mean
                # log-ratio is the KL); the noise is larger for larger models, whose R² is lower (§3.3)
                mean_length = 25 * (1 + 0.04 * kl)
                lengths = rng.normal(mean_length, 8, n)
                logratios = kl / mean_length * lengths + rng.normal(0, 2 * (1 + 0.5 * i), n)
                gamma, r2 = fit.length_regression(lengths, logratios)
                accuracy = 0.5 + 0.18 * (1 - math.exp(-kl / 10)) + rng.normal(0, 0.01)
                rows.append(fit.to_row({
                    "model": model, "loss": loss, "beta": beta, "fraction": fraction, "win_rate": w,
                    "win_rate_se": se, "kl": kl, "forward_kl": 0.6 * kl * math.exp(rng.normal(0, 0.1)),
                    "eval_accuracy": accuracy, "eval_loss": base_loss - 0.8 * (accuracy - 0.5) + rng.normal(0, 0.01),
                    "length": lengths.mean(), "length_gamma": gamma, "length_r2": r2}, f"{model} {loss} {beta}"))

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fit.write_results(out / "results.csv", rows)
fit.main([str(out / "results.csv"), "--out", str(out), "--dpi", str(args.dpi)])

print("\nEq. 5 recovered from all checkpoints (true → fitted):")
fits = fit.json.loads((out / "fits.json").read_text())["scaling_law"]["all"]
for (loss, model), (alpha, beta_law) in truth.items():
    f = fits[loss][model]
    print(f"{loss:<5} {model:<12} α {alpha:.4f} → {f['rd_alpha']:.4f}   β {beta_law:.4f} → {f['rd_beta']:.4f}")
