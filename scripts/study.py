"""The study, end to end: prepare → SFT → DAA runs → sample every checkpoint → judge → fit → summary.

One pipeline, two presets (the paper's §3.1 on GPUs, and its offline miniature):

    python scripts/study.py tiny OUT [--quick] [--seeds N] [--scaling] [--jobs N] [--dry-run]
    python scripts/study.py paper OUT [--sizes pythia-1b,pythia-2.8b,pythia-6.9b] [--nproc N] [--dry-run]

(scripts/tiny_study.sh and scripts/paper_study.sh call it.) Every stage is a call of the
repository's own scripts, printed as it starts, one line each; its output goes to a log
beside its run directory. Re-running the same command resumes: a stage whose outputs are
complete on disk prints "# skip"; a killed one resumes where it stopped (sft.py and daa.py
from their `latest` checkpoint, judge.py from its judgments file). `--dry-run` prints the
commands it would run and an estimate of their cost, and runs nothing.

Layout: OUT/data/ (prepared once), OUT/<model>/s<seed>/sft and OUT/<model>/s<seed>/<loss>-<β>[-<arm>]
(run directories), OUT/<model>/s<seed>/<run>.log, OUT/fit/ (fit.py), OUT/study.json (the
prepare command, so that a re-run with other data flags refuses instead of mixing data).
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import files  # noqa: E402
import training  # noqa: E402
from fit import n_params  # noqa: E402
from model import PYTHIA  # noqa: E402

# The miniature: a tiny GPT-NeoX trained from scratch on data/tiny, judged by its gold reward. All its
# settings live here. DAA as App. B (RMSprop, linear warmup then constant, one epoch, 4 checkpoints),
# scaled to a ~140k-parameter model: batch 64, lr 1e-4, 30 warmup steps. A sweep chose them
# (docs/study.md): at lr 3e-5 β hardly moves the final KL (3× over β 0.1–1); at 3e-4 the KL saturates
# within 25–50 % of the epoch; at 1e-4 it falls monotonically with β over 20× (AdamW as well; RMSprop
# is the paper's). SFT only has to give a sensible reference: AdamW, lr 2e-3.
TINY = {
    "sft_examples": 30000, "pref_examples": 20000, "eval_prompts": 600,  # data/tiny/prepare.py
    "prepare_flags": [],                       # extra data/tiny/prepare.py flags
    "models": {"tiny-m": "models/tiny-m"},  # name -> model directory under OUT/data (prepare.py writes them)
    "batch_size": 64,                          # SFT and DAA
    "sft_optimizer": "adamw", "sft_lr": 2e-3, "sft_warmup": 0,
    "optimizer": "rmsprop", "lr": 1e-4, "warmup": 30, "checkpoints": 4, "eval_examples": 500,  # DAA
    "betas": {"dpo": [0.1, 0.15, 0.2, 0.3, 0.5, 1.0],
              "ipo": [0.02, 0.05, 0.1, 0.2, 0.5, 1.0],  # IPO's own grid: its target margin is 1/(2β)
              "slic": [0.1, 0.15, 0.2, 0.3, 0.5, 1.0]},
    "arms": [],  # extra DAA runs: {"suffix", "loss", "flags" (daa.py), "models"}, at the loss's β grid
    "sample_flags": ["--max-new-tokens", "24", "--batch-size", "200"],  # after --ckpt --ref --prompts --n
    "quick": {  # --quick: plumbing in about half a minute per seed
        "sft_examples": 2000, "pref_examples": 1024, "eval_prompts": 64, "checkpoints": 3,
        "warmup": 4, "eval_examples": 128,  # 16 DAA steps
        "betas": {"dpo": [0.1], "ipo": [0.1], "slic": [0.1]},
    },
    "scaling": {  # --scaling (issue 14): three sizes, each its own SFT reference; two arms at the middle size
        "models": {"tiny-s": "models/tiny-s", "tiny-m": "models/tiny-m", "tiny-l": "models/tiny-l"},
        "arms": [{"suffix": "len0.5", "loss": "dpo", "flags": ["--length-alpha", "0.5"], "models": ["tiny-m"]},
                 {"suffix": "nll1", "loss": "dpo", "flags": ["--nll-alpha", "1"], "models": ["tiny-m"]}],  # RPO
    },
    # --dry-run estimate: tokens per example measured on data/tiny (prompt ~10, response ~3 + EOS)
    "tokens": {"prompt": 10, "response": 4, "sample": 8, "judge_in": 0, "judge_out": 0},
}

# The paper (§3.1, App. B): Pythia 1B, 2.8B and 6.9B on Reddit TL;DR, 3 losses × 7 β per size, judged by
# gpt-4-turbo-2024-04-09 on 256 held-out prompts. App. B's batch 128, RMSprop lr 5e-7, 150 warmup steps,
# 1 epoch and 4 checkpoints are the defaults of sft.py and daa.py, so no flag repeats them.
PAPER = {
    "sizes": ["pythia-1b", "pythia-2.8b", "pythia-6.9b"],
    "nproc": {"pythia-1b": 2, "pythia-2.8b": 4, "pythia-6.9b": 4},  # App. B: 2 A40, 4 A40, 4 A100
    # DDP holds 16 bytes per parameter on every GPU (fp32 weights, gradients, RMSprop state, the live
    # reference): 45 GB at 2.8B, more than an A40's 48 GB leaves beside activations; 110 GB at 6.9B.
    # FSDP over 4 GPUs: 11 and 28 GB each. 1B under DDP: 16 GB + about 5 GB for 8 shared pairs in bf16.
    "fsdp": ["pythia-2.8b", "pythia-6.9b", "pythia-12b"],
    "grad_accum": 8,  # App. B: "batch size of 128 (8 gradient accumulation steps)"
    # The paper uses seven β per loss but does not list them: this grid is ours, the same for all
    # three losses so that §3.1's "IPO reaches lower KL at equal β" can be checked.
    "betas": {loss: [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0] for loss in ("dpo", "ipo", "slic")},
    "eval_prompts": 256, "eval_examples": 256,  # App. B: 256 held-out prompts for all evaluations
    "batch_size": 128, "checkpoints": 4,        # sft.py / daa.py defaults (App. B), for the plan and estimate
    "sft_examples": 116722, "pref_examples": 92858,  # data/tldr/prepare.py's sft_train and pref_train rows
    # --dry-run estimate, assumed: TL;DR prompt (post) and human summary tokens, a policy sample,
    # and one judge request (our prompt template ~150 tokens + post + both summaries) and its reply.
    "tokens": {"prompt": 350, "response": 30, "sample": 100, "judge_in": 630, "judge_out": 40},
}

# --dry-run estimate assumptions (arithmetic, not measurements).
GPU = {"name": "A100 bf16 dense", "peak": 312e12}
MFU = {"train": 0.35, "sample": 0.05}  # decoding is memory-bound: far below the training MFU
JUDGE_PRICE = {"model": "gpt-4-turbo", "in": 10e-6, "out": 30e-6}  # US$ per token (OpenAI's list price)
STAGES = ("prepare", "sft", "daa", "sample", "judge", "fit", "summary")
PLAN = ("batch_size", "sft_examples", "pref_examples", "checkpoints", "eval_prompts", "eval_examples")


# ---------------------------------------------------------------- presets -> one settings object

def tiny(args):
    cfg = dict(TINY)
    for mode in ("quick", "scaling"):
        if getattr(args, mode):
            cfg.update(TINY[mode])
    if args.losses:  # a loss without a grid of its own (a new one, docs/new_loss.md) takes DPO's
        cfg["betas"] = {loss: cfg["betas"].get(loss, cfg["betas"]["dpo"]) for loss in args.losses}
    out, data = args.out, args.out / "data"
    common = ["--data", data, "--batch-size", cfg["batch_size"], "--micro-batch-size", cfg["batch_size"],
              "--log-interval", 100]
    prepare = ["python", "data/tiny/prepare.py", "--out-dir", data, "--sft-examples", cfg["sft_examples"],
               "--pref-examples", cfg["pref_examples"], "--eval-prompts", cfg["eval_prompts"], *cfg["prepare_flags"]]
    prepare += ["--labeller", args.labeller] if args.labeller else []
    prepare += ["--no-byte-fallback"] if args.no_byte_fallback else []
    return SimpleNamespace(
        out=out, data=data, prepare=prepare, models={m: data / d for m, d in cfg["models"].items()},
        launch=lambda model: ["python"], nproc=lambda model: 1,
        sft_flags=lambda model: common + ["--optimizer", cfg["sft_optimizer"], "--lr", cfg["sft_lr"], "--warmup",
                                          cfg["sft_warmup"], "--checkpoints", 1],
        daa_flags=lambda model: common + ["--optimizer", cfg["optimizer"], "--lr", cfg["lr"], "--warmup", cfg["warmup"],
                                          "--checkpoints", cfg["checkpoints"], "--eval-examples", cfg["eval_examples"]],
        runs=runs(cfg["models"], cfg["betas"], cfg["arms"]),
        sample_flags=["--n", cfg["eval_prompts"], *cfg["sample_flags"], "--train-data", data,  # ood_token_rate
                      "--gold-spec", data / "gold.json"],  # gold and proxy rewards of the samples
        judge_flags=["--judge", "gold", "--task", "tiny", "--gold-spec", data / "gold.json"],
        summary=["python", "scripts/tiny_summary.py", out], env={"OMP_NUM_THREADS": "1"}, judge_slot="main", slots={},
        params={m: tiny_params(data / d) for m, d in cfg["models"].items()},
        plan={k: cfg[k] for k in PLAN}, tokens=cfg["tokens"])


def paper(args):
    cfg, out, data = PAPER, args.out, args.out / "data"
    unknown = [s for s in args.sizes if s not in PYTHIA]
    if unknown:
        raise ValueError(f"--sizes: {', '.join(unknown)} not a Pythia model ({', '.join(PYTHIA)})")

    def nproc(model):
        return args.nproc or cfg["nproc"].get(model, 8)

    def train_flags(model):
        micro = cfg["batch_size"] // (cfg["grad_accum"] * nproc(model))  # else sft.py's default micro-batch
        fits = micro and cfg["batch_size"] % (micro * nproc(model)) == 0
        return (["--data", data] + (["--micro-batch-size", micro] if fits else [])
                + (["--fsdp"] if model in cfg["fsdp"] else []))
    return SimpleNamespace(
        out=out, data=data, prepare=["python", "data/tldr/prepare.py", "--out-dir", data],
        models={m: f"EleutherAI/{m}" for m in args.sizes},
        launch=lambda model: ["torchrun", "--standalone", "--nproc_per_node", nproc(model)], nproc=nproc,
        sft_flags=train_flags,
        daa_flags=lambda model: train_flags(model) + ["--eval-examples", cfg["eval_examples"]],
        runs=runs(args.sizes, cfg["betas"], []),
        sample_flags=["--num-prompts", cfg["eval_prompts"], "--train-data", data],  # torchrun takes --n as its own
        judge_flags=[], summary=None, env={}, judge_slot="api", slots={"api": 2},  # judging beside the GPU jobs
        params={m: n_params(PYTHIA[m].to_dict()) for m in args.sizes},
        plan={k: cfg[k] for k in PLAN}, tokens=cfg["tokens"])


def runs(models, betas, arms):
    """(model, run name, daa.py flags) of every DAA run: each loss at its β grid at every size, then the arms."""
    out = []
    for model in models:
        for loss, grid in betas.items():
            out += [(model, f"{loss}-{b:g}", ["--loss", loss, "--beta", f"{b:g}"]) for b in grid]
        for arm in arms:
            if model in arm["models"] and arm["loss"] in betas:
                out += [(model, f"{arm['loss']}-{b:g}-{arm['suffix']}", ["--loss", arm["loss"], "--beta", f"{b:g}",
                                                                       *arm["flags"]]) for b in betas[arm["loss"]]]
    return out


def tiny_params(model_dir):
    """Parameters of a miniature model, from the config.json prepare.py wrote; NaN before it ran."""
    path = Path(model_dir) / "config.json"
    return n_params(json.loads(path.read_text())) if path.is_file() else math.nan


# ---------------------------------------------------------------- what is done, on disk

def state(run):
    path = Path(run) / "latest" / "trainer_state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoints(run):
    return sorted((p for p in Path(run).glob("ckpt-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def planned_checkpoints(S, n_examples, n_checkpoints):
    """The ckpt-<examples> names a run will write (training.make_plan's spacing), for --dry-run."""
    plan = training.make_plan(SimpleNamespace(batch_size=S.plan["batch_size"], micro_batch_size=S.plan["batch_size"],
                                              epochs=1, checkpoints=n_checkpoints, seed=0),
                              SimpleNamespace(world=1, rank=0), n_examples)
    return [f"ckpt-{step * plan.batch_size}" for step in plan.checkpoint_steps]


def samples_done(run, ckpt):
    return (Path(run) / f"samples-{ckpt}.summary.json").is_file()


def judged(run, ckpt):
    """judge.py writes its summary once every sample has a judgment."""
    path = Path(run) / f"judgments-{ckpt}.summary.json"
    if not (path.is_file() and samples_done(run, ckpt)):
        return False
    n = json.loads((Path(run) / f"samples-{ckpt}.summary.json").read_text()).get("n")
    return json.loads(path.read_text()).get("n") == n


# ---------------------------------------------------------------- the stages, as jobs

def step(label, argv=None, log=None, cost=None):
    """One line of the study: a command to run (argv), or a skip (argv None)."""
    return SimpleNamespace(label=label, argv=[str(a) for a in argv] if argv else None, log=log, cost=cost or {})


def job(name, stage, deps, steps, slot="main"):
    return SimpleNamespace(name=name, stage=stage, deps=deps, steps=steps, slot=slot)


def build(S, seeds):
    """Every job of the study, in stage order; `steps(dry)` yields its steps when the job starts,
    so that what is already done is decided then (dry: checkpoint names from the plan, not disk)."""
    P = S.plan
    jobs = [job("prepare", "prepare", [], lambda dry: iter([
        step(f"prepare {S.data}: exists") if S.data.is_dir() else step("prepare", S.prepare, S.out / "prepare.log")]))]
    evals = []
    for model in S.models:
        for seed in seeds:
            home = S.out / model / f"s{seed}"
            sft = home / "sft"
            jobs.append(train_job(f"sft {sft}", "sft", ["prepare"], sft, S.launch(model) + [
                "sft.py", "--model", S.models[model], "--out", sft, "--seed", seed, *S.sft_flags(model)], sft_cost(S, model)))
            evals.append((model, sft, sft, planned_checkpoints(S, P["sft_examples"], 1)))
            for m, name, flags in S.runs:
                if m != model:
                    continue
                run = home / name
                jobs.append(train_job(f"daa {run}", "daa", [f"sft {sft}"], run, S.launch(model) + [
                    "daa.py", "--init", sft, "--out", run, "--seed", seed, *flags, *S.daa_flags(model)], daa_cost(S, model)))
                evals.append((model, run, sft, planned_checkpoints(S, P["pref_examples"], P["checkpoints"])))
    for model, run, sft, planned in evals:
        trained = f"sft {run}" if run == sft else f"daa {run}"
        jobs.append(job(f"sample {run}", "sample", [trained], sample_steps(S, model, run, sft, planned)))
    for model, run, sft, planned in evals:
        jobs.append(job(f"judge {run}", "judge", [f"sample {run}"], judge_steps(S, run, planned), S.judge_slot))
    fit = ["python", "fit.py", *[run for _, run, _, _ in evals], "--out", S.out / "fit"]
    jobs.append(job("fit", "fit", [j.name for j in jobs if j.stage == "judge"],
                    lambda dry: iter([step("fit", fit, S.out / "fit.log")])))
    if S.summary:
        jobs.append(job("summary", "summary", ["fit"], lambda dry: iter([step("summary", S.summary)])))
    return jobs


def train_job(name, stage, deps, run, argv, cost):
    def steps(dry):
        s = state(run)
        if s and s["step"] == s["total_steps"]:
            yield step(f"{name}: finished, step {s['step']}/{s['total_steps']}")
        else:
            yield step(name, argv, f"{run}.log", cost)
    return job(name, stage, deps, steps)


def sample_steps(S, model, run, sft, planned):
    def steps(dry):
        names = planned if dry else [c.name for c in checkpoints(run)]
        todo = [c for c in names if not samples_done(run, c)]
        if not todo:
            yield step(f"sample {run}: every checkpoint has its samples-<ckpt>.summary.json")
            return
        yield step(f"sample {run}", S.launch(model) + ["sample.py", "--ckpt", *[run / c for c in todo],
                   "--ref", sft / "latest", "--prompts", S.data / "eval_prompts.jsonl", *S.sample_flags],
                   f"{run}.log", sample_cost(S, model, len(todo)))
    return steps


def judge_steps(S, run, planned):
    def steps(dry):
        for c in (planned if dry else [p.name for p in checkpoints(run) if samples_done(run, p.name)]):
            if judged(run, c):
                yield step(f"judge {run}/samples-{c}.jsonl: judged")
            else:
                yield step(f"judge {run}/{c}", ["python", "judge.py", run / f"samples-{c}.jsonl", *S.judge_flags],
                           f"{run}.log", {"judgments": S.plan["eval_prompts"]})
    return steps


# ---------------------------------------------------------------- running

def show(s):
    """The printed line: the command, shell-quoted, with its log redirection; or the skip."""
    if s.argv is None:
        return f"# skip {s.label}"
    return shlex.join(s.argv) + (f" >> {shlex.quote(str(s.log))} 2>&1" if s.log else "")


def dry_run(jobs, S):
    total, hours = {}, {}  # FLOPs and judgments; GPU-hours per model
    for j in jobs:
        for s in j.steps(True):
            print(show(s))
            for k, v in s.cost.items():
                if k != "model":
                    total[k] = total.get(k, 0) + v
            if "model" in s.cost:
                hours[s.cost["model"]] = hours.get(s.cost["model"], 0) + gpu_hours(s.cost)
    for line in estimate(total, hours, S):
        print(line)


def start(s, env):
    """Popen one step, its output appended to its log (or on the console: the summary's table)."""
    print(show(s), flush=True)
    argv = [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(s.argv)]
    log = None
    if s.log:
        Path(s.log).parent.mkdir(parents=True, exist_ok=True)
        log = open(s.log, "a")
        log.write(f"\n$ {shlex.join(s.argv)}\n")
        log.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT if log
                            else None)
    return SimpleNamespace(proc=proc, step=s, log=log)


