"""Direct Alignment Algorithms: DPO, IPO, SLiC (Rafailov et al., 2024, Eq. 4) and published fixes.

A DAA loss is a function of per-pair tensors: the policy's and the reference's log-probs of
the chosen and the rejected response (summed over response tokens), their token counts, β,
and the loss's own options. With h = log π(y|x) − log π_ref(y|x) of one response, the paper's
three are a convex g of the margin (Eq. 4)

    βh = β(h_w − h_l),

and only g differs; the fixes added after it need more than the margin: each response's own
log-ratio (χPO, Cal-DPO), the policy's own log-probability (DPO-Positive), per-token means
without a reference (SimPO). `LOSSES` below is the one table of them all (formula, source,
options; `daa.py --help` prints it), and `--loss` takes its names.

β is comparable only within one convention. IPO here has its minimum at h* = 1/(2β) (the DPO
reference code); Eq. 4 read literally, g(βh) = (βh − 1)², puts it at h* = 1/β (so its β = 0.2
has the minimiser of our β = 0.1); TRL's "ipo" also averages log-probs over tokens, which
--average-logps reproduces for any loss. --length-alpha adds Park et al.'s α(|y_w| − |y_l|)
to the margin of the losses built on it. --nll-alpha A adds A × the per-token negative
log-likelihood of the chosen response to any loss (RPO, Liu et al. 2024: its official code adds
−ηβ·log π(y_w) summed over tokens, which is A = ηβ|y_w|; TRL's rpo_alpha is a per-token mean
over the micro-batch, which is A = rpo_alpha when the chosen responses have equal lengths).

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
from torch.nn.attention.flex_attention import create_block_mask

import files
import logprobs
import sample
import training
from data.tiny import task
from download import DownloadError
from tokenizer import load_tokenizer

# ---------------------------------------------------------------- the losses
#
# A loss is a function of one namespace x of per-pair tensors [n]:
#   x.chosen, x.rejected          log π of y_w and y_l (sums; per-token means under --average-logps or per_token)
#   x.ref_chosen, x.ref_rejected  log π_ref, the same way
#   x.h_w, x.h_l                  each response's log-ratio log π/π_ref
#   x.margin                      βh = β(h_w − h_l), plus α(|y_w| − |y_l|) under --length-alpha (Park et al.)
#   x.beta and x.<option>         β and the loss's own options (flags --<option>, named in its entry)
# and returns the per-pair loss. Its `reward(x, h, logp)` is the implicit reward of one response
# (log-ratio h, log-prob logp): rewards/chosen and rewards/rejected, whose difference is
# rewards/margin and whose order is rewards/accuracy (Fig. 4).


def implicit_reward(x, h, logp):
    """β log π/π_ref: the reward the RLHF objective (Eq. 3) implies for the policy (§2.3)."""
    return x.beta * h


def exp_of(h):
    """e^h in at least fp32 from h clamped at 20: e^20 ≈ 5e8 puts β·e^h past any clip of χPO for
    β ≥ 1e-6, R ≤ 200, and stays far from fp32's overflow at h ≈ 88 (and bf16's, the same); the
    clamp's zero gradient above it keeps a huge h's gradient finite instead of 0 × ∞."""
    return h.to(torch.promote_types(h.dtype, torch.float32)).clamp(max=20).exp()


def chipo_reward(x, h, logp):
    """β·φ(π/π_ref) with χPO's link φ(z) = z + log z: β(e^h + h), up to a per-prompt constant."""
    return x.beta * (exp_of(h) + h)


def chipo(x):
    # Algorithm 1 of Huang et al. 2024 (as issue 22 quotes it; the paper's text was not in our sources):
    # DPO with the log link replaced by φ, the logit clipped to [−2R, 2R], R the reward range.
    logit = chipo_reward(x, x.h_w, x.chosen) - chipo_reward(x, x.h_l, x.rejected)
    return -F.logsigmoid(logit.clamp(-2 * x.chipo_clip, 2 * x.chipo_clip))


def dpop(x):
    # DPO-Positive (Pal et al. 2024, Eq. 3): a hinge on the chosen response falling below the reference,
    # inside the sigmoid and scaled by β like the margin.
    return -F.logsigmoid(x.margin - x.beta * x.dpop_lambda * torch.relu(x.ref_chosen - x.chosen))


SIMPO_GAMMA_BETA_RATIO = 0.5  # the authors' configs set γ through γ/β (gamma_beta_ratio), 0.5 for Llama-3-Base


