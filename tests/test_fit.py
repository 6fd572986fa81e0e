"""fit.py: Eq. 5 fits and baselines, Eq. 6 length regression, readers, figures, degenerate inputs."""
import csv
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fit

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("fig1_winrate_vs_sqrt_kl.png", "fig2_training_dynamics.png", "fig3_length_r2.png",
           "fig4_eval_metrics.png", "fig5_forward_kl.png")
ALPHA, BETA = 0.1396, 0.05  # peak at d* = e^(α/β − 1) ≈ 6, R(d*) = β·d* ≈ 0.3


def law(d, y0=0.0):
    return y0 + d * (ALPHA - BETA * np.log(d))


# ---------------------------------------------------------------- Eq. 5 and the baselines


def test_fit_scaling_law_recovers_alpha_beta_within_2_percent():
    rng = np.random.default_rng(0)
    d = np.linspace(0.5, 12, 80)
    alpha, beta = fit.fit_scaling_law(d, law(d) + rng.normal(0, 0.005, d.size))
    assert alpha == pytest.approx(ALPHA, rel=0.02) and beta == pytest.approx(BETA, rel=0.02)
    # win rates: the gain over a measured SFT win rate y0
    alpha, beta = fit.fit_scaling_law(d, law(d, 0.3) + rng.normal(0, 0.005, d.size), y0=0.3)
    assert alpha == pytest.approx(ALPHA, rel=0.02) and beta == pytest.approx(BETA, rel=0.02)
    # no SFT point: y0 is fitted too
    y0, alpha, beta = fit.fit_curve(d, law(d, 0.3) + rng.normal(0, 0.002, d.size), "r_d", None)
    assert y0 == pytest.approx(0.3, abs=0.005)
    assert alpha == pytest.approx(ALPHA, rel=0.02) and beta == pytest.approx(BETA, rel=0.02)


def test_baselines_are_exact_on_their_own_curves():
    d = np.linspace(0.0, 10, 12)
    for shape, (a, b) in {"quadratic_kl": (0.02, -1e-4), "quadratic_d": (0.08, -0.006)}.items():
        f, g = fit.SHAPES[shape](d)
        y = 0.35 + a * f + b * g
        assert fit.fit_curve(d, y, shape, 0.35) == pytest.approx((0.35, a, b), rel=1e-6, abs=1e-12)
        assert fit.fit_curve(d, y, shape, None) == pytest.approx((0.35, a, b), rel=1e-6, abs=1e-9)
    kl = d ** 2  # quadratic in KL is a·KL + b·KL²
    assert fit.predict("quadratic_kl", (0.1, 0.2, 0.3), d) == pytest.approx(0.1 + 0.2 * kl + 0.3 * kl ** 2)


def _rmses(d, y, y0):
    return {s: fit.rmse(y, fit.predict(s, fit.fit_curve(d, y, s, y0), d)) for s in fit.SHAPES}


def test_rmse_comparison_on_points_from_the_law():
    rng = np.random.default_rng(1)
    d, sigma = np.sqrt(np.linspace(0.25, 144, 60)), 0.02
    r = _rmses(d, law(d, 0.3) + rng.normal(0, sigma, d.size), 0.3)
    assert 0.7 * sigma < r["r_d"] < 1.3 * sigma  # the true model fits to the noise level
    assert r["quadratic_kl"] > 2 * r["r_d"]  # the paper's finding: R(d) at least halves it
    assert r["r_d"] < r["quadratic_d"] < 2 * r["quadratic_kl"]


def test_rmse_comparison_on_points_from_a_quadratic_in_d():
    rng = np.random.default_rng(2)
    d, sigma = np.sqrt(np.linspace(0.25, 144, 60)), 0.02
    y = 0.3 + 0.08 * d - 0.006 * d ** 2 + rng.normal(0, sigma, d.size)
    r = _rmses(d, y, 0.3)
    assert 0.7 * sigma < r["quadratic_d"] < 1.3 * sigma
    assert r["quadratic_d"] < r["r_d"] < 2 * sigma  # R(d) is worse but close: both are concave humps
    assert r["quadratic_kl"] > r["r_d"]


