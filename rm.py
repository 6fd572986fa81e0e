"""The reward model of classical RLHF (Rafailov et al., 2024, Eq. 1–2), which DAAs skip.

    p(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))                  (Eq. 1, Bradley–Terry)
    L_R(φ) = −E_(x, y_w, y_l) log σ(r_φ(x, y_w) − r_φ(x, y_l))        (Eq. 2)

r_φ is GPT-NeoX initialised from the SFT model, with a scalar head (`reward_head`, a
Linear(hidden, 1)) read at the final-norm state of the response's last token: its EOS, which
has seen the whole prompt and response (the last kept token when truncation cut the EOS).
The head starts at N(0, 1/(hidden + 1)) (variance; a usual reward-head init), seeded by --seed.
The unembedding is never read, so it is frozen. The pairs are batched as daa.py batches them
(prefix-shared [prompt | chosen | rejected] by default). The plumbing is training.py's, as in
sft.py and daa.py: torchrun (DDP or --fsdp), checkpoints, exact resume, the run-directory lock.

    python rm.py --init out/sft --data ~/.cache/nanodaa/data/tldr --out out/rm
    torchrun --nproc_per_node 8 rm.py --init out/sft-1b --out out/rm-1b

A checkpoint is a plain GPT-NeoX directory (model.safetensors: the trained backbone beside the
SFT model's unembedding; GPTNeoX.from_pretrained and transformers load it) plus head.safetensors
(`reward_head.weight`, `reward_head.bias`), which `load` adds. Every checkpoint scores the
held-out pairs of pref_eval.jsonl (eval.json: Bradley–Terry loss, accuracy, margin); with
--gold-spec (the miniature) also the labeller's own ceiling on them. `score` is what best-of-n
(bon.py) picks by.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import daa
import training
from data.tiny import task
from download import DownloadError
from logprobs import IGNORE
from tokenizer import load_tokenizer

HEAD = "head.safetensors"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the SFT checkpoint the reward model starts from (out/sft, "
                   "out/sft/latest or out/sft/ckpt-N)")
    p.add_argument("--eval-examples", type=int, default=256, help="pairs of pref_eval.jsonl scored at every "
                   "checkpoint (eval.json: loss, accuracy, margin); 0 skips it (default: %(default)s)")
    p.add_argument("--gold-spec", default=None, help="the miniature's gold.json: eval.json also gets the labeller's "
                   "own accuracy and loss on the same pairs, the ceiling its noise sets")
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", help="score each pair as "
                   "two rows [prompt | chosen], [prompt | rejected] instead of one [prompt | chosen | rejected]")
    training.add_args(p, checkpoints=1)
    # The paper trains no reward model, so these defaults are ours: one epoch of AdamW. The
    # miniature's settings are chosen by measurement (docs/evaluation.md, "The reward model").
    p.set_defaults(optimizer="adamw", lr=1e-5, warmup=0)
    return p


# ---------------------------------------------------------------- the model

def add_head(model, seed):
    """Give a GPT-NeoX its scalar reward head, freshly initialised, and freeze its unembedding."""
    g = torch.Generator().manual_seed(seed)
    D = model.config.hidden_size
    head = nn.Linear(D, 1).to(model.embed_out.weight.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, D, generator=g) / math.sqrt(D + 1))
        head.bias.zero_()
    model.reward_head = head
    model.embed_out.requires_grad_(False)  # r never reads it; DDP would wait for its gradient
    return model


def load(path, seed=0, device="cpu", dtype=torch.float32, fresh=False):
    """A reward model: the GPT-NeoX at `path` (a run directory stands for its `latest`) with the head
    of its head.safetensors. `fresh`: a directory without one (the SFT model) gets a new head seeded by `seed`."""
    d = training.model_dir(path)
    if not (fresh or (d / HEAD).is_file()):
        raise ValueError(f"{d} has no {HEAD}: not a reward model (rm.py writes one into every checkpoint)")
    model = add_head(training.load_model(d, seed, device), seed)
    if (d / HEAD).is_file():
        model.reward_head.load_state_dict({k.removeprefix("reward_head."): v for k, v in load_file(d / HEAD).items()})
    return model.to(dtype)


def rewards(model, input_ids, attention_mask, ends, position_ids=None):
    """r(x, y) read at positions `ends` ([B] or [B, K]: K responses packed in one row), float32 (float64
    for a float64 model)."""
    hidden = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, return_hidden=True)
    # The head is read after the call, as logprobs reads embed_out: FSDP gathers the root's weights in its forward.
    head = getattr(model, "module", model).reward_head
    rows = torch.arange(len(ends), device=ends.device).view(-1, *[1] * (ends.dim() - 1))
    r = head(hidden[rows, ends]).squeeze(-1)
    return r.to(torch.promote_types(r.dtype, torch.float32))


def pair_rewards(model, batch):
    """r of the chosen and of the rejected responses of a daa.pair_batch, each at its last token.

    A row's prompt ends where its first response label sits (P); chosen then ends at P + C − 1,
    and rejected at P + C + R − 1 in a prefix-shared row, P + R − 1 in a row of its own.
    """
    c, r, labels = batch["chosen_tokens"], batch["rejected_tokens"], batch["labels"]
    if labels.dim() == 3:  # prefix-shared: [n, 2, T]
        p = (labels[:, 0] != IGNORE).int().argmax(-1)
        out = rewards(model, batch["input_ids"], batch["attention_mask"], torch.stack([p + c - 1, p + c + r - 1], 1),
                      batch["position_ids"])
        return out[:, 0], out[:, 1]
    p = (labels != IGNORE).int().argmax(-1)
    out = rewards(model, batch["input_ids"], None, p + torch.cat([c, r]) - 1)  # right-padded: causal, no mask
    return out[:len(c)], out[len(c):]


def bt_loss(model, batch):
    """Eq. 2 per pair, −log σ(r_w − r_l), with the reward statistics eval.json reports."""
    chosen, rejected = pair_rewards(model, batch)
    margin = chosen - rejected
    losses = F.softplus(-margin)
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()  # a tie is half right
    stats = {"loss": losses.detach(), "accuracy": accuracy, "margin": margin.detach(),
             "rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach()}
    return losses.mean(), stats


@torch.no_grad()
def score(model, tok, prompts, responses, max_length=512, batch_size=256):
    """r(x, y) of each (prompt, response text) pair, scored as training scores a response (training.encode:
    the response, then EOS), `batch_size` at a time, shortest first (less padding); a float32 CPU tensor
    (float64 for a float64 model)."""
    seqs = training.tokenize(tok, [{"prompt": x, "response": y} for x, y in zip(prompts, responses)], ("response",),
                             max_length)
    lengths = torch.tensor([len(p) + len(r) for p, r in seqs])
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    out = torch.zeros(len(seqs), dtype=torch.promote_types(model.embed_out.weight.dtype, torch.float32))
    device = model.embed_out.weight.device
    for i in range(0, len(seqs), batch_size):
        idx = order[i:i + batch_size]
        batch = training.to_device(dict(training.collate([seqs[j] for j in idx], tok.eos_id), ends=lengths[idx] - 1),
                                   device)
        out[idx] = rewards(model, batch["input_ids"], None, batch["ends"]).cpu()  # right-padded: causal, no mask
    return out


# ---------------------------------------------------------------- evaluation

def labeller_ceiling(pairs, spec):
    """What the labeller itself scores on held-out pairs it labelled: with p = P(chosen ≻ rejected)
    (task.preference_probability), the expected accuracy of the best possible reward model, mean
    max(p, 1 − p), and on these very labels the accuracy (p > ½) and Bradley–Terry loss (−log p)
    of the labeller's own proxy reward, the true r of Eq. 1."""
    ps = [task.preference_probability(x["prompt"], x["chosen"], x["rejected"], spec) for x in pairs]
    return {"eval/ceiling_accuracy": sum(max(p, 1 - p) for p in ps) / len(ps),
            "eval/labeller_accuracy": sum((p > 0.5) + 0.5 * (p == 0.5) for p in ps) / len(ps),
            "eval/labeller_loss": -sum(math.log(p) for p in ps) / len(ps)}


