"""Direct Alignment Algorithms: DPO, IPO and SLiC (Rafailov et al., 2024, Eq. 4).

All three minimise  E_(x, y_w, y_l) [ g(h) ]  over preference pairs, where

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))

is the difference of implicit rewards (over β) and sequence log-probs are sums
over response tokens (per-token means with --average-logps). Only the convex
function g differs:

    loss   g                       source
    dpo    −log σ(βh)              Rafailov et al. 2023
    slic   max(0, 1 − βh)          Zhao et al. 2023 (hinge, calibration term only)
    ipo    (h − 1/(2β))²           Azar et al. 2023, as the DPO reference code writes it

β is comparable only within one convention. IPO here has its minimum at
h* = 1/(2β); Eq. 4 read literally, g(βh) = (βh − 1)², puts it at h* = 1/β (so
its β = 0.2 has the minimiser of our β = 0.1); TRL's "ipo" also averages
log-probs over tokens, which --average-logps reproduces. --nll-alpha A adds
A × the per-token negative log-likelihood of the chosen response to any of the
three (RPO: "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
Adversarial Regularizer", 2024; the per-token mean, as TRL's rpo_alpha).

Online. `--online R --gold-spec gold.json` (the miniature) trains on the policy's own samples
instead, to test §4's argument that offline data do not cover the policy's outputs. The run
has the offline run's pairs, steps and data order, split into R rounds evenly spaced as the
checkpoints are (R = --checkpoints: every round ends at one). At each round's start, the
responses of the round's pairs are replaced by two fresh samples of the current policy per
prompt (sample.draw, temperature 1), labelled by the labeller's Bradley–Terry draw that
labelled the offline data (task.labeller_prefers_first, an RNG seeded by (seed, round)); the
round then trains one DAA pass from the previous round's policy, against the SFT reference.
The round's pairs are written to OUT/online-round<r>.jsonl before it trains, so a resume
reads what the killed run trained on; each checkpoint's online.json names its round.
A daa.py run, not an online.py: the loss, batching, reference and checkpoints are this
file's, and online DPO differs from offline only in where the pairs come from.
"""
import argparse
import bisect
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import files
import logprobs
import sample
import training
from data.tiny import task
from download import DownloadError
from tokenizer import load_tokenizer

# g of Eq. 4, written on the margin βh (IPO also needs β). A new loss is one more entry here:
# `daa.py --loss NAME` and the miniature (docs/new_loss.md) pick it up.
G = {
    "dpo": lambda margin, beta: -F.logsigmoid(margin),  # Rafailov et al. 2023
    # (h − 1/(2β))² written through the margin: (βh − 1/2)² / β², the DPO reference code's IPO,
    # minimised at h* = 1/(2β). Eq. 4 read literally, (βh − 1)², is minimised at h* = 1/β: a β
    # there is twice a β here. TRL's "ipo" is this form on per-token mean log-probs (--average-logps).
    "ipo": lambda margin, beta: (margin - 0.5) ** 2 / beta ** 2,  # Azar et al. 2023
    "slic": lambda margin, beta: torch.relu(1 - margin),  # Zhao et al. 2023, the hinge (calibration term only)
}
LOSSES = tuple(G)


def daa_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss, length_alpha=0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-example DAA loss (Eq. 4) and the implicit rewards β·log(π/π_ref) of both responses.

    `length_alpha` > 0 is Park et al.'s length regulariser (the paper's Fig. 3 left): the RLHF
    objective of Eq. 3 with a length penalty, r(x, y) − α|y|, has the implicit reward
    β log π/π_ref + α|y|, so the margin becomes βh + α(|y_w| − |y_l|). A pair whose chosen
    response is longer is then partly explained by length, and the policy learns less of it.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)  # βh
    if length_alpha:
        margin = margin + length_alpha * (chosen_lengths - rejected_lengths)
    if loss not in G:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    losses = G[loss](margin, beta)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------- training script
#
#   python daa.py --init out/sft-70m --loss dpo --beta 0.1 --data ~/.cache/nanodaa/data/tldr --out out/dpo-0.1
#   torchrun --nproc_per_node 8 daa.py --init out/sft-1b --loss ipo --beta 0.1 ... --out out/ipo-1b-0.1