def advance(it, S):
    """Print the job's skips up to its next command and start that; None when the job has no more."""
    for s in it:
        if s.argv is None:
            print(show(s), flush=True)
        else:
            return start(s, S.env)
    return None


def tail(path, n=8):
    lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    return "\n".join("    " + line for line in lines)


def execute(jobs, S, n_jobs):
    """Run the jobs, each once its dependencies are done, at most n_jobs at a time ("api" jobs, judging,
    in their own slots). Downstream stages go first, so a finished run is evaluated while others train.
    A failure stops new jobs from starting; the running ones finish (they resume on the next call)."""
    limits = {"main": n_jobs, **S.slots}
    pending, running, done, failed = list(jobs), {}, set(), []
    try:
        while pending or running:
            while not failed:
                ready = [j for j in pending if set(j.deps) <= done and
                         sum(r.job.slot == j.slot for r in running.values()) < limits[j.slot]]
                if not ready:
                    break
                j = max(ready, key=lambda j: STAGES.index(j.stage))
                pending.remove(j)
                it = j.steps(False)
                r = advance(it, S)
                if r is None:
                    done.add(j.name)
                else:
                    running[j.name] = SimpleNamespace(job=j, it=it, cur=r)
            if not running:
                break
            time.sleep(0.2)
            for name, r in list(running.items()):
                rc = r.cur.proc.poll()
                if rc is None:
                    continue
                if r.cur.log:
                    r.cur.log.close()
                if rc:
                    failed.append(r.cur.step)
                    print(f"failed (exit {rc}): {r.cur.step.label}" +
                          (f"; the end of {r.cur.step.log}:\n{tail(r.cur.step.log)}" if r.cur.step.log else ""),
                          flush=True)
                    del running[name]
                    continue
                nxt = advance(r.it, S)
                if nxt is None:
                    done.add(name)
                    del running[name]
                else:
                    r.cur = nxt
    except KeyboardInterrupt:
        for r in running.values():
            r.cur.proc.terminate()
            r.cur.proc.wait()
        raise
    return failed