def evaluate(model, batches, env):
    """Held-out Bradley–Terry loss, accuracy and mean margin, over all processes."""
    s = training.evaluate(model, bt_loss, batches, env)
    n = s["examples"]
    return {"eval/examples": int(n), "eval/loss": s["loss"] / n, "eval/accuracy": s["accuracy"] / n,
            "eval/margin": s["margin"] / n}


def main(argv=None):
    args = get_parser().parse_args(argv)
    env = training.setup(args)
    tok = load_tokenizer(training.model_dir(args.init))
    keys = ("prompt", "chosen", "rejected")
    pairs = training.read_examples(Path(args.data) / "pref_train.jsonl", keys, args.max_examples)
    eval_pairs = (training.read_examples(Path(args.data) / "pref_eval.jsonl", keys, args.eval_examples)
                  if args.eval_examples else [])
    ceiling = labeller_ceiling(eval_pairs, task.read_spec(args.gold_spec)) if args.gold_spec and eval_pairs else {}
    # Tokenised once, so that a step only packs ids (daa.py's pairs: the same cut, the same batches).
    pairs, eval_pairs = (training.tokenize(tok, rows, ("chosen", "rejected"), args.max_length)
                         for rows in (pairs, eval_pairs))
    plan = training.make_plan(args, env, len(pairs), daa.pair_lengths(pairs, args.prefix_sharing))
    state = training.prepare_out(args, env)
    if training.finished(state, env):
        return training.finish(env)
    model = training.wrap(load(state["dir"] if state else args.init, args.seed, env.device, fresh=not state), env,
                          args.fsdp, args.activation_checkpointing, args.compile)
    optimizer = training.make_optimizer(args, model)
    if state:
        training.load_optimizer(model, optimizer, state["dir"])
    start = state["step"] if state else 0
    training.say(env, f"reward model: {len(pairs)} pairs, {plan.total_steps} steps of {plan.batch_size} "
                      f"({plan.micro} per forward × {plan.accum} accumulation × {env.world} processes)")

    def batch(examples, idx):
        return daa.pair_batch(examples, idx, "rm", tok.eos_id, env.device, args.prefix_sharing)
    eval_idx = training.shard(len(eval_pairs), env, plan.micro)
    clock = training.start_clock(start)
    for step in range(start, plan.total_steps):
        batches = [batch(pairs, idx) for idx in training.micro_batch_indices(plan, step)]
        stats = training.train_step(model, optimizer, batches, bt_loss, env, args, step)
        training.log_step(args, env, plan, step + 1, stats, clock)
        if step + 1 in plan.checkpoint_steps:
            extra = {}
            if eval_idx:
                ev = {**evaluate(training.unwrap(model), (batch(eval_pairs, i) for i in eval_idx), env), **ceiling}
                training.log_metrics(args, env, {"step": step + 1, "examples": (step + 1) * plan.batch_size, **ev})
                training.say(env, " | ".join(f"{k} {v:.4g}" for k, v in ev.items()))
                extra["eval.json"] = ev
            training.save_checkpoint(args, env, plan, step + 1, model, optimizer, tok.enc.name, extra)
        training.save_if_due(args, env, plan, step + 1, model, optimizer, tok.enc.name, clock)
    training.finish(env)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, DownloadError) as e:
        sys.exit(f"error: {e}")