EVAL_KEYS = {  # eval.json / metrics.jsonl name -> per-pair statistic; fit.py reads these (Fig. 4, Fig. 5)
    "eval/loss": "loss", "eval/nll": "loss/nll", "eval/accuracy": "rewards/accuracy", "eval/margin": "rewards/margin",
    "eval/logratio_chosen": "logratios/chosen", "eval/logratio_rejected": "logratios/rejected",
    "eval/rewards_chosen": "rewards/chosen", "eval/rewards_rejected": "rewards/rejected",
    "eval/logps_chosen": "logps/chosen", "eval/logps_rejected": "logps/rejected",
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__ + "\nTrains a policy with one of these losses from an SFT "
                                "checkpoint; re-running the same command on the same --out resumes it.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the SFT checkpoint to start from (out/sft, out/sft/latest or "
                   "out/sft/ckpt-N); it is also the reference π_ref unless --ref is given")
    p.add_argument("--ref", default=None, help="a different reference model directory (default: --init)")
    p.add_argument("--loss", choices=LOSSES, default="dpo", help="g of Eq. 4, table above (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="β of Eq. 4, the strength of the KL constraint; the "
                   "paper sweeps it (default: %(default)s)")
    p.add_argument("--length-alpha", type=float, default=0.0, help="α of Park et al.'s length regulariser, margin "
                   "βh + α(|y_w| − |y_l|) in tokens (the paper's Fig. 3); 0, the default, turns it off")
    p.add_argument("--average-logps", action="store_true", help="score every loss on per-token mean log-probs "
                   "instead of sums (TRL's IPO and SimPO's convention), so that their β means the same here")
    p.add_argument("--nll-alpha", type=float, default=0.0, help="add A × the per-token negative log-likelihood of "
                   "the chosen response to the loss (RPO's SFT term, any --loss); logged as loss/nll; 0, the "
                   "default, turns it off")
    p.add_argument("--precompute-ref", action="store_true", help="one pass computes the reference log-probs of "
                   "every pair, then the reference model is freed (saves its memory during training)")
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", help="score each pair as "
                   "two rows [prompt | chosen], [prompt | rejected] instead of one [prompt | chosen | rejected]")
    p.add_argument("--eval-examples", type=int, default=256, help="pairs of pref_eval.jsonl scored at every "
                   "checkpoint (loss, reward accuracy, margin, log-ratios; eval.json); 0 skips evaluation "
                   "(default: %(default)s, App. B: 256 held-out prompts for all evaluations)")
    p.add_argument("--online", type=int, default=0, metavar="R", help="online DPO in R rounds: each round "
                   "replaces the responses of its pairs by two fresh samples of the policy at the round's start, "
                   "labelled by the miniature's labeller (--gold-spec); same pairs and steps as offline "
                   "(module docstring, \"Online\"); 0, the default, trains on the offline pairs")
    p.add_argument("--gold-spec", default=None, help="the miniature's gold.json, whose labeller --online asks")
    p.add_argument("--online-max-new-tokens", type=int, default=None, help="cap on an online sample's new tokens "
                   "(default: none beyond --max-length and the model's positions; sample.py's --max-new-tokens)")
    p.add_argument("--online-batch-size", type=int, default=256, help="samples per generate call, per process, "
                   "when a round draws its pairs (default: %(default)s)")
    training.add_args(p, checkpoints=4)
    return p


def pair_batch(tok, pairs, idx, split, max_length, device, shared=True):
    """The pairs `idx` as one batch, with both responses sharing one truncated prompt (training.encode).

    shared (the default): one row per pair, [prompt | chosen | rejected] (pack_pairs), so the
    prompt, on TL;DR ten times a summary's length, runs through the model once per pair.
    Otherwise two rows per pair, [chosen_0..chosen_n, rejected_0..rejected_n], in one padded
    batch (the DPO reference code's concatenated_forward). Both carry chosen_tokens and
    rejected_tokens [n]: each response's scored tokens, EOS included.
    """
    seqs = [training.encode(tok, pairs[i]["prompt"], [pairs[i]["chosen"], pairs[i]["rejected"]], max_length)
            for i in idx]
    n_tokens = torch.tensor([[sum(t != logprobs.IGNORE for t in labels) for _, labels in s] for s in seqs])
    batch = pack_pairs(seqs, tok.eos_id) if shared else \
        training.collate([s[0] for s in seqs] + [s[1] for s in seqs], tok.eos_id, "cpu")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return dict(batch, idx=idx, split=split, chosen_tokens=n_tokens[:, 0].to(device),
                rejected_tokens=n_tokens[:, 1].to(device))


