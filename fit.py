"""Scaling-law fits, regressions and the paper's figures (Rafailov et al., 2024, §3).

    python fit.py out/dpo-b0.1 out/ipo-b0.1 ... --out figures/   # run directories
    python fit.py results.csv --out figures/                     # or a results file

Writes fig1..fig5 PNGs (and fig6 when the frontier is in), fits.json and
results.csv (the rows it read, in the results-file format) to --out, and prints
the RMSE table of the three fits.

A results file (CSV or JSONL) has one row per (model, loss, beta, fraction of
the epoch): `model, loss, beta, fraction, win_rate, kl` are required;
`win_rate_se, forward_kl, eval_accuracy, eval_loss, length_tokens, length_gamma,
length_r2, length_gamma_centred, length_r2_centred, seed, params, length_alpha, nll_alpha`
are optional, as are the text columns `run, ckpt` (the run directory and checkpoint a row was
read from) (an empty cell
or null is missing), and any other numeric column is carried through. A row
whose loss is "sft" or whose fraction is 0 is the SFT policy of its model:
d = 0, where every loss's curve starts.

The frontier (Gao et al. 2022's Fig. 1 beside the paper's): bon.py's results
file has rows of loss "bon" (by `reward` and `n`) and "tilted" (by `reward` and
`beta`) and no fraction; fits.json["frontier"] fits them with R(d) and Gao et
al.'s best-of-n form y0 + d(α − β·d), and fig6 draws them beside DPO's
checkpoints, online (daa.py --online) and sampled in-support (sample.py
--in-support).

A series (an "arm") is a loss, with its regularisers when they are on:
daa.py --length-alpha 0.01 gives "dpo+len0.01", --nll-alpha 1 "dpo+nll1"
(RPO). Fits and figure panels are per arm and model size; seeds of one arm
pool into one fit.

The law, Eq. 5 (Gao et al. 2022): R(d) = d(α − β log d), d = √KL(π‖π_ref).
Gao et al.'s R is the gold-reward gain over the initial policy, so R(0) = 0,
while the paper plots the win rate itself. We therefore fit the win rate as
y0 + R(d), where y0 is the SFT win rate: the measured one when the inputs hold
an SFT row for that model (then only α and β are fitted), a fitted intercept
otherwise. The paper's baselines pass through the same y0:
    quadratic in KL:  y0 + a·KL + b·KL²        quadratic in d:  y0 + a·d + b·d²
All three are linear in their coefficients and solved by least squares,
unweighted, one fit per (arm, model size).

Eq. 6 regresses each checkpoint's log π(y|x)/π_ref(y|x) on the sample length
|y| in tokens, both ways: through the origin, as the paper writes it, with the
uncentred R² that goes with it (1 − SSR/Σz², `length_r2`; Fig. 3), and with an
intercept and the centred R² (`length_r2_centred`). The uncentred R² tends to 1
whenever the log-ratios are large next to their spread (at high KL), whatever
the length does, so only the centred one compares across KL budgets.
"""
import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import matplotlib

import files

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REQUIRED = ("model", "loss", "beta", "fraction", "win_rate", "kl")
OPTIONAL = ("win_rate_se", "forward_kl", "eval_accuracy", "eval_loss", "length_tokens", "length_gamma", "length_r2",
            "length_gamma_centred", "length_r2_centred",
            "seed", "params", "length_alpha", "nll_alpha", "online", "online_round", "in_support", "reward", "n")
TEXT = ("model", "loss", "reward")
SOURCE = ("run", "ckpt")  # text: where a run directory's row came from (its per-prompt samples and judgments)
FRONTIER = ("bon", "tilted")  # bon.py's rows: best-of-n (by n) and the tilted optimum (by β), no checkpoint
NAN = float("nan")

# -----------------------------------------------------------------------------
# fits


def _xlogx(d):
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # d log d → 0 as d → 0


# The two shape functions of each model; both vanish at d = 0, so y(0) = y0.
SHAPES = {
    "r_d": lambda d: (d, -_xlogx(d)),  # Eq. 5: α·d − β·d·log d
    "quadratic_kl": lambda d: (d ** 2, d ** 4),  # a·KL + b·KL²
    "quadratic_d": lambda d: (d, d ** 2),  # a·d + b·d²
    "bon": lambda d: (d, -d ** 2),  # Gao et al.'s best-of-n form, d(α − β·d): quadratic_d with β = −b
}


