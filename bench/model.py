"""model.py vs transformers' GPTNeoXForCausalLM: training step and KV-cache decoding throughput.

Both models hold the same random weights (pythia-70m shape by default) and run on the CPU
in float32 with --threads torch threads (default 2). The sides take turns in one process:
each round times ours then theirs (or theirs then ours, every other round), so a change in
the machine's load hits both; a round's ratio compares two neighbouring runs, and the table
gives the median over --rounds rounds (wall clock, and process CPU time, which leaves out the
waits for a core), and the ratio of each side's fastest run. The load average before and
after is printed: on a shared machine, read the ratios next to it.

    python bench/model.py                  # pythia-70m, 4 x 256 fwd+bwd, 8 x 128 greedy decode, 2 threads
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import PYTHIA, GPTNeoX  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="pythia-70m", choices=sorted(PYTHIA), help="Pythia shape (random weights)")
parser.add_argument("--batch-size", type=int, default=4, help="forward+backward: sequences per step")
parser.add_argument("--seq-len", type=int, default=256, help="forward+backward: tokens per sequence")
parser.add_argument("--decode-batch", type=int, default=8, help="decode: prompts per batch")
parser.add_argument("--prompt-len", type=int, default=64, help="decode: longest prompt (others are left-padded)")
parser.add_argument("--new-tokens", type=int, default=128, help="decode: greedy tokens generated per prompt")
parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per benchmark (median reported)")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
args = parser.parse_args()

from transformers import GPTNeoXForCausalLM  # noqa: E402  (benchmark oracle only)

torch.set_num_threads(args.threads)
torch.manual_seed(0)
ours = GPTNeoX(PYTHIA[args.model])
with tempfile.TemporaryDirectory() as d:
    ours.save_pretrained(d)
    hf = GPTNeoXForCausalLM.from_pretrained(d, attn_implementation="sdpa")
V = ours.config.vocab_size


def interleaved(fns):
    """Wall-clock and process CPU seconds per call of each side, round by round; the order within a
    round alternates. CPU time (all threads) leaves out the time this process waits for a core."""
    wall, cpu = {side: [] for side in fns}, {side: [] for side in fns}
    for r in range(args.rounds):
        for side in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[side]()
            wall[side].append(time.perf_counter() - t0)
            cpu[side].append(time.process_time() - c0)
    return wall, cpu


def paired(t):
    """Each round's ratio transformers / ours (> 1: ours is faster)."""
    return [h / o for o, h in zip(t["ours"], t["hf"])]


# forward + backward: next-token cross-entropy over a full batch
idx = torch.randint(0, V, (args.batch_size, args.seq_len + 1))
x, y = idx[:, :-1], idx[:, 1:]


def train_step(model, logits_of):
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten()).backward()


fwd_bwd = {"ours": lambda: train_step(ours, lambda m, i: m(i)),
           "hf": lambda: train_step(hf, lambda m, i: m(input_ids=i).logits)}

# greedy decoding from left-padded prompts of different lengths
g = torch.Generator().manual_seed(1)
prompts = torch.randint(0, V, (args.decode_batch, args.prompt_len), generator=g)
lengths = torch.linspace(args.prompt_len // 4, args.prompt_len, args.decode_batch).long()
mask = (torch.arange(args.prompt_len)[None, :] >= args.prompt_len - lengths[:, None]).long()
out = {}


def decode_ours():
    ours.eval()
    out["ours"] = ours.generate(prompts, mask, max_new_tokens=args.new_tokens, temperature=0)


def decode_hf():
    hf.eval()
    with torch.no_grad():
        seq = hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    out["hf"] = seq[:, args.prompt_len:]


decode = {"ours": decode_ours, "hf": decode_hf}

load_before = os.getloadavg()
rows = []
for name, fns, tokens in [(f"forward+backward, batch {args.batch_size} x {args.seq_len}", fwd_bwd, args.batch_size * args.seq_len),
                          (f"greedy decode (KV cache), batch {args.decode_batch} x {args.new_tokens} new", decode,
                           args.decode_batch * args.new_tokens)]:
    for fn in fns.values():
        fn()  # warm-up
    wall, cpu = interleaved(fns)
    ratios = paired(wall)
    rows.append((name, tokens / statistics.median(wall["ours"]), tokens / statistics.median(wall["hf"]),
                 statistics.median(ratios), min(ratios), max(ratios), statistics.median(paired(cpu)),
                 min(wall["hf"]) / min(wall["ours"])))
load_after = os.getloadavg()

same = torch.equal(out["ours"], out["hf"])
print(f"{args.model} shape, random weights, CPU float32, {args.threads} threads, torch {torch.__version__}, "
      f"{args.rounds} interleaved rounds; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after "
      f"on {os.cpu_count()} CPUs")
print("| benchmark | nanoDAA tokens/s (median) | transformers tokens/s (median) | ratio, median of rounds "
      "(min-max) | ratio of CPU time, median | ratio of the best runs |\n|---|---:|---:|---:|---:|---:|")
for name, a, b, r, lo, hi, r_cpu, best in rows:
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {r:.2f}x ({lo:.2f}-{hi:.2f}) | {r_cpu:.2f}x | {best:.2f}x |")
print(f"greedy tokens identical to transformers: {same}")
