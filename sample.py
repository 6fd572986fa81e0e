"""Sample a checkpoint on held-out prompts and measure what the paper plots win rates against (§3, App. B).

For the same n prompts (picked by --seed alone, so every checkpoint sees the
same ones) it draws one sample per prompt at temperature 1 up to max length
512, prompt + sample as in the DPO code (a prompt that, with its reference
summary, would not fit is first cut to 256 tokens, keeping its start and its
last line), then scores each sample under the policy and the reference:

    KL(π‖π_ref) ≈ mean over samples of  log π(y|x) − log π_ref(y|x),   y ~ π(·|x)

(an unbiased Monte Carlo estimate only when sampling is plain temperature-1
sampling), the sample's length, and two likelihood over-optimisation
indicators of Shi et al. (*Understanding Likelihood Over-optimisation in
Direct Alignment Algorithms*): per token, the entropy of the policy's top-10
next-token probabilities (renormalised) and the mass those 10 hold, averaged
over the sample. Rows go to `samples-<ckpt>.jsonl` beside the checkpoint, the
means to `samples-<ckpt>.summary.json`.

--in-support (with --train-data) samples only tokens that occur in some training
response, from the policy renormalised over them, π_S(y_t) ∝ π(y_t) on S, and
scores that distribution (so its KL is π_S's to π_ref): the part of a collapse
that token-level OOD mass causes is what it recovers. It writes
`samples-<ckpt>+in_support.jsonl`, beside the plain samples, with the same
prompts and random draws.

    python sample.py --ckpt out/dpo/ckpt-46080 --ref out/sft/ckpt-92858
    python sample.py --ckpt out/dpo/ckpt-* --ref out/sft/latest   # every checkpoint of a run
    torchrun --nproc_per_node 8 sample.py --ckpt ... --ref ... --num-prompts 256   # sharded, one file
"""
import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import files
import training
from data.tiny import task
from download import cache_dir
from logprobs import IGNORE, default_chunk_size, sequence_logps, token_logprobs
from model import GPTNeoX, left_padding
from tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_prompts(rows, n, seed):
    """The same n rows for every checkpoint: a permutation drawn from `seed` alone, kept in file order."""
    g = torch.Generator().manual_seed(seed)
    return [rows[i] for i in sorted(torch.randperm(len(rows), generator=g)[:n].tolist())]


def left_pad(seqs, pad_id):
    """Token lists -> ids [B, T] and token mask [B, T] (1 = token), padded on the left for generation."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def top10_indicators(hidden, weight, labels, k=10, chunk_size=None):
    """Shi et al.'s indicators per row: mean over sample tokens of the entropy of the renormalised
    top-k next-token probabilities, and of the top-k probability mass.

    hidden [B, T, D] final-norm states, weight [V, D] the unembedding, labels [B, T] (IGNORE off the
    sample). Position t predicts labels[:, t+1]. Logits are formed a chunk of positions at a time
    (as logprobs.py does), so a long sample never holds [T, V] at once.
    """
    predicts = labels[:, 1:] != IGNORE
    h = hidden[:, :-1][predicts]  # [N, D]: the positions that predict a sample token
    n = len(h)
    chunk = chunk_size or default_chunk_size(n, h.shape[1], weight.shape[0])
    entropy, mass = torch.empty(n), torch.empty(n)
    w = weight.float()
    for i in range(0, n, chunk):
        p = (h[i:i + chunk].float() @ w.T).softmax(-1).topk(min(k, len(w)), dim=-1).values
        m = p.sum(-1)
        q = p / m[:, None]
        entropy[i:i + chunk] = -torch.special.xlogy(q, q).sum(-1).cpu()
        mass[i:i + chunk] = m.cpu()
    count = predicts.sum(1).cpu()
    row = torch.repeat_interleave(torch.arange(len(labels)), count)
    per_row = lambda x: torch.zeros(len(labels)).index_add_(0, row, x) / count.clamp(min=1)
    return per_row(entropy), per_row(mass)


@torch.no_grad()
def draw(policy, prompts, budgets, eos_id, args, generator, allowed=None):
    """Sample one continuation per prompt: (ids [B, T], token mask, labels, samples), the prompt
    and sample tokens of each row with IGNORE labels off the sample, and each sample's token list.

    budgets[i] caps row i's new tokens (the rest of --max-length), so a row's sample does not
    depend on which prompts share its batch. A sample ends at its first EOS, which it keeps:
    emitting EOS is part of the sampled sequence and its log-prob counts. `allowed` (sorted ids,
    --in-support) samples from the policy renormalised over those tokens: every other logit is −∞.
    """
    device = policy.embed_out.weight.device
    ids, mask = left_pad(prompts, eos_id)
    ids, mask = ids.to(device), mask.to(device)
    hook = None
    if allowed is not None:
        off = torch.full((policy.config.vocab_size,), float("-inf"), device=device).index_fill_(0, allowed, 0.0)
        hook = policy.embed_out.register_forward_hook(lambda module, inputs, logits: logits + off.to(logits.dtype))
    try:
        new = policy.generate(ids, mask, max(budgets), args.temperature, args.top_k, args.top_p, eos_id, generator)
    finally:
        if hook:
            hook.remove()
    samples, keep = [], torch.zeros_like(new, dtype=torch.bool)
    for i, budget in enumerate(budgets):
        row = new[i, :budget].tolist()
        toks = row[:row.index(eos_id) + 1] if eos_id in row else row
        samples.append(toks)
        keep[i, :len(toks)] = True
    full, full_mask = torch.cat([ids, new], 1), torch.cat([mask, keep.long()], 1)
    labels = full.masked_fill(~torch.cat([torch.zeros_like(mask, dtype=torch.bool), keep], 1), IGNORE)
    return full, full_mask, labels, samples


def sample_text(tok, toks):
    """A sample's text: its tokens without the EOS it ends with."""
    return tok.decode(toks[:len(toks) - (toks[-1:] == [tok.eos_id])])