def fit_curve(d, y, shape="r_d", y0=None):
    """Least squares y = y0 + a·f(d) + b·g(d) for the model `shape`; returns (y0, a, b).

    `y0` fixes the value at d = 0 (the measured SFT win rate); None fits it too.
    """
    d, y = np.asarray(d, dtype=float), np.asarray(y, dtype=float)
    if d.ndim != 1 or d.shape != y.shape:
        raise ValueError(f"d and y must be 1-D and of the same length, got shapes {d.shape} and {y.shape}")
    if len(d) < 3:
        raise ValueError(f"need at least 3 points to fit, got {len(d)}")
    if not (np.isfinite(d).all() and np.isfinite(y).all()):
        raise ValueError("d and y must be finite: drop the rows with NaN first")
    if (d < 0).any():
        raise ValueError(f"d = √KL must be ≥ 0, got {d.min():g}")
    columns = list(SHAPES[shape](d))
    if y0 is None:
        columns.insert(0, np.ones_like(d))
    A = np.stack(columns, axis=1)
    coef, _, rank, _ = np.linalg.lstsq(A, y - (0.0 if y0 is None else y0), rcond=None)
    if rank < A.shape[1]:
        raise ValueError(f"the {shape} fit is not identifiable: the points need more distinct values of d > 0")
    return tuple(float(c) for c in coef) if y0 is None else (float(y0), float(coef[0]), float(coef[1]))


def fit_scaling_law(d, y, y0=0.0):
    """Eq. 5: α, β of y − y0 = R(d) = d(α − β log d) by linear least squares.

    y0 = 0 is Gao et al.'s convention (y is already the gain over the initial
    policy); pass the SFT win rate to fit win rates. The peak is at
    d* = exp(α/β − 1), where R(d*) = β·d*.
    """
    _, alpha, beta = fit_curve(d, y, "r_d", y0)
    return alpha, beta


def predict(shape, coef, d):
    """y0 + a·f(d) + b·g(d) for coef = (y0, a, b) as fit_curve returns it."""
    d = np.asarray(d, dtype=float)
    f, g = SHAPES[shape](d)
    return coef[0] + coef[1] * f + coef[2] * g


def rmse(y, pred):
    """Root-mean-square residual, the paper's measure of fit."""
    return float(np.sqrt(np.mean((np.asarray(y) - np.asarray(pred)) ** 2)))


def length_regression(lengths, logratios, intercept=False):
    """Eq. 6: least squares log π(y|x)/π_ref(y|x) = γ·|y| over one checkpoint's samples.

    Returns (γ, R²). Eq. 6 has no intercept, so by default the line goes through
    the origin and R² is uncentred, 1 − SSR/Σz²: the share of the log-ratios'
    second moment that length alone explains. `intercept` fits γ·|y| + c with
    the centred R² (the share of their variance). Degenerate but legal inputs
    give NaN rather than an error: with an intercept, all lengths equal (every
    sample hit the length cap) gives (NaN, NaN); log-ratios all 0 (the SFT
    policy itself), or constant ones with an intercept, give (0, NaN).
    """
    x, z = np.asarray(lengths, dtype=float), np.asarray(logratios, dtype=float)
    if x.ndim != 1 or x.shape != z.shape:
        raise ValueError(f"lengths and log-ratios must be 1-D and of the same length, got {x.shape} and {z.shape}")
    if len(x) < 3:
        raise ValueError(f"need at least 3 samples for the length regression, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(z).all()):
        raise ValueError("lengths and log-ratios must be finite")
    xc, zc = (x - x.mean(), z - z.mean()) if intercept else (x, z)
    sxx, szz = float(xc @ xc), float(zc @ zc)
    if sxx == 0:
        return NAN, NAN
    gamma = float(xc @ zc) / sxx
    if szz == 0:
        return gamma, NAN
    return gamma, 1.0 - float(((zc - gamma * xc) ** 2).sum()) / szz


def pearson(x, y):
    """Pearson r over the finite pairs; NaN with fewer than 3 of them or no variance."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return NAN
    x, y = x[keep] - x[keep].mean(), y[keep] - y[keep].mean()
    if not (x @ x > 0 and y @ y > 0):
        return NAN
    return float(x @ y / math.sqrt((x @ x) * (y @ y)))


# -----------------------------------------------------------------------------
# inputs


def _number(value, where, key):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null")):
        return NAN
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key}={value!r} is not a number") from None


def to_row(raw, where):
    """A results row from a dict of raw values: text columns as str, the rest float (NaN when missing).

    `where` names the source (file:line) in error messages.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with keys {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED)})")
    row = {k: ("" if raw.get(k) is None else str(raw[k])) if k in TEXT else _number(raw.get(k), where, k)
           for k in REQUIRED + OPTIONAL}
    row.update({k: str(raw[k]) for k in SOURCE if raw.get(k) not in (None, "")})
    for k, v in raw.items():  # any other numeric statistic is carried through (text columns are not)
        if k not in row and k not in SOURCE and k is not None:
            try:
                row[k] = _number(v, where, k)
            except ValueError:
                pass
    if row["loss"] in FRONTIER:
        if not row["reward"] or not math.isfinite(row["n" if row["loss"] == "bon" else "beta"]):
            raise ValueError(f"{where}: a {row['loss']} row needs its picking reward and its "
                             f"{'n' if row['loss'] == 'bon' else 'beta'} (bon.py writes them)")
        return row
    if not math.isfinite(row["fraction"]):
        raise ValueError(f"{where}: fraction is empty; it is the fraction of the epoch (0 for SFT)")
    if not (is_sft(row) or math.isfinite(row["beta"])):
        raise ValueError(f"{where}: beta is empty; only SFT rows (loss sft or fraction 0) may leave it out")
    return row


