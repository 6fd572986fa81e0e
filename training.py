"""Plumbing shared by sft.py, daa.py and rm.py: torchrun setup, data, optimizer, checkpoints, logging.

A training script reads top to bottom with these pieces:

    args = parser.parse_args(); env = setup(args)            # torchrun ranks, device, autocast
    state = prepare_out(args, env)                            # args.json; resume from `latest`
    plan = make_plan(args, env, n_examples)                   # steps, accumulation, checkpoint steps
    for step in range(start, plan.total_steps):
        batches = [collate(...) for idx in micro_batch_indices(plan, step)]
        stats = train_step(model, optimizer, batches, loss_fn, env, args, step)
        log_step(...); if step + 1 in plan.checkpoint_steps: save_checkpoint(...)

Batching (App. B of the paper): `--batch-size` is the global batch, split as micro-batch ×
accumulation steps × world size. The data order is a permutation drawn from (seed, epoch)
alone, so a resumed run sees exactly the batches an uninterrupted run sees; within a step,
examples are grouped by length (micro_batch_indices). Every file is written atomically
(files.py); the run directory's layout is docs/formats.md's.
"""
import base64
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import files
from download import cache_dir
from logprobs import IGNORE, scored_tokens
from model import Config, GPTNeoX, unreadable

FLAGS_THAT_MAY_CHANGE_ON_RESUME = {"out", "micro_batch_size", "log_interval", "device",  # the math stays the same
                                   "activation_checkpointing", "dist_timeout", "compile", "attention",
                                   "save_minutes"}


def add_args(parser, checkpoints):
    """The flags sft.py and daa.py share; defaults are the paper's App. B."""
    p = parser
    p.add_argument("--data", default=str(cache_dir() / "data" / "tldr"), help="directory of prepared JSONL, as "
                   "data/<name>/prepare.py writes it (default: $NANODAA_CACHE/data/tldr)")
    p.add_argument("--out", required=True, help="run directory; re-running the same command on it resumes from "
                   "its `latest` checkpoint")
    p.add_argument("--batch-size", type=int, default=128, help="global batch in examples (pairs for DAA), over all "
                   "processes and accumulation steps (default %(default)s, App. B)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="examples per process per forward; "
                   "accumulation = batch / (micro × processes) (default: min(8, batch / processes))")
    p.add_argument("--lr", type=float, default=5e-7, help="peak learning rate (default %(default)s, App. B)")
    p.add_argument("--warmup", type=int, default=150, help="linear warmup steps, then constant "
                   "(default %(default)s, App. B)")
    p.add_argument("--optimizer", choices=("rmsprop", "adamw"), default="rmsprop",
                   help="RMSprop as the paper and the DPO reference code, or AdamW (weight decay 0)")
    p.add_argument("--max-grad-norm", type=float, default=10.0, help="clip the global gradient norm "
                   "(default %(default)s, as the DPO reference code)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training set (default %(default)s, App. B)")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N training examples "
                   "(quick runs, tests)")
    p.add_argument("--max-length", type=int, default=512, help="truncate prompt + response to this many tokens "
                   "(default %(default)s, App. B); a long prompt loses the tokens before its last line, keeping "
                   "its start and the instruction (TL;DR:, Assistant:)")
    p.add_argument("--checkpoints", type=int, default=checkpoints, help="checkpoints evenly spaced over the run, "
                   "as ckpt-<examples seen>/; 4 saves at 25/50/75/100%% (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order (with the epoch) and any "
                   "random init (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (one GPU per torchrun process, by LOCAL_RANK) or "
                   "cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="autocast compute dtype; "
                   "weights, gradients and optimizer state stay float32 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the "
                   "processes with torch's fully_shard (for models DDP cannot hold, e.g. pythia-6.9b)")
    p.add_argument("--activation-checkpointing", action="store_true", help="keep only each block's input in "
                   "the forward and recompute the block in backward: less activation memory for about a third "
                   "more compute (a larger --micro-batch-size then fits)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (the same code "
                   "for all layers: one compiled graph, recompiled once for a new sequence length, then with "
                   "dynamic shapes); the first steps pay the compile time")
    p.add_argument("--dist-timeout", type=float, default=180, help="minutes a process waits in a collective "
                   "before the run is aborted; generous, as the other processes wait while rank 0 writes a "
                   "checkpoint (tens of GB at 6.9B; NCCL's own default is 10) (default %(default)s)")
    p.add_argument("--save-minutes", type=float, default=None, help="also save a resume state (OUT/resume/, "
                   "replacing the last; not an evaluation checkpoint) every M minutes, at a step boundary; one is "
                   "saved on SIGTERM in any case (default: none)")
    p.add_argument("--log-interval", type=int, default=10, help="print a progress line every N steps (rank 0; "
                   "default %(default)s); metrics.jsonl gets every step")
    return p