# ---------------------------------------------------------------- the --dry-run estimate

def sft_cost(S, model):
    """FLOPs of one SFT epoch: forward and backward, 6 per parameter and token."""
    T = S.tokens
    return {"model": model, "train": 6 * S.params[model] * S.plan["sft_examples"] * (T["prompt"] + T["response"])}


def daa_cost(S, model):
    """The policy's forward and backward on each pair, π_ref's forward on it, and the forwards of π and π_ref
    on the held-out pairs at every checkpoint (2 per parameter and token). A pair is one prefix-shared row,
    prompt + chosen + rejected (daa.py's default)."""
    P, n, row = S.plan, S.params[model], S.tokens["prompt"] + 2 * S.tokens["response"]
    forwards = P["pref_examples"] + 2 * P["eval_examples"] * P["checkpoints"]
    return {"model": model, "train": 6 * n * P["pref_examples"] * row + 2 * n * forwards * row}


def sample_cost(S, model, n_checkpoints):
    """Generation, then the policy's and the reference's log-probs: three forwards over prompt + sample."""
    T = S.tokens
    tokens = n_checkpoints * S.plan["eval_prompts"] * (T["prompt"] + T["sample"])
    return {"model": model, "sample": 3 * 2 * S.params[model] * tokens}


def gpu_hours(flops):
    return sum(flops.get(k, 0) / (GPU["peak"] * MFU[k]) for k in MFU) / 3600


