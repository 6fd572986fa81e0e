"""Fused per-token log-probs (logprobs.token_logprobs) vs the naive log_softmax + gather.

    python bench/logprobs.py                  # the two shapes of issue 4, fp32 on CPU
    python bench/logprobs.py --shapes 1024x256x50304 --rounds 1

Each measurement runs in a fresh subprocess (one variant, one shape) so that one
variant's freed memory cannot hide the other's. "Extra memory" is what a forward
+ backward costs beyond its inputs: the peak RSS of the first (warm-up) call
minus the RSS once hidden, weight and targets exist. It includes the gradients
dH and dW both variants must return (their sum is printed as the floor) and
every temporary. The peak is reset after the inputs are built (Linux
/proc/self/clear_refs), so torch's import does not count, and
MALLOC_MMAP_THRESHOLD_ makes glibc hand large buffers back to the OS as soon as
they are freed, so the peak is the true high-water mark of live tensors.
Time is the best forward + backward over the later calls of all rounds; the
rounds alternate variants so that load from other processes hits both alike.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from logprobs import default_chunk_size, token_logprobs  # noqa: E402


def naive(hidden, weight, targets, chunk_size=None):
    return (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


VARIANTS = {"naive": naive, "fused": token_logprobs}


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant, n, d, v, chunk_size, repeat):
    """Runs in the child: builds the inputs, then one warm-up call for memory and `repeat` for time."""
    torch.manual_seed(0)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) * d ** -0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    fn = VARIANTS[variant]

    def step():
        logp = fn(hidden, weight, targets, chunk_size)
        torch.autograd.grad(logp.sum(), (hidden, weight))

    step()  # warm-up: pages in the code paths (~15 MiB that stay for good) and sizes the allocators
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the RSS now: inputs, no temporaries
    base = rss()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"extra": peak - base, "time": min(times)}


def run_child(variant, n, d, v, chunk_size, repeat):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--shapes", f"{n}x{d}x{v}",
           "--repeat", str(repeat)] + (["--chunk-size", str(chunk_size)] if chunk_size else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{variant} {n}x{d}x{v} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x256x50304,4096x512x50304",
                   help="comma-separated NxDxV: tokens x hidden size x vocabulary")
    p.add_argument("--chunk-size", type=int, default=None, help="fused chunk size (default: logprobs' rule)")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per variant and shape, alternating")
    p.add_argument("--repeat", type=int, default=2, help="timed forward+backward calls per subprocess")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.child:
        print(json.dumps(measure(args.child, *shapes[0], args.chunk_size, args.repeat)))
        return

    mb = 2 ** 20
    print(f"fp32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"extra = peak RSS of forward+backward - RSS with inputs (MiB); time = forward+backward (s)")
    print(f"{'N x D x V':>16} {'chunk':>6} {'floor':>7} | {'naive MiB':>9} {'fused MiB':>9} {'less':>6} | "
          f"{'naive s':>8} {'fused s':>8} {'ratio':>6}")
    for n, d, v in shapes:
        res = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                res[name].append(run_child(name, n, d, v, args.chunk_size, args.repeat))
        extra = {k: max(r["extra"] for r in rs) for k, rs in res.items()}
        secs = {k: min(r["time"] for r in rs) for k, rs in res.items()}
        floor = 4 * (n * d + v * d)  # dH + dW in fp32
        chunk = args.chunk_size or default_chunk_size(n, d, v)
        print(f"{f'{n}x{d}x{v}':>16} {chunk:>6} {floor / mb:>7.0f} | {extra['naive'] / mb:>9.0f} "
              f"{extra['fused'] / mb:>9.0f} {extra['naive'] / extra['fused']:>5.1f}x | "
              f"{secs['naive']:>8.2f} {secs['fused']:>8.2f} {secs['fused'] / secs['naive']:>5.2f}x")


if __name__ == "__main__":
    main()