def pack_pairs(seqs, pad_id):
    """Prefix-shared rows [prompt | chosen | rejected], right-padded, from training.encode's pairs.

    rejected attends to the prompt and to itself, never to chosen, and its positions continue
    from the end of the prompt as if chosen were absent: each response sees exactly what it
    sees in a row of its own. labels [n, 2, T] (logprobs.sequence_logps): response k's token
    predicted by position t sits at labels[:, k, t + 1], so the prompt's last position predicts
    the first token of both responses; attention_mask is the [n, T, T] query-sees-key matrix.
    """
    rows = []
    for (ids_c, labels_c), (ids_r, _) in seqs:
        p = labels_c.count(logprobs.IGNORE)  # the shared prompt's length
        rows.append((ids_c[:p], ids_c[p:], ids_r[p:]))
    T = max(len(p) + len(c) + len(r) for p, c, r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), 2, T), logprobs.IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    part = torch.full((len(rows), T), 3)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    for i, (p, c, r) in enumerate(rows):
        P, C, R = len(p), len(c), len(r)
        ids[i, :P + C + R] = torch.tensor(p + c + r)
        pos[i, :P + C] = torch.arange(P + C)
        pos[i, P + C:P + C + R] = torch.arange(P, P + R)
        part[i, :P], part[i, P:P + C], part[i, P + C:P + C + R] = 0, 1, 2
        labels[i, 0, P:P + C] = torch.tensor(c)
        labels[i, 1, P] = r[0]  # predicted by the prompt's last position, as chosen's first token
        labels[i, 1, P + C + 1:P + C + R] = torch.tensor(r[1:])
    q, k = part[:, :, None], part[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal & ~((q == 2) & (k == 1))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos,
            "tokens": (part < 3).sum()}


def pair_logps(model, batch):
    """Sequence log-probs (summed over response tokens) of the chosen and of the rejected responses."""
    logps = logprobs.sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    position_ids=batch.get("position_ids"))
    if logps.dim() == 2:  # prefix-shared: [n, 2]
        return logps[:, 0], logps[:, 1]
    n = len(logps) // 2
    return logps[:n], logps[n:]


def make_loss_fn(args, reference):
    """loss_fn(model, batch) -> (mean DAA loss, per-pair statistics); `reference(batch)` gives π_ref's log-probs."""
    def loss_fn(model, batch):
        chosen, rejected = pair_logps(model, batch)
        ref_chosen, ref_rejected = reference(batch)
        n_chosen, n_rejected = batch["chosen_tokens"], batch["rejected_tokens"]
        nll = -chosen / n_chosen  # per-token NLL of the chosen response (RPO's SFT term)
        # --average-logps: the loss (and its implicit rewards) on per-token means, policy and reference
        # alike (TRL's IPO, SimPO); the logged log-probs and log-ratios stay sums (Eq. 7 reads them).
        c, r = (n_chosen, n_rejected) if args.average_logps else (1, 1)
        losses, chosen_rewards, rejected_rewards = daa_loss(
            chosen / c, rejected / r, ref_chosen / c, ref_rejected / r, args.beta, args.loss,
            args.length_alpha, n_chosen, n_rejected)
        if args.nll_alpha:
            losses = losses + args.nll_alpha * nll
        stats = {"loss": losses.detach(), "loss/nll": nll.detach(),
                 "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                 "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
                 "rewards/margin": chosen_rewards - rejected_rewards,
                 "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
                 "logratios/chosen": (chosen - ref_chosen).detach(),
                 "logratios/rejected": (rejected - ref_rejected).detach()}
        return losses.mean(), stats
    return loss_fn


def ref_logps(ref, batch, env):
    with torch.no_grad(), env.autocast():
        logps = pair_logps(ref, batch)
    training.reshard(ref)  # after pair_logps, which reads embed_out.weight once the forward is done
    return logps


def precompute(ref, batches, n_batches, env):
    """π_ref's log-probs of every pair in `batches`: {(split, index): (chosen, rejected)}."""
    table, t0 = {}, time.time()
    for k, batch in enumerate(batches, 1):
        chosen, rejected = ref_logps(ref, batch, env)
        table.update(((batch["split"], i), (c, r)) for i, c, r in zip(batch["idx"], chosen.tolist(), rejected.tolist()))
        if k % 100 == 0 or k == n_batches:
            training.say(env, f"reference log-probs: {k}/{n_batches} batches, ETA {training.eta(t0, k, n_batches)}")
    return table