def simpo(x):
    gamma = SIMPO_GAMMA_BETA_RATIO * x.beta if x.simpo_gamma is None else x.simpo_gamma
    return -F.logsigmoid(x.beta * (x.chosen - x.rejected) - gamma)


def simpo_reward(x, h, logp):
    """β × the policy's per-token mean log-prob: SimPO's reference-free reward (Meng et al. 2024)."""
    return x.beta * logp


def entry(loss, formula, source, reward=implicit_reward, options=None, margin=False, per_token=False):
    """One row of LOSSES. options: {flag dest: (default, help)}; margin: the loss reads x.margin (so
    --length-alpha applies); per_token: it is defined on per-token mean log-probs (as --average-logps)."""
    return dict(loss=loss, formula=formula, source=source, reward=reward, options=options or {},
                margin=margin, per_token=per_token)


LOSSES = {
    # The paper's three: g of the margin (Eq. 4).
    "dpo": entry(lambda x: -F.logsigmoid(x.margin), "−log σ(βh)", "Rafailov et al. 2023", margin=True),
    # (h − 1/(2β))² written through the margin, (βh − 1/2)² / β²: the DPO reference code's IPO.
    "ipo": entry(lambda x: (x.margin - 0.5) ** 2 / x.beta ** 2, "(h − 1/(2β))²",
                 "Azar et al. 2023, as the DPO reference code writes it", margin=True),
    "slic": entry(lambda x: torch.relu(1 - x.margin), "max(0, 1 − βh)",
                  "Zhao et al. 2023, the hinge (calibration term only)", margin=True),
    # Published fixes, as their sources write them.
    "chipo": entry(chipo, "−log σ(clip(β[(e^h_w + h_w) − (e^h_l + h_l)], −2R, 2R))",
                   "Huang et al. 2024, χPO (\"Correcting the Mythos of KL-Regularization\")", reward=chipo_reward,
                   options={"chipo_clip": (5.0, "R of χPO: the logit is clipped to [−2R, 2R]; R is the reward range "
                                                "in Bradley–Terry log-odds (5: about the miniature labeller's, "
                                                "1.5 per important word, 3 words)")}),
    "dpop": entry(dpop, "−log σ(β[h − λ·max(0, log π_ref(y_w) − log π(y_w))])",
                  "Pal et al. 2024, DPO-Positive (Smaug)",
                  options={"dpop_lambda": (50.0, "λ of DPO-Positive, the weight of the chosen response's drop "
                                                 "below the reference")}, margin=True),
    # Official code (tengxiao1/Cal-DPO, loss_type "Cal-DPO"): no β in the BT term; β sets the targets ±1/(2β).
    "caldpo": entry(lambda x: -F.logsigmoid(x.h_w - x.h_l)
                    + 0.5 * ((x.h_w - 0.5 / x.beta) ** 2 + (x.h_l + 0.5 / x.beta) ** 2),
                    "−log σ(h_w − h_l) + ½[(h_w − 1/(2β))² + (h_l + 1/(2β))²]",
                    "Xiao et al. 2024, Cal-DPO, as its official code computes it"),
    # Reference-free: its KL to the SFT model is only measured (eval/logratio_*), never constrained.
    "simpo": entry(simpo, "−log σ(β(ā_w − ā_l) − γ), ā per-token mean log π", "Meng et al. 2024, SimPO (the "
                   "authors' code)", reward=simpo_reward, per_token=True,
                   options={"simpo_gamma": (None, f"γ of SimPO, its target reward margin (default: "
                                                  f"{SIMPO_GAMMA_BETA_RATIO:g}·β, the γ/β of the authors' "
                                                  "Llama-3-Base config, whose β is 2)")}),
}


def loss_table():
    """LOSSES as text, for --help."""
    rows = [(name, e["formula"], e["source"] + "".join(f"; --{o.replace('_', '-')}" + (f" {d:g}" if d else "")
                                                       for o, (d, _) in e["options"].items()))
            for name, e in LOSSES.items()]
    width = max(len(r[1]) for r in rows)
    return "\n".join(f"    {name:<7}{formula:<{width + 2}}{source}" for name, formula, source in rows)


