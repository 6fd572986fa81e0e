"""The study driver (scripts/study.py): the --dry-run plans of the paper preset and of every mode of the
miniature (per-seed data, --same-data, the SFT lr grid and its pick step, --bench, --frontier, --losses),
the worker pool on a failure, the pick step, and one --quick run of the miniature end to end, re-run to
check that what is done is skipped, that a half-done step resumes, and that --seeds 2 adds the second
seed's data and runs."""
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

import findings  # noqa: E402


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


def rel(path, root):
    return Path(path).relative_to(root).as_posix()


def test_paper_dry_run_plan(tmp_path):
    out = tmp_path / "paper"
    lines = study("paper_study.sh", out, "--dry-run")
    assert not out.exists()  # nothing ran, nothing was written
    assert all(line.startswith(("python ", "torchrun ", "# ")) for line in lines)  # one command per line
    cmds = commands(lines)
    assert [c[1:] for c in script_runs(cmds, "data/tldr/prepare.py")] == [["data/tldr/prepare.py", "--out-dir",
                                                                          str(out / "data")]]  # one dataset
    sft, daa = script_runs(cmds, "sft.py"), script_runs(cmds, "daa.py")
    assert len(sft) == 3 and len(daa) == 63
    sizes = {flag(c, "--model") for c in sft}
    assert sizes == {"EleutherAI/pythia-1b", "EleutherAI/pythia-2.8b", "EleutherAI/pythia-6.9b"}
    for c in sft + daa:
        model = flag(c, "--model") or flag(c, "--init")  # FSDP where DDP's 16 B/param does not fit the paper's GPUs
        assert ("--fsdp" in c) == ("pythia-6.9b" in model or "pythia-2.8b" in model)
        assert c[:3] == ["torchrun", "--standalone", "--nproc_per_node"] and flag(c, "--data") == str(out / "data")
        assert flag(c, "--eval-examples") == "256" and "--lr" not in c  # App. B's lr is the scripts' default
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
    assert script_runs(cmds, "fit.py") and not script_runs(cmds, "scripts/tiny_summary.py")
    assert lines[-3].startswith("# estimate per model: pythia-1b") and lines[-2].startswith("# estimate")
    assert "GPU-hours" in lines[-2] and "judgments" in lines[-2] and "$" in lines[-2] and "MFU" in lines[-1]


def test_paper_sizes_and_nproc(tmp_path, capsys):
    lines = plan(capsys, "paper", tmp_path / "p", "--sizes", "pythia-410m", "--nproc", "8")
    sft = script_runs(commands(lines), "sft.py")
    assert [flag(c, "--model") for c in sft] == ["EleutherAI/pythia-410m"]
    assert flag(sft[0], "--nproc_per_node") == "8"
    assert flag(sft[0], "--micro-batch-size") == "2"  # App. B: 128 = 8 accumulation steps × 8 processes × 2


def test_tiny_seeds_sample_their_own_data(tmp_path, capsys):
    out = tmp_path / "t"
    cmds = commands(plan(capsys, "tiny", out, "--seeds", "2", "--variant", "hard"))
    prepare = script_runs(cmds, "data/tiny/prepare.py")
    assert [(rel(flag(c, "--out-dir"), out), flag(c, "--seed"), flag(c, "--variant")) for c in prepare] == [
        ("data/s0", "0", "hard"), ("data/s1", "1", "hard")]
    for c in script_runs(cmds, "sft.py") + script_runs(cmds, "daa.py"):  # every run of a seed on that seed's data
        seed = flag(c, "--seed")
        assert flag(c, "--data") == str(out / "data" / f"s{seed}") and f"/s{seed}/" in flag(c, "--out")
    for c in script_runs(cmds, "sample.py"):  # ref: OUT/tiny-m/s<seed>/sft/latest
        assert flag(c, "--train-data") == str(out / "data" / Path(flag(c, "--ref")).parts[-3])
    sft = script_runs(cmds, "sft.py")[0]
    assert flag(sft, "--model") == str(out / "data" / "s0" / "models" / "tiny-m")
    assert (flag(sft, "--lr"), flag(sft, "--eval-examples"), flag(sft, "--checkpoints")) == ("0.002", "500", "1")
    same = commands(plan(capsys, "tiny", out, "--seeds", "2", "--same-data"))
    assert [flag(c, "--out-dir") for c in script_runs(same, "data/tiny/prepare.py")] == [str(out / "data")]
    assert {flag(c, "--data") for c in script_runs(same, "daa.py")} == {str(out / "data")}
    assert {flag(c, "--seed") for c in script_runs(same, "daa.py")} == {"0", "1"}