def read_results(path):
    """Rows of a results file: .csv with a header, or .jsonl with one object per line."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [to_row(raw, f"{path}:{i}") for i, raw in enumerate(csv.DictReader(f), start=2)]
    return [to_row(raw, f"{path}:{i}") for i, raw in files.iter_jsonl(path)]


def _json(path):
    """The object in a JSON file, or {} when there is no such file."""
    if not Path(path).exists():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None


def n_params(config):
    """Parameter count of the GPT-NeoX that a config.json describes (model.py's layout: untied
    embed_in and embed_out, biases everywhere but embed_out), computed without building it."""
    V, D, I, L = (int(config[k]) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    per_layer = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * I + I) + (I * D + D)  # 2 norms, qkv, dense, MLP
    return 2 * V * D + L * per_layer + 2 * D


def arm(row):
    """The series a row belongs to: its loss, with the regularisers that are on (daa.py's flags), online
    DPO's rounds (+online4) and in-support sampling (+insupport); bon.py's rows by their picking reward
    (bon-proxy, bon-rm, tilted-proxy, tilted-rm)."""
    if row["loss"] in FRONTIER:
        return f"{row['loss']}-{row['reward']}"
    name = row["loss"]
    for key, tag in (("length_alpha", "len"), ("nll_alpha", "nll"), ("online", "online")):
        if row.get(key, 0) > 0:
            name += f"+{tag}{row[key]:g}"
    return name + ("+insupport" if row.get("in_support", 0) > 0 else "")


def _model_name(args):
    """sft.py's --model (its last path component: EleutherAI/pythia-1b -> pythia-1b); for daa.py,
    the --model of the SFT run that its --init points into."""
    if "model" in args:
        return Path(str(args["model"])).name
    init = Path(str(args.get("init", "")))
    for run in (init, init.parent):  # out/sft, or out/sft/ckpt-N and out/sft/latest
        if "model" in (sft_args := _json(run / "args.json")):
            return Path(str(sft_args["model"])).name
    return str(args.get("init", "model"))


def model_of(path):
    """The model name of a run directory, or of a checkpoint inside one (bon.py's policy)."""
    for run in (Path(path), Path(path).parent):
        if (run / "args.json").exists():
            return _model_name(_json(run / "args.json"))
    return Path(path).name


def read_run(run):
    """Rows, one per sampled checkpoint, of a run directory written by daa.py, sample.py and judge.py.

    The one place that knows the run-directory layout (docs/formats.md, "The run
    directory"): if file or key names change, adapt them here. A run without a loss
    (sft.py's) gives SFT rows: fraction 0, the start of every DAA curve. Every
    numeric statistic of samples-<ckpt>.summary.json rides along (the run's own
    seed, loss and length win over the sampler's). sample.py --in-support's
    samples-<ckpt>+in_support.jsonl give the same checkpoint's row with in_support 1;
    a daa.py --online run's rows carry `online` (its R) and `online_round` (<ckpt>/online.json).
    """
    run = Path(run)
    args = _json(run / "args.json")
    loss, model = str(args.get("loss", "sft")), _model_name(args)
    data_seed = _json(Path(str(args.get("data", ""))) / "gold.json").get("seed")  # the miniature's data seed
    rows = []
    for path in sorted(run.glob("samples-*.jsonl")):
        tag = path.name[len("samples-"):-len(".jsonl")]  # ckpt-<examples>, latest, ckpt-<examples>+in_support
        ckpt = tag.removesuffix("+in_support")  # the checkpoint directory
        state, ev = _json(run / ckpt / "trainer_state.json"), _json(run / ckpt / "eval.json")
        fraction = 0.0 if loss == "sft" else state.get("fraction")
        if fraction is None:
            raise ValueError(f"{run}: {path.name} has no checkpoint {ckpt}/trainer_state.json with the fraction of "
                             "the epoch")
        judgments = run / f"judgments-{tag}.jsonl"
        try:
            samples = files.read_jsonl(path)
            logratios = [s["policy_logp"] - s["ref_logp"] for s in samples]
            lengths = [s["length_tokens"] for s in samples]  # |y| of Eq. 6, in tokens
            wins = np.array([j["win"] for j in files.read_jsonl(judgments)] if judgments.exists() else [], dtype=float)
        except KeyError as e:
            raise ValueError(f"{run}/{tag}: a sample or judgment has no key {e}") from None
        (gamma, r2), (gamma_c, r2_c) = [length_regression(lengths, logratios, centred) if len(samples) >= 3
                                        else (NAN, NAN) for centred in (False, True)]
        summary, config = _json(run / f"samples-{tag}.summary.json"), _json(run / ckpt / "config.json")
        stats = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append(to_row({**stats,
            "model": model, "loss": loss, "beta": args.get("beta"), "fraction": fraction, "seed": args.get("seed"),
            "run": str(run), "ckpt": tag, "data_seed": data_seed,
            "params": n_params(config) if config else None,
            "length_alpha": args.get("length_alpha", 0.0), "nll_alpha": args.get("nll_alpha", 0.0),
            "online": args.get("online", 0), "online_round": _json(run / ckpt / "online.json").get("round"),
            "in_support": float(tag != ckpt),
            "win_rate": wins.mean() if len(wins) else None,  # as judge.py's summary
            "win_rate_se": wins.std(ddof=1) / math.sqrt(len(wins)) if len(wins) > 1 else None,
            "kl": summary.get("kl", np.mean(logratios) if samples else None),
            "forward_kl": -ev["eval/logratio_chosen"] if "eval/logratio_chosen" in ev else None,  # Eq. 7
            "eval_accuracy": ev.get("eval/accuracy"), "eval_loss": ev.get("eval/loss"),
            "length_tokens": np.mean(lengths) if samples else None, "length_gamma": gamma, "length_r2": r2,
            "length_gamma_centred": gamma_c, "length_r2_centred": r2_c,
        }, f"{run}/{path.name}"))
    return sorted(rows, key=lambda r: (r["fraction"], r["in_support"]))


def load(inputs):
    rows = []
    for name in inputs:
        p = Path(name)
        if p.is_dir() and (p / "args.json").exists():
            rows += read_run(p)
        elif p.is_file() and p.suffix in (".csv", ".jsonl"):
            rows += read_results(p)
        else:
            raise ValueError(f"{name}: neither a run directory (with args.json) nor a .csv/.jsonl results file")
    if not rows:
        raise ValueError(f"no rows in {' '.join(inputs)}: run sample.py and judge.py on the checkpoints first")
    return rows


def _cell(v):
    """A number as a CSV cell: empty when missing, whole numbers (a parameter count) in full."""
    return "" if math.isnan(v) else str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"


def write_results(path, rows):
    """The results file (CSV) of `rows`, written atomically."""
    path = Path(path)
    with files.atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        extra = sorted({k for r in rows for k in r} - set(REQUIRED + OPTIONAL + SOURCE))
        w = csv.DictWriter(f, fieldnames=REQUIRED + OPTIONAL + SOURCE + tuple(extra))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] if k in TEXT else r.get(k, "") if k in SOURCE else _cell(r.get(k, NAN))
                        for k in w.fieldnames})


