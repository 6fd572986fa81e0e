"""Best-of-n sampling (Gao et al. 2022): explicit reward optimisation, beside the DAAs' frontier.

The paper says DAAs over-optimise "like classical RLHF"; this is that comparison in the
miniature, whose gold reward is known. From the SFT policy π_ref it draws N samples per eval
prompt (sample.draw: temperature 1, the length rule of sample.py) and scores each by the
labeller's proxy reward (exact, data/tiny/task.py), by a learned reward model (rm.score, Eq. 2)
and by the gold reward, judged against the prompt's reference (judge.judge_gold). The
best-of-n policy draws n samples and returns the one its reward scores highest. For
n = 1, 2, 4, …, N:

    E[v of the pick] = Σ_i v_(i) · C(i − 1, n − 1) / C(N, n)     (samples in ascending score order)

the mean, over all n-subsets of the N samples, of the picked sample's value v (gold reward,
proxy reward, win, ...): unbiased for n ≤ N (Gao et al. 2022). Ties in the picking score
are broken uniformly at random; the estimator's expectation over that gives each tied sample
its group's mean value. The labeller's proxy reward takes few values, so its ties are many.

KL. Gao et al. plot best-of-n at KL = log n − (n − 1)/n (`kl_bound`). That is exact only for
a score with no ties; Beirami et al. (2024) show it is an upper bound. With ties, the pick lands
on score level k with probability q_k = F_k^n − F_(k−1)^n (F the score's CDF under π_ref, p_k
its mass), spread over the level as π_ref spreads it, so KL(π_n‖π_ref) = Σ_k q_k log(q_k / p_k).
`kl` is that sum with the levels' empirical masses over the N samples (per prompt, averaged):
for N = 256 untied samples it is within 1 % of log n − (n − 1)/n. The proxy's ties (and the
SFT policy's repeated summaries, which tie any score) make it far smaller.

The exact KL-regularised optimum of Eq. 3, π_β ∝ π_ref·e^{r/β} (the policy DPO at β targets
when r is the labeller's true reward), is the second reference curve (`loss: "tilted"`),
reweighting the same N samples by e^{r/β}: self-normalised, so trustworthy only while the
effective sample size `ess` = 1/Σw² (per prompt, averaged) stays large. Its KL is Σ w log(N w).

    python bon.py --policy out/sft --rm out/rm --prompts data/eval_prompts.jsonl --n-samples 256 \\
        --train-data data --gold-spec data/gold.json --out out/bon

Writes OUT/samples.jsonl (per prompt: the N samples and their scores), OUT/per_prompt.jsonl
(per point, the per-prompt estimates whose means the point is: for bootstrap intervals) and
then OUT/bon.jsonl, the results file fit.py reads: one row per (reward, n) with loss "bon",
and per (reward, β) with loss "tilted". Both best-of-n KLs are bounded by log N − (N − 1)/N: N = 256 reaches 4.5
(√KL 2.1), where the DAAs reach 15.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import files
import fit
import rm
import sample
import training
from data.tiny import task
from judge import judge_gold
from model import GPTNeoX
from tokenizer import load_tokenizer

VALUES = ("gold_reward", "proxy_reward", "win", "hits", "other_words", "length_words", "ood_tokens", "tokens")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="the SFT policy π_ref (a run directory: its `latest`)")
    p.add_argument("--rm", default=None, help="a reward model from rm.py (run directory or checkpoint); without "
                   "it only the proxy reward picks")
    p.add_argument("--prompts", required=True, help="eval_prompts.jsonl (id, prompt, reference)")
    p.add_argument("--gold-spec", required=True, help="the miniature's gold.json: gold and proxy rewards")
    p.add_argument("--train-data", default=None, help="the prepared data directory: adds ood_token_rate of the picks")
    p.add_argument("--n-samples", type=int, default=256, help="N, samples per prompt; n runs over 1, 2, 4, ... N")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts, picked as sample.py picks them "
                   "(default: all)")
    p.add_argument("--betas", default="0.1,0.15,0.2,0.3,0.5,1,2,5", help="β of the tilted curve π_ref·e^{r/β}, "
                   "comma-separated (the tiny preset's DPO grid and two larger); empty: none")
    p.add_argument("--max-length", type=int, default=512, help="most prompt + sample tokens, as sample.py")
    p.add_argument("--max-prompt-length", type=int, default=256, help="as sample.py")
    p.add_argument("--max-new-tokens", type=int, default=None, help="an extra cap on new tokens per sample, as "
                   "sample.py's (the tiny preset: 24)")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per generate call (and per reward-model "
                   "forward)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts (alone, as sample.py) and seeds sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--out", required=True, help="output directory: samples.jsonl, per_prompt.jsonl, then bon.jsonl")
    # Best-of-n's KL holds for samples of π_ref itself: plain temperature-1 sampling (sample.draw reads these).
    p.set_defaults(temperature=1.0, top_k=0, top_p=1.0)
    return p


# ---------------------------------------------------------------- the estimators

def tie_means(scores, values):
    """(sorted scores, values in ascending score order with each tied group's values replaced by the
    group's mean): uniform tie-breaking, in expectation. scores [N], values [N, K]."""
    order = np.argsort(scores, kind="stable")
    s, v = scores[order], values[order].astype(float)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    counts = np.diff(np.r_[starts, len(s)])
    return s, np.repeat(np.add.reduceat(v, starts, axis=0) / counts[:, None], counts, axis=0), counts


def best_of_n(scores, values, ns):
    """[len(ns), K]: the expected values of the top-scoring sample among n drawn without replacement
    from the N, E = Σ_i v_(i) C(i − 1, n − 1) / C(N, n), ties broken uniformly at random."""
    _, v, _ = tie_means(scores, values)
    N, below = len(v), np.arange(len(v))  # the i-th smallest has i − 1 samples below it
    log_fact = np.array([math.lgamma(k + 1) for k in range(N + 1)])
    out = []
    for n in ns:
        top = below >= n - 1  # it is a subset's top only if the other n − 1 lie below it
        w = np.zeros(N)
        w[top] = np.exp(log_fact[below[top]] - log_fact[n - 1] - log_fact[below[top] - n + 1]  # C(i − 1, n − 1)
                        - log_fact[N] + log_fact[n] + log_fact[N - n])  # / C(N, n)
        out.append(w @ v)
    return np.array(out)


def bon_kl(scores, ns):
    """[len(ns)]: KL(π_n‖π_ref) = Σ_k q_k log(q_k / p_k) over the score's levels, p_k their empirical
    masses and q_k = F_k^n − F_(k−1)^n the pick's; log n − (n − 1)/n when no two scores tie."""
    _, _, counts = tie_means(scores, np.zeros((len(scores), 0)))
    p = counts / counts.sum()
    F = np.cumsum(p)
    F0 = np.r_[0.0, F[:-1]]
    out = []
    for n in ns:
        q = F ** n - F0 ** n if n > 1 else p  # best of one is π_ref itself (F − F0 rounds off p)
        k = q > 0
        out.append(float(q[k] @ np.log(q[k] / p[k])))
    return np.array(out)


def tilted(scores, values, beta):
    """π_ref·e^{s/β} over the N samples, self-normalised: (E values [K], KL, effective sample size)."""
    z = scores / beta
    w = np.exp(z - z.max())
    w /= w.sum()
    k = w > 0
    return w @ values, float(w[k] @ np.log(len(w) * w[k])), float(1 / (w @ w))


# ---------------------------------------------------------------- sampling and scoring

def draw_all(policy, tok, encoded, budgets, n_samples, args, env):
    """n_samples sample token lists per prompt, args.batch_size rows per generate call."""
    rows = [i for i in range(len(encoded)) for _ in range(n_samples)]
    generator = torch.Generator(env.device).manual_seed(args.seed)
    out, t0, every = [], time.time(), max(1, len(rows) // args.batch_size // 10) * args.batch_size
    for b in range(0, len(rows), args.batch_size):
        batch = rows[b:b + args.batch_size]
        *_, samples = sample.draw(policy, [encoded[i] for i in batch], [budgets[i] for i in batch], tok.eos_id,
                                  args, generator)
        out += samples
        if (b + len(batch)) % every == 0 or len(out) == len(rows):
            training.say(env, f"sampled {len(out)}/{len(rows)} ({len(out) / (time.time() - t0):.0f} samples/s)")
    return [out[i * n_samples:(i + 1) * n_samples] for i in range(len(encoded))]


def score_prompt(row, tokens, tok, spec, seen_ids):
    """Per-sample values of one prompt's samples ([N, len(VALUES)]) and their texts."""
    texts = [sample.sample_text(tok, t) for t in tokens]
    vals = []
    for text, toks in zip(texts, tokens):
        hits, others = task.gold_parts(row["prompt"], text, spec)
        vals.append([task.gold_reward(row["prompt"], text, spec), task.proxy_reward(row["prompt"], text, spec),
                     judge_gold({**row, "sample": text}, spec)["win"], hits, others, len(text.split()),
                     sum(t not in seen_ids for t in toks) if seen_ids is not None else 0, len(toks)])
    return np.array(vals, dtype=float), texts


def points(scores, values, ns, betas, has_ood):
    """(result row, per-prompt values [P, K], per-prompt KL [P]) of one picking reward: best-of-n at
    each n and the tilted optimum at each β. The row holds means over prompts (win_rate_se: the
    spread of the per-prompt estimates over prompts)."""
    per_n = np.stack([best_of_n(s, v, ns) for s, v in zip(scores, values)])  # [P, len(ns), K]
    kls = np.stack([bon_kl(s, ns) for s in scores])
    out = [(dict(loss="bon", n=n, kl_bound=math.log(n) - (n - 1) / n), per_n[:, j], kls[:, j])
           for j, n in enumerate(ns)]
    for beta in betas:
        t = [tilted(s, v, beta) for s, v in zip(scores, values)]
        ess = [x[2] for x in t]
        out.append((dict(loss="tilted", beta=beta, ess=np.mean(ess), ess_min=min(ess)), np.stack([x[0] for x in t]),
                    np.array([x[1] for x in t])))
    return [(dict(r, kl=kl.mean(), prompts=len(scores), **summarize(v, has_ood)), v, kl) for r, v, kl in out]


def summarize(v, has_ood):
    """Means over prompts of the per-prompt expected values v [P, K] (VALUES' order)."""
    m = dict(zip(VALUES, v.mean(0)))
    out = {k: float(m[k]) for k in ("gold_reward", "proxy_reward", "hits", "other_words", "length_words")}
    out.update(win_rate=float(m["win"]), win_rate_se=float(v[:, VALUES.index("win")].std(ddof=1) / math.sqrt(len(v))))
    if has_ood:
        out["ood_token_rate"] = float(m["ood_tokens"] / m["tokens"])
    return out


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be at least 1, got {args.n_samples}")
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    if any(b <= 0 for b in betas):
        raise ValueError(f"--betas must be positive, got {args.betas}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.hold(out, f"best-of-n output {out}")
    env = training.init_process(args.device, args.seed)
    policy_dir = training.model_dir(args.policy).resolve()
    tok = load_tokenizer(sample.find_tokenizer(policy_dir))
    rows = training.read_examples(args.prompts, ("id", "prompt", "reference"))
    chosen = sample.select_prompts(rows, args.num_prompts or len(rows), args.seed)
    spec = task.read_spec(args.gold_spec)
    seen_ids = sample.response_token_ids(args.train_data, tok) if args.train_data else None
    policy = GPTNeoX.from_pretrained(policy_dir, device=env.device)
    model = rm.load(args.rm, device=env.device).eval() if args.rm else None  # before sampling: a bad --rm fails at once
    encoded, budgets = sample.encode_prompts(tok, chosen, args, policy.config.max_position_embeddings)
    clock = {"start": time.time()}
    tokens = draw_all(policy, tok, encoded, budgets, args.n_samples, args, env)
    clock["sample"] = time.time()
    scored = [score_prompt(r, t, tok, spec, seen_ids) for r, t in zip(chosen, tokens)]
    values = [v for v, _ in scored]
    pickers = {"proxy": [v[:, VALUES.index("proxy_reward")] for v in values]}
    clock["gold and proxy"] = time.time()
    if model is not None:
        # Each distinct (prompt, text) once: a repeated summary then ties with itself exactly, whatever the batch.
        uniq = sorted({(i, t) for i, (_, texts) in enumerate(scored) for t in texts})
        r = rm.score(model, tok, [chosen[i]["prompt"] for i, _ in uniq], [t for _, t in uniq], args.max_length,
                     args.batch_size)
        lookup = dict(zip(uniq, r.double().tolist()))
        pickers["rm"] = [np.array([lookup[i, t] for t in texts]) for i, (_, texts) in enumerate(scored)]
        clock["reward model"] = time.time()

    files.write_text(out / "samples.jsonl", "".join(json.dumps(
        {"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "samples": texts,
         **{k: v[:, VALUES.index(k)].tolist() for k in ("gold_reward", "proxy_reward", "win")},
         **({"rm_reward": pickers["rm"][i].tolist()} if "rm" in pickers else {})}) + "\n"
        for i, (r, (v, texts)) in enumerate(zip(chosen, scored))))
    ns = sorted({min(2 ** k, args.n_samples) for k in range(args.n_samples.bit_length() + 1)})
    common = {"model": fit.model_of(policy_dir), "seed": args.seed, "samples": args.n_samples,
              "params": fit.n_params(policy.config.to_dict()), "fraction": None, "beta": None}
    found = [({**common, "reward": reward, **r}, v, kl) for reward, scores in pickers.items()
             for r, v, kl in points(scores, values, ns, betas, seen_ids is not None)]
    files.write_text(out / "per_prompt.jsonl", "".join(json.dumps(files.finite(
        {k: r[k] for k in ("reward", "loss", "n", "beta") if r.get(k) is not None} | {"id": [c["id"] for c in chosen],
         "kl": kl.tolist(), **{k: v[:, i].tolist() for i, k in enumerate(VALUES)}})) + "\n" for r, v, kl in found))
    results = [r for r, _, _ in found]
    files.write_text(out / "bon.jsonl", "".join(json.dumps(files.finite(r)) + "\n" for r in results))
    clock["estimators"] = time.time()
    stages = list(clock.items())
    training.say(env, "seconds: " + ", ".join(f"{k} {t - stages[i][1]:.1f}" for i, (k, t) in enumerate(stages[1:])))
    for r in results:
        what = f"n={r['n']}" if r["loss"] == "bon" else f"β={r['beta']:g} (ESS {r['ess']:.1f})"
        training.say(env, f"{r['loss']:<6} {r['reward']:<5} {what:<20} KL {r['kl']:.3f}  win {r['win_rate']:.3f} "
                          f"± {r['win_rate_se']:.3f}  gold {r['gold_reward']:.3f}  proxy {r['proxy_reward']:.3f}")
    training.say(env, f"wrote {out / 'samples.jsonl'} and {out / 'bon.jsonl'}")
    files.release(out)
    training.finish(env)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