# ---------------------------------------------------------------- processes and devices

def init_process(device, seed, dist_timeout=180):
    """This process's rank, world size and device, as torchrun starts them (RANK, LOCAL_RANK,
    WORLD_SIZE; plain python is rank 0 of 1), with the process group joined (NCCL on CUDA, gloo
    on CPU) and torch seeded. sample.py and rm.py call it directly; training scripts via setup()."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=dist_timeout))
    torch.manual_seed(seed)
    return SimpleNamespace(rank=rank, world=world, local_rank=local_rank, device=device, main=rank == 0,
                           owns_group=owns_group)


def setup(args):
    """init_process for a training script, plus its compute dtype: autocast in bf16 on CUDA by default."""
    env = init_process(args.device, args.seed, args.dist_timeout)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # logprobs.py's fp32 matmuls on tensor cores
    if args.fsdp and env.world == 1:
        raise ValueError("--fsdp shards over processes: start it with torchrun --nproc_per_node N (N > 1)")
    env.dtype = args.dtype or ("bfloat16" if env.device.type == "cuda" else "float32")
    # A fresh context per use: one torch.autocast object must not be entered twice (the reference
    # model's forward runs inside the policy's loss function).
    env.autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if env.dtype == "bfloat16" \
        else nullcontext
    catch_sigterm()
    return env


_sigterm = []  # non-empty once this process got SIGTERM (catch_sigterm)


def catch_sigterm():
    """SIGTERM, what Slurm and Kubernetes send before they preempt (and torchrun forwards), no longer
    kills the run mid-step: save_if_due saves a resume state at the next step boundary and exits.
    A second SIGTERM kills at once, as before."""
    def handler(signum, frame):
        _sigterm.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm.clear()
    signal.signal(signal.SIGTERM, handler)


def finish(env):
    if getattr(env, "run_dir", None):
        files.release(env.run_dir)  # the run directory's lock (prepare_out)
    if env.owns_group:
        dist.destroy_process_group()


def barrier(env):
    if env.world > 1:
        dist.barrier()


def reduce_sum(env, values):
    """Sum a dict of scalar tensors over processes with one collective; returns floats."""
    keys = sorted(values)
    packed = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(env.device)
    if env.world > 1:
        dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def evaluate(model, loss_fn, batches, env):
    """Sums over the held-out `batches` of every per-example statistic loss_fn returns, over all
    processes, plus "examples": the caller turns them into means (daa.py, sft.py, rm.py)."""
    sums = {}
    with torch.no_grad(), env.autocast():
        for batch in batches:
            _, stats = loss_fn(model, batch)
            stats["examples"] = torch.ones_like(stats["loss"])
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v.sum()
    return reduce_sum(env, sums)


def say(env, *msg):
    if env.main:
        print(*msg, flush=True)


# ---------------------------------------------------------------- data

def read_examples(path, keys, limit=None):
    """The first `limit` examples of a prepared JSONL file, each holding string values for `keys`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run data/<name>/prepare.py --out-dir {path.parent}")
    rows = []
    for n, row in files.iter_jsonl(path) if limit != 0 else ():
        missing = [k for k in keys if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: needs string field(s) {', '.join(missing)}")
        rows.append({k: row[k] for k in keys})
        if len(rows) == limit:
            break
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def encode(tok, prompt, responses, max_length):
    """(input_ids, labels) for prompt + each response + EOS, all sharing one truncated prompt.

    Labels are the ids on response tokens and IGNORE on the prompt, so only the response is
    scored. When too long, a response keeps at least half the budget and the prompt is cut
    from its middle (cut_prompt). Pairs share the prompt cut so that chosen and rejected are
    scored on the same context.
    """
    p = tok.encode(prompt)
    rs = [tok.encode(r) + [tok.eos_id] for r in responses]
    r_budget = max(max_length - len(p), max_length // 2)
    rs = [r[:r_budget] for r in rs]
    p = cut_prompt(tok, prompt, p, max_length - max(len(r) for r in rs))
    return [(p + r, [IGNORE] * len(p) + r) for r in rs]


def cut_prompt(tok, prompt, ids, budget):
    """`prompt`'s token ids `ids` cut to at most `budget` tokens, from the middle: its start
    (subreddit, title) and its last line, the instruction the model answers ("TL;DR:",
    "Assistant:"), survive. The one rule for training (encode) and sampling (sample.py)."""
    if len(ids) <= budget:
        return ids
    last_line = prompt[prompt.rstrip().rfind("\n"):]  # "\nTL;DR:"; the whole prompt if it has no newline
    n_tail = min(len(tok.encode(last_line)), budget // 2)
    return ids[:budget - n_tail] + ids[len(ids) - n_tail:]


def tokenize(tok, rows, responses, max_length):
    """Every example tokenised and truncated once, before training (encode), so that a step only
    packs ids: per row, (prompt, response, ...) as int32 arrays, responses with their EOS."""
    out = []
    for row in rows:
        seqs = encode(tok, row["prompt"], [row[k] for k in responses], max_length)
        p = seqs[0][1].count(IGNORE)  # the shared prompt's length
        out.append((np.array(seqs[0][0][:p], np.int32), *(np.array(ids[p:], np.int32) for ids, _ in seqs)))
    return out


def collate(examples, pad_id):
    """Right-pad (prompt, response) id arrays into CPU tensors [B, T]: input_ids, and labels with
    IGNORE on prompt and padding, plus their logprobs.scored_tokens. No attention mask: causal
    attention is exact for every token when padding only follows it (model.forward)."""
    T = max(len(p) + len(r) for p, r in examples)
    ids = np.full((len(examples), T), pad_id, np.int64)
    labels = np.full((len(examples), T), IGNORE, np.int64)
    for i, (p, r) in enumerate(examples):
        ids[i, :len(p) + len(r)] = np.concatenate((p, r))
        labels[i, len(p):len(p) + len(r)] = r
    labels = torch.from_numpy(labels)
    return {"input_ids": torch.from_numpy(ids), "labels": labels, "scored": scored_tokens(labels),
            "tokens": torch.tensor(sum(len(p) + len(r) for p, r in examples))}


def move(t, device):
    """A CPU tensor on `device`. On CUDA from pinned memory and non-blocking: the copy queues behind
    the kernels already running, where a plain .to() from pageable memory waits for them."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def to_device(batch, device):
    """A batch's tensors on `device` (move)."""
    return {k: move(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_plan(args, env, n_examples, lengths=None):
    """Steps, accumulation and checkpoint steps for `n_examples` training examples; `lengths`
    (tokens per example, as batched) lets micro_batch_indices group similar lengths."""
    B, W = args.batch_size, env.world
    micro = args.micro_batch_size or min(8, max(1, B // W))
    if B % (micro * W):
        raise ValueError(f"--batch-size {B} must be a multiple of --micro-batch-size {micro} × {W} processes")
    steps_per_epoch = n_examples // B  # the last partial batch is dropped: every step has the full batch
    if steps_per_epoch == 0:
        raise ValueError(f"{n_examples} training examples are fewer than --batch-size {B}")
    total = steps_per_epoch * args.epochs
    checkpoint_steps = sorted({max(1, round(total * k / args.checkpoints)) for k in range(1, args.checkpoints + 1)})
    return SimpleNamespace(n_examples=n_examples, batch_size=B, micro=micro, accum=B // (micro * W),
                           steps_per_epoch=steps_per_epoch, total_steps=total, checkpoint_steps=checkpoint_steps,
                           seed=args.seed, rank=env.rank, world=W,
                           lengths=None if lengths is None else np.asarray(lengths))


def epoch_order(n, seed, epoch):
    """The data order of one epoch: a permutation fixed by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batch_indices(plan, step):
    """This process's example indices at `step`, in micro-batches.

    Which examples form the step is the data order's alone. When they span several micro-batches
    and `plan.lengths` is known, they are sorted by length first (length bucketing: each
    micro-batch holds similar lengths, so less padding) and micro-batch j goes to process
    j % world as its (j // world)-th: at each accumulation step the processes hold neighbouring
    lengths and finish together. The step's gradient, a mean over its examples, is the same sum.
    """
    epoch, k = divmod(step, plan.steps_per_epoch)
    batch = epoch_order(plan.n_examples, plan.seed, epoch)[k * plan.batch_size:(k + 1) * plan.batch_size]
    if plan.lengths is not None and plan.micro < plan.batch_size:
        batch = batch[np.argsort(plan.lengths[batch], kind="stable")]
    micro = [batch[i:i + plan.micro].tolist() for i in range(0, plan.batch_size, plan.micro)]
    return micro[plan.rank::plan.world]


def shard(n, env, micro):
    """Micro-batches of this process's contiguous share of range(n), the same count on every process
    (FSDP needs every process in every forward); n is cut to a multiple of the world size."""
    per_rank = n // env.world
    start = env.rank * per_rank
    return [list(range(start + i, start + min(i + micro, per_rank))) for i in range(0, per_rank, micro)]


# ---------------------------------------------------------------- models

def model_dir(path):
    """A run directory stands for its newest checkpoint: `out/sft` and `out/sft/latest` both work."""
    p = Path(path)
    return p / "latest" if (p / "latest").exists() else p


def load_model(name_or_dir, seed, device):
    """A Pythia name or checkpoint directory, in float32. A directory with config.json but no weights
    starts from a random init seeded by `seed` (the offline miniature task trains from scratch)."""
    d = model_dir(name_or_dir)
    weights = ("model.safetensors", "model.safetensors.index.json")
    if d.is_dir() and (d / "config.json").is_file() and not any((d / w).exists() for w in weights):
        torch.manual_seed(seed)
        return GPTNeoX(Config.from_dict(json.loads((d / "config.json").read_text()))).to(device)
    return GPTNeoX.from_pretrained(str(d), device=device)


def wrap(model, env, fsdp, checkpointing=False, compile=False):
    """DDP replicates the model and all-reduces gradients; FSDP shards each block and the rest.

    Under a bf16 run FSDP gathers bf16 weights and reduces gradients in fp32: without that policy
    autocast would cast each gathered fp32 weight and save the bf16 copy, unsharded, for backward.
    DDP's gradient_as_bucket_view lets .grad live in its all-reduce buckets instead of beside
    them (4 bytes per parameter less). `checkpointing`: --activation-checkpointing. `compile`
    (--compile) compiles each block in place, before DDP or FSDP wrap them (as torchtitan does
    for FSDP): the backward stays one graph per block, so gradient hooks still fire block by block.
    """
    model.activation_checkpointing = checkpointing
    if compile:
        for block in model.gpt_neox.layers:
            block.compile()
    if fsdp:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if env.dtype == "bfloat16" else MixedPrecisionPolicy()
        for block in model.gpt_neox.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if env.world > 1 and any(p.requires_grad for p in model.parameters()):
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   gradient_as_bucket_view=True)
    return model


def reshard(model):
    """Free an FSDP model's gathered root weights (embed_in, embed_out, final norm). FSDP keeps the
    root gathered after its forward for the backward to come; a frozen reference has none."""
    if isinstance(model, FSDPModule):
        model.reshard()


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def freeze(model):
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------- optimisation

def make_optimizer(args, model):
    if args.optimizer == "rmsprop":  # App. B; torch defaults alpha 0.99, eps 1e-8 as the DPO reference code
        return torch.optim.RMSprop(model.parameters(), lr=args.lr)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def lr_at(step, args):
    """Linear warmup over `--warmup` steps, then constant (App. B; the DPO reference code's schedule)."""
    return args.lr * min(1.0, (step + 1) / (args.warmup + 1))


def set_grad_sync(model, sync):
    """DDP all-reduces gradients only on the last micro-step; this is read by its forward, so it
    is set before that forward. FSDP reduce-scatters every micro-step instead: skipping it would
    keep full, unsharded gradients, the memory FSDP is there to save."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync


def train_step(model, optimizer, batches, loss_fn, env, args, step):
    """Optimizer step `step` over this process's micro-batches; returns stats averaged over the global batch.

    `loss_fn(model, batch) -> (mean loss, {name: per-example tensor})`. Each micro-batch loss is
    a mean over its examples, so dividing by the number of micro-batches (and DDP's mean over
    processes) makes the gradient the mean over the whole global batch. A non-finite loss or
    gradient norm stops the run before the optimizer touches the weights.
    """
    lr = lr_at(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = {}
    for i, batch in enumerate(batches):
        set_grad_sync(model, i == len(batches) - 1)
        with env.autocast():
            loss, stats = loss_fn(model, batch)
        (loss / len(batches)).backward()
        stats = dict(stats, examples=torch.ones_like(stats["loss"]), tokens=batch["tokens"])
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v.detach().sum()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    sums = reduce_sum(env, sums)
    n = sums.pop("examples")
    out = {k: v if k == "tokens" else v / n for k, v in sums.items()}
    out.update(lr=lr, grad_norm=float(grad_norm))
    if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])):
        latest = Path(args.out) / "latest"
        kept = f"the last good checkpoint is {latest.resolve()}" if latest.exists() else "no checkpoint was written"
        raise FloatingPointError(f"non-finite loss ({out['loss']}) or gradient norm ({out['grad_norm']}) at step "
                                 f"{step + 1}: stopped; {kept} (try a lower --lr, or check the data)")
    optimizer.step()
    # Under DDP zeroed in place: .grad stays a view into the all-reduce buckets (wrap); set to None,
    # each no-sync micro-step of the next step would allocate fresh gradients beside them.
    optimizer.zero_grad(set_to_none=not isinstance(model, DDP))
    return out


# ---------------------------------------------------------------- run directory, checkpoints, resume

def prepare_out(args, env):
    """Create the run directory, or find the checkpoint to resume from.

    Returns None for a fresh run, else the newest complete checkpoint's trainer_state
    (with its directory under "dir"). metrics.jsonl is cut back to that checkpoint's step,
    so a resumed run's log reads as one run. Rank 0 holds the directory's OS lock until
    finish(env): a second launch on the same --out refuses at once.
    """
    out = Path(args.out)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        files.hold(out, f"run directory {out}")
        env.run_dir = out  # released by finish(env)
    flags = dict(vars(args))
    args_file, latest = out / "args.json", out / "latest"
    if args_file.exists():
        old = json.loads(args_file.read_text())
        changed = [f"--{k.replace('_', '-')} {old.get(k)} -> {v}" for k, v in flags.items()
                   if k not in FLAGS_THAT_MAY_CHANGE_ON_RESUME and old.get(k) != v]
        if changed:
            raise ValueError(f"{out} holds a run started with other flags ({'; '.join(changed)}): "
                             f"use a new --out, or the original flags to resume it")
    state = None
    for d in (latest, out / RESUME):  # the resume state when it is the newer (save_if_due)
        if (d / "trainer_state.json").exists():
            s = json.loads((d / "trainer_state.json").read_text())
            if state is None or s["step"] > state["step"]:
                state = dict(s, dir=str(d.resolve()))
    if env.main:
        for stale in [*out.glob(".ckpt-*.tmp-*"), *out.glob(f".{RESUME}.*-*")]:  # half-written by a killed run
            shutil.rmtree(stale)
        if not args_file.exists():
            files.write_json(args_file, flags)
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            keep = [l for l in metrics.read_text().splitlines() if state and json.loads(l)["step"] <= state["step"]]
            files.write_text(metrics, "".join(l + "\n" for l in keep))
    barrier(env)
    if state and state["step"] < state["total_steps"]:
        rng = state["rng"][min(env.rank, len(state["rng"]) - 1)]
        torch.set_rng_state(_rng_from(rng["torch"]))
        if rng["cuda"] and env.device.type == "cuda":
            torch.cuda.set_rng_state(_rng_from(rng["cuda"]), env.device)
        say(env, f"resuming from {state['dir']} (step {state['step']}/{state['total_steps']})")
    return state


def finished(state, env):
    if state and state["step"] >= state["total_steps"]:
        say(env, f"run already finished: {state['dir']} is the final checkpoint; nothing to do")
        return True
    return False


def _rng_to(t):
    return base64.b64encode(t.numpy().tobytes()).decode()


def _rng_from(s):
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def save_checkpoint(args, env, plan, step, model, optimizer, tokenizer_file, extra=None):
    """Write out/ckpt-<examples>/ completely under a temporary name, rename it, then point `latest` at it.

    A kill at any moment leaves `latest` naming a complete checkpoint. Collective: every
    process calls it. `extra` maps file names to JSON objects written alongside (daa.py's eval.json).
    A resume state it supersedes is removed.
    """
    name = f"ckpt-{step * plan.batch_size}"
    save_state(args, env, plan, step, model, optimizer, tokenizer_file, name, extra)
    if env.main:
        out = Path(args.out)
        link = out / "latest.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(name)
        os.replace(link, out / "latest")  # atomic: `latest` always names a complete checkpoint
        for old in out.glob("ckpt-*/optimizer.safetensors"):  # resume needs only the newest's
            if old.parent.name != name:
                old.unlink()
        shutil.rmtree(out / RESUME, ignore_errors=True)
        say(env, f"saved {out / name}")
    barrier(env)


RESUME = "resume"  # out/resume/: the resume-only state of save_if_due


def save_if_due(args, env, plan, step, model, optimizer, tokenizer_file, clock):
    """At the boundary after `step`: when any process got SIGTERM, or --save-minutes have passed since
    the last save, write the resume-only state out/resume/ (a checkpoint's files, replacing the last;
    no evaluation, and `latest` does not move: fit.py never sees it), and after SIGTERM exit with
    143. The processes decide together (one all-reduce of two flags), so all stop at the same step.
    A step that just wrote a checkpoint saves nothing more; the last step always does."""
    if step == plan.total_steps:
        return
    due = torch.tensor([float(bool(_sigterm)), float(args.save_minutes is not None
                                                     and time.time() - clock["saved"] >= 60 * args.save_minutes)],
                       device=env.device)
    if env.world > 1:
        dist.all_reduce(due, op=dist.ReduceOp.MAX)
    term, periodic = due.tolist()
    if (term or periodic) and step not in plan.checkpoint_steps:
        save_state(args, env, plan, step, model, optimizer, tokenizer_file, RESUME)
        say(env, f"saved the resume state {Path(args.out) / RESUME} (step {step}/{plan.total_steps})")
    if term or periodic:
        clock["saved"] = time.time()
    if term:
        say(env, "SIGTERM: stopped; the same command continues from here")
        finish(env)
        raise SystemExit(143)  # 128 + SIGTERM, as if the signal had killed it


def save_state(args, env, plan, step, model, optimizer, tokenizer_file, name, extra=None):
    """out/<name>/ atomically: config.json and model.safetensors (the HF GPT-NeoX layout), weights the
    module has beyond GPT-NeoX's (rm.py's reward head) in head.safetensors, tokenizer.json,
    optimizer.safetensors, trainer_state.json (step, each process's RNG state) and `extra`.
    Collective: FSDP gathers full tensors; each process's RNG state is recorded."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    rng = {"torch": _rng_to(torch.get_rng_state()),
           "cuda": _rng_to(torch.cuda.get_rng_state(env.device)) if env.device.type == "cuda" else None}
    rngs = [rng]
    if env.world > 1:
        rngs = [None] * env.world
        dist.all_gather_object(rngs, rng)
    if env.main:
        with files.atomic_dir(Path(args.out) / name) as tmp:  # replaces one left by a run killed before `latest` moved
            with torch.device("meta"):
                cpu_model = GPTNeoX(unwrap(model).config)
            plain = cpu_model.state_dict().keys()
            cpu_model.load_state_dict({k: v for k, v in weights.items() if k in plain}, assign=True)
            cpu_model.save_pretrained(tmp)  # config.json + model.safetensors, the HF GPT-NeoX layout
            head = {k: v.contiguous() for k, v in weights.items() if k not in plain}
            if head:  # weights GPT-NeoX lacks (rm.py's reward head): their own file, so the model stays plain
                save_file(head, tmp / "head.safetensors")
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
            save_optimizer(optim, tmp / "optimizer.safetensors")
            state = {"step": step, "total_steps": plan.total_steps, "examples": step * plan.batch_size,
                     "epoch": step / plan.steps_per_epoch, "fraction": step / plan.total_steps, "seed": plan.seed,
                     "world_size": env.world, "rng": rngs}
            for fname, obj in {"trainer_state.json": state, **(extra or {})}.items():
                files.write_json(tmp / fname, obj)


def save_optimizer(optim_state, path):
    """Optimizer state as safetensors: tensors under "<param name>/<key>", the rest as JSON metadata."""
    tensors, scalars = {}, {}
    for name, st in optim_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{k}"] = v
    meta = {"param_groups": json.dumps(optim_state["param_groups"]), "scalars": json.dumps(scalars)}
    with files.atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_optimizer(path):
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            for key in f.keys():
                name, k = key.rsplit("/", 1)
                state.setdefault(name, {})[k] = f.get_tensor(key)
    except SafetensorError as e:
        raise unreadable(path, e) from None
    for key, v in json.loads(meta["scalars"]).items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def load_optimizer(model, optimizer, ckpt_dir):
    """Every process reads the full state; FSDP keeps its shard of it."""
    set_optimizer_state_dict(model, optimizer, read_optimizer(Path(ckpt_dir) / "optimizer.safetensors"),
                             options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------- metrics and progress

def log_metrics(args, env, record):
    if env.main:
        with open(Path(args.out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def log_step(args, env, plan, step, stats, clock):
    """metrics.jsonl every step; a progress line with rates and ETA every --log-interval steps (rank 0).

    `clock` holds the start time and step of this process, so rates cover this process's work.
    """
    now = time.time()
    dt = max(now - clock["last"], 1e-9)
    clock["last"] = now
    clock["tokens"] += stats["tokens"]
    record = {"step": step, "examples": step * plan.batch_size, **stats,
              "examples_per_s": plan.batch_size / dt, "tokens_per_s": stats["tokens"] / dt}
    log_metrics(args, env, record)
    if step % args.log_interval and step != plan.total_steps:
        return
    done, elapsed = step - clock["start_step"], now - clock["start"]
    say(env, f"step {step}/{plan.total_steps} ({100 * step / plan.total_steps:.0f}%) | loss {stats['loss']:.4f} | "
             f"lr {stats['lr']:.2e} | grad norm {stats['grad_norm']:.3f} | "
             f"{done * plan.batch_size / elapsed:.1f} examples/s | {clock['tokens'] / elapsed:.0f} tokens/s | "
             f"ETA {eta(clock['start'], done, plan.total_steps - clock['start_step'])}")


def eta(t0, done, total):
    """h:mm:ss left, extrapolating the rate since t0."""
    s = (total - done) * (time.time() - t0) / max(done, 1)
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def start_clock(step):
    now = time.time()
    return {"start": now, "last": now, "start_step": step, "tokens": 0, "saved": now}
