"""Supervised fine-tuning, the first step of the paper's pipeline (Sec. 4, App. B).

Maximises log π(y|x) of the dataset's responses (TL;DR: the human-written summaries)
given their prompts. The result is both the DAA policy's starting point and its
reference π_ref (daa.py --init out/sft).

    python sft.py --model pythia-70m --data ~/.cache/nanodaa/data/tldr --out out/sft-70m
    torchrun --nproc_per_node 8 sft.py --model pythia-1b --out out/sft-1b

Re-running the same command on the same --out resumes from its newest checkpoint. Every
checkpoint scores held-out NLL on sft_valid.jsonl (eval.json), by which a learning rate is chosen.
"""
import argparse
import sys
from pathlib import Path

import logprobs
import training
from download import DownloadError
from tokenizer import load_tokenizer


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Pythia name (pythia-1b), or a checkpoint directory holding "
                   "config.json, tokenizer.json and model.safetensors; a directory without model.safetensors "
                   "starts from a random init seeded by --seed (the offline miniature task)")
    p.add_argument("--eval-examples", type=int, default=256, help="examples of sft_valid.jsonl scored at every "
                   "checkpoint: held-out NLL per response and per token (eval.json); 0 skips it (default: %(default)s)")
    training.add_args(p, checkpoints=1)
    return p


def sft_loss(model, batch):
    # Negative log-likelihood summed over each response's tokens and averaged over sequences, as
    # the DPO reference code: the objective is log π(y|x) of whole responses, the same sequence
    # log-prob the DAA losses (Eq. 4) and the KL are made of. A per-token mean would instead
    # weigh every token of the batch equally, so short responses would count for less.
    logps = logprobs.sequence_logps(model, batch["input_ids"], batch["labels"], scored=batch["scored"])  # causal
    n_tokens = (batch["labels"] != logprobs.IGNORE).sum(1)
    return -logps.mean(), {"loss": -logps.detach(), "response_tokens": n_tokens}


def batch_of(examples, idx, pad_id, device):
    return training.to_device(training.collate([examples[i] for i in idx], pad_id), device)


def evaluate(model, batches, env):
    """Held-out NLL: per response (the objective) and per token (comparable across data and models)."""
    sums = training.evaluate(model, sft_loss, batches, env)
    return {"eval/examples": int(sums["examples"]), "eval/nll": sums["loss"] / sums["examples"],
            "eval/nll_per_token": sums["loss"] / sums["response_tokens"]}


def main(argv=None):
    args = get_parser().parse_args(argv)
    env = training.setup(args)
    tok = load_tokenizer(training.model_dir(args.model))
    data = training.read_examples(Path(args.data) / "sft_train.jsonl", ("prompt", "response"), args.max_examples)
    valid = (training.read_examples(Path(args.data) / "sft_valid.jsonl", ("prompt", "response"), args.eval_examples)
             if args.eval_examples else [])
    # Tokenised once, up front, so that a step only packs ids.
    data, valid = (training.tokenize(tok, rows, ("response",), args.max_length) for rows in (data, valid))
    plan = training.make_plan(args, env, len(data), [len(p) + len(r) for p, r in data])
    state = training.prepare_out(args, env)
    if training.finished(state, env):
        return training.finish(env)
    model = training.wrap(training.load_model(state["dir"] if state else args.model, args.seed, env.device),
                          env, args.fsdp, args.activation_checkpointing, args.compile)
    optimizer = training.make_optimizer(args, model)
    if state:
        training.load_optimizer(model, optimizer, state["dir"])
    start = state["step"] if state else 0
    training.say(env, f"{len(data)} examples, {plan.total_steps} steps of {plan.batch_size} "
                      f"({plan.micro} per forward × {plan.accum} accumulation × {env.world} processes)")

    valid_idx = training.shard(len(valid), env, plan.micro)
    clock = training.start_clock(start)
    for step in range(start, plan.total_steps):
        batches = [batch_of(data, idx, tok.eos_id, env.device) for idx in training.micro_batch_indices(plan, step)]
        stats = training.train_step(model, optimizer, batches, sft_loss, env, args, step)
        training.log_step(args, env, plan, step + 1, stats, clock)
        if step + 1 in plan.checkpoint_steps:
            extra = {}
            if valid_idx:
                ev = evaluate(training.unwrap(model), (batch_of(valid, i, tok.eos_id, env.device)
                                                      for i in valid_idx), env)
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