def test_tiny_scaling_plan_picks_each_sizes_sft_lr(tmp_path, capsys):
    out = tmp_path / "t"
    cmds = commands(plan(capsys, "tiny", out, "--scaling", "--quick", "--seeds", "2"))
    lrs = driver.TINY["quick"]["sft_lrs"]
    sft = sorted((rel(flag(c, "--out"), out), flag(c, "--lr")) for c in script_runs(cmds, "sft.py"))
    assert sft == sorted((f"{m}/s{s}/sft-lr{lr:g}", str(lr)) for m in lrs for s in "01" for lr in lrs[m])
    picks = [c for c in cmds if "pick-sft" in c]
    assert sorted(rel(c[3], out) for c in picks) == sorted(f"{m}/s{s}/sft" for m in lrs for s in "01")
    for c in picks:  # the link, then every lr's run beside it
        assert c[4:] == [str(Path(c[3]).with_name(f"sft-lr{lr:g}")) for lr in lrs[Path(c[3]).parts[-3]]]
    daa = {rel(flag(c, "--out"), out): c for c in script_runs(cmds, "daa.py")}
    for seed in "01":
        assert flag(daa[f"tiny-m/s{seed}/dpo-0.1-len0.5"], "--length-alpha") == "0.5"
        assert flag(daa[f"tiny-m/s{seed}/dpo-0.1-nll1"], "--nll-alpha") == "1"
        assert flag(daa[f"tiny-m/s{seed}/dpo-0.1"], "--seed") == seed
    assert all(rel(flag(c, "--init"), out).endswith("/sft") for c in daa.values())  # the picked link
    assert not any(k.endswith(("len0.5", "nll1")) for k in daa if not k.startswith("tiny-m/"))  # main size only
    assert len(daa) == 2 * (3 * 3 + 2)
    samples = {flag(c, "--ref") for c in script_runs(cmds, "sample.py")}
    assert samples == {f"{out}/{m}/s{s}/sft/latest" for m in lrs for s in "01"}  # no sft-lr run is sampled
    plain = commands(plan(capsys, "tiny", out, "--quick"))  # without --scaling: the one lr, straight into sft
    assert [(rel(flag(c, "--out"), out), flag(c, "--lr")) for c in script_runs(plain, "sft.py")] == [
        ("tiny-m/s0/sft", "0.002")] and not any("pick-sft" in c for c in plain)


def test_tiny_losses_picks_the_losses_and_gives_a_new_one_dpos_grid(tmp_path, capsys):
    daa = script_runs(commands(plan(capsys, "tiny", tmp_path / "t", "--losses", "dpo,mine,chipo")), "daa.py")
    grid = lambda loss: sorted(float(flag(c, "--beta")) for c in daa if flag(c, "--loss") == loss)
    assert {flag(c, "--loss") for c in daa} == {"dpo", "mine", "chipo"}
    assert grid("mine") == grid("dpo") == driver.TINY["betas"]["dpo"]
    assert grid("chipo") == sorted(driver.TINY["betas"]["chipo"])  # its own grid


def test_bench_plan(tmp_path, capsys):
    out = tmp_path / "t"
    daa = {rel(flag(c, "--out"), out): c for c in
           script_runs(commands(plan(capsys, "tiny", out, "--bench")), "daa.py")}
    for loss in driver.TINY["bench"]["losses"]:
        assert sorted(float(flag(c, "--beta")) for k, c in daa.items() if k.split("/")[-1].count("-") == 1 and
                      flag(c, "--loss") == loss) == sorted(driver.TINY["betas"][loss])
    for b in driver.TINY["betas"]["dpo"]:  # the arms at DPO's grid
        assert flag(daa[f"tiny-m/s0/dpo-{b:g}-len0.5"], "--length-alpha") == "0.5"
        assert flag(daa[f"tiny-m/s0/dpo-{b:g}-nll0.05"], "--nll-alpha") == "0.05"
        assert flag(daa[f"tiny-m/s0/dpo-{b:g}-nll0.2"], "--nll-alpha") == "0.2"
    assert len(daa) == sum(len(driver.TINY["betas"][loss]) for loss in driver.TINY["bench"]["losses"]) + 3 * 6
    quick = script_runs(commands(plan(capsys, "tiny", out, "--bench", "--quick")), "daa.py")
    assert len(quick) == 7 + 3 and {flag(c, "--beta") for c in quick} == {"0.1"}  # one β per loss and arm


