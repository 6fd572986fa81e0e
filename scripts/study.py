"""The study, end to end: prepare → SFT → DAA runs → sample every checkpoint → judge → fit → summary.

    python scripts/study.py tiny OUT [--quick] [--seeds N] [--same-data] [--scaling] [--bench] [--frontier]
        [--losses LIST] [--variant NAME] [--labeller NAME] [--no-byte-fallback] [--jobs N] [--dry-run]
    python scripts/study.py paper OUT [--sizes pythia-1b,pythia-2.8b,pythia-6.9b] [--nproc N] [--seeds N] [--jobs N]
        [--dry-run]

(scripts/tiny_study.sh and scripts/paper_study.sh; docs/study.md.) plan() writes the study as a flat,
ordered list of steps: a command of the repository's scripts, the outputs it writes, the outputs it
needs. execute() starts a step once no unfinished step makes what it needs, the first ready in list
order (a finished run is sampled while others train), at most --jobs at a time, its output appended
to a log. --dry-run prints every command and their cost (scripts/estimate.py), and runs nothing.

Layout (HOME = OUT/<size>/s<seed>; DATA = OUT/data/s<seed>, or OUT/data with --same-data and for the paper):
    OUT/study.json              each DATA's prepare command: a re-run with other data flags refuses
    DATA/, DATA.log             data/tiny/prepare.py --seed <seed> (the paper: data/tldr/prepare.py)
    HOME/sft                    the SFT model, reference of every run beside it; under --scaling a link to
                                the HOME/sft-lr<lr> of least held-out NLL (HOME/sft-choice.json)
    HOME/<loss>-<β>[-<arm>]     a DAA run, with samples-<ckpt>.jsonl and judgments-<ckpt>.jsonl
    HOME/rm, HOME/bon           --frontier: the reward model, best-of-n (bon/bon.jsonl, fit.py reads it)
    HOME/<run>.log              the output of every command that wrote that run directory
    OUT/fit/, OUT/summary.json  fit.py; scripts/tiny_summary.py (tiny preset)

Resume: run the same command again. A finished output is skipped (`# skip ...`): a DATA that exists, a
training run whose latest/trainer_state.json has step == total_steps, a checkpoint's samples summary, a
judgments summary counting every sample, bon/bon.jsonl, sft-choice.json. A half-done one resumes:
sft.py, daa.py and rm.py from `latest`, judge.py appends to its judgments, sample.py gets only the
checkpoints without a summary. fit and the summary always run (seconds).
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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import files  # noqa: E402
import training  # noqa: E402
from estimate import estimate  # noqa: E402  (scripts/estimate.py)
from model import PYTHIA  # noqa: E402

SIZES = ["tiny-s", "tiny-m", "tiny-l"]  # data/tiny/prepare.py writes DATA/models/<size>
DPO_GRID = [0.1, 0.15, 0.2, 0.3, 0.5, 1.0]
LENGTH_ARM = {"suffix": "len0.5", "loss": "dpo", "flags": ["--length-alpha", "0.5"]}  # Park et al., Fig. 3 left

# The miniature: a tiny GPT-NeoX trained from scratch on data/tiny, judged by its gold reward. DAA as App. B
# (RMSprop, warmup then constant, one epoch, 4 checkpoints) at batch 64, lr 1e-4, 30 warmup steps: a sweep chose
# them (docs/study.md; at 1e-4 the final KL falls monotonically with β over 20×, at 3e-5 over 3×, at 3e-4 it
# saturates within half the epoch). SFT only has to give a sensible reference.
TINY = {
    "preset": "tiny", "sizes": ["tiny-m"], "main": "tiny-m",  # arms and --frontier run at the main size
    "sft_examples": 30000, "pref_examples": 20000, "eval_prompts": 600,  # data/tiny/prepare.py
    "batch_size": 64, "eval_examples": 500,  # SFT, DAA, RM; held-out examples scored at every checkpoint
    "sft_optimizer": "adamw", "sft_lr": 2e-3, "sft_warmup": 0,  # SFT and RM, one checkpoint
    "optimizer": "rmsprop", "lr": {size: 1e-4 for size in SIZES}, "warmup": 30, "checkpoints": 4,  # DAA
    "losses": ["dpo", "ipo", "slic"],
    "betas": {"dpo": DPO_GRID, "ipo": [0.02, 0.05, 0.1, 0.2, 0.5, 1.0],  # IPO's target margin is 1/(2β)
              "slic": DPO_GRID,  # the published fixes: docs/study.md's sweep (β means something else in each)
              "chipo": [1.0, 0.3, 0.1, 0.03, 0.01, 0.001], "dpop": DPO_GRID,  # at λ 50 no grid spans 10×
              "caldpo": [0.1, 0.03, 0.01, 0.003, 0.001, 0.0003], "simpo": [0.3, 0.5, 0.7, 1.0, 2.0, 10.0]},
    "arms": [],  # extra DAA runs at the main size on their loss's β grid: {"suffix", "loss", "flags" (daa.py)}
    "sample_flags": ["--max-new-tokens", "24", "--batch-size", "200"],  # after --ckpt --ref --prompts --n (bon.py:
    # the same length cap)
    "env": {"OMP_NUM_THREADS": "1"},  # one thread per process, --jobs processes side by side
    # --dry-run estimate: tokens per example measured on data/tiny (prompt ~10, response ~3 + EOS)
    "tokens": {"prompt": 10, "response": 4, "sample": 8, "judge_in": 0, "judge_out": 0},
    # The modes' sub-dicts go over the above in MODES' order (--quick last: a quick version of each).
    "scaling": {  # issues 14, 21.7: three sizes, each its own SFT reference at its SFT lr of least held-out NLL
        # The grid brackets every size's least held-out NLL on both task variants (a probe, docs/study.md).
        "sizes": SIZES, "sft_lrs": {size: [5e-4, 1e-3, 2e-3] for size in SIZES},
        "arms": [LENGTH_ARM, {"suffix": "nll1", "loss": "dpo", "flags": ["--nll-alpha", "1"]}],  # RPO
    },
    "bench": {  # issue 22.3: seven losses; RPO at two small α (placeholders) and length-regularised DPO
        "losses": ["dpo", "ipo", "slic", "chipo", "dpop", "caldpo", "simpo"],
        "arms": [LENGTH_ARM, *({"suffix": f"nll{a:g}", "loss": "dpo", "flags": ["--nll-alpha", f"{a:g}"]}
                               for a in (0.05, 0.2))],
    },
    "frontier": {"rm_lr": 1e-3, "bon_samples": 256, "online": 4},  # issue 23.7: rm.py, bon.py, daa.py --online
    "quick": {  # plumbing in about half a minute per seed (tests): 16 DAA steps
        "sft_examples": 2000, "pref_examples": 1024, "eval_prompts": 64, "checkpoints": 3, "warmup": 4,
        "eval_examples": 128, "betas": {"dpo": [0.1], "ipo": [0.1], "slic": [0.1]},  # the other losses get DPO's
        "sft_lrs": {size: [2e-3, 4e-3] for size in SIZES}, "bon_samples": 16,
    },
}
MODES = ("scaling", "bench", "frontier", "quick")

# The paper (§3.1, App. B): Pythia 1B, 2.8B and 6.9B on Reddit TL;DR, 3 losses × 7 β per size, judged by
# gpt-4-turbo-2024-04-09 on 256 held-out prompts. App. B's batch 128, RMSprop lr 5e-7, 150 warmup steps,
# 1 epoch and 4 checkpoints are the defaults of sft.py and daa.py, so no flag repeats them.
PAPER = {
    "preset": "paper", "sizes": ["pythia-1b", "pythia-2.8b", "pythia-6.9b"], "main": None, "arms": [],
    "nproc": {"pythia-1b": 2, "pythia-2.8b": 4, "pythia-6.9b": 4},  # App. B: 2 A40, 4 A40, 4 A100 (others: 8)
    # DDP holds 16 B per parameter on every GPU (fp32 weights, gradients, RMSprop state, the live reference):
    # 45 GB at 2.8B, more than an A40's 48 GB leaves beside activations. FSDP over 4 GPUs: 11 GB (6.9B: 28).
    "fsdp": ["pythia-2.8b", "pythia-6.9b", "pythia-12b"],
    "grad_accum": 8,  # App. B: "batch size of 128 (8 gradient accumulation steps)"
    # The paper uses seven β per loss but does not list them: this grid is ours, the same for all
    # three losses so that §3.1's "IPO reaches lower KL at equal β" can be checked.
    "losses": ["dpo", "ipo", "slic"], "betas": {loss: [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0] for loss in
                                                ("dpo", "ipo", "slic")},
    "eval_prompts": 256, "eval_examples": 256,  # App. B: 256 held-out prompts for all evaluations
    "batch_size": 128, "checkpoints": 4,  # sft.py / daa.py defaults (App. B), for the plan and estimate
    "sft_examples": 116722, "pref_examples": 92858,  # data/tldr/prepare.py's sft_train and pref_train rows
    "env": {}, "judge_jobs": 2,  # judging runs beside the GPU jobs, two at a time: it waits on the API
    # --dry-run estimate, assumed: TL;DR post and summary tokens, a policy sample, a judge request (~150
    # template tokens + post + both summaries) and its reply
    "tokens": {"prompt": 350, "response": 30, "sample": 100, "judge_in": 630, "judge_out": 40},
}


def settings(args):
    """The preset's dict with the chosen modes' sub-dicts over it (their arms add up), and the data flags."""
    if args.preset == "paper":
        unknown = [s for s in args.sizes if s not in PYTHIA]
        if unknown:
            raise ValueError(f"--sizes: {', '.join(unknown)} not a Pythia model ({', '.join(PYTHIA)})")
        nproc = {s: args.nproc or PAPER["nproc"].get(s, 8) for s in args.sizes}
        return {**PAPER, "sizes": args.sizes, "nproc": nproc, "modes": set(), "same_data": True}
    cfg, modes = {k: v for k, v in TINY.items() if k not in MODES}, {m for m in MODES if getattr(args, m)}
    for mode in (m for m in MODES if m in modes):
        cfg = {**cfg, **TINY[mode], "arms": cfg["arms"] + TINY[mode].get("arms", [])}
    prepare = [a for k in ("variant", "labeller") if getattr(args, k) for a in (f"--{k}", getattr(args, k))]
    return {**cfg, "losses": args.losses or cfg["losses"], "modes": modes, "same_data": args.same_data,
            "arms": list({a["suffix"]: a for a in cfg["arms"]}.values()),  # --scaling's and --bench's len0.5 once
            "prepare_flags": prepare + ["--no-byte-fallback"] * args.no_byte_fallback}


# ---------------------------------------------------------------- the commands

def paper(cfg):
    return cfg["preset"] == "paper"


def launch(cfg, size):
    return ["torchrun", "--standalone", "--nproc_per_node", cfg["nproc"][size]] if paper(cfg) else ["python"]


def prepare_cmd(cfg, data, seed):
    if paper(cfg):
        return ["python", "data/tldr/prepare.py", "--out-dir", data]
    return ["python", "data/tiny/prepare.py", "--out-dir", data, "--seed", seed, "--sft-examples", cfg["sft_examples"],
            "--pref-examples", cfg["pref_examples"], "--eval-prompts", cfg["eval_prompts"], *cfg["prepare_flags"]]


def train_flags(cfg, size, stage, lr):
    """sft.py / daa.py / rm.py flags after --data. The miniature spells out its optimizer (rm.py trains as SFT
    does); the paper's are the scripts' defaults (App. B), so it passes only the micro-batch and FSDP."""
    if paper(cfg):
        n, batch = cfg["nproc"][size], cfg["batch_size"]
        micro = batch // (cfg["grad_accum"] * n)  # App. B's 8 accumulation steps; else sft.py's default micro-batch
        return ((["--micro-batch-size", micro] if micro and batch % (micro * n) == 0 else []) +
                (["--fsdp"] if size in cfg["fsdp"] else []) + ["--eval-examples", cfg["eval_examples"]])
    optimizer, warmup, checkpoints = ((cfg["optimizer"], cfg["warmup"], cfg["checkpoints"]) if stage == "daa"
                                      else (cfg["sft_optimizer"], cfg["sft_warmup"], 1))
    return ["--batch-size", cfg["batch_size"], "--micro-batch-size", cfg["batch_size"], "--log-interval", 100,
            "--optimizer", optimizer, "--lr", lr, "--warmup", warmup, "--checkpoints", checkpoints,
            "--eval-examples", cfg["eval_examples"]]


def sample_cmd(cfg, size, data, ckpts, ref, extra=()):
    """sample.py: KL to the reference, the OOD token rate (--train-data) and, in the miniature, each sample's
    gold and proxy reward. torchrun would take --n as its own flag: the paper passes --num-prompts."""
    n = ["--num-prompts", cfg["eval_prompts"]] if paper(cfg) else ["--n", cfg["eval_prompts"], *cfg["sample_flags"]]
    return [*launch(cfg, size), "sample.py", "--ckpt", *ckpts, "--ref", ref / "latest", "--prompts",
            data / "eval_prompts.jsonl", *n, "--train-data", data,
            *([] if paper(cfg) else ["--gold-spec", data / "gold.json"]), *extra]


def judge_cmd(cfg, data, samples):  # the paper: judge.py's API judge and its default model
    return ["python", "judge.py", samples,
            *([] if paper(cfg) else ["--judge", "gold", "--task", "tiny", "--gold-spec", data / "gold.json"])]


# ---------------------------------------------------------------- the plan

class Step(NamedTuple):
    kind: str     # prepare, sft, pick, daa, rm, bon, sample, judge, fit, summary
    size: str     # the model size it trains or samples, or None
    cmd: list     # argv; "python" first runs with this interpreter
    out: tuple    # the outputs it writes
    needs: tuple  # the outputs of other steps it reads
    log: Path     # its output is appended here (None: on the console)


def log(path):
    return Path(f"{path}.log")


def ckpt_names(cfg, split, n, checkpoints):
    """The ckpt-<examples> names a run writes (training.make_plan's spacing) over a split's rows: the prepared
    file's, or before prepare has run, the preset's count n."""
    n = sum(1 for line in split.open() if line.strip()) if split.is_file() else n
    B = cfg["batch_size"]
    plan = training.make_plan(SimpleNamespace(batch_size=B, micro_batch_size=B, epochs=1, checkpoints=checkpoints,
                                              seed=0), SimpleNamespace(world=1, rank=0), n)
    return [f"ckpt-{step * B}" for step in plan.checkpoint_steps]


def evaluate(cfg, size, data, run, ref, ckpts, extra=(), tag=""):
    """Sample a run's checkpoints (those without a summary yet) in one sample.py, then judge each one."""
    summaries = {c: run / f"samples-{c}{tag}.summary.json" for c in ckpts}
    todo = [run / c for c, summary in summaries.items() if not summary.is_file()]
    steps = [Step("sample", size, sample_cmd(cfg, size, data, todo, ref, extra), tuple(summaries.values()), (run,),
                  log(run))]
    for c, summary in summaries.items():
        steps.append(Step("judge", None, judge_cmd(cfg, data, run / f"samples-{c}{tag}.jsonl"),
                          (run / f"judgments-{c}{tag}.summary.json",), (summary,), log(run)))
    return steps


def daa_runs(cfg, size, data):
    """(run name, loss, β, more daa.py flags) of every DAA run at a size: each loss on its own β grid (a loss
    without one gets DPO's); at the main size the arms on their loss's grid and --frontier's online DPO."""
    grid = {loss: cfg["betas"].get(loss, cfg["betas"]["dpo"]) for loss in cfg["losses"]}
    runs = [(f"{loss}-{b:g}", loss, b, []) for loss in cfg["losses"] for b in grid[loss]]
    if size == cfg["main"]:
        runs += [(f"{a['loss']}-{b:g}-{a['suffix']}", a["loss"], b, a["flags"])
                 for a in cfg["arms"] if a["loss"] in grid for b in grid[a["loss"]]]
    if size == cfg["main"] and "frontier" in cfg["modes"]:
        k = cfg["online"]
        runs += [(f"dpo-{b:g}-online{k}", "dpo", b, ["--online", k, "--gold-spec", data / "gold.json",
                                                    "--online-max-new-tokens", cfg["sample_flags"][1]])
                 for b in grid.get("dpo", [])]  # the online pairs with the eval samples' length cap
    return runs


def home_steps(cfg, home, size, seed, data):
    """One size at one seed: its SFT reference (under --scaling the best of an lr grid by held-out NLL), the
    DAA runs on it, and at the main size under --frontier the reward model, best-of-n and the in-support
    re-sampling of every plain DPO run. Each trained policy is followed by its sampling and judging."""
    sft, scaling = home / "sft", "scaling" in cfg["modes"]
    model = f"EleutherAI/{size}" if paper(cfg) else data / "models" / size
    lrs = cfg["sft_lrs"][size] if scaling else [cfg.get("sft_lr")]
    tries = [home / f"sft-lr{lr:g}" for lr in lrs] if scaling else [sft]
    steps = [Step("sft", size, [*launch(cfg, size), "sft.py", "--model", model, "--out", run, "--seed", seed,
                                "--data", data, *train_flags(cfg, size, "sft", lr)], (run,), (data,), log(run))
             for run, lr in zip(tries, lrs)]
    if scaling:
        steps.append(Step("pick", size, ["python", "scripts/study.py", "pick-sft", sft, *tries],
                          (sft, home / "sft-choice.json"), tuple(tries), log(sft)))
    steps += evaluate(cfg, size, data, sft, sft, ckpt_names(cfg, data / "sft_train.jsonl", cfg["sft_examples"], 1))
    ckpts = ckpt_names(cfg, data / "pref_train.jsonl", cfg["pref_examples"], cfg["checkpoints"])
    runs = daa_runs(cfg, size, data)
    for name, loss, beta, flags in runs:
        steps.append(Step("daa", size, [*launch(cfg, size), "daa.py", "--init", sft, "--out", home / name, "--seed",
                                        seed, "--loss", loss, "--beta", f"{beta:g}", *flags, "--data", data,
                                        *train_flags(cfg, size, "daa", cfg.get("lr", {}).get(size))],
                          (home / name,), (sft, data), log(home / name)))
        steps += evaluate(cfg, size, data, home / name, sft, ckpts)
    if "frontier" not in cfg["modes"] or size != cfg["main"]:
        return steps
    rm, bon = home / "rm", home / "bon"
    steps.append(Step("rm", size, ["python", "rm.py", "--init", sft, "--data", data, "--out", rm, "--seed", seed,
                                   *train_flags(cfg, size, "rm", cfg["rm_lr"]), "--gold-spec", data / "gold.json"],
                      (rm,), (sft, data), log(rm)))  # --gold-spec: the labeller's own accuracy, the ceiling
    steps.append(Step("bon", size, ["python", "bon.py", "--policy", sft, "--rm", rm, "--prompts", data /
                                    "eval_prompts.jsonl", "--n-samples", cfg["bon_samples"], "--train-data", data,
                                    "--gold-spec", data / "gold.json", "--out", bon, "--seed", seed,
                                    *cfg["sample_flags"][:2]],
                      (bon / "bon.jsonl",), (sft, rm, data), log(bon)))
    for name, loss, beta, flags in runs:
        if loss == "dpo" and not flags:
            steps += evaluate(cfg, size, data, home / name, sft, ckpts, ["--in-support"], "+in_support")
    return steps


def plan(cfg, out, seeds):
    """Every step of the study, in order: per seed its data and, per size, home_steps; then fit over every
    sampled run and best-of-n result, and the miniature's summary."""
    steps = []
    for seed in seeds:
        data = out / "data" if cfg["same_data"] else out / "data" / f"s{seed}"
        if seed == 0 or not cfg["same_data"]:
            steps.append(Step("prepare", None, prepare_cmd(cfg, data, seed), (data,), (), log(data)))
        for size in cfg["sizes"]:
            steps += home_steps(cfg, out / size / f"s{seed}", size, seed, data)
    runs = dict.fromkeys(s.needs[0] for s in steps if s.kind == "sample")
    results = [s.out[0] for s in steps if s.kind == "bon"]
    evals = tuple(s.out[0] for s in steps if s.kind in ("judge", "bon"))
    steps.append(Step("fit", None, ["python", "fit.py", *runs, *results, "--out", out / "fit"], (out / "fit",), evals,
                      log(out / "fit")))
    if not paper(cfg):
        steps.append(Step("summary", None, ["python", "scripts/tiny_summary.py", out], (out / "summary.json",),
                          (out / "fit",), None))
    return steps


# ---------------------------------------------------------------- what is done, on disk

def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def done(s):
    """Why a step's outputs are all finished on disk (module docstring), or None."""
    if s.kind in ("sft", "daa", "rm"):
        state = read_json(s.out[0] / "latest" / "trainer_state.json")
        if state and state["step"] == state["total_steps"]:
            return f"finished, step {state['step']}/{state['total_steps']}"
        return None
    if s.kind == "judge":  # judge.py writes its summary once every sample has a judgment
        n = read_json(s.out[0]).get("n")
        return "every sample judged" if n is not None and n == read_json(s.needs[0]).get("n") else None
    return "exists" if s.kind not in ("fit", "summary") and all(o.exists() for o in s.out) else None


def check_out(out, steps, dry_run):
    """Refuse an OUT whose data came from other data flags (OUT/study.json: each DATA's prepare command,
    written before prepare runs) or that was made with --scaling where this study has none, or the reverse."""
    made = read_json(out / "study.json").get("prepare", {})
    if isinstance(made, list):  # one prepare command, OUT/data
        raise ValueError(f"{out} was made before each seed had its own data (OUT/data/s<seed>): use a new OUT")
    want = {str(s.out[0]): [str(a) for a in s.cmd] for s in steps if s.kind == "prepare"}
    for data, cmd in want.items():
        clash = [d for d in made if d.startswith(data + "/") or data.startswith(d + "/")]  # OUT/data vs OUT/data/s0
        if clash:
            raise ValueError(f"{out} has its data in {clash[0]}, not {data} (another --same-data): use a new OUT")
        if Path(data).exists() and made.get(data) != cmd:
            by = f"`{shlex.join(made[data])}`" if data in made else "an unknown command (not in study.json)"
            raise ValueError(f"{data} was prepared by {by}, not `{shlex.join(cmd)}` (other --quick/--labeller/"
                             "--variant/data flags): use a new OUT")
    for s in steps:
        if (s.kind == "pick" and s.out[0].is_dir() and not s.out[0].is_symlink()) or \
                (s.kind == "sft" and s.out[0].is_symlink()):
            raise ValueError(f"{s.out[0]} was made {'with' if s.kind == 'sft' else 'without'} --scaling: use a new OUT")
    if not dry_run and want.keys() - made.keys():
        files.write_json(out / "study.json", {"prepare": {**made, **want}})


def pick_sft(link, runs):
    """The --scaling pick step: point `link` (HOME/sft) at the run of least held-out NLL per token (sft.py's
    latest/eval.json, on sft_valid), so that sizes are compared each at its best SFT lr (issue 21.7), and
    write HOME/sft-choice.json: {"chosen": run name, "runs": {run name: {"lr", "nll_per_token"}}}."""
    link, choice = Path(link), {}
    for run in map(Path, runs):
        ev = read_json(run / "latest" / "eval.json")
        if "eval/nll_per_token" not in ev:
            raise ValueError(f"{run}/latest/eval.json has no eval/nll_per_token (sft.py --eval-examples 0?)")
        choice[run.name] = {"lr": read_json(run / "args.json")["lr"], "nll_per_token": ev["eval/nll_per_token"]}
    best = min(choice, key=lambda r: math.inf if choice[r]["nll_per_token"] is None else choice[r]["nll_per_token"])
    if choice[best]["nll_per_token"] is None:  # files.write_json writes a NaN as null: a run that diverged
        raise ValueError(f"no finite held-out NLL in {', '.join(runs)}")
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(best, tmp)  # relative: the runs sit beside the link
    os.replace(tmp, link)  # atomic (a run directory in its place: check_out refuses before)
    files.write_json(link.with_name(f"{link.name}-choice.json"), {"chosen": best, "runs": choice})
    nll = ", ".join(f"{r} {c['nll_per_token']}" for r, c in choice.items())
    print(f"{link} -> {best}; held-out NLL per token: {nll}")


# ---------------------------------------------------------------- running

def show(s, why=None):
    """The printed line: the skip, or the command, shell-quoted, with its log redirection."""
    if why:
        return f"# skip {s.kind} {s.out[0]}: {why}"
    return shlex.join(map(str, s.cmd)) + (f" >> {shlex.quote(str(s.log))} 2>&1" if s.log else "")


def start(s, env):
    """Popen one step, its output appended to its log (or on the console: the summary's table)."""
    print(show(s), flush=True)
    log = None
    if s.log:
        s.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(s.log, "a")
        print(f"\n$ {shlex.join(map(str, s.cmd))}", file=log, flush=True)
    argv = [sys.executable if i == 0 and a == "python" else str(a) for i, a in enumerate(s.cmd)]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                            stderr=subprocess.STDOUT if log else None), s, log


