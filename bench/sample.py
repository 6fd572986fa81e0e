"""Decode speed of model.generate against transformers' generate: same weights, same sampling, CPU.

Random Pythia-shaped weights (no download), a batch of 8 random 64-token prompts,
128 new tokens each, plain temperature-1 sampling (top-k off, top-p 1). The two
contenders run alternately, best of --repeats each, so machine load hits both.

    python bench/sample.py [--models pythia-14m pythia-70m] [--repeats 3]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import PYTHIA, GPTNeoX  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--models", nargs="+", default=["pythia-14m", "pythia-70m"], help="Pythia shapes to time")
p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
p.add_argument("--repeats", type=int, default=3, help="timed runs per contender (best is reported)")
p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
args = p.parse_args()
torch.set_num_threads(args.threads)
from transformers import GPTNeoXForCausalLM  # noqa: E402  (the baseline; test-only dependency)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


print(f"batch {args.batch_size} x {args.new_tokens} new tokens after {args.prompt_len}-token prompts, "
      f"sampling at temperature 1, {args.threads} CPU threads, best of {args.repeats}")
print(f"{'model':<12} {'nanoDAA tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}  greedy tokens equal")
for name in args.models:
    torch.manual_seed(0)
    ours = GPTNeoX(PYTHIA[name]).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = GPTNeoXForCausalLM.from_pretrained(d).eval()
    ids = torch.randint(1, 50000, (args.batch_size, args.prompt_len))
    mask = torch.ones_like(ids)
    run_ours = lambda **kw: ours.generate(ids, mask, args.new_tokens, eos_id=0, **kw)
    run_theirs = lambda **kw: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                              pad_token_id=0, eos_token_id=0, **kw)[:, args.prompt_len:]
    with torch.no_grad():
        # Same weights, same model: greedy decoding agrees token for token.
        same = torch.equal(run_ours(temperature=0)[:, :16], run_theirs(do_sample=False, max_length=None)[:, :16])
        best = {"ours": float("inf"), "theirs": float("inf")}
        for _ in range(args.repeats + 1):  # the first round warms up
            for who, fn in (("ours", lambda: run_ours(generator=torch.Generator().manual_seed(0))),
                            ("theirs", lambda: run_theirs(do_sample=True, temperature=1.0, top_k=0, top_p=1.0))):
                dt, out = timed(fn)
                assert out.shape == (args.batch_size, args.new_tokens), out.shape  # no early stop: equal work
                best[who] = min(best[who], dt) if _ else best[who]
    n = args.batch_size * args.new_tokens
    print(f"{name:<12} {n / best['ours']:>14.1f} {n / best['theirs']:>19.1f} {best['theirs'] / best['ours']:>6.2f}x  {same}")