# -----------------------------------------------------------------------------
# analysis


def is_sft(row):
    return row["loss"] == "sft" or row["fraction"] == 0


def sqrt_kl(kl):
    # A Monte-Carlo KL estimate can come out slightly negative near the SFT policy: read it as 0.
    return np.sqrt(np.maximum(np.asarray(kl, dtype=float), 0.0))


def model_key(name):
    """Sort model names by size when they carry one (pythia-410m < pythia-1b < pythia-2.8b)."""
    m = re.search(r"(\d+(?:\.\d+)?)([mb])\b", name.lower())
    return (float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9) if m else math.inf, name)


def model_order(rows):
    """Model names, smallest first: by parameter count where the rows carry one (tiny-s < tiny-m < tiny-l),
    else by the size in the name."""
    params = {}
    for r in rows:
        if math.isfinite(r.get("params", NAN)):
            params[r["model"]] = r["params"]
    return sorted({r["model"] for r in rows}, key=lambda m: (params.get(m, math.inf), model_key(m)))


def run_key(r):
    """One training run: model size, arm, β and seed."""
    return r["model"], arm(r), r["beta"], r.get("seed", NAN) if math.isfinite(r.get("seed", NAN)) else None


def final_rows(rows):
    """The last checkpoint of each run (model, arm, β, seed)."""
    last = {}
    for r in rows:
        last[run_key(r)] = max(last.get(run_key(r), -math.inf), r["fraction"])
    return [r for r in rows if r["fraction"] == last[run_key(r)]]


def sft_win_rates(rows):
    """y0 per model: the mean win rate of its SFT rows."""
    by_model = {}
    for r in rows:
        if is_sft(r) and not r.get("in_support", 0) > 0 and math.isfinite(r["win_rate"]):
            by_model.setdefault(r["model"], []).append(r["win_rate"])
    return {m: float(np.mean(v)) for m, v in by_model.items()}