def lane(cfg, s):  # the paper's judging waits on an API, not the GPUs: a lane of its own
    return "judge" if s.kind == "judge" and "judge_jobs" in cfg else "main"


def execute(steps, cfg, jobs):
    """Run the steps, each once no unfinished step makes what it needs, the first ready in list order, at most
    `jobs` at a time. After a failure start nothing new, let the running finish (they resume on the next
    call), and return the failed steps."""
    todo, running, failed = list(steps), [], []
    limit = {"main": jobs, "judge": cfg.get("judge_jobs")}
    try:
        while todo or running:
            making = {o for s in todo + [r[1] for r in running] for o in s.out}
            for s in [] if failed else list(todo):
                if sum(lane(cfg, r[1]) == lane(cfg, s) for r in running) < limit[lane(cfg, s)] and \
                        making.isdisjoint(s.needs):
                    todo.remove(s)
                    running.append(start(s, cfg["env"]))
            if not running:
                break
            time.sleep(0.2)
            for proc, s, log in [r for r in running if r[0].poll() is not None]:
                running.remove((proc, s, log))
                if log:
                    log.close()
                if proc.returncode:
                    failed.append(s)
                    end = s.log.read_text(errors="replace").splitlines()[-8:] if s.log else []
                    print(f"failed (exit {proc.returncode}): {show(s)}" + "".join(f"\n    {line}" for line in end),
                          flush=True)
    except KeyboardInterrupt:
        for proc, _, _ in running:
            proc.terminate()
            proc.wait()
        raise
    return failed