def support_logps(hidden, weight, labels, allowed):
    """Σ_t log π_S(y_t) of each row's sample under the policy renormalised over the ids `allowed`
    (--in-support): the log-softmax over the unembedding's rows S alone. A token outside S has no
    row, and the lookup fails rather than score it."""
    index = torch.full((weight.shape[0],), -1, dtype=torch.long, device=labels.device)
    index[allowed] = torch.arange(len(allowed), device=labels.device)
    targets = labels[:, 1:]
    where = (targets != IGNORE).nonzero(as_tuple=True)
    logp = token_logprobs(hidden[:, :-1][where], weight[allowed], index[targets[where]])
    return torch.zeros(len(labels), dtype=logp.dtype, device=logp.device).index_add(0, where[0], logp)


@torch.no_grad()
def sample_batch(policy, ref, prompts, budgets, eos_id, args, generator, allowed=None, sampler=None):
    """Sample one continuation per prompt (draw) and score it; returns one dict of statistics per prompt.

    `sampler` (--sample-dtype bfloat16): a low-precision copy of the policy that draws the samples;
    `policy` and `ref` (float32 weights) score them, since bf16 scoring biases the KL (issue 24.7).

    With `allowed` (--in-support) the policy's log-prob and indicators are those of the
    renormalised distribution it sampled from, so the KL is that distribution's to π_ref.
    """
    full, full_mask, labels, samples = draw(sampler or policy, prompts, budgets, eos_id, args, generator, allowed)
    visible, pos = left_padding(full_mask)  # one mask for both models
    policy_logp, hidden = sequence_logps(policy, full, labels, visible, return_hidden=True,
                                         position_ids=pos)  # temperature 1
    weight = policy.embed_out.weight
    if allowed is not None:
        policy_logp, weight = support_logps(hidden, weight, labels, allowed), weight[allowed]
    ref_logp = sequence_logps(ref, full, labels, visible, position_ids=pos)
    entropy, mass = top10_indicators(hidden, weight, labels)
    return [{"sample_tokens": s, "length_tokens": len(s) - (s[-1] == eos_id), "eos": s[-1] == eos_id,
             "policy_logp": policy_logp[i].item(), "ref_logp": ref_logp[i].item(),
             "top10_entropy": entropy[i].item(), "top10_mass": mass[i].item()} for i, s in enumerate(samples)]