@pytest.mark.parametrize("d, y, message", [
    ([1.0, 2.0], [0.5, 0.6], "at least 3 points"),
    ([1.0, 2.0, float("nan")], [0.5, 0.6, 0.7], "finite"),
    ([1.0, 2.0, 3.0], [0.5, float("inf"), 0.7], "finite"),
    ([1.0, -2.0, 3.0], [0.5, 0.6, 0.7], "≥ 0"),
    ([4.0, 4.0, 4.0], [0.5, 0.6, 0.7], "not identifiable"),
    ([0.0, 0.0, 3.0], [0.5, 0.6, 0.7], "not identifiable"),  # only one d > 0
    ([[1.0, 2.0, 3.0]], [[0.5, 0.6, 0.7]], "1-D"),
])
def test_fit_rejects_degenerate_points(d, y, message):
    with pytest.raises(ValueError, match=message):
        fit.fit_scaling_law(d, y)


def test_d_zero_is_the_sft_point():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) warning
        assert fit.predict("r_d", (0.3, ALPHA, BETA), [0.0]) == pytest.approx([0.3])
        d = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
        assert fit.fit_scaling_law(d, law(np.maximum(d, 1e-300))) == pytest.approx((ALPHA, BETA), rel=1e-9)
    # a slightly negative Monte-Carlo KL reads as d = 0
    assert fit.sqrt_kl([-0.01, 4.0]) == pytest.approx([0.0, 2.0])


# ---------------------------------------------------------------- Eq. 6 and Pearson r


def test_length_regression_through_the_origin():
    """Eq. 6 by default: z = γ|y|, no intercept, uncentred R² = 1 − SSR/Σz²."""
    lengths = np.arange(10.0, 60.0)
    gamma, r2 = fit.length_regression(lengths, 0.05 * lengths)
    assert gamma == pytest.approx(0.05) and r2 == pytest.approx(1.0)
    rng = np.random.default_rng(2)
    z = 0.05 * lengths + rng.normal(0, 0.2, lengths.size)
    gamma, r2 = fit.length_regression(lengths, z)
    assert gamma == pytest.approx((lengths @ z) / (lengths @ lengths))  # the normal equation without intercept
    assert r2 == pytest.approx(1 - ((z - gamma * lengths) ** 2).sum() / (z ** 2).sum())
    assert gamma == pytest.approx(np.linalg.lstsq(lengths[:, None], z, rcond=None)[0][0])


def test_length_regression_constant_offset():
    """z = c, no dependence on length: through the origin a line still 'explains' much of Σz²
    (uncentred R² high, γ > 0), while the centred variant sees γ = 0 and R² = 0."""
    lengths = np.arange(10.0, 58.0)
    z = 2.0 + 1e-3 * np.tile([1, -1, -1, 1], 12)  # a wiggle orthogonal to length: z is c, plus nothing length explains
    gamma, r2 = fit.length_regression(lengths, z)
    assert gamma == pytest.approx(2.0 * lengths.sum() / (lengths @ lengths), rel=1e-3) and 0.8 < r2 < 1
    gamma, r2 = fit.length_regression(lengths, z, intercept=True)
    assert abs(gamma) < 1e-12 and r2 < 1e-9
    # and an offset on top of a slope: the intercept variant recovers the slope exactly
    gamma, r2 = fit.length_regression(lengths, 0.05 * lengths - 1.0, intercept=True)
    assert gamma == pytest.approx(0.05) and r2 == pytest.approx(1.0)
    gamma_origin, r2_origin = fit.length_regression(lengths, 0.05 * lengths - 1.0)
    assert gamma_origin < 0.05 and r2_origin < 1
    # noise of known size: population R² = γ²·Var(len) / (γ²·Var(len) + σ²) = 0.5 here
    rng = np.random.default_rng(3)
    lengths = rng.uniform(10, 70, 20000)
    sigma = 0.05 * math.sqrt(60 ** 2 / 12)
    z = 0.05 * lengths + rng.normal(0, sigma, lengths.size)
    gamma, r2 = fit.length_regression(lengths, z, intercept=True)
    assert gamma == pytest.approx(0.05, rel=0.03) and r2 == pytest.approx(0.5, abs=0.02)
    assert r2 == pytest.approx(np.corrcoef(lengths, z)[0, 1] ** 2)  # simple regression: R² = r²
    assert gamma == pytest.approx(np.polyfit(lengths, z, 1)[0])