# ---------------------------------------------------------------- main

def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out", type=Path, help="the study's directory (created; re-running on it resumes)")
    common.add_argument("--dry-run", action="store_true", help="print the commands and their estimated GPU-hours "
                        "and judge cost; run nothing, write nothing")
    common.add_argument("--seeds", type=int, default=1, help="seeds 0 … N−1 of every run (sft.py/daa.py --seed; "
                        "and of the miniature's data) (default %(default)s)")
    sub = p.add_subparsers(dest="preset", required=True)
    t = sub.add_parser("tiny", parents=[common], help="the offline miniature (scripts/tiny_study.sh)")
    for flag, text in [("--quick", "tiny data, one β per loss, small best-of-n: plumbing in ~30 s per seed"),
                       ("--scaling", "three sizes at their SFT lr of least held-out NLL; DPO's length and RPO arms"),
                       ("--bench", "seven losses, and RPO at two small α and length-regularised DPO"),
                       ("--frontier", "rm.py, best-of-n, online DPO, in-support re-sampling of the DPO runs"),
                       ("--same-data", "one dataset for every seed: OUT/data (seed 0's)"),
                       ("--no-byte-fallback", "data/tiny/prepare.py --no-byte-fallback")]:
        t.add_argument(flag, action="store_true", help=text)
    t.add_argument("--losses", type=lambda s: s.split(","), default=None, help="comma-separated daa.py losses "
                   "(default: dpo,ipo,slic), each on its β grid in TINY (without one: DPO's)")
    t.add_argument("--variant", default=None, help="data/tiny/prepare.py --variant NAME")
    t.add_argument("--labeller", default=None, help="data/tiny/prepare.py --labeller NAME")
    t.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each (default %(default)s)")
    g = sub.add_parser("paper", parents=[common], help="the paper on a GPU node (scripts/paper_study.sh)")
    g.add_argument("--sizes", type=lambda s: s.split(","), default=PAPER["sizes"],
                   help="comma-separated Pythia models (default: %(default)s, §3.1)")
    g.add_argument("--nproc", type=int, default=None, help="GPUs per torchrun job (default: App. B's 2, 4, 4; 8)")
    g.add_argument("--jobs", type=int, default=1, help="GPU jobs side by side, each on --nproc GPUs; judging "
                   "runs beside them (default %(default)s)")
    k = sub.add_parser("pick-sft", help="(a --scaling step) link HOME/sft to the HOME/sft-lr<lr> of least NLL")
    k.add_argument("link")
    k.add_argument("runs", nargs="+")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.preset == "pick-sft":
        return pick_sft(args.link, args.runs)
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be at least 1")
    out = args.out.resolve()
    out = Path(os.path.relpath(out, ROOT)) if out.is_relative_to(ROOT) else out  # commands run from ROOT
    cfg, seeds = settings(args), range(args.seeds)
    steps = plan(cfg, out, seeds)
    check_out(out, steps, args.dry_run)
    for s in steps:
        if args.dry_run or done(s):
            print(show(s, done(s)), flush=True)
    if args.dry_run:
        return print("\n".join(estimate([s for s in steps if not done(s)], cfg, steps[0].out[0])))
    t0 = time.time()  # the data first: the rest is planned again, its checkpoint names from the data's rows
    failed = execute([s for s in steps if s.kind == "prepare" and not done(s)], cfg, args.jobs)
    failed = failed or execute([s for s in plan(cfg, out, seeds) if s.kind != "prepare" and not done(s)], cfg,
                               args.jobs)
    if failed:
        raise RuntimeError(f"{len(failed)} step(s) failed ({', '.join(f'{s.kind} {s.out[0]}' for s in failed)}); "
                           "fix the cause and re-run the same command: finished steps are skipped")
    print(f"done in {time.time() - t0:.0f} s: {out}/fit/" + ("" if paper(cfg) else f", {out}/summary.json"))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")