def fit_all(rows, y0s, notes, x="kl", y="win_rate", shapes=("quadratic_kl", "quadratic_d")):
    """Per arm and model size (seeds pooled): R(d) and the other `shapes` fitted to `y` on d = √x, with RMSEs."""
    fits = {}
    rows = [r for r in rows if math.isfinite(r.get(y, NAN))]
    for loss, model in sorted({(arm(r), r["model"]) for r in rows}):
        pts = [r for r in rows if arm(r) == loss and r["model"] == model]
        d, y_ = sqrt_kl([r[x] for r in pts]), np.array([r[y] for r in pts])
        try:
            y0, alpha, beta = fit_curve(d, y_, "r_d", y0s.get(model))
            entry = {"n": len(pts), "y0": y0, "y0_measured": model in y0s, "rd_alpha": alpha, "rd_beta": beta,
                     "rmse": rmse(y_, predict("r_d", (y0, alpha, beta), d))}
            for shape in shapes:
                coef = fit_curve(d, y_, shape, y0s.get(model))
                entry[shape] = list(coef)
                entry[f"rmse_{shape}"] = rmse(y_, predict(shape, coef, d))
        except ValueError as e:
            notes.append(f"no fit for {loss} {model} ({y.replace('_', ' ')} on √{x}): {e}")
            continue
        fits.setdefault(loss, {})[model] = entry
    return fits


def pooled_rmse(fits):
    """RMSE per loss over all its points, pooling the fits of every model size."""
    table = {}
    for loss, by_model in fits.items():
        n = sum(f["n"] for f in by_model.values())
        table[loss] = {"n": n} | {
            key: math.sqrt(sum(f["n"] * f[f"rmse{sfx}"] ** 2 for f in by_model.values()) / n)
            for key, sfx in (("r_d", ""), ("quadratic_kl", "_quadratic_kl"), ("quadratic_d", "_quadratic_d"))}
    return table


def correlations(rows, key):
    """Fig. 4: Pearson r of `key` with the win rate, over all checkpoints of an arm and within each size."""
    out = {}
    for loss in sorted({arm(r) for r in rows}):
        pts = [r for r in rows if arm(r) == loss]
        out[loss] = {"overall": pearson([r[key] for r in pts], [r["win_rate"] for r in pts]), "by_model": {
            m: pearson([r[key] for r in pts if r["model"] == m], [r["win_rate"] for r in pts if r["model"] == m])
            for m in model_order(pts)}}
    return out


def rmse_table(rmse_by_subset):
    lines = ["RMSE of win-rate fits on d = √KL (paper: R(d) about halves quadratic in KL; quadratic in d is close)",
             f"{'checkpoints':<12}{'loss':<8}{'points':>7}{'R(d)':>9}{'quad KL':>9}{'quad d':>9}{'quadKL/R(d)':>13}"]
    for subset, table in rmse_by_subset.items():
        for loss, t in sorted(table.items()):
            ratio = t["quadratic_kl"] / t["r_d"] if t["r_d"] > 0 else math.inf
            lines.append(f"{subset:<12}{loss:<8}{t['n']:>7}{t['r_d']:>9.4f}{t['quadratic_kl']:>9.4f}"
                         f"{t['quadratic_d']:>9.4f}{ratio:>13.2f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# figures: one panel per loss, one colour per model size, error bars from the standard errors


def _title(name):
    loss, *regs = name.split("+")
    return "+".join([{"dpo": "DPO", "ipo": "IPO", "slic": "SLiC"}.get(loss, loss), *regs])


def _grid(nrows, losses, dpi):
    fig, axes = plt.subplots(nrows, len(losses), figsize=(3.6 * len(losses), 2.9 * nrows), squeeze=False, dpi=dpi,
                             layout="constrained")
    for ax, loss in zip(axes[0], losses):
        ax.set_title(_title(loss))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig, path):
    files.save_figure(fig, path)
    plt.close(fig)
    return path


def _legend(ax, **kw):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _errorbar(ax, x, rows, color, label=None, **kw):
    y = np.array([r["win_rate"] for r in rows])
    se = np.array([r["win_rate_se"] for r in rows])
    ax.errorbar(x, y, yerr=np.nan_to_num(se) if np.isfinite(se).any() else None, fmt="o", ms=4, capsize=2,
                color=color, label=label, **kw)