def check_options(loss, options, length_alpha=0.0):
    """Refuse a loss that is unknown, options it does not take, and --length-alpha without a margin."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    foreign = [o for o in options if o not in LOSSES[loss]["options"]]
    if foreign:
        raise ValueError(f"--loss {loss} takes no {', '.join('--' + o.replace('_', '-') for o in foreign)}")
    if length_alpha and not LOSSES[loss]["margin"]:
        raise ValueError(f"--length-alpha changes the margin βh, which --loss {loss} does not use "
                         f"(it applies to {', '.join(n for n, e in LOSSES.items() if e['margin'])})")


def daa_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss, length_alpha=0.0, chosen_lengths=None, rejected_lengths=None, average_logps=False,
             **options):
    """Per-pair loss of LOSSES[loss] and the implicit rewards of both responses (its `reward`).

    Log-probs are sums over response tokens; a per_token loss, or average_logps, divides all four
    by the token counts first (chosen_lengths, rejected_lengths). `length_alpha` > 0 is Park et al.'s
    length regulariser (the paper's Fig. 3 left): the RLHF objective of Eq. 3 with a length penalty,
    r(x, y) − α|y|, has the implicit reward β log π/π_ref + α|y|, so the margin becomes
    βh + α(|y_w| − |y_l|): a pair whose chosen response is longer is partly explained by length.
    `options`: the loss's own (LOSSES[loss]["options"]); one left out takes its default.
    """
    check_options(loss, options, length_alpha)
    e = LOSSES[loss]
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if average_logps or e["per_token"]:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"per-token mean log-probs (--loss {loss} or --average-logps) need the token counts")
        logps = [lp / n for lp, n in zip(logps, (chosen_lengths, rejected_lengths) * 2)]
    chosen, rejected, ref_chosen, ref_rejected = logps
    x = SimpleNamespace(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                        h_w=chosen - ref_chosen, h_l=rejected - ref_rejected, beta=beta,
                        **{o: options.get(o, default) for o, (default, _) in e["options"].items()})
    x.margin = beta * (x.h_w - x.h_l)
    if length_alpha:
        x.margin = x.margin + length_alpha * (chosen_lengths - rejected_lengths)
    rewards = [e["reward"](x, h, lp).detach() for h, lp in ((x.h_w, chosen), (x.h_l, rejected))]
    return e["loss"](x), *rewards


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
    table = ("The losses (--loss; h_w, h_l: log π/π_ref of the chosen and the rejected response, summed over "
             "tokens; h = h_w − h_l):\n" + loss_table())
    p = argparse.ArgumentParser(description=__doc__ + "\n" + table + "\n\nTrains a policy with one of them from an "
                                "SFT checkpoint; re-running the same command on the same --out resumes it.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the SFT checkpoint to start from (out/sft, out/sft/latest or "
                   "out/sft/ckpt-N); it is also the reference π_ref unless --ref is given")
    p.add_argument("--ref", default=None, help="a different reference model directory (default: --init)")
    p.add_argument("--loss", choices=LOSSES, default="dpo", help="the loss, table above (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="β of Eq. 4, the strength of the KL constraint; the "
                   "paper sweeps it (default: %(default)s)")
    p.add_argument("--length-alpha", type=float, default=0.0, help="α of Park et al.'s length regulariser, margin "
                   "βh + α(|y_w| − |y_l|) in tokens (the paper's Fig. 3); 0, the default, turns it off")
    p.add_argument("--average-logps", action="store_true", help="score every loss on per-token mean log-probs "
                   "instead of sums (TRL's IPO and SimPO's convention), so that their β means the same here")
    p.add_argument("--nll-alpha", type=float, default=0.0, help="add A × the per-token negative log-likelihood of "
                   "the chosen response to the loss (RPO's SFT term, any --loss); logged as loss/nll; 0, the "
                   "default, turns it off")
    for loss, e in LOSSES.items():  # each loss's own options, named in its table entry
        for option, (default, text) in e["options"].items():
            # default None (the table's value): a run directory written before the option existed still resumes
            p.add_argument(f"--{option.replace('_', '-')}", type=float, default=None,
                           help=f"{text} (--loss {loss} only" + (f"; default: {default:g})" if default else ")"))
    p.add_argument("--precompute-ref", action="store_true", help="one pass computes the reference log-probs of "
                   "every pair, then the reference model is freed (saves its memory during training)")
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", help="score each pair as "
                   "two rows [prompt | chosen], [prompt | rejected] instead of one [prompt | chosen | rejected]")
    p.add_argument("--attention", choices=("sdpa", "flex"), default="sdpa", help="the kernel of prefix-shared rows: "
                   "sdpa (F.scaled_dot_product_attention with the [pairs, T, T] mask) or flex (torch's flex_attention "
                   "with a block mask, compiled; CUDA only; docs/training.md says when it pays) (default: %(default)s)")
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


def pair_batch(examples, idx, split, pad_id, device, prefix_sharing=True, attention="sdpa"):
    """The pairs `idx` of training.tokenize's (prompt, chosen, rejected) as one batch on `device`.

    prefix_sharing (the default): one row per pair, [prompt | chosen | rejected]
    (prefix_sharing_batch), so the prompt, on TL;DR ten times a summary's length, runs through the
    model once per pair; its mask is built on the device (prefix_sharing_mask, `attention` "sdpa"
    or "flex"). Otherwise two rows per pair, [chosen_0..chosen_n, rejected_0..rejected_n], in one
    right-padded batch (the DPO reference code's concatenated_forward). Both carry chosen_tokens
    and rejected_tokens [n]: each response's scored tokens, EOS included.
    """
    rows = [examples[i] for i in idx]
    batch = prefix_sharing_batch(rows, pad_id) if prefix_sharing else \
        training.collate([(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows], pad_id)
    n_tokens = torch.tensor([[len(c), len(r)] for _, c, r in rows])
    batch = training.to_device(dict(batch, chosen_tokens=n_tokens[:, 0], rejected_tokens=n_tokens[:, 1]), device)
    if prefix_sharing:
        batch["attention_mask"] = prefix_sharing_mask(batch.pop("segments"), attention)
    return dict(batch, idx=idx, split=split)


def pair_lengths(examples, prefix_sharing=True):
    """Each pair's tokens as pair_batch lays it out (its row, or the longer of its two rows): what
    training.micro_batch_indices groups micro-batches by."""
    return [len(p) + len(c) + len(r) if prefix_sharing else len(p) + max(len(c), len(r)) for p, c, r in examples]


def prefix_sharing_batch(rows, pad_id):
    """Prefix-shared rows [prompt | chosen | rejected], right-padded, on the CPU, from (prompt,
    chosen, rejected) id arrays.

    rejected attends to the prompt and to itself, never to chosen, and its positions continue
    from the end of the prompt as if chosen were absent: each response sees exactly what it
    sees in a row of its own. labels [n, 2, T] (logprobs.sequence_logps): response k's token
    predicted by position t sits at labels[:, k, t + 1], so the prompt's last position predicts
    the first token of both responses. segments [n, T] says which part each position is (0
    prompt, 1 chosen, 2 rejected, 3 padding): prefix_sharing_mask makes the mask of it on the
    device, so the [n, T, T] matrix is never copied there.
    """
    T = max(len(p) + len(c) + len(r) for p, c, r in rows)
    ids = np.full((len(rows), T), pad_id, np.int64)
    labels = np.full((len(rows), 2, T), logprobs.IGNORE, np.int64)
    pos = np.zeros((len(rows), T), np.int64)
    segments = np.full((len(rows), T), 3, np.int64)
    for i, (p, c, r) in enumerate(rows):
        P, C, R = len(p), len(c), len(r)
        ids[i, :P + C + R] = np.concatenate((p, c, r))
        pos[i, :P + C] = np.arange(P + C)
        pos[i, P + C:P + C + R] = np.arange(P, P + R)
        segments[i, :P], segments[i, P:P + C], segments[i, P + C:P + C + R] = 0, 1, 2
        labels[i, 0, P:P + C] = c
        labels[i, 1, P] = r[0]  # predicted by the prompt's last position, as chosen's first token
        labels[i, 1, P + C + 1:P + C + R] = r[1:]
    labels = torch.from_numpy(labels)
    return {"input_ids": torch.from_numpy(ids), "labels": labels, "scored": logprobs.scored_tokens(labels),
            "position_ids": torch.from_numpy(pos), "segments": torch.from_numpy(segments),
            "tokens": torch.tensor(int((segments < 3).sum()))}


def prefix_sharing_mask(segments, attention="sdpa"):
    """The query-sees-key rule of prefix-shared rows, from their segments [n, T], on their device:
    causal, minus every (rejected query, chosen key). "sdpa": a boolean [n, T, T] matrix;
    "flex": a flex_attention BlockMask of the same rule, whose kernel skips the blocks no query
    sees (half of a causal square, and rejected's rows of chosen's columns)."""
    if attention == "flex":
        def sees(b, h, q, k):
            return (k <= q) & ~((segments[b, q] == 2) & (segments[b, k] == 1))
        return create_block_mask(sees, len(segments), None, segments.shape[1], segments.shape[1],
                                 device=segments.device)
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    return causal & ~((q == 2) & (k == 1))


def pair_logps(model, batch):
    """Sequence log-probs (summed over response tokens) of the chosen and of the rejected responses."""
    logps = logprobs.sequence_logps(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"), scored=batch["scored"])
    if logps.dim() == 2:  # prefix sharing: [n, 2]
        return logps[:, 0], logps[:, 1]
    n = len(logps) // 2
    return logps[:n], logps[n:]


def loss_options(args):
    """The table's options that the command line sets: {dest: value} (daa_loss refuses another loss's)."""
    return {o: getattr(args, o) for e in LOSSES.values() for o in e["options"] if getattr(args, o) is not None}


def make_loss_fn(args, reference):
    """loss_fn(model, batch) -> (mean DAA loss, per-pair statistics); `reference(batch)` gives π_ref's log-probs."""
    options = loss_options(args)
    check_options(args.loss, options, args.length_alpha)  # at once, not at the first batch

    def loss_fn(model, batch):
        chosen, rejected = pair_logps(model, batch)
        ref_chosen, ref_rejected = reference(batch)
        n_chosen, n_rejected = batch["chosen_tokens"], batch["rejected_tokens"]
        nll = -chosen / n_chosen  # per-token NLL of the chosen response (RPO's SFT term)
        # --average-logps: the loss (and its implicit rewards) on per-token means, policy and reference
        # alike (TRL's IPO, SimPO); the logged log-probs and log-ratios stay sums (Eq. 7 reads them).
        losses, chosen_rewards, rejected_rewards = daa_loss(
            chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss, args.length_alpha, n_chosen,
            n_rejected, args.average_logps, **options)
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
        logps = training.move(torch.tensor([table[batch["split"], i] for i in batch["idx"]]), batch["input_ids"].device)
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


def check_args(args):
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.online and not args.gold_spec:
        raise ValueError("--online labels the policy's samples with the miniature's labeller: give --gold-spec")
    if args.online and (args.precompute_ref or args.fsdp):
        raise ValueError("--online draws new pairs every round, with each process's whole policy: it works "
                         "without --precompute-ref and --fsdp")


def load_models(args, env, state):
    """(policy, reference), loaded and wrapped one at a time: with --fsdp each is whole on the device
    only until it is sharded."""
    policy = training.wrap(training.load_model(state["dir"] if state else args.init, args.seed, env.device),
                           env, args.fsdp, args.activation_checkpointing, args.compile)
    # A reference used only for the precomputing pass stays unwrapped (each process runs it whole, with
    # no collective), so dropping it frees it: an FSDP module that has run a forward outlives `del`.
    ref = training.wrap(training.freeze(training.load_model(args.ref or args.init, args.seed, env.device)),
                        env, args.fsdp and not args.precompute_ref, compile=args.compile)
    if args.fsdp and args.precompute_ref and env.dtype == "bfloat16":
        ref.to(torch.bfloat16)  # the numerics of the policy, whose FSDP policy gathers bf16 weights: h = 0 at step 0
    return policy, ref


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    env = training.setup(args)
    if args.attention == "flex" and env.device.type != "cuda":
        raise ValueError("--attention flex needs --device cuda: torch's flex_attention has no backward on the CPU")
    tok = load_tokenizer(training.model_dir(args.init))
    data = Path(args.data)
    texts = training.read_examples(data / "pref_train.jsonl", ("prompt", "chosen", "rejected"), args.max_examples)
    eval_pairs = (training.read_examples(data / "pref_eval.jsonl", ("prompt", "chosen", "rejected"), args.eval_examples)
                  if args.eval_examples else [])
    # Tokenised once, up front (the fixture's TL;DR pairs: 1.3 ms per 8), so that a step only packs ids.
    pairs, eval_pairs = (training.tokenize(tok, rows, ("chosen", "rejected"), args.max_length)
                         for rows in (texts, eval_pairs))
    plan = training.make_plan(args, env, len(pairs), pair_lengths(pairs, args.prefix_sharing))
    state = training.prepare_out(args, env)
    if training.finished(state, env):
        return training.finish(env)
    start = state["step"] if state else 0

    policy, ref = load_models(args, env, state)

    def batch(idx, split):
        return pair_batch(pairs if split == "train" else eval_pairs, idx, split, tok.eos_id, env.device,
                          args.prefix_sharing, args.attention)
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
            r, rows = online_pairs(args, env, plan, tok, policy, texts, step, starts)
            pairs = training.tokenize(tok, rows, ("chosen", "rejected"), args.max_length)
            plan.lengths = np.asarray(pair_lengths(pairs, args.prefix_sharing))  # this round's pairs, bucketed
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
        training.save_if_due(args, env, plan, step + 1, policy, optimizer, tok.enc.name, clock)
    training.finish(env)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, DownloadError) as e:
        sys.exit(f"error: {e}")
