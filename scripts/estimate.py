"""The --dry-run estimate of scripts/study.py: GPU-hours and judge cost of the steps it prints.

Arithmetic, not a measurement. A model of N parameters costs 6·N FLOPs per token forward and
backward, 2·N per token of a forward; tokens per example are the preset's "tokens"; the GPU, its
MFU and the judge's price are below (docs/study.md lists every assumption).
"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
from fit import n_params  # noqa: E402
from model import PYTHIA  # noqa: E402

GPU = {"name": "A100 bf16 dense", "peak": 312e12}
MFU = {"train": 0.35, "sample": 0.05}  # decoding is memory-bound: far below the training MFU
JUDGE_PRICE = {"model": "gpt-4-turbo", "in": 10e-6, "out": 30e-6}  # US$ per token (OpenAI's list price)


def flops(s, P, n):
    """{"train", "sample"} FLOPs of one step for a model of n parameters (P: the preset)."""
    T, cmd = P["tokens"], s.cmd
    seq, gen, row = T["prompt"] + T["response"], T["prompt"] + T["sample"], T["prompt"] + 2 * T["response"]
    if s.kind == "sft":  # an epoch, then sft_valid's NLL at its one checkpoint
        return {"train": 6 * n * P["sft_examples"] * seq + 2 * n * P["eval_examples"] * seq}
    if s.kind == "rm":  # an epoch of pairs, each one prefix-shared row (prompt + chosen + rejected), then pref_eval
        return {"train": 6 * n * P["pref_examples"] * row + 2 * n * P["eval_examples"] * row}
    if s.kind == "daa":  # the policy on each pair, π_ref's forward on it, both on pref_eval at every checkpoint;
        forwards = P["pref_examples"] + 2 * P["eval_examples"] * P["checkpoints"]  # --online K: K samples a pair
        k = int(cmd[cmd.index("--online") + 1]) if "--online" in cmd else 0
        return {"train": 6 * n * P["pref_examples"] * row + 2 * n * forwards * row,
                "sample": 2 * n * k * P["pref_examples"] * gen}
    if s.kind == "sample":  # generation, then the policy's and the reference's log-probs: three forwards
        return {"sample": 3 * 2 * n * (cmd.index("--ref") - cmd.index("--ckpt") - 1) * P["eval_prompts"] * gen}
    if s.kind == "bon":  # N samples per prompt, generated and scored by the reward model
        return {"sample": 2 * 2 * n * P["bon_samples"] * P["eval_prompts"] * gen}
    return {}


def estimate(steps, P, data):
    """Comment lines: GPU-hours and judge cost of `steps`, with the assumptions. data: the first DATA dir."""
    if P["preset"] == "paper":
        n = {s: n_params(PYTHIA[s].to_dict()) for s in P["sizes"]}
    else:  # the miniature's config.json, once prepare.py has written it
        paths = {s: Path(data) / "models" / s / "config.json" for s in P["sizes"]}
        n = {s: n_params(json.loads(p.read_text())) if p.is_file() else math.nan for s, p in paths.items()}
    total, hours = {"train": 0, "sample": 0}, {}
    for s in steps:
        for k, v in flops(s, P, n.get(s.size, 0)).items():
            total[k] += v
            hours[s.size] = hours.get(s.size, 0) + v / (GPU["peak"] * MFU[k]) / 3600
    T, all_hours = P["tokens"], sum(hours.values())
    n_judge = sum(s.kind == "judge" for s in steps) * P["eval_prompts"]
    cost = n_judge * (T["judge_in"] * JUDGE_PRICE["in"] + T["judge_out"] * JUDGE_PRICE["out"])
    gpus = {s: P.get("nproc", {}).get(s, 1) for s in hours}
    per_size = ", ".join(f"{s} {h:,.1f} GPU-hours ({h / gpus[s]:,.1f} h on {gpus[s]} GPUs)"
                         for s, h in hours.items() if not math.isnan(h))
    work = "FLOPs unknown until OUT/data holds the model configs" if math.isnan(all_hours) else \
        f"{total['train']:.2e} training + {total['sample']:.2e} sampling FLOPs ≈ {all_hours:,.1f} GPU-hours"
    return [f"# estimate per model: {per_size or 'n/a'}",
            f"# estimate (arithmetic, not a measurement) of the commands above: {work}; "
            f"judge: {n_judge:,} judgments ≈ ${cost:,.0f}",
            f"# assumed: training 6·N FLOPs per token (forward + backward), reference, evaluation and sampling "
            f"forwards 2·N (sampling: generation, then policy and reference scoring); {T['prompt']} prompt, "
            f"{T['response']} response and {T['sample']} sample tokens per example; a pair as one prefix-shared "
            f"row; {GPU['name']} {GPU['peak'] / 1e12:.0f} TFLOP/s at {MFU['train']:.0%} MFU for training, "
            f"{MFU['sample']:.0%} for sampling; judge {T['judge_in']} input + {T['judge_out']} output tokens at "
            f"{JUDGE_PRICE['model']}'s ${JUDGE_PRICE['in'] * 1e6:g} / ${JUDGE_PRICE['out'] * 1e6:g} per 1M tokens"]