def test_frontier_plan(tmp_path, capsys):
    out = tmp_path / "t"
    lines = plan(capsys, "tiny", out, "--frontier", "--quick")
    cmds, home, data = commands(lines), out / "tiny-m" / "s0", str(out / "data" / "s0")
    [rm] = script_runs(cmds, "rm.py")
    assert (flag(rm, "--init"), flag(rm, "--out"), flag(rm, "--data"), flag(rm, "--lr")) == (
        str(home / "sft"), str(home / "rm"), data, "0.001")
    assert (flag(rm, "--optimizer"), flag(rm, "--checkpoints"), flag(rm, "--batch-size")) == ("adamw", "1", "64")
    [bon] = script_runs(cmds, "bon.py")
    assert (flag(bon, "--policy"), flag(bon, "--rm"), flag(bon, "--out"), flag(bon, "--n-samples")) == (
        str(home / "sft"), str(home / "rm"), str(home / "bon"), "16")
    assert flag(bon, "--gold-spec") == data + "/gold.json" and flag(bon, "--prompts") == data + "/eval_prompts.jsonl"
    [online] = [c for c in script_runs(cmds, "daa.py") if "--online" in c]
    assert (flag(online, "--out"), flag(online, "--online"), flag(online, "--loss"), flag(online, "--beta")) == (
        str(home / "dpo-0.1-online4"), "4", "dpo", "0.1")
    assert flag(online, "--gold-spec") == data + "/gold.json"
    in_support = [c for c in script_runs(cmds, "sample.py") if "--in-support" in c]  # the plain DPO runs only
    assert [Path(c[c.index("--ckpt") + 1]).parent.name for c in in_support] == ["dpo-0.1"]
    judged = [c[2] for c in script_runs(cmds, "judge.py") if "+in_support" in c[2]]
    assert judged == [str(home / "dpo-0.1" / f"samples-ckpt-{n}+in_support.jsonl") for n in (320, 704, 1024)]
    assert str(home / "dpo-0.1-online4") in script_runs(cmds, "fit.py")[0]
    assert str(home / "bon" / "bon.jsonl") in script_runs(cmds, "fit.py")[0]
    order = [flag(c, "--out") or c[1] for c in cmds]
    assert order.index(str(home / "sft")) < order.index(str(home / "rm")) < order.index(str(home / "bon"))


@pytest.mark.parametrize("flags", [["paper"], ["tiny", "--scaling", "--bench", "--frontier", "--seeds", "2"]])
def test_every_step_needs_only_what_an_earlier_step_makes(tmp_path, flags):
    args = driver.get_parser().parse_args([flags[0], str(tmp_path / "x"), *flags[1:]])
    cfg = driver.settings(args)
    steps = driver.plan(cfg, tmp_path / "x", range(args.seeds))
    made = set()
    for s in steps:
        assert set(s.needs) <= made, (s.kind, s.out[0], set(s.needs) - made)
        assert made.isdisjoint(s.out)  # one maker per output
        made |= set(s.out)


def test_a_failure_starts_nothing_new(tmp_path, capsys):
    """A failed step: its dependants and the queued steps never start, the running one finishes."""
    def step(name, code, needs=()):
        return driver.Step("daa", None, ["python", "-c", code], (tmp_path / name,), tuple(tmp_path / n for n in needs),
                           tmp_path / f"{name}.log")
    touch = "import pathlib; pathlib.Path(r'%s').write_text('ran')"
    slow = ("import pathlib, time\nwhile 'the cause' not in pathlib.Path(r'%s').read_text(): time.sleep(0.05)\n"
            "time.sleep(1)\n" % (tmp_path / "bad.log")) + touch % (tmp_path / "slow")  # outlives the failure
    steps = [step("bad", "import sys; print('the cause', flush=True); sys.exit(3)"), step("slow", slow),
             step("after", touch % (tmp_path / "after"), needs=["bad"]), step("queued", touch % (tmp_path / "queued"))]
    failed = driver.execute(steps, {"env": {}}, jobs=2)
    assert [s.out[0].name for s in failed] == ["bad"]
    assert (tmp_path / "slow").read_text() == "ran"  # the running step finished
    assert not (tmp_path / "after").exists() and not (tmp_path / "queued").exists()
    printed = capsys.readouterr().out
    assert "failed (exit 3)" in printed and "the cause" in printed  # the end of its log