def estimate(total, by_model, S):
    """Comment lines: GPU-hours and judge cost of the commands printed above, with the assumptions."""
    T, hours = S.tokens, gpu_hours(total)
    n_judge = total.get("judgments", 0)
    cost = n_judge * (T["judge_in"] * JUDGE_PRICE["in"] + T["judge_out"] * JUDGE_PRICE["out"])
    flops = "FLOPs unknown until OUT/data holds the model configs" if math.isnan(hours) else \
        f"{total.get('train', 0):.2e} training + {total.get('sample', 0):.2e} sampling FLOPs ≈ {hours:,.1f} GPU-hours"
    per_model = ", ".join(f"{m} {h:,.1f} GPU-hours ({h / S.nproc(m):,.1f} h on {S.nproc(m)} GPUs)"
                          for m, h in by_model.items() if not math.isnan(h))
    return [f"# estimate per model: {per_model or 'n/a'}",
            f"# estimate (arithmetic, not a measurement) of the commands above: {flops}; "
            f"judge: {n_judge:,} judgments ≈ ${cost:,.0f}",
            f"# assumed: training 6·N FLOPs per token (forward + backward), reference, evaluation and sampling "
            f"forwards 2·N (sampling: generation, then policy and reference scoring); {T['prompt']} prompt, "
            f"{T['response']} response and {T['sample']} sample tokens per example; a pair as one prefix-shared "
            f"row; {GPU['name']} {GPU['peak'] / 1e12:.0f} TFLOP/s at {MFU['train']:.0%} MFU for training, "
            f"{MFU['sample']:.0%} for sampling; judge {T['judge_in']} input + {T['judge_out']} output tokens at "
            f"{JUDGE_PRICE['model']}'s ${JUDGE_PRICE['in'] * 1e6:g} / ${JUDGE_PRICE['out'] * 1e6:g} per 1M tokens"]