def make_reference(ref, table, env):
    """reference(batch) -> π_ref's (chosen, rejected) log-probs: looked up when precomputed, else computed."""
    def reference(batch):
        if (batch["split"], batch["idx"][0]) not in table:
            return ref_logps(ref, batch, env)
        logps = torch.tensor([table[batch["split"], i] for i in batch["idx"]], device=batch["input_ids"].device)
        return logps[:, 0], logps[:, 1]
    return reference


def evaluate(model, loss_fn, batches, env):
    """Mean per-pair statistics on the held-out pairs, over all processes (EVAL_KEYS)."""
    sums = training.evaluate(model, loss_fn, batches, env)
    return {"eval/examples": int(sums["examples"]), **{k: sums[v] / sums["examples"] for k, v in EVAL_KEYS.items()}}


# ---------------------------------------------------------------- --online: DPO on the policy's own samples

def round_starts(plan, rounds):
    """The first step of each of the R rounds, evenly spaced over the run as the checkpoints are
    (make_plan): with R = --checkpoints, every round ends at a checkpoint."""
    return sorted({0} | {max(1, round(plan.total_steps * k / rounds)) for k in range(1, rounds)})


def round_examples(plan, first, last):
    """The pair indices the global batches of steps first..last − 1 train on, every process's."""
    whole = SimpleNamespace(**{**vars(plan), "rank": 0, "world": 1})  # one process holding the whole batch
    return sorted({i for step in range(first, last) for micro in training.micro_batch_indices(whole, step)
                   for i in micro})


def online_pairs(args, env, plan, tok, policy, pairs, step, starts):
    """(r, `pairs` with the responses of round r, the one `step` lies in, replaced by the policy's own)
    as the round's file OUT/online-round<r>.jsonl holds them. The file is drawn and written first if
    it does not exist yet, which only the round's first step may do: the policy then is the round's
    starting point, and a resume reads the very pairs the killed run trained on."""
    r = bisect.bisect_right(starts, step)  # 1-based
    path = Path(args.out) / f"online-round{r}.jsonl"
    first, last = starts[r - 1], starts[r] if r < len(starts) else plan.total_steps
    exists = path.exists()
    training.barrier(env)  # every process has looked before rank 0 may write it
    if not exists:
        if step != first:
            raise ValueError(f"{path} is missing, and its round started at step {first}, before step {step} where "
                             "this run resumed: its pairs cannot be drawn again from the round's starting policy")
        draw_round(args, env, tok, training.unwrap(policy), pairs, round_examples(plan, first, last), r, path)
        training.barrier(env)
    new = list(pairs)
    for row in files.read_jsonl(path, ("index", "prompt", "chosen", "rejected")):
        new[row["index"]] = row
    return r, new