def _law_panel(ax, rows, fits, y0s, x, colors):
    """Win rate vs √x with the dotted R(d) fit of each model size and the SFT point (star) at d = 0."""
    for model, color in colors.items():
        pts = [r for r in rows if r["model"] == model]
        if not pts:
            continue
        d = sqrt_kl([r[x] for r in pts])
        _errorbar(ax, d, pts, color, label=model)
        if model in y0s:
            ax.plot([0], [y0s[model]], "*", color=color, ms=11, mec="k", mew=0.5)
        if model in fits:
            f = fits[model]
            dd = np.linspace(0, d.max() * 1.05, 200)
            ax.plot(dd, predict("r_d", (f["y0"], f["rd_alpha"], f["rd_beta"]), dd), ":", color=color, lw=1.5)


def fig1(data, final, fits, y0s, colors, losses, path, dpi):
    """Fig. 1: win rate vs √KL, final checkpoints (top) and all checkpoints (bottom), R(d) fits dotted."""
    fig, axes = _grid(2, losses, dpi)
    for row, (subset, pts) in enumerate((("final", final), ("all", data))):
        for ax, loss in zip(axes[row], losses):
            _law_panel(ax, [r for r in pts if arm(r) == loss], fits[subset].get(loss, {}), y0s, "kl", colors)
            ax.set_xlabel("√KL(π‖π_ref)")
        axes[row][0].set_ylabel(f"win rate ({subset} checkpoints)")
    _legend(axes[0][-1], fontsize=7, title="dotted: R(d), ★ SFT", title_fontsize=7)
    return _save(fig, path)


def fig2(data, y0s, colors, losses, path, dpi):
    """Fig. 2: win rate (top) and KL (bottom) over the epoch, one line per run (model size, β, seed), from SFT.

    The paper's finding: win rates often peak before the end of the epoch while KL keeps growing.
    """
    fig, axes = _grid(2, losses, dpi)
    cmaps = ["Blues", "Oranges", "Greens", "Reds", "Purples", "Greys"]
    for col, loss in enumerate(losses):
        pts = [r for r in data if arm(r) == loss]
        for m, model in enumerate(colors):
            betas = sorted({r["beta"] for r in pts if r["model"] == model})
            runs = sorted({run_key(r) for r in pts if r["model"] == model}, key=lambda k: (k[2], str(k[3])))
            for k in runs:
                run = sorted((r for r in pts if run_key(r) == k), key=lambda r: r["fraction"])
                b = betas.index(k[2])
                shade = plt.get_cmap(cmaps[m % len(cmaps)])(0.45 + 0.55 * b / max(1, len(betas) - 1))
                sft = [(0.0, y0s[model], 0.0)] if model in y0s else []  # every run starts at the SFT policy
                f, w, kl = zip(*(sft + [(r["fraction"], r["win_rate"], r["kl"]) for r in run]))
                axes[0][col].plot(f, w, "-o", ms=2, lw=1.2, color=shade, label=model if k == runs[-1] else None)
                axes[1][col].plot(f, kl, "-o", ms=2, lw=1.2, color=shade)
        axes[1][col].set_xlabel("fraction of the epoch")
    axes[0][0].set_ylabel("win rate")
    axes[1][0].set_ylabel("KL(π‖π_ref)")
    _legend(axes[0][-1], fontsize=7, title="light → dark: small → large β", title_fontsize=7)
    return _save(fig, path)


def fig3(data, colors, losses, path, dpi):
    """Fig. 3 (right): R² of the length regression (Eq. 6) vs √KL, per model size."""
    fig, axes = _grid(1, losses, dpi)
    for ax, loss in zip(axes[0], losses):
        for model, color in colors.items():
            pts = [r for r in data if arm(r) == loss and r["model"] == model and math.isfinite(r["length_r2"])]
            ax.plot(sqrt_kl([r["kl"] for r in pts]), [r["length_r2"] for r in pts], "o", ms=4, color=color,
                    label=model)
        ax.set_xlabel("√KL(π‖π_ref)")
    axes[0][0].set_ylabel("R² of log π/π_ref on length (Eq. 6)")
    fig.suptitle("Eq. 6 through the origin (the paper's form), uncentred R²", fontsize=8)
    _legend(axes[0][-1], fontsize=7)
    return _save(fig, path)


def fig4(data, corr, colors, losses, path, dpi):
    """Fig. 4: win rate vs held-out implicit-reward accuracy (top) and DAA loss (bottom), with Pearson r."""
    fig, axes = _grid(2, losses, dpi)
    for row, (key, label) in enumerate((("eval_accuracy", "implicit-reward accuracy (held out)"),
                                        ("eval_loss", "DAA loss (held out)"))):
        for ax, loss in zip(axes[row], losses):
            c = corr[key][loss]
            for model, color in colors.items():
                pts = [r for r in data if arm(r) == loss and r["model"] == model and math.isfinite(r[key])]
                if pts:
                    _errorbar(ax, [r[key] for r in pts], pts, color, label=f"{model} r={c['by_model'][model]:.2f}")
            ax.set_title(f"{_title(loss)}: r = {c['overall']:.2f}", fontsize=10)
            ax.set_xlabel(label)
            _legend(ax, fontsize=6)
        axes[row][0].set_ylabel("win rate")
    return _save(fig, path)