def test_pick_sft_links_the_least_nll(tmp_path, capsys):
    home = tmp_path / "tiny-s" / "s0"
    for lr, nll in ((1e-3, 2.5), (2e-3, 2.25), (4e-3, None)):  # None: NaN in sft.py's eval.json (diverged)
        run = home / f"sft-lr{lr:g}"
        (run / "ckpt-1984").mkdir(parents=True)
        (run / "latest").symlink_to("ckpt-1984")
        (run / "args.json").write_text(json.dumps({"lr": lr}))
        (run / "ckpt-1984" / "eval.json").write_text(json.dumps({"eval/nll_per_token": nll}))
    runs = sorted(str(p) for p in home.glob("sft-lr*"))
    driver.main(["pick-sft", str(home / "sft"), *runs])
    assert (home / "sft").is_symlink() and str((home / "sft").readlink()) == "sft-lr0.002"  # relative
    choice = json.loads((home / "sft-choice.json").read_text())
    assert choice["chosen"] == "sft-lr0.002"
    assert choice["runs"]["sft-lr0.001"] == {"lr": 1e-3, "nll_per_token": 2.5} and len(choice["runs"]) == 3
    assert choice["runs"]["sft-lr0.004"]["nll_per_token"] is None
    (home / "sft-lr0.004" / "ckpt-1984" / "eval.json").write_text(json.dumps({"eval/nll_per_token": 1.0}))
    driver.main(["pick-sft", str(home / "sft"), *runs])  # a re-run replaces the link
    assert str((home / "sft").readlink()) == "sft-lr0.004"
    with pytest.raises(ValueError, match="no eval/nll_per_token"):
        driver.main(["pick-sft", str(home / "sft"), *runs, str(tmp_path / "not-a-run")])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    return out, study("tiny_study.sh", out, "--quick")


def test_quick_study_end_to_end(quick):
    out, _ = quick
    home = out / "tiny-m" / "s0"
    assert sorted(p.name for p in home.iterdir() if p.is_dir()) == ["dpo-0.1", "ipo-0.1", "sft", "slic-0.1"]
    assert (out / "data" / "s0" / "gold.json").is_file()
    assert list(json.loads((out / "study.json").read_text())["prepare"]) == [str(out / "data" / "s0")]
    assert "eval/nll_per_token" in json.loads((home / "sft" / "latest" / "eval.json").read_text())
    fits = json.loads((out / "fit" / "fits.json").read_text())["scaling_law"]["all"]
    assert set(fits) == {"dpo", "ipo", "slic"}
    for fig in ("fig1_winrate_vs_sqrt_kl", "fig2_training_dynamics", "fig4_eval_metrics", "fig5_forward_kl"):
        assert (out / "fit" / f"{fig}.png").stat().st_size > 1000
    # ---- summary.json (scripts/tiny_summary.py): the lead's assertions go here ----
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sft"]) == {"win_rate", "win_rate_se"}
    assert {p["loss"] for p in summary["points"]} == {"dpo", "ipo", "slic"}
    assert len(summary["points"]) == len(summary["runs"]) == 3 * 3  # three checkpoints of each run, one seed
    for p in summary["points"]:
        assert {"loss", "beta", "fraction", "win_rate", "win_rate_se", "kl", "length_tokens", "n_seeds"} <= set(p)
        assert 0 <= p["win_rate"] <= 1 and p["kl"] > -1 and p["n_seeds"] == 1
        assert 0 <= p["ood_token_rate"] <= 1 and math.isfinite(p["gold_reward"] + p["proxy_reward"])  # sample.py's
        assert p["length_tokens"] >= p["length_words"] - 1e-4 and p["hits"] + p["other_words"] == pytest.approx(
            p["length_words"], rel=1e-5)  # results.csv keeps 6 digits. A word is one token of the task's tokenizer; hits + other words = words
    text = (out / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}: not strict JSON"))
    assert summary["thresholds"] == findings.THRESHOLDS and summary["seeds"] == [0]
    assert {"lr", "valid_nll", "excess_nll"} <= set(summary["sft_models"]["tiny-m"])
    assert summary["sft_models"]["tiny-m"]["excess_nll"] > 0  # above the generator's exact entropy
    for f in summary["findings"] + summary["scaling_findings"]:
        assert set(f) == {"finding", "measured", "verdict", "ci", "ci_of", "level", "comparisons"}
        assert f["verdict"] in findings.VERDICTS
        if f["verdict"] not in ("not applicable", "not measured"):  # the rule, from the comparisons alone
            assert f["verdict"] == findings.verdict(f["comparisons"])
    assert {f["finding"].split(" (")[0] for f in summary["findings"] if f["verdict"] == "not applicable"} == {
        "Length exploitation"}  # the aligned labeller never pays for length
    assert [r["series"] for r in summary["leaderboard"]["rows"]] == ["dpo", "ipo", "slic"]
    # ---- end of the lead's assertions ----


