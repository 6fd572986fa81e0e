"""One DAA training step with the fused log-prob kernel vs full logits + log_softmax, side by side.

The step is daa.py's: π_ref's log-probs (no grad), the policy's on chosen and rejected in
one forward, DPO loss (Eq. 4), backward, gradient clipping, RMSprop. Only the way the
sequence log-probs are computed differs:

    fused   logprobs.sequence_logps: hidden states + chunked unembedding (never [tokens × vocab])
    naive   the DPO reference code: logits = model(x) [B, T, V], log_softmax, gather

Setup: pythia-160m shape with random weights, 4 pairs × 256 tokens (128 prompt, 128
response), CPU float32. Each variant runs in a fresh subprocess. A short warm-up step
allocates the optimizer state; then the peak RSS is reset (/proc/self/clear_refs) and
the timed steps run. "step memory" is the peak RSS during those steps minus the RSS
before them: what the step itself needs on top of weights and optimizer state.
MALLOC_MMAP_THRESHOLD_=131072 makes glibc return freed large buffers to the OS, so RSS
follows live memory instead of the allocator's high-water mark.

    python bench/train.py                 # about 5 minutes on 2 cores
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def naive_sequence_logps(model, input_ids, labels, attention_mask=None):
    """The reference code's way: full [B, T, V] logits, log_softmax, gather."""
    logp = model(input_ids, attention_mask)[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    token_logps = logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (token_logps * (targets != -100)).sum(1)


def status(field):
    """A /proc/self/status field in MiB (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def worker(variant, pairs, length, steps, model_name):
    import torch

    import daa
    import logprobs
    import training
    from model import PYTHIA, GPTNeoX

    if variant == "naive":
        logprobs.sequence_logps = naive_sequence_logps  # daa.pair_logps calls it through the module
    torch.manual_seed(0)
    policy = GPTNeoX(PYTHIA[model_name])
    ref = training.freeze(GPTNeoX(PYTHIA[model_name]))
    ref.load_state_dict(policy.state_dict())
    args = SimpleNamespace(optimizer="rmsprop", lr=5e-7, warmup=150, max_grad_norm=10.0, out="-", beta=0.1,
                           loss="dpo", length_alpha=0.0)
    env = SimpleNamespace(world=1, rank=0, main=True, device=torch.device("cpu"), autocast=nullcontext)
    optimizer = training.make_optimizer(args, policy)
    loss_fn = daa.make_loss_fn(args, daa.make_reference(ref, {}, env))

    def batch(T):
        ids = torch.randint(0, 50277, (2 * pairs, T))
        labels = ids.clone()
        labels[:, :T // 2] = -100  # the first half is the prompt
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                "idx": list(range(pairs)), "split": "train"}

    training.train_step(policy, optimizer, [batch(16)], loss_fn, env, args, 0)  # allocates optimizer state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    before = status("VmRSS")
    t0 = time.perf_counter()
    for step in range(steps):
        training.train_step(policy, optimizer, [batch(length)], loss_fn, env, args, step + 1)
    seconds = (time.perf_counter() - t0) / steps
    peak = status("VmHWM")
    print(json.dumps({"variant": variant, "s_per_step": seconds, "tokens_per_s": 2 * pairs * length / seconds,
                      "rss_before_mib": before, "peak_rss_mib": peak, "step_mib": peak - before}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-160m", help="Pythia shape (random weights)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2× sequences)")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    p.add_argument("--repeats", type=int, default=1, help="alternate the variants this many times; best time kept")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.pairs, args.length, args.steps, args.model)

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for _ in range(args.repeats):
        for variant in ("fused", "naive"):
            cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--pairs", str(args.pairs),
                   "--length", str(args.length), "--steps", str(args.steps)]
            r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            if variant not in results or r["s_per_step"] < results[variant]["s_per_step"]:
                results[variant] = r
    print(f"one DAA step (DPO, RMSprop), {args.model} random weights, {args.pairs} pairs × {args.length} tokens, "
          f"CPU float32, {os.cpu_count()} cores, {args.steps} timed steps\n")
    print("| variant | s/step | tokens/s | RSS before step (MiB) | peak RSS (MiB) | step memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for v in ("fused", "naive"):
        r = results[v]
        print(f"| {v} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['rss_before_mib']:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['step_mib']:.0f} |")
    f, n = results["fused"], results["naive"]
    print(f"\nfused vs naive: {f['tokens_per_s'] / n['tokens_per_s']:.2f}× the speed, "
          f"{n['step_mib'] / f['step_mib']:.2f}× less step memory, {n['peak_rss_mib'] / f['peak_rss_mib']:.2f}× "
          f"lower peak RSS (bar: ≥ 2× lower peak memory at ≥ 1.0× the speed)")


if __name__ == "__main__":
    main()