def fig5(data, fits, y0s, colors, losses, path, dpi):
    """Fig. 5: win rate vs √forward KL (Eq. 7), all checkpoints, R(d) fits dotted."""
    fig, axes = _grid(1, losses, dpi)
    for ax, loss in zip(axes[0], losses):
        _law_panel(ax, [r for r in data if arm(r) == loss], fits.get(loss, {}), y0s, "forward_kl", colors)
        ax.set_xlabel("√KL(π_ref‖π)  (forward, Eq. 7)")
    axes[0][0].set_ylabel("win rate")
    _legend(axes[0][-1], fontsize=7, title="dotted: R(d), ★ SFT", title_fontsize=7)
    return _save(fig, path)


def _frontier_label(name):
    """A legend label and plot style for fig6's series."""
    if name.split("-")[0] in FRONTIER:
        loss, reward = name.split("-", 1)
        label = {"bon": "best-of-n", "tilted": "π_ref·exp(r/β)"}[loss] + f" ({'RM' if reward == 'rm' else reward})"
        return label, {"color": "C3" if reward == "rm" else "C2", "fmt": "-o" if loss == "bon" else "--s", "ms": 3}
    tags = name.split("+")[1:]
    label = "DPO" + "".join(f", online ({t[len('online'):]} rounds)" if t.startswith("online") else ", in-support"
                            for t in tags)
    color = "C1" if any(t.startswith("online") for t in tags) else "C0"
    return label, {"color": color, "fmt": "o", "ms": 4, "mfc": "none" if "insupport" in tags else color}


def fig6(rows, fits, path, dpi):
    """Fig. 6: win rate and gold reward vs √KL. DPO's checkpoints (offline, online, sampled in-support)
    beside best-of-n and the tilted optimum π_ref·e^{r/β}, picked by the proxy and by the reward model:
    Gao et al. 2022's Fig. 1 beside the paper's. Dotted: Gao et al.'s best-of-n form d(α − βd)."""
    models = model_order(rows)
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False, dpi=dpi,
                             layout="constrained")
    N = max((r.get("samples", NAN) for r in rows if r["loss"] == "bon"), default=NAN)
    for ax_row, model in zip(axes, models):
        for ax, key in zip(ax_row, ("win_rate", "gold_reward")):
            for name in sorted({arm(r) for r in rows}):
                pts = sorted((r for r in rows if arm(r) == name and r["model"] == model and math.isfinite(r.get(key, NAN))),
                             key=lambda r: r["kl"])
                if not pts:
                    continue
                label, style = _frontier_label(name)
                d = sqrt_kl([r["kl"] for r in pts])
                se = [r["win_rate_se"] for r in pts] if key == "win_rate" else None
                ax.errorbar(d, [r[key] for r in pts], yerr=np.nan_to_num(se) if se else None, capsize=2, lw=1.2,
                            label=label, **style)
                f = fits.get(key, {}).get(name, {}).get(model)
                if f and name.startswith("bon"):
                    dd = np.linspace(0, d.max(), 100)
                    ax.plot(dd, predict("bon", f["bon"], dd), ":", color=style["color"], lw=1.2)
            if math.isfinite(N):  # the most KL best-of-N can reach, log N − (N − 1)/N
                ax.axvline(math.sqrt(math.log(N) - (N - 1) / N), color="grey", ls=":", lw=1)
            ax.set_xlabel("√KL(π‖π_ref)")
            ax.set_ylabel(f"{key.replace('_', ' ')} ({model})")
            ax.grid(alpha=0.3)
    _legend(axes[0][1], fontsize=7)
    fig.suptitle(f"grey: best-of-{N:g}'s largest KL, log N − (N − 1)/N" if math.isfinite(N) else "", fontsize=8)
    return _save(fig, path)


def frontier(judged, data, out, dpi, notes):
    """fits["frontier"] and fig6, when bon.py's rows or online DPO's are in: the frontier arms' R(d) and
    best-of-n fits of win rate and gold reward (intercept free: best-of-1 is the SFT policy, at d = 0),
    drawn beside DPO's checkpoints (plain DPO, online, in-support; not the other regularisers)."""
    rows = [r for r in judged if r["loss"] in FRONTIER]
    dpo = [r for r in data if arm(r).split("+")[0] == "dpo"
           and all(t.startswith(("online", "insupport")) for t in arm(r).split("+")[1:])]
    if not rows and not any(r.get("online", 0) > 0 for r in dpo):
        return {}, []  # no frontier in the inputs: nothing to note, the study without it is the usual one
    fits = {y: fit_all(rows, {}, notes, y=y, shapes=("bon",)) for y in ("win_rate", "gold_reward")}
    return fits, [fig6(rows + dpo, fits, out / "fig6_frontier.png", dpi)]