def test_length_regression_degenerate():
    # all at the cap: no slope with an intercept; through the origin, γ = mean z / 512
    assert all(math.isnan(v) for v in fit.length_regression([512, 512, 512], [1.0, 2.0, 3.0], intercept=True))
    assert fit.length_regression([512, 512, 512], [1.0, 2.0, 3.0])[0] == pytest.approx(2 / 512)
    for intercept in (False, True):
        gamma, r2 = fit.length_regression([10, 20, 30], [0.0, 0.0, 0.0], intercept)  # the SFT policy: π = π_ref
        assert gamma == 0.0 and math.isnan(r2)
    for lengths, z, message in (([1, 2], [1.0, 2.0], "at least 3"), ([1, 2, 3], [1.0, 2.0], "same length"),
                                ([1, 2, 3], [1.0, float("nan"), 2.0], "finite")):
        with pytest.raises(ValueError, match=message):
            fit.length_regression(lengths, z)


def test_pearson():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert fit.pearson(x, x + y) == pytest.approx(np.corrcoef(x, x + y)[0, 1])
    assert fit.pearson([1, 2, float("nan"), 4], [2, 4, 5, 8]) == pytest.approx(1.0)  # NaN pairs dropped
    assert math.isnan(fit.pearson([1, 2], [3, 4])) and math.isnan(fit.pearson([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------- results files and the CLI


def _law_rows(models=("pythia-1b", "pythia-2.8b"), losses=("dpo", "ipo"), sft=True):
    """Noise-free results rows drawn from y0 + R(d): 3 β × 4 checkpoints per (model, loss)."""
    rows = []
    for i, model in enumerate(models):
        y0 = 0.3 + 0.05 * i
        if sft:
            rows.append({"model": model, "loss": "sft", "beta": "", "fraction": 0, "win_rate": y0, "kl": 0})
        for loss in losses:
            for j, beta in enumerate((0.05, 0.1, 0.5)):
                for fraction in (0.25, 0.5, 0.75, 1.0):
                    kl = (1 + 40 * fraction) / (1 + j)
                    rows.append({"model": model, "loss": loss, "beta": beta, "fraction": fraction,
                                 "win_rate": float(law(math.sqrt(kl), y0)), "win_rate_se": 0.03, "kl": kl,
                                 "forward_kl": 0.5 * kl, "eval_accuracy": 0.5 + 0.01 * kl,
                                 "eval_loss": 0.69 - 0.005 * kl + 0.01 * j})
    return rows


def _write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def test_results_csv_fits_exactly_and_prints_the_table(tmp_path, capsys):
    fit.main([str(_write_csv(tmp_path / "r.csv", _law_rows())), "--out", str(tmp_path / "o")])
    fits = json.loads((tmp_path / "o" / "fits.json").read_text())
    for subset in ("final", "all"):
        for loss in ("dpo", "ipo"):
            for i, model in enumerate(("pythia-1b", "pythia-2.8b")):
                f = fits["scaling_law"][subset][loss][model]
                assert f["y0_measured"] and f["y0"] == pytest.approx(0.3 + 0.05 * i)
                assert (f["rd_alpha"], f["rd_beta"]) == pytest.approx((ALPHA, BETA), rel=1e-6)
                assert f["rmse"] < 1e-9 < f["rmse_quadratic_kl"]
    assert fits["rmse"]["all"]["dpo"]["n"] == 24
    assert fits["forward_kl"]["dpo"]["pythia-1b"]["n"] == 12
    assert fits["correlations"]["eval_accuracy"]["dpo"]["overall"] == pytest.approx(
        np.corrcoef(*zip(*[(r["eval_accuracy"], r["win_rate"]) for r in _law_rows() if r["loss"] == "dpo"]))[0, 1])
    out = capsys.readouterr().out
    assert "quadKL/R(d)" in out and "final       dpo" in out and "all         ipo" in out
    assert "fig3 skipped" in out  # a results file without length_r2 has no Fig. 3
    for name in FIGURES[:2] + FIGURES[3:]:
        assert (tmp_path / "o" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # results.csv round-trips
    again = fit.read_results(tmp_path / "o" / "results.csv")
    assert len(again) == len(_law_rows()) and again[1]["kl"] == pytest.approx(_law_rows()[1]["kl"], rel=1e-5)


def test_results_jsonl_without_sft_fits_the_intercept(tmp_path):
    rows = _law_rows(models=("tiny",), losses=("slic",), sft=False)
    rows[0]["eval_loss"] = None  # null is missing
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    fits, notes = fit.analyze(fit.load([str(path)]), tmp_path / "o")
    f = fits["scaling_law"]["all"]["slic"]["tiny"]
    assert not f["y0_measured"] and f["y0"] == pytest.approx(0.3, abs=1e-9)
    assert (f["rd_alpha"], f["rd_beta"]) == pytest.approx((ALPHA, BETA), rel=1e-6)
    assert fits["sft_win_rate"] == {}


def test_degenerate_groups_are_skipped_with_a_note(tmp_path):
    rows = _law_rows(models=("pythia-1b",), losses=("dpo",))
    rows += [{"model": "pythia-1b", "loss": "ipo", "beta": 0.1, "fraction": f, "win_rate": 0.5, "kl": 4 * f}
             for f in (0.5, 1.0)]  # 2 points
    rows[3]["win_rate"] = "nan"  # not judged yet
    fits, notes = fit.analyze(fit.load([str(_write_csv(tmp_path / "r.csv", rows))]), tmp_path / "o")
    assert "ipo" not in fits["scaling_law"]["all"] and fits["scaling_law"]["all"]["dpo"]["pythia-1b"]["n"] == 11
    assert any("no fit for ipo pythia-1b" in n and "at least 3 points" in n for n in notes)
    assert any("1 row(s) without a win rate" in n for n in notes)
    assert (tmp_path / "o" / FIGURES[0]).stat().st_size > 0


@pytest.mark.parametrize("content, message", [
    ("model,loss,beta,fraction,win_rate\nm,dpo,0.1,1,0.5\n", "r.csv:2: missing column(s) kl"),
    ("model,loss,beta,fraction,win_rate,kl\nm,dpo,0.1,1,0.5,2\nm,dpo,0.1,1,high,2\n", "r.csv:3: win_rate='high'"),
    ("model,loss,beta,fraction,win_rate,kl\nm,dpo,0.1,,0.5,2\n", "r.csv:2: fraction is empty"),
    ("model,loss,beta,fraction,win_rate,kl\nm,dpo,,1,0.5,2\n", "r.csv:2: beta is empty"),
    ("model,loss,beta,fraction,win_rate,kl\n", "no rows"),
])
def test_bad_results_file_raises_before_writing(tmp_path, content, message):
    (tmp_path / "r.csv").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        fit.main([str(tmp_path / "r.csv"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    (tmp_path / "r.csv").write_text("model,loss,beta,fraction,win_rate\nm,dpo,0.1,1,0.5\n")
    p = subprocess.run([sys.executable, str(ROOT / "fit.py"), str(tmp_path / "r.csv"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.startswith("error: ") and "missing column(s) kl" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_bad_inputs_name_the_file_and_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"model": "m"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:1: missing column\(s\) loss"):
        fit.load([str(tmp_path / "r.jsonl")])
    (tmp_path / "r.jsonl").write_text('\n{oops\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: not valid JSON"):
        fit.load([str(tmp_path / "r.jsonl")])
    with pytest.raises(ValueError, match="neither a run directory"):
        fit.load([str(tmp_path)])


# ---------------------------------------------------------------- run directories → every figure


def _write_run(root, model, loss, beta, rng, y0, name=None, args=None, config=None, summary=None,
               steps=(256, 512, 768, 1024)):
    """A run directory as sft.py/daa.py + sample.py + judge.py lay it out (docs/formats.md, "The run directory");
    `args` adds to args.json, `config` is each checkpoint's config.json, `summary` its samples summary."""
    sft = root / f"{model}-sft"
    run = root / (name or f"{model}-{loss}-{beta}") if loss else sft
    run.mkdir()
    base = {"init": str(sft / "latest"), "loss": loss, "beta": beta} if loss else {"model": model}
    (run / "args.json").write_text(json.dumps({**base, **(args or {})}))
    n = 16
    for examples in steps if loss else (2048,):
        fraction = examples / 1024 if loss else 1.0  # an SFT checkpoint's fraction is of the SFT epoch
        kl = 40 * fraction / (beta * 20) if loss else 0.0
        tag = f"ckpt-{examples}"
        (run / tag).mkdir()
        (run / tag / "trainer_state.json").write_text(json.dumps({"examples": examples, "fraction": fraction}))
        if config:
            (run / tag / "config.json").write_text(json.dumps(config))
        if summary:
            (run / f"samples-{tag}.summary.json").write_text(json.dumps({"kl": kl, **summary}))
        if loss:
            (run / tag / "eval.json").write_text(json.dumps({
                "eval/examples": 100, "eval/loss": 0.69 - 0.004 * kl, "eval/accuracy": 0.5 + 0.005 * kl,
                "eval/logratio_chosen": -0.4 * kl}))
        lengths = rng.integers(10, 60, n)
        logratios = kl + 0.01 * math.sqrt(kl) * (lengths - 35) + rng.normal(0, 0.3 if loss else 0.0, n)
        (run / f"samples-{tag}.jsonl").write_text("".join(json.dumps(
            {"id": i, "prompt": "p", "sample": "s", "reference": "r", "length_tokens": int(lengths[i]),
             "policy_logp": -50.0 + logratios[i], "ref_logp": -50.0}) + "\n" for i in range(n)))
        p = float(law(max(math.sqrt(kl), 1e-9), y0))
        wins = (np.arange(n) < round(p * n)).astype(float)
        (run / f"judgments-{tag}.jsonl").write_text("".join(
            json.dumps({"id": i, "win": wins[i], "verdict": "A"}) + "\n" for i in range(n)))
    return run


def test_every_figure_from_synthetic_run_directories(tmp_path, capsys):
    rng = np.random.default_rng(5)
    sizes = (("pythia-410m", 0.3), ("pythia-1b", 0.35))
    runs = [_write_run(tmp_path, model, None, None, rng, y0) for model, y0 in sizes]
    runs += [_write_run(tmp_path, model, loss, beta, rng, y0)
             for model, y0 in sizes for loss in ("dpo", "ipo", "slic") for beta in (0.05, 0.1, 0.5)]
    rows = fit.read_run(runs[2])
    assert [r["fraction"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    r = rows[-1]
    assert (r["model"], r["loss"], r["beta"]) == ("pythia-410m", "dpo", 0.05)  # model from the SFT run's args
    assert r["forward_kl"] == pytest.approx(0.4 * 40 / (0.05 * 20))  # Eq. 7: −mean chosen log-ratio
    assert r["eval_accuracy"] == pytest.approx(0.5 + 0.005 * 40) and r["length_r2"] > 0.5
    wins = [json.loads(line)["win"] for line in (runs[2] / "judgments-ckpt-1024.jsonl").read_text().splitlines()]
    assert r["win_rate"] == pytest.approx(np.mean(wins)) and r["win_rate_se"] == pytest.approx(
        np.std(wins, ddof=1) / 4)
    sft = fit.read_run(runs[0])
    assert len(sft) == 1 and sft[0]["fraction"] == 0 and sft[0]["loss"] == "sft" and sft[0]["model"] == "pythia-410m"
    assert sft[0]["kl"] == 0 and math.isnan(sft[0]["length_r2"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "args.json").write_text('{"loss": "dpo", "beta": 0.1}')
    (tmp_path / "bad" / "samples-ckpt-9.jsonl").write_text('{"length_tokens": 3}\n')
    with pytest.raises(ValueError, match="ckpt-9/trainer_state.json"):
        fit.read_run(tmp_path / "bad")
    (tmp_path / "bad" / "ckpt-9").mkdir()
    (tmp_path / "bad" / "ckpt-9" / "trainer_state.json").write_text('{"fraction": 0.5}')
    with pytest.raises(ValueError, match="ckpt-9: a sample or judgment has no key 'policy_logp'"):
        fit.read_run(tmp_path / "bad")

    out = tmp_path / "figs"
    fit.main([str(r) for r in runs] + ["--out", str(out), "--dpi", "50"])
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    fits = json.loads((out / "fits.json").read_text())
    assert sorted(fits["figures"]) == sorted(FIGURES)
    assert set(fits["scaling_law"]["all"]) == {"dpo", "ipo", "slic"}
    assert fits["sft_win_rate"] == {"pythia-410m": pytest.approx(5 / 16), "pythia-1b": pytest.approx(6 / 16)}
    assert not list(out.glob("*.tmp"))
    assert "note" not in capsys.readouterr().out


def test_synthetic_example_script(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "synthetic_fit_example.py"), "--out", str(tmp_path),
                        "--dpi", "40", "--prompts", "64"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "Eq. 5 recovered" in p.stdout and "quadKL/R(d)" in p.stdout
    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 5000
    rows = fit.read_results(tmp_path / "results.csv")
    assert len(rows) == 3 + 3 * 3 * 5 * 4


def test_sizes_seeds_and_arms_from_run_directories(tmp_path):
    """Issue 14: rows carry seed, params, length_alpha, nll_alpha and the samples summary's statistics;
    each regulariser is its own arm; seeds pool into one fit but stay separate runs; sizes order by params."""
    import torch
    from model import Config, GPTNeoX
    rng = np.random.default_rng(6)
    sizes = {"tiny-s": (16, 1), "tiny-m": (32, 2), "tiny-l": (64, 4)}  # width, depth
    configs = {m: Config(vocab_size=64, hidden_size=w, num_hidden_layers=l, num_attention_heads=4,
                         intermediate_size=4 * w).to_dict() for m, (w, l) in sizes.items()}
    stats = {"ood_token_rate": 0.125, "gold_reward": -0.5, "proxy_reward": 1.5, "length_words": 7.0, "n": 16,
             "ckpt": "text is not carried", "eos_rate": True}
    runs = []
    for i, model in enumerate(("tiny-l", "tiny-s", "tiny-m")):  # not in size order
        runs.append(_write_run(tmp_path, model, None, None, rng, 0.3, config=configs[model]))
        for beta in (0.05, 0.1, 0.5):
            for seed in (0, 1):
                runs.append(_write_run(tmp_path, model, "dpo", beta, rng, 0.3, name=f"{model}-dpo-{beta}-s{seed}",
                                       args={"seed": seed}, config=configs[model], summary=stats,
                                       steps=(256, 512, 768, 1024) if seed == 0 else (256, 512, 768)))
            if model == "tiny-m":
                for key in ("length_alpha", "nll_alpha"):
                    runs.append(_write_run(tmp_path, model, "dpo", beta, rng, 0.3, name=f"{model}-{key}-{beta}",
                                           args={"seed": 0, key: 0.01}, config=configs[model], summary=stats))
    rows = fit.load([str(r) for r in runs])
    r = next(r for r in rows if r["model"] == "tiny-m" and r["nll_alpha"] > 0)
    with torch.device("meta"):
        params = sum(p.numel() for p in GPTNeoX(Config.from_dict(configs["tiny-m"])).parameters())
    assert r["params"] == params and fit.arm(r) == "dpo+nll0.01" and r["length_alpha"] == 0 and r["seed"] == 0
    assert (r["ood_token_rate"], r["gold_reward"], r["proxy_reward"], r["length_words"]) == (0.125, -0.5, 1.5, 7.0)
    assert r["ckpt"].startswith("ckpt-") and "eos_rate" not in r  # not the summary's text or booleans: its checkpoint
    assert fit.model_order(rows) == ["tiny-s", "tiny-m", "tiny-l"]

    # seeds are separate runs: seed 1 stopped at 0.75, and that is its final checkpoint
    final = fit.final_rows([r for r in rows if not fit.is_sft(r)])
    plain = [r for r in final if fit.arm(r) == "dpo" and r["model"] == "tiny-s" and r["beta"] == 0.1]
    assert sorted((r["seed"], r["fraction"]) for r in plain) == [(0, 1.0), (1, 0.75)]

    fits, _ = fit.analyze(rows, tmp_path / "o", dpi=40)
    law = fits["scaling_law"]["all"]
    assert set(law) == {"dpo", "dpo+len0.01", "dpo+nll0.01"}
    assert set(law["dpo"]) == {"tiny-s", "tiny-m", "tiny-l"} and set(law["dpo+len0.01"]) == {"tiny-m"}
    assert law["dpo"]["tiny-m"]["n"] == 3 * (4 + 3) and law["dpo+nll0.01"]["tiny-m"]["n"] == 3 * 4  # seeds pooled
    assert fits["scaling_law"]["final"]["dpo"]["tiny-m"]["n"] == 3 * 2
    assert fits["length_regression"].startswith("length_r2: Eq. 6 through the origin")
    for name in FIGURES:
        assert (tmp_path / "o" / name).stat().st_size > 5000
    again = {(r["model"], fit.arm(r), r["beta"], r["seed"], r["fraction"]): r
             for r in fit.read_results(tmp_path / "o" / "results.csv")}
    r = again["tiny-m", "dpo+nll0.01", 0.1, 0, 1.0]
    assert r["params"] == params and r["ood_token_rate"] == 0.125 and r["nll_alpha"] == 0.01

    # Eq. 6 both ways: with an intercept, the centred R² of a simple regression is Pearson's r²
    for r in fit.read_run(runs[1]):
        tag = next(t for t in (runs[1]).glob("ckpt-*") if json.loads((t / "trainer_state.json").read_text())[
            "fraction"] == r["fraction"]).name
        samples = [json.loads(line) for line in (runs[1] / f"samples-{tag}.jsonl").read_text().splitlines()]
        x = np.array([s["length_tokens"] for s in samples], float)
        z = np.array([s["policy_logp"] - s["ref_logp"] for s in samples])
        assert r["length_r2_centred"] == pytest.approx(np.corrcoef(x, z)[0, 1] ** 2, rel=1e-9)
        assert r["length_r2"] == pytest.approx(1 - ((z - (x @ z / (x @ x)) * x) ** 2).sum() / (z @ z), rel=1e-9)


# ---------------------------------------------------------------- the frontier (issue 23): bon.py, --online, --in-support

def _bon_rows(alpha=0.3, beta=0.05, y0=0.4):
    """bon.py's results: best-of-n on Gao et al.'s form y0 + d(α − βd), gold reward twice the gain."""
    rows = []
    for reward, a in (("proxy", alpha), ("rm", alpha / 2)):
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            kl = math.log(n) - (n - 1) / n
            d = math.sqrt(kl)
            rows.append({"model": "tiny-m", "loss": "bon", "reward": reward, "n": n, "beta": None, "fraction": None,
                         "kl": kl, "win_rate": y0 + d * (a - beta * d), "win_rate_se": 0.01,
                         "gold_reward": 0.1 + 2 * d * (a - beta * d), "samples": 256})
        rows.append({"model": "tiny-m", "loss": "tilted", "reward": reward, "beta": 0.5, "fraction": None, "kl": 1.0,
                     "win_rate": 0.6, "gold_reward": 0.3, "ess": 40.0})
    return rows


def test_frontier_rows_need_no_checkpoint_and_are_named_by_their_reward(tmp_path):
    path = tmp_path / "bon.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _bon_rows()))
    rows = fit.read_results(path)
    assert {fit.arm(r) for r in rows} == {"bon-proxy", "bon-rm", "tilted-proxy", "tilted-rm"}
    assert not any(fit.is_sft(r) for r in rows)  # best of 1 is π_ref, but it sets no DAA curve's y0
    for bad, message in (({"n": None}, "a bon row needs its picking reward and its n"),
                         ({"reward": None}, "a bon row needs its picking reward and its n")):
        path.write_text(json.dumps({**_bon_rows()[3], **bad}) + "\n")
        with pytest.raises(ValueError, match=f"bon.jsonl:1: {message}"):
            fit.read_results(path)
    path.write_text(json.dumps({**_bon_rows()[9], "beta": None}) + "\n")
    with pytest.raises(ValueError, match="a tilted row needs its picking reward and its beta"):
        fit.read_results(path)
    dpo = {"model": "m", "loss": "dpo", "beta": 0.1, "fraction": 0.5, "win_rate": 0.5, "kl": 1.0}
    assert fit.arm(fit.to_row({**dpo, "online": 4, "online_round": 2}, "x")) == "dpo+online4"
    assert fit.arm(fit.to_row({**dpo, "in_support": True}, "x")) == "dpo+insupport"
    assert fit.arm(fit.to_row({**dpo, "online": 4, "in_support": 1}, "x")) == "dpo+online4+insupport"


def test_frontier_fits_gao_et_al_best_of_n_form_and_draws_fig6(tmp_path):
    rng = np.random.default_rng(7)
    sft = _write_run(tmp_path, "tiny-m", None, None, rng, 0.4)
    runs = [_write_run(tmp_path, "tiny-m", "dpo", beta, rng, 0.4, summary={"gold_reward": 0.2}) for beta in (0.1, 0.5)]
    online = _write_run(tmp_path, "tiny-m", "dpo", 0.1, rng, 0.4, name="online", args={"online": 4},
                        summary={"gold_reward": 0.3})
    for k, ckpt in enumerate(sorted(online.glob("ckpt-*"), key=lambda p: int(p.name[5:])), 1):
        (ckpt / "online.json").write_text(json.dumps({"round": k, "rounds": 4}))
    path = tmp_path / "bon.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _bon_rows()))
    rows = fit.load([str(sft), *map(str, runs), str(online), str(path)])
    assert sorted(r["online_round"] for r in rows if fit.arm(r) == "dpo+online4") == [1, 2, 3, 4]
    fits, notes = fit.analyze(rows, tmp_path / "o", dpi=40)
    f = fits["frontier"]["win_rate"]["bon-proxy"]["tiny-m"]
    assert f["bon"] == pytest.approx([0.4, 0.3, 0.05], abs=1e-9) and f["rmse_bon"] < 1e-9  # exact on its own form
    g = fits["frontier"]["gold_reward"]["bon-rm"]["tiny-m"]
    assert g["bon"] == pytest.approx([0.1, 0.3, 0.1], abs=1e-9)
    assert "tilted-rm" not in fits["frontier"]["win_rate"]  # one point: noted, not fitted
    assert "dpo" in fits["scaling_law"]["all"] and "bon-proxy" not in fits["scaling_law"]["all"]
    assert "fig6_frontier.png" in fits["figures"] and (tmp_path / "o" / "fig6_frontier.png").stat().st_size > 10_000
    fits, notes = fit.analyze(fit.load([str(sft), *map(str, runs)]), tmp_path / "p", dpi=40)
    assert "fig6_frontier.png" not in fits["figures"] and fits["frontier"] == {}


def test_in_support_samples_are_their_checkpoints_twin_rows(tmp_path):
    rng = np.random.default_rng(8)
    run = _write_run(tmp_path, "tiny-m", "dpo", 0.1, rng, 0.4, steps=(512, 1024))
    for tag in ("ckpt-512", "ckpt-1024"):  # sample.py --in-support and judge.py's default names
        for kind in ("samples", "judgments"):
            text = (run / f"{kind}-{tag}.jsonl").read_text()
            (run / f"{kind}-{tag}+in_support.jsonl").write_text(text.replace('"win": 0.0', '"win": 1.0'))
        (run / f"samples-{tag}+in_support.summary.json").write_text(json.dumps({"kl": 0.5, "in_support": True}))
    rows = fit.read_run(run)
    assert [(r["fraction"], r["in_support"], fit.arm(r)) for r in rows] == [
        (0.5, 0, "dpo"), (0.5, 1, "dpo+insupport"), (1.0, 0, "dpo"), (1.0, 1, "dpo+insupport")]
    assert [r["kl"] for r in rows if r["in_support"]] == [0.5, 0.5] and rows[1]["win_rate"] == 1.0
    assert rows[0]["eval_accuracy"] == rows[1]["eval_accuracy"]  # the same checkpoint's eval.json