def response_token_ids(data_dir, tok):
    """Every token id that occurs in a training response: SFT responses and both responses of the
    training pairs, each with its EOS, as training.encode scores them. Computed once per data
    directory and tokenizer, then read from a cache file beside the data."""
    data_dir = Path(data_dir)
    vocab = hashlib.sha256(repr(sorted((i, tok.enc.decode_single_token_bytes(i)) for i in tok.ids)).encode())
    cache = data_dir / f"response_token_ids-{vocab.hexdigest()[:16]}.json"
    if cache.is_file():
        return set(json.loads(cache.read_text()))
    texts = [r["response"] for r in training.read_examples(data_dir / "sft_train.jsonl", ("response",))]
    for r in training.read_examples(data_dir / "pref_train.jsonl", ("chosen", "rejected")):
        texts += [r["chosen"], r["rejected"]]
    ids = {tok.eos_id}.union(*(tok.encode(t) for t in set(texts)))
    try:
        files.write_text(cache, json.dumps(sorted(ids)) + "\n")
    except OSError:
        pass  # a read-only data directory: computed again next time
    return ids


def add_diagnostics(row, seen_ids, gold_spec):
    """Per-sample over-optimization diagnostics. `length_words`: whitespace words, beside the paper's
    |y| in tokens (`length_tokens`; byte tokens glue onto words, so the two can move apart).
    `ood_tokens`: sampled tokens (EOS included) whose id never occurs in a training response: mass
    the policy moved off the data (App. E). For the miniature (`gold_spec`), the gold reward, its
    parts (`hits`: important post words named; `other_words`: everything else) and the labeller's
    proxy reward (data/tiny/task.py)."""
    row["length_words"] = len(row["sample"].split())
    if seen_ids is not None:
        row["ood_tokens"] = sum(t not in seen_ids for t in row["sample_tokens"])
    if gold_spec is not None:
        hits, others = task.gold_parts(row["prompt"], row["sample"], gold_spec)
        row.update(gold_reward=task.gold_reward(row["prompt"], row["sample"], gold_spec), hits=hits,
                   other_words=others, proxy_reward=task.proxy_reward(row["prompt"], row["sample"], gold_spec))
    return row


def summarize(rows, args, ckpt):
    """KL(π‖π_ref) with its standard error, √KL (the paper's x-axis), mean length, mean indicators,
    and the diagnostics add_diagnostics gave the rows (the OOD token rate pools all sampled tokens)."""
    diff = torch.tensor([r["policy_logp"] - r["ref_logp"] for r in rows], dtype=torch.float64)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    kl = diff.mean().item()
    s = {"kl": kl, "kl_se": (diff.std() / math.sqrt(len(rows))).item() if len(rows) > 1 else 0.0,
         "sqrt_kl": math.sqrt(max(kl, 0.0)), "length_tokens": mean("length_tokens"),
         "length_words": mean("length_words"),
         "top10_entropy": mean("top10_entropy"), "top10_mass": mean("top10_mass"),
         "eos_rate": mean("eos"), "n": len(rows), "prompts_cut": sum(r["prompt_cut"] for r in rows),
         "ckpt": str(ckpt), "ref": str(args.ref), "seed": args.seed, "temperature": args.temperature}
    if "ood_tokens" in rows[0]:
        s["ood_token_rate"] = sum(r["ood_tokens"] for r in rows) / sum(len(r["sample_tokens"]) for r in rows)
    for key in ("gold_reward", "proxy_reward", "hits", "other_words"):
        if key in rows[0]:
            s[key] = mean(key)
    return s


def encode_prompt(tok, row, max_length, max_prompt_length):
    """The prompt's tokens, cut as the DPO code cuts them: when the prompt and its reference summary
    (+ EOS) exceed max_length, the prompt is cut to max_prompt_length (training.cut_prompt: start and
    last line kept). Sets row["cut"]."""
    ids = tok.encode(row["prompt"])
    row["cut"] = len(ids) + len(tok.encode(row["reference"])) + 1 > max_length and len(ids) > max_prompt_length
    return training.cut_prompt(tok, row["prompt"], ids, max_prompt_length) if row["cut"] else ids