# -----------------------------------------------------------------------------


def analyze(rows, out, dpi=90):
    """Fits, correlations and figures for `rows`; writes into directory `out`. Returns (fits, notes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    judged = [r for r in rows if math.isfinite(r["win_rate"]) and math.isfinite(r["kl"])]
    if len(judged) < len(rows):
        notes.append(f"{len(rows) - len(judged)} row(s) without a win rate or KL left out of the win-rate fits")
    y0s = sft_win_rates(judged)
    data = [r for r in judged if not is_sft(r) and r["loss"] not in FRONTIER]  # the DAA checkpoints; SFT sets y0
    final = final_rows(data)
    fits = {"scaling_law": {"final": fit_all(final, y0s, notes), "all": fit_all(data, y0s, notes)}}
    fits["rmse"] = {subset: pooled_rmse(f) for subset, f in fits["scaling_law"].items()}
    fkl = [r for r in data if math.isfinite(r["forward_kl"])]
    fits["forward_kl"] = fit_all(fkl, y0s, notes, x="forward_kl") if fkl else {}
    fits["correlations"] = {k: correlations(data, k) for k in ("eval_accuracy", "eval_loss")}
    fits["sft_win_rate"] = y0s
    fits["convention"] = ("win_rate = y0 + R(d), R(d) = d*(rd_alpha - rd_beta*log d), d = sqrt(KL) (rd_beta is the "
                          "law's coefficient, not the DAA's beta); y0 = SFT win rate "
                          "(measured when y0_measured, else fitted); quadratic_kl = [y0, a, b] of y0 + a*KL + b*KL^2; "
                          "quadratic_d = [y0, a, b] of y0 + a*d + b*d^2")
    fits["length_regression"] = ("length_r2: Eq. 6 through the origin with the uncentred R² (the paper's form); "
                                 "length_r2_centred: with an intercept and the centred R²")

    losses = sorted({arm(r) for r in data})
    models = model_order([r for r in rows if not is_sft(r) and r["loss"] not in FRONTIER])
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    figures = []
    if data:
        figures.append(fig1(data, final, fits["scaling_law"], y0s, colors, losses,
                            out / "fig1_winrate_vs_sqrt_kl.png", dpi))
        figures.append(fig2(data, y0s, colors, losses, out / "fig2_training_dynamics.png", dpi))
    else:
        notes.append("no judged DAA checkpoints: no win-rate figures")
    # Fig. 3 needs no win rate: every sampled checkpoint counts.
    sampled = [r for r in rows if not is_sft(r) and math.isfinite(r["kl"]) and math.isfinite(r["length_r2"])]
    if sampled:
        figures.append(fig3(sampled, colors, sorted({arm(r) for r in sampled}), out / "fig3_length_r2.png", dpi))
    else:
        notes.append("fig3 skipped: no length_r2 in the inputs (it comes from the samples of a run directory)")
    if any(math.isfinite(r["eval_accuracy"]) or math.isfinite(r["eval_loss"]) for r in data):
        figures.append(fig4(data, fits["correlations"], colors, losses, out / "fig4_eval_metrics.png", dpi))
    else:
        notes.append("fig4 skipped: no eval_accuracy or eval_loss with a win rate in the inputs")
    if fkl:
        figures.append(fig5(fkl, fits["forward_kl"], y0s, colors, losses, out / "fig5_forward_kl.png", dpi))
    else:
        notes.append("fig5 skipped: no forward_kl with a win rate in the inputs")
    fits["frontier"], fig = frontier(judged, data, out, dpi, notes)
    fits["figures"] = [p.name for p in figures + fig]

    write_results(out / "results.csv", rows)
    files.write_json(out / "fits.json", fits, indent=1)
    return fits, notes


def main(argv=None):
    p = argparse.ArgumentParser(description="Scaling-law fits (Eq. 5), length regression (Eq. 6), forward KL "
                                "(Eq. 7) and Figs. 1-5 of Rafailov et al. 2024 from run directories or results files.")
    p.add_argument("inputs", nargs="+", help="run directories (out/<run>/ with args.json) and/or results files "
                                             "(.csv or .jsonl, one row per model, loss, beta, fraction)")
    p.add_argument("--out", default="out/fit", help="directory for the figures, fits.json and results.csv")
    p.add_argument("--dpi", type=int, default=90, help="resolution of the PNG figures")
    args = p.parse_args(argv)
    fits, notes = analyze(load(args.inputs), args.out, args.dpi)
    for note in notes:
        print(f"note: {note}")
    print(rmse_table(fits["rmse"]))
    print(f"wrote {', '.join(fits['figures'] + ['fits.json', 'results.csv'])} to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
