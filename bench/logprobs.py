"""Fused per-token log-probs (logprobs.token_logprobs) vs the naive log_softmax + gather.

    python bench/logprobs.py                  # issue 4's two shapes, fp32 on CPU, torch's threads
    python bench/logprobs.py --threads 1      # one thread per variant (steadier on a shared machine)
    python bench/logprobs.py --shapes 1024x256x50304 --rounds 1

Bar (issue 4): at least 15x less extra memory and at most 1.5x the naive time.

Each measurement runs in a fresh subprocess (one variant, one shape), so that one
variant's freed memory cannot hide the other's. "Extra memory" is what a forward
+ backward costs beyond what is resident between calls, as in a training loop:
the peak RSS during the measured calls minus the RSS before them, when only the
inputs (hidden, weight, targets) are live. One warm-up call comes first, so the
~15 MiB of code and allocator state that the first call pages in for good, the
same for both variants, is not counted; /proc/self/clear_refs then resets the
peak mark. The extra includes the gradients dH and dW both variants must return
(their fp32 size is printed as the floor) and every temporary.
MALLOC_MMAP_THRESHOLD_ makes glibc return large buffers to the OS as soon as they
are freed, so the peak is the high-water mark of live tensors and does not
wander from run to run. Time is the best forward + backward over all measured
calls; rounds alternate the variants so that load from other processes hits
both alike.
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


def measure(variant, n, d, v, chunk_size, repeat, threads):
    """Runs in the child: builds the inputs, makes one warm-up call, then `repeat` measured calls."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) * d ** -0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    fn = VARIANTS[variant]

    def step():
        logp = fn(hidden, weight, targets, chunk_size or None)
        torch.autograd.grad(logp.sum(), (hidden, weight))

    step()  # warm-up: pages in the code paths (~15 MiB that stay for good) and sizes the allocators
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the RSS now: inputs, no temporaries
    base = rss()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"extra": peak - base, "time": min(times)}


def run_child(variant, n, d, v, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--shapes", f"{n}x{d}x{v}",
           "--repeat", str(args.repeat), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{variant} {n}x{d}x{v} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout)


def parse_shape(s):
    parts = s.split("x")
    if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise ValueError(f"--shapes: {s!r} is not NxDxV (positive integers), e.g. 2048x256x50304")
    return tuple(int(x) for x in parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x256x50304,4096x512x50304",
                   help="comma-separated NxDxV: tokens x hidden size x vocabulary")
    p.add_argument("--chunk-size", type=int, default=0, help="fused chunk size (default 0: logprobs' rule)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each subprocess (default 0: torch's)")
    p.add_argument("--rounds", type=int, default=3, help="subprocesses per variant and shape, alternating")
    p.add_argument("--repeat", type=int, default=2, help="measured forward+backward calls per subprocess (>= 1)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    if args.repeat < 1 or args.rounds < 1:
        raise ValueError("--repeat and --rounds must be at least 1")
    if args.child:
        print(json.dumps(measure(args.child, *shapes[0], args.chunk_size, args.repeat, args.threads)))
        return

    mb = 2 ** 20
    print(f"fp32 CPU, torch {torch.__version__}, torch threads: {args.threads or torch.get_num_threads()}; "
          f"extra = peak RSS of forward+backward - RSS with inputs (MiB); time = forward+backward (s)")
    print(f"{'N x D x V':>16} {'chunk':>6} {'floor':>7} | {'naive MiB':>9} {'fused MiB':>9} {'less':>6} | "
          f"{'naive s':>8} {'fused s':>8} {'ratio':>6}")
    for n, d, v in shapes:
        res = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                res[name].append(run_child(name, n, d, v, args))
        extra = {k: max(r["extra"] for r in rs) for k, rs in res.items()}
        secs = {k: min(r["time"] for r in rs) for k, rs in res.items()}
        floor = 4 * (n * d + v * d)  # dH + dW in fp32
        chunk = args.chunk_size or default_chunk_size(n, d, v)
        print(f"{f'{n}x{d}x{v}':>16} {chunk:>6} {floor / mb:>7.0f} | {extra['naive'] / mb:>9.0f} "
              f"{extra['fused'] / mb:>9.0f} {extra['naive'] / extra['fused']:>5.1f}x | "
              f"{secs['naive']:>8.2f} {secs['fused']:>8.2f} {secs['fused'] / secs['naive']:>5.2f}x")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