def tree(out):
    return {p for p in out.rglob("*")}


def test_rerun_skips_every_heavy_stage(quick):
    out, _ = quick
    before = tree(out)
    lines = study("tiny_study.sh", out, "--quick")
    ran = [c[1] for c in commands(lines)]
    assert ran == ["fit.py", "scripts/tiny_summary.py"]  # the cheap last stages always run
    skipped = [line.split()[2] for line in lines if line.startswith("# skip")]
    stages = {stage: skipped.count(stage) for stage in ("prepare", "sft", "daa", "sample", "judge")}
    assert stages == {"prepare": 1, "sft": 1, "daa": 3, "sample": 4, "judge": 1 + 3 * 3}  # a judgment per checkpoint
    assert tree(out) == before


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
    with pytest.raises(ValueError, match="data/s0, not .*data \\(another --same-data\\)"):
        driver.main(["tiny", str(out), "--quick", "--same-data", "--dry-run"])
    with pytest.raises(ValueError, match="tiny-m/s0/sft was made without --scaling"):
        driver.main(["tiny", str(out), "--quick", "--scaling", "--dry-run"])


def test_data_without_its_prepare_command_refuses(tmp_path):
    (tmp_path / "t" / "data" / "s0").mkdir(parents=True)  # as if prepared by hand, or before study.json existed
    with pytest.raises(ValueError, match="prepared by an unknown command"):
        driver.main(["tiny", str(tmp_path / "t"), "--dry-run"])


def test_second_seed(quick):
    """--seeds 2 adds seed 1 beside seed 0's finished runs: its own data (prepare.py --seed 1) and runs."""
    out, _ = quick
    lines = study("tiny_study.sh", out, "--quick", "--seeds", "2")
    assert f"# skip sft {out}/tiny-m/s0/sft: finished, step 31/31" in lines
    assert [json.loads((out / "data" / f"s{s}" / "gold.json").read_text())["seed"] for s in (0, 1)] == [0, 1]
    prompts = [(out / "data" / f"s{s}" / "eval_prompts.jsonl").read_text() for s in (0, 1)]
    assert prompts[0] != prompts[1]  # the data drawn from another seed
    for seed in (0, 1):
        home = out / "tiny-m" / f"s{seed}"
        for run in ("sft", "dpo-0.1", "ipo-0.1", "slic-0.1"):
            args = json.loads((home / run / "args.json").read_text())
            state = json.loads((home / run / "latest" / "trainer_state.json").read_text())
            assert args["seed"] == seed and args["data"] == str(out / "data" / f"s{seed}")
            assert state["step"] == state["total_steps"]
            ckpts = list((home / run).glob("ckpt-*"))
            assert len(ckpts) == (1 if run == "sft" else 3)
            assert all((home / run / f"judgments-{c.name}.summary.json").is_file() for c in ckpts)
    # ---- summary.json over two seeds: the lead's assertions go here ----
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2 * 3 * 3 and {p["n_seeds"] for p in summary["points"]} == {2}
    # ---- end of the lead's assertions ----
