"""The study driver (scripts/study.py): the paper preset's --dry-run plan, the miniature's plan with
--scaling and --seeds, and one --quick run of the miniature end to end, re-run to check that what is
done is skipped, that a half-done stage resumes, and that --seeds 2 adds the second seed's runs."""
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import study as driver  # noqa: E402


def study(script, out, *flags):
    done = subprocess.run(["bash", ROOT / "scripts" / script, out, *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


def plan(capsys, *argv):
    """The --dry-run plan, in this process (the wrappers' own test is test_paper_dry_run_plan)."""
    driver.main([*map(str, argv), "--dry-run"])
    return capsys.readouterr().out.splitlines()


def commands(lines):
    """argv of every command the driver printed, without its log redirection."""
    return [shlex.split(line.split(" >> ")[0]) for line in lines if line.startswith(("python ", "torchrun "))]


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def script_runs(cmds, script):
    return [c for c in cmds if script in c]


def test_paper_dry_run_plan(tmp_path):
    out = tmp_path / "paper"
    lines = study("paper_study.sh", out, "--dry-run")
    assert not out.exists()  # nothing ran, nothing was written
    assert all(line.startswith(("python ", "torchrun ", "# ")) for line in lines)  # one command per line
    cmds = commands(lines)
    sft, daa = script_runs(cmds, "sft.py"), script_runs(cmds, "daa.py")
    assert len(sft) == 3 and len(daa) == 63
    sizes = {flag(c, "--model") for c in sft}
    assert sizes == {"EleutherAI/pythia-1b", "EleutherAI/pythia-2.8b", "EleutherAI/pythia-6.9b"}
    for c in sft + daa:  # FSDP exactly where the 6.9B model is trained
        model = flag(c, "--model") or flag(c, "--init")  # FSDP where DDP's 16 B/param does not fit the paper's GPUs
        assert ("--fsdp" in c) == ("pythia-6.9b" in model or "pythia-2.8b" in model)
        assert c[:3] == ["torchrun", "--standalone", "--nproc_per_node"]
    for size in ("pythia-1b", "pythia-2.8b", "pythia-6.9b"):
        runs = [c for c in daa if f"/{size}/" in flag(c, "--init")]
        for loss in ("dpo", "ipo", "slic"):
            betas = {float(flag(c, "--beta")) for c in runs if flag(c, "--loss") == loss}
            assert len(betas) == 7
    assert len({flag(c, "--out") for c in daa}) == 63
    samples = script_runs(cmds, "sample.py")
    assert len(samples) == 66 and all(flag(c, "--num-prompts") == "256" and c[0] == "torchrun" for c in samples)
    judges = script_runs(cmds, "judge.py")
    assert len(judges) == 3 * 1 + 63 * 4 and not any("gold" in c for c in judges)  # every checkpoint, the API judge
    assert script_runs(cmds, "fit.py") and lines[-2].startswith("# estimate")
    assert "GPU-hours" in lines[-2] and "judgments" in lines[-2] and "$" in lines[-2] and "MFU" in lines[-1]


def test_paper_sizes_and_nproc(tmp_path, capsys):
    lines = plan(capsys, "paper", tmp_path / "p", "--sizes", "pythia-410m", "--nproc", "8")
    sft = script_runs(commands(lines), "sft.py")
    assert [flag(c, "--model") for c in sft] == ["EleutherAI/pythia-410m"]
    assert flag(sft[0], "--nproc_per_node") == "8"
    assert flag(sft[0], "--micro-batch-size") == "2"  # App. B: 128 = 8 accumulation steps × 8 processes × 2


def test_tiny_scaling_plan_with_seeds(tmp_path, capsys):
    lines = plan(capsys, "tiny", tmp_path / "t", "--scaling", "--quick", "--seeds", "2")
    cmds = commands(lines)
    sft = script_runs(cmds, "sft.py")
    assert sorted((Path(flag(c, "--model")).name, flag(c, "--seed")) for c in sft) == [
        (m, s) for m in ("tiny-l", "tiny-m", "tiny-s") for s in "01"]
    daa = {Path(flag(c, "--out")).relative_to(tmp_path / "t").as_posix(): c for c in script_runs(cmds, "daa.py")}
    for seed in "01":
        assert flag(daa[f"tiny-m/s{seed}/dpo-0.1-len0.5"], "--length-alpha") == "0.5"
        assert flag(daa[f"tiny-m/s{seed}/dpo-0.1-nll1"], "--nll-alpha") == "1"
        assert flag(daa[f"tiny-m/s{seed}/dpo-0.1"], "--seed") == seed
    assert not any(k.endswith(("len0.5", "nll1")) for k in daa if not k.startswith("tiny-m/"))  # middle size only
    assert len(daa) == 2 * (3 * 3 + 2)


def test_tiny_losses_picks_the_losses_and_gives_a_new_one_dpos_grid(tmp_path, capsys):
    daa = script_runs(commands(plan(capsys, "tiny", tmp_path / "t", "--losses", "dpo,mine")), "daa.py")
    grid = lambda loss: sorted(float(flag(c, "--beta")) for c in daa if flag(c, "--loss") == loss)
    assert {flag(c, "--loss") for c in daa} == {"dpo", "mine"}
    assert grid("mine") == grid("dpo") == driver.TINY["betas"]["dpo"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    return out, study("tiny_study.sh", out, "--quick")


def test_quick_study_end_to_end(quick):
    out, _ = quick
    home = out / "tiny-m" / "s0"
    assert sorted(p.name for p in home.iterdir() if p.is_dir()) == ["dpo-0.1", "ipo-0.1", "sft", "slic-0.1"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sft"]) == {"win_rate", "win_rate_se"}
    assert {p["loss"] for p in summary["points"]} == {"dpo", "ipo", "slic"}
    assert len(summary["points"]) == len(summary["runs"]) == 3 * 3  # three checkpoints of each run, one seed
    for p in summary["points"]:
        assert {"loss", "beta", "fraction", "win_rate", "win_rate_se", "kl", "length_tokens", "n_seeds"} <= set(p)
        assert 0 <= p["win_rate"] <= 1 and p["kl"] > -1 and p["n_seeds"] == 1
        assert 0 <= p["ood_token_rate"] <= 1 and math.isfinite(p["gold_reward"] + p["proxy_reward"])  # sample.py's
    fits = json.loads((out / "fit" / "fits.json").read_text())["scaling_law"]["all"]
    assert set(fits) == {"dpo", "ipo", "slic"}
    for fig in ("fig1_winrate_vs_sqrt_kl", "fig2_training_dynamics", "fig4_eval_metrics", "fig5_forward_kl"):
        assert (out / "fit" / f"{fig}.png").stat().st_size > 1000


def files(out):
    return {p for p in out.rglob("*")}


def test_rerun_skips_every_heavy_stage(quick):
    out, _ = quick
    before = files(out)
    lines = study("tiny_study.sh", out, "--quick")
    ran = [c[1] for c in commands(lines)]
    assert ran == ["fit.py", "scripts/tiny_summary.py"]  # the cheap last stages always run
    skipped = [line.split()[2] for line in lines if line.startswith("# skip")]
    stages = {stage: skipped.count(stage) for stage in ("prepare", "sft", "daa", "sample", "judge")}
    assert stages == {"prepare": 1, "sft": 1, "daa": 3, "sample": 4, "judge": 1 + 3 * 3}  # a judgment per checkpoint
    assert files(out) == before


def test_a_half_done_stage_resumes(quick):
    out, _ = quick
    run = out / "tiny-m" / "s0" / "ipo-0.1"
    ckpt = sorted(run.glob("ckpt-*"), key=lambda p: int(p.name[5:]))[1].name
    (run / f"samples-{ckpt}.summary.json").unlink()  # as if sample.py died before this checkpoint's summary
    judgments = run / f"judgments-{ckpt}.jsonl"
    (run / f"judgments-{ckpt}.summary.json").unlink()  # and judge.py before its last rows
    judgments.write_text("".join(judgments.read_text().splitlines(keepends=True)[:10]))
    cmds = commands(study("tiny_study.sh", out, "--quick"))
    sample, judge = script_runs(cmds, "sample.py"), script_runs(cmds, "judge.py")
    assert len(sample) == 1 and sample[0][sample[0].index("--ckpt") + 1:sample[0].index("--ref")] == [str(run / ckpt)]
    assert len(judge) == 1 and judge[0][2] == str(run / f"samples-{ckpt}.jsonl")
    assert json.loads((run / f"judgments-{ckpt}.summary.json").read_text())["n"] == 64


def test_other_data_flags_refuse(quick):
    out, _ = quick
    with pytest.raises(ValueError, match="was prepared by .*--eval-prompts 64.*not .*--eval-prompts 600.*use a new OUT"):
        driver.main(["tiny", str(out), "--dry-run"])  # the full study's data flags on --quick's data


def test_data_without_its_prepare_command_refuses(tmp_path):
    (tmp_path / "t" / "data").mkdir(parents=True)  # as if prepared by hand, or by a run killed before study.json
    with pytest.raises(ValueError, match="prepared by an unknown command"):
        driver.main(["tiny", str(tmp_path / "t"), "--dry-run"])


def test_second_seed(quick):
    out, _ = quick
    lines = study("tiny_study.sh", out, "--quick", "--seeds", "2")
    assert f"# skip sft {out}/tiny-m/s0/sft: finished, step 31/31" in lines
    for seed in (0, 1):
        home = out / "tiny-m" / f"s{seed}"
        for run in ("sft", "dpo-0.1", "ipo-0.1", "slic-0.1"):
            args = json.loads((home / run / "args.json").read_text())
            state = json.loads((home / run / "latest" / "trainer_state.json").read_text())
            assert args["seed"] == seed and state["step"] == state["total_steps"]
            ckpts = list((home / run).glob("ckpt-*"))
            assert len(ckpts) == (1 if run == "sft" else 3)
            assert all((home / run / f"judgments-{c.name}.summary.json").is_file() for c in ckpts)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2 * 3 * 3 and {p["n_seeds"] for p in summary["points"]} == {2}
    for p in summary["points"]:  # a point is the mean of its two seeds' rows
        rows = [r for r in summary["runs"] if (r["loss"], r["beta"], r["fraction"]) == (p["loss"], p["beta"], p["fraction"])]
        assert sorted(r["seed"] for r in rows) == [0, 1]
        assert p["win_rate"] == pytest.approx(sum(r["win_rate"] for r in rows) / 2)
        assert p["kl"] == pytest.approx(sum(r["kl"] for r in rows) / 2)
    first_loss = [json.loads((out / "tiny-m" / f"s{s}" / "sft" / "metrics.jsonl").read_text().splitlines()[0])
                  ["loss"] for s in (0, 1)]
    assert first_loss[0] != first_loss[1]  # another initialisation and data order


def test_scaling_quick_adds_the_sizes_and_both_arms(quick):
    """Issue 14's plumbing: --scaling runs three sizes, each with its own SFT reference, and the
    length-regularised and RPO arms of DPO at the middle size; summary.json carries all of them."""
    out, _ = quick
    study("tiny_study.sh", out, "--quick", "--scaling")
    summary = json.loads((out / "summary.json").read_text())
    params = {m: s["params"] for m, s in summary["sft_models"].items()}
    assert set(params) == {"tiny-s", "tiny-m", "tiny-l"} and params["tiny-l"] >= 8 * params["tiny-s"]
    for size in params:
        ref = json.loads((out / size / "s0" / "dpo-0.1" / "args.json").read_text())["init"]
        assert Path(ref) == out / size / "s0" / "sft"
    series = {(p["model"], p["series"]) for p in summary["points"]}
    assert {("tiny-m", "dpo+len0.5"), ("tiny-m", "dpo+nll1")} <= series
    assert not any(s.startswith("dpo+") for m, s in series if m != "tiny-m")
    arms = {p["series"]: p for p in summary["points"] if p["series"].startswith("dpo+")}
    assert arms["dpo+len0.5"]["length_alpha"] == 0.5 and arms["dpo+nll1"]["nll_alpha"] == 1
    found = " ".join(f["finding"] for f in summary["scaling_findings"])
    assert "Larger models" in found and "dpo+len0.5" in found and "dpo+nll1" in found
    assert "**Model size and the regularised arms**" in (out / "summary.md").read_text()