def encode_prompts(tok, rows, args, n_positions):
    """Each row's prompt tokens (encode_prompt) and its budget of new tokens: prompt + sample fit
    --max-length and the model's `n_positions`, capped by --max-new-tokens. bon.py shares the rule."""
    max_length = min(args.max_length, n_positions)
    if args.max_prompt_length < 1 or max_length < 2:
        raise ValueError(f"--max-prompt-length {args.max_prompt_length} and the max length {max_length} (--max-length "
                         f"{args.max_length}, the model's {n_positions} positions) must leave "
                         "a prompt at least 1 token and a sample at least 1")
    max_prompt_length = min(args.max_prompt_length, max_length // 2)  # a small model's few positions: half each
    encoded = [encode_prompt(tok, r, max_length, max_prompt_length) for r in rows]
    for r, e in zip(rows, encoded):
        if not e:
            raise ValueError(f"{args.prompts}: prompt {r['id']!r} is empty")
    return encoded, [min(args.max_new_tokens or max_length, max_length - len(e)) for e in encoded]


def find_tokenizer(ckpt):
    for d in (ckpt, ckpt.parent):
        if (d / "tokenizer.json").is_file():
            return d
    raise ValueError(f"no tokenizer.json in {ckpt} or {ckpt.parent}: pass --tokenizer (a tokenizer.json, "
                     "or a Pythia name such as pythia-1b)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, nargs="+", help="policy checkpoint directories (a run directory: its `latest`); several share one load of the reference and prompts")
    p.add_argument("--ref", required=True, help="reference model (the SFT model): checkpoint or run directory, or a Pythia name")
    p.add_argument("--prompts", default=str(cache_dir() / "data" / "tldr" / "eval_prompts.jsonl"), help="eval_prompts.jsonl (id, prompt, reference)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, a directory holding one, or a Pythia name; if omitted, the one in --ckpt or its run directory")
    p.add_argument("--n", "--num-prompts", dest="n", type=int, default=256,
                   help="prompts to sample (the paper: 256); under torchrun write --num-prompts (torchrun takes --n as its own)")
    p.add_argument("--max-length", type=int, default=512, help="most prompt + sample tokens (App. B: max length 512, "
                   "read as the DPO code reads it)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="a prompt that would not leave room for its "
                   "reference summary within --max-length is cut to this many tokens (or half the max length if "
                   "less), keeping its start and its last line (the DPO code's max_prompt_length)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="an extra cap on new tokens per sample (default: "
                   "none beyond --max-length)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (the KL estimate assumes 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call, per rank")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts (alone) and seeds sampling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--sample-dtype", choices=list(DTYPES), default=None, help="the weights dtype of the policy copy "
                   "that generates (default: bfloat16 on cuda, float32 on cpu); the log-probs that KL uses are always "
                   "scored with float32 weights (6.9B: fp32 policy and reference plus a bf16 copy, 69 GB). Not "
                   "training's --dtype, which is an autocast dtype")
    p.add_argument("--train-data", default=None, help="the prepared data directory the policy was trained on: "
                   "adds ood_token_rate, the share of sampled tokens never seen in a training response")
    p.add_argument("--gold-spec", default=None, help="the miniature's gold.json: adds each sample's gold reward, "
                   "its parts (hits, other words), the labeller's proxy reward and its length in words")
    p.add_argument("--in-support", action="store_true", help="sample only tokens that occur in some training "
                   "response (--train-data's set, the one ood_token_rate counts against), from the policy "
                   "renormalised over them; its log-probs, KL and indicators are that distribution's. Writes "
                   "samples-<ckpt name>+in_support.jsonl, beside the plain samples of the same checkpoint")
    p.add_argument("--out", default=None, help="output JSONL (one --ckpt only); if omitted, samples-<ckpt name>.jsonl beside each checkpoint (summary: <out minus .jsonl>.summary.json)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    ckpts = [training.model_dir(c).resolve() for c in args.ckpt]  # a run directory's `latest` -> its ckpt-<examples>
    if args.out and len(ckpts) > 1:
        raise ValueError("--out names one file: give one --ckpt, or leave --out out to write beside each checkpoint")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.in_support and not args.train_data:
        raise ValueError("--in-support samples from the tokens of the training responses: give --train-data DIR")
    env = training.init_process(args.device, args.seed)
    device = env.device
    tag = "+in_support" if args.in_support else ""  # beside the plain samples, never over them (fit.read_run)
    outs = [Path(args.out) if args.out else c.parent / f"samples-{c.name}{tag}.jsonl" for c in ckpts]
    if env.main:  # one writer per output: a second sample.py on it refuses at once
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            files.hold(f"{out}.lock", out)
    # TF32 stays off (torch's default): KL is a small difference of two large sums, so it gets full fp32.

    tok = load_tokenizer(args.tokenizer or find_tokenizer(ckpts[0]))
    all_rows = training.read_examples(args.prompts, ("id", "prompt", "reference"))
    if len({r["id"] for r in all_rows}) < len(all_rows):
        raise ValueError(f"{args.prompts}: ids are not unique (judge.py and fit.py match rows by id)")
    chosen = select_prompts(all_rows, args.n, args.seed)
    dtype = DTYPES[args.sample_dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    ref = GPTNeoX.from_pretrained(str(training.model_dir(args.ref)), dtype=torch.float32, device=device)
    encoded, budgets = encode_prompts(tok, chosen, args, ref.config.max_position_embeddings)
    seen_ids = response_token_ids(args.train_data, tok) if args.train_data else None
    gold_spec = task.read_spec(args.gold_spec) if args.gold_spec else None
    diagnose = lambda row: add_diagnostics(row, seen_ids, gold_spec)
    allowed = torch.tensor(sorted(seen_ids), device=device) if args.in_support else None
    for ckpt, out in zip(ckpts, outs):
        policy = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32, device=device)
        sampler = copy.deepcopy(policy).to(dtype) if dtype != torch.float32 else None
        sample_checkpoint(policy, ref, tok, chosen, encoded, budgets, out, args, env, ckpt, diagnose, allowed, sampler)
        files.release(f"{out}.lock")
        del policy, sampler  # before the next loads: one policy (and its copy) beside the reference, never two
    training.finish(env)


def sample_checkpoint(policy, ref, tok, chosen, encoded, budgets, out, args, env, ckpt, diagnose, allowed=None,
                      sampler=None):
    """Sample this rank's share of the prompts, gather on rank 0, write the rows and their summary.
    `allowed`: --in-support's token ids; `sampler`: the generating copy (sample_batch)."""
    rank, world = env.rank, env.world
    # This rank's share, longest prompts first so a batch holds prompts of similar length (less padding).
    mine = sorted(range(rank, len(chosen), world), key=lambda i: -len(encoded[i]))
    generator = torch.Generator(env.device).manual_seed(args.seed + rank)  # the same draws for every checkpoint

    rows, t0, new_tokens = [], time.time(), 0
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    for b, batch in enumerate(batches, 1):
        prompts = [encoded[i] for i in batch]
        drawn = sample_batch(policy, ref, prompts, [budgets[i] for i in batch], tok.eos_id, args, generator, allowed,
                             sampler)
        for i, stats in zip(batch, drawn):
            r = chosen[i]
            rows.append(diagnose({"id": r["id"], "prompt": r["prompt"], "prompt_tokens": len(encoded[i]),
                                  "prompt_cut": r["cut"], "reference": r["reference"],
                                  "sample": sample_text(tok, stats["sample_tokens"]), **stats}))
            new_tokens += len(stats["sample_tokens"])
        if rank == 0:
            dt = time.time() - t0
            print(f"batch {b}/{len(batches)}: {new_tokens / dt:.1f} tokens/s, ETA {dt / b * (len(batches) - b):.0f} s", flush=True)

    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        rows = [r for part in gathered for r in part] if rank == 0 else []
    if rank == 0:
        order = {r["id"]: i for i, r in enumerate(chosen)}
        rows.sort(key=lambda r: order[r["id"]])
        s = summarize(rows, args, ckpt)
        if allowed is not None:  # `ckpt` names the checkpoint, as in its plain twin's summary
            s.update(in_support=True, support_tokens=len(allowed))
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        files.write_json(out.with_suffix(".summary.json"), s)
        print(f"KL {s['kl']:.3f} ± {s['kl_se']:.3f} (√KL {s['sqrt_kl']:.3f}), length {s['length_tokens']:.1f} tokens, "
              f"top-10 entropy {s['top10_entropy']:.3f}, top-10 mass {s['top10_mass']:.3f}, n={s['n']}")
        print(f"wrote {out} and {out.with_suffix('.summary.json')}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