# ---------------------------------------------------------------- main

def check_prepared(S, dry_run):
    """OUT/study.json records the prepare command, written before prepare runs: a re-run whose data
    flags differ from those of the data on disk refuses instead of mixing them."""
    path, new = S.out / "study.json", [str(a) for a in S.prepare]
    if S.data.is_dir():
        old = json.loads(path.read_text())["prepare"] if path.is_file() else None
        if old != new:
            made = f"`{shlex.join(old)}`" if old else "an unknown command (no study.json)"
            raise ValueError(f"{S.data} was prepared by {made}, not `{shlex.join(new)}` "
                             "(other --quick/--labeller/data flags): use a new OUT")
    elif not dry_run:
        S.out.mkdir(parents=True, exist_ok=True)
        files.write_json(path, {"prepare": new})


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out", type=Path, help="the study's directory (created; re-running on it resumes)")
    common.add_argument("--dry-run", action="store_true", help="print every command it would run and the "
                        "estimated GPU-hours and judge cost; run nothing, write nothing")
    common.add_argument("--seeds", type=int, default=1, help="run every SFT and DAA run on seeds 0 … N−1 "
                        "(sft.py/daa.py --seed: data order and initialisation; default %(default)s)")
    sub = p.add_subparsers(dest="preset", required=True)
    t = sub.add_parser("tiny", parents=[common], help="the offline miniature (scripts/tiny_study.sh)")
    t.add_argument("--quick", action="store_true", help="tiny data, one β per loss: plumbing in about half a minute")
    t.add_argument("--scaling", action="store_true", help="three model sizes, plus the length-regularised and "
                   "the RPO (--nll-alpha) DPO arms at the middle size")
    t.add_argument("--labeller", default=None, help="data/tiny/prepare.py --labeller NAME")
    t.add_argument("--no-byte-fallback", action="store_true", help="data/tiny/prepare.py --no-byte-fallback")
    t.add_argument("--losses", type=lambda s: s.split(","), default=None, help="comma-separated daa.py losses "
                   "to run (default: dpo, ipo and slic); one with no β grid in TINY gets DPO's")
    t.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each (default %(default)s)")
    g = sub.add_parser("paper", parents=[common], help="the paper on a GPU node (scripts/paper_study.sh)")
    g.add_argument("--sizes", type=lambda s: s.split(","), default=PAPER["sizes"],
                   help="comma-separated Pythia models (default: %(default)s, §3.1)")
    g.add_argument("--nproc", type=int, default=None, help="GPUs per torchrun job (default: the paper's, "
                   "2 for 1b, 4 for 2.8b and 6.9b, App. B)")
    g.add_argument("--jobs", type=int, default=1, help="GPU jobs side by side (default %(default)s: each takes "
                   "--nproc GPUs); judging runs beside them")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be at least 1")
    out = args.out.resolve()
    args.out = Path(os.path.relpath(out, ROOT)) if out.is_relative_to(ROOT) else out  # commands run from ROOT
    S = (tiny if args.preset == "tiny" else paper)(args)
    check_prepared(S, args.dry_run)
    jobs = build(S, range(args.seeds))
    if args.dry_run:
        return dry_run(jobs, S)
    t0 = time.time()
    failed = execute(jobs, S, args.jobs)
    if failed:
        raise RuntimeError(f"{len(failed)} stage(s) failed ({', '.join(s.label for s in failed)}); "
                           "fix the cause and re-run the same command: finished stages are skipped")
    print(f"done in {time.time() - t0:.0f} s: {S.out}/fit/" + (f", {S.out}/summary.json" if S.summary else ""))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")