def draw_round(args, env, tok, policy, pairs, idx, r, path):
    """Two samples of `policy` per prompt of the pairs `idx` (each process its share, sample.draw at
    temperature 1), labelled on rank 0 by the labeller's Bradley–Terry draw (task.labeller_prefers_first,
    as data/tiny/prepare.py labels the offline pairs) with an RNG seeded by (seed, round)."""
    spec = task.read_spec(args.gold_spec)
    max_length = min(args.max_length, policy.config.max_position_embeddings)
    sampling = argparse.Namespace(temperature=1.0, top_k=0, top_p=1.0)  # the policy's own distribution
    seed = int(np.random.SeedSequence([args.seed, r, env.rank]).generate_state(1)[0])
    generator = torch.Generator(env.device).manual_seed(seed)
    mine, drawn = idx[env.rank::env.world], []
    rows = [i for i in mine for _ in range(2)]
    for b in range(0, len(rows), args.online_batch_size):
        batch = rows[b:b + args.online_batch_size]
        prompts = [training.cut_prompt(tok, pairs[i]["prompt"], tok.encode(pairs[i]["prompt"]), max_length // 2)
                   for i in batch]
        budgets = [min(args.online_max_new_tokens or max_length, max_length - len(x)) for x in prompts]
        drawn += [sample.sample_text(tok, t) for t in sample.draw(policy, prompts, budgets, tok.eos_id, sampling,
                                                                    generator)[3]]
    texts = {i: (drawn[2 * k], drawn[2 * k + 1]) for k, i in enumerate(mine)}
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, texts)
        texts = {i: t for part in parts for i, t in part.items()}
    if env.main:
        rng, out = random.Random(f"{args.seed}:{r}"), []
        for i in idx:
            prompt, (a, b) = pairs[i]["prompt"], texts[i]
            chosen, rejected = (a, b) if task.labeller_prefers_first(rng, prompt, a, b, spec) else (b, a)
            out.append({"index": i, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "p_chosen": task.preference_probability(prompt, chosen, rejected, spec)})
        files.write_text(path, "".join(json.dumps(row) + "\n" for row in out))
        same = sum(x["chosen"] == x["rejected"] for x in out) / len(out)
        training.say(env, f"online round {r}: {len(out)} pairs of the policy's samples in {path.name} "
                          f"({same:.1%} identical, mean P(chosen) {np.mean([x['p_chosen'] for x in out]):.3f})")


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.online and not args.gold_spec:
        raise ValueError("--online labels the policy's samples with the miniature's labeller: give --gold-spec")
    if args.online and (args.precompute_ref or args.fsdp):
        raise ValueError("--online draws new pairs every round, with each process's whole policy: it works "
                         "without --precompute-ref and --fsdp")
    env = training.setup(args)
    tok = load_tokenizer(training.model_dir(args.init))
    data = Path(args.data)
    pairs = training.read_examples(data / "pref_train.jsonl", ("prompt", "chosen", "rejected"), args.max_examples)
    eval_pairs = (training.read_examples(data / "pref_eval.jsonl", ("prompt", "chosen", "rejected"), args.eval_examples)
                  if args.eval_examples else [])
    plan = training.make_plan(args, env, len(pairs))
    state = training.prepare_out(args, env)
    if training.finished(state, env):
        return training.finish(env)
    start = state["step"] if state else 0

    # Load and wrap one model at a time: with --fsdp each is whole on the device only until it is sharded.
    policy = training.wrap(training.load_model(state["dir"] if state else args.init, args.seed, env.device),
                           env, args.fsdp, args.activation_checkpointing)
    # A reference used only for the precomputing pass stays unwrapped (each process runs it whole, with
    # no collective), so dropping it frees it: an FSDP module that has run a forward outlives `del`.
    ref = training.wrap(training.freeze(training.load_model(args.ref or args.init, args.seed, env.device)),
                        env, args.fsdp and not args.precompute_ref)

    def batch(idx, split):
        return pair_batch(tok, pairs if split == "train" else eval_pairs, idx, split, args.max_length, env.device,
                          args.prefix_sharing)
    eval_idx = training.shard(len(eval_pairs), env, plan.micro)
    todo = [(idx, "eval") for idx in eval_idx]  # the eval pairs' reference log-probs never change: computed once
    if args.precompute_ref:
        todo += [(idx, "train") for step in range(start, plan.total_steps)
                 for idx in training.micro_batch_indices(plan, step)]
    table = precompute(ref, (batch(*t) for t in todo), len(todo), env)
    if args.precompute_ref:
        ref = None  # every pair is in the table: the reference model's memory is free for training
    reference = make_reference(ref, table, env)
    loss_fn = make_loss_fn(args, reference)
    optimizer = training.make_optimizer(args, policy)
    if state:
        training.load_optimizer(policy, optimizer, state["dir"])
    training.say(env, f"{args.loss} β={args.beta}: {len(pairs)} pairs, {plan.total_steps} steps of {plan.batch_size} "
                      f"({plan.micro} per forward × {plan.accum} accumulation × {env.world} processes), "
                      f"checkpoints after steps {plan.checkpoint_steps}")

    starts = round_starts(plan, args.online) if args.online else []
    clock = training.start_clock(start)
    for step in range(start, plan.total_steps):
        if step in starts or (starts and step == start):  # a round begins, or a resume lands inside one
            r, pairs = online_pairs(args, env, plan, tok, policy, pairs, step, starts)
        batches = [batch(idx, "train") for idx in training.micro_batch_indices(plan, step)]
        stats = training.train_step(policy, optimizer, batches, loss_fn, env, args, step)
        training.log_step(args, env, plan, step + 1, stats, clock)
        if step + 1 in plan.checkpoint_steps:
            extra = {}
            if eval_idx:
                ev = evaluate(training.unwrap(policy), loss_fn, (batch(idx, "eval") for idx in eval_idx), env)
                training.log_metrics(args, env, {"step": step + 1, "examples": (step + 1) * plan.batch_size, **ev})
                training.say(env, " | ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                extra["eval.json"] = ev
            if starts:  # fit.py's online_round: the round this checkpoint ends (or lies in)
                extra["online.json"] = {"round": r, "rounds": args.online, "pairs": f"online-round{r}.jsonl"}
            training.save_checkpoint(args, env, plan, step + 1, policy, optimizer, tok.enc.name, extra)
    training.finish(env)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, DownloadError) as e:
        sys.exit(f"error: {e}")
