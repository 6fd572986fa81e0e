"""One DAA training step four ways, side by side: full logits, fused kernel, + prefix sharing, + checkpointing.

The step is daa.py's: π_ref's log-probs (no grad), the policy's on chosen and rejected,
DPO loss (Eq. 4), backward, gradient clipping, RMSprop. The variants:

    full logits     two rows per pair; logits = model(x) [B, T, V], log_softmax, gather (the DPO reference code)
    fused           two rows per pair; logprobs.sequence_logps (hidden states + chunked unembedding)
    fused + shared  one row [prompt | chosen | rejected] per pair (daa.prefix_sharing_batch), the default
    + checkpointing the same with --activation-checkpointing (each block recomputed in backward)

Pairs: real TL;DR comparisons (tests/fixtures, Pythia's tokenizer, truncated as daa.py does
at --max-length 512), the `--pairs` whose prompt lengths are closest to the fixture's mean.
Model: a Pythia shape with random weights, CPU float32. Each variant runs in a fresh
subprocess, the variants interleaved `--repeats` times (best time kept) so a busy machine
slows them alike. A short warm-up step allocates the optimizer state; then the peak RSS is
reset (/proc/self/clear_refs) and the timed steps run. "step memory" is the peak RSS during
those steps minus the RSS before them: what the step needs on top of weights, gradients
(kept allocated between steps, as DDP keeps them in its buckets) and optimizer state: the
activations and temporaries, which the variants change. MALLOC_MMAP_THRESHOLD_=131072 makes glibc return freed large buffers to the OS, so
RSS follows live memory instead of the allocator's high-water mark.

    python bench/train.py     # 2 minutes on a quiet 2-core machine, 8 on a loaded one (docs/training.md's table)
    python bench/train.py --model pythia-410m --variants shared shared+ckpt     # memory per size
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"
from data.tldr.prepare import FORMAT  # noqa: E402  (the TL;DR prompt, as data/tldr/prepare.py writes it)
VARIANTS = {"full": "full logits", "fused": "fused", "shared": "fused + shared", "shared+ckpt": "+ checkpointing"}


def naive_sequence_logps(model, input_ids, labels, attention_mask=None, position_ids=None):
    """The reference code's way: full [B, T, V] logits, log_softmax, gather (two-row batches)."""
    logp = model(input_ids, attention_mask, position_ids=position_ids)[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    token_logps = logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (token_logps * (targets != -100)).sum(1)


def tldr_pairs():
    """The comparison fixture as daa.py's pairs (prompt, chosen, rejected)."""
    rows = [json.loads(line) for line in open(FIXTURES / "tldr_comparisons_batch18_first100.jsonl", encoding="utf-8")]
    pairs = []
    for c in rows:
        info, texts = c["info"], [s["text"] for s in c["summaries"]]
        prompt = FORMAT.format(subreddit=info["subreddit"], title=info["title"], post=info["post"])
        pairs.append({"prompt": prompt, "chosen": texts[c["choice"]], "rejected": texts[1 - c["choice"]]})
    return pairs


def typical(tok, pairs, n, max_length):
    """The n pairs whose (truncated) prompt length is closest to the mean, and the fixture's mean lengths."""
    import training
    enc = [training.encode(tok, p["prompt"], [p["chosen"], p["rejected"]], max_length) for p in pairs]
    prompt = [s[0][1].count(logprobs.IGNORE) for s in enc]
    response = [len(ids) - P for s, P in zip(enc, prompt) for ids, _ in s]
    mean_p, mean_r = sum(prompt) / len(prompt), sum(response) / len(response)
    order = sorted(range(len(pairs)), key=lambda i: abs(prompt[i] - mean_p))
    return [pairs[i] for i in order[:n]], mean_p, mean_r


def status(field):
    """A /proc/self/status field in MiB (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def worker(variant, n_pairs, steps, model_name, max_length):
    import torch

    import daa
    import logprobs
    import training
    from model import PYTHIA, GPTNeoX
    from tokenizer import load_tokenizer

    if variant == "full":
        logprobs.sequence_logps = naive_sequence_logps  # daa.pair_logps calls it through the module
    tok = load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer.json")
    pairs, _, _ = typical(tok, tldr_pairs(), n_pairs, max_length)
    torch.manual_seed(0)
    policy = GPTNeoX(PYTHIA[model_name])
    policy.activation_checkpointing = variant == "shared+ckpt"
    ref = training.freeze(GPTNeoX(PYTHIA[model_name]))
    ref.load_state_dict(policy.state_dict())
    args = daa.get_parser().parse_args(["--init", "-", "--out", "-"])  # daa.py's defaults: DPO, β 0.1, RMSprop, App. B
    env = SimpleNamespace(world=1, rank=0, main=True, device=torch.device("cpu"), autocast=nullcontext)
    optimizer = training.make_optimizer(args, policy)
    # Gradients stay allocated between steps, as DDP keeps them in its buckets (gradient_as_bucket_view):
    # step memory is then the activations and the step's temporaries, what the variants change.
    optimizer.zero_grad = lambda set_to_none=True, real=optimizer.zero_grad: real(set_to_none=False)
    loss_fn = daa.make_loss_fn(args, daa.make_reference(ref, {}, env))
    prefix_sharing = variant.startswith("shared")
    batch = lambda length: daa.pair_batch(training.tokenize(tok, pairs, ("chosen", "rejected"), length),
                                          list(range(len(pairs))), "train", tok.eos_id, "cpu", prefix_sharing)

    training.train_step(policy, optimizer, [batch(16)], loss_fn, env, args, 0)  # allocates optimizer state
    b = batch(max_length)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    before = status("VmRSS")
    t0 = time.perf_counter()
    for step in range(steps):
        training.train_step(policy, optimizer, [b], loss_fn, env, args, step + 1)
    seconds = (time.perf_counter() - t0) / steps
    peak = status("VmHWM")
    print(json.dumps({"variant": variant, "s_per_step": seconds, "tokens": int(b["tokens"]),
                      "tokens_per_s": int(b["tokens"]) / seconds, "pairs_per_s": len(pairs) / seconds,
                      "rss_before_mib": before, "peak_rss_mib": peak, "step_mib": peak - before}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-160m", help="Pythia shape (random weights)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (one micro-batch)")
    p.add_argument("--max-length", type=int, default=512, help="daa.py's truncation (App. B)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant")
    p.add_argument("--repeats", type=int, default=2, help="alternate the variants this many times; best time kept")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which to run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.pairs, args.steps, args.model, args.max_length)

    from tokenizer import load_tokenizer
    tok = load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer.json")
    _, mean_p, mean_r = typical(tok, tldr_pairs(), args.pairs, args.max_length)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for _ in range(args.repeats):
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--pairs", str(args.pairs),
                   "--max-length", str(args.max_length), "--steps", str(args.steps)]
            r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            if variant not in results or r["s_per_step"] < results[variant]["s_per_step"]:
                results[variant] = r
    print(f"one DAA step (DPO, RMSprop), {args.model} random weights, {args.pairs} TL;DR pairs (fixture means: "
          f"prompt {mean_p:.0f}, response {mean_r:.0f} tokens), CPU float32, {os.cpu_count()} cores, "
          f"best of {args.repeats} interleaved × {args.steps} step\n")
    print("| variant | tokens in the model | s/step | pairs/s | tokens/s | peak RSS (MiB) | step memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for v in args.variants:
        r = results[v]
        print(f"| {VARIANTS[v]} | {r['tokens']} | {r['s_per_step']:.2f} | {r['pairs_per_s']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['step_mib']:.0f} |")
    bars = [("shared", "fused", "pairs_per_s", 1.5, "fused + shared vs fused (two rows): pairs/s"),
            ("shared", "full", "pairs_per_s", 2.0, "fused + shared vs full logits: pairs/s")]
    print()
    for a, b, key, bar, text in bars:
        if a in results and b in results:
            x = results[a][key] / results[b][key]
            print(f"{text} {x:.2f}× (bar ≥ {bar}×: {'met' if x >= bar else 'NOT met'})")
    if "shared" in results and "shared+ckpt" in results:
        s, c = results["shared"], results["shared+ckpt"]
        less, speed = s["step_mib"] / c["step_mib"], c["pairs_per_s"] / s["pairs_per_s"]
        ok = less >= 2 and speed >= 0.7
        print(f"checkpointing vs without: {less:.2f}× less step memory at {speed:.2f}× the speed "
              f"(bar ≥ 2× at ≥ 0.7×: {'met' if ok else 'NOT met'})")


if __name__ == "__main__":
    main()
