"""The first GPU check: what nanoDAA does on one CUDA GPU, as a JSON report, in about 4 minutes.

    PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT/gpu.json [--budget-minutes 4]

  parity     pythia-70m's shape, first trained 300 steps on the TL;DR fixture so its logits are
             peaked (random weights give near-uniform ones, which no tolerance can fail on):
             sequence log-probs under bf16 autocast and with pure bf16 weights (sample.py's
             generating copy) against fp32 (TF32 off); the kernel alone under autocast and TF32
  flash      the two-row (right-padded, no mask) forward under sdpa_kernel(FLASH_ATTENTION),
             which raises if FlashAttention is not used
  daa_step   pythia-1b's shape, 8 TL;DR pairs, bf16 autocast: s/step, pairs/s, peak memory;
             model FLOPs (real tokens: 6N per policy token, 2N per reference token, attention
             12·L·D·T, the unembedding on response tokens only, as the kernel does), hardware FLOPs
             (every slot of the padded batch, plus the recomputed forward under checkpointing) and
             the padding share; prefix-shared (sdpa and flex masks) vs two rows, and checkpointing
  sampling   generate() tokens/s, pythia-1b's shape, bf16 weights
  resume     torchrun daa.py on every GPU: killed (the worker's whole process tree) after its first
             checkpoint, resumed, against the same run uninterrupted

Each section runs in try/except and the report is written after every one, so a crash or a
spent budget keeps what was measured. What one GPU cannot measure (NCCL across GPUs, DDP, FSDP,
the watchdog, --precompute-ref under FSDP) is labelled so. Without CUDA it exits 2.
"""
import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose logprobs.py and model.py are benchmarks

import daa  # noqa: E402
import files  # noqa: E402
import training  # noqa: E402
from logprobs import IGNORE, token_logprobs  # noqa: E402
from model import PYTHIA, GPTNeoX  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from bench.train import FIXTURES, tldr_pairs  # noqa: E402

BF16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, by device name
NOT_ON_ONE_GPU = "not measured on 1 GPU"
TOLERANCE = {"autocast": 0.05, "bf16_weights": 0.1, "tf32": 0.05}  # max nats per token


def data():
    tok = load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer.json")
    pairs = tldr_pairs()
    return tok, pairs, training.tokenize(tok, pairs, ("chosen", "rejected"), 512)  # as daa.py does, once


def trained_model(examples, pad_id, steps=300):
    """pythia-70m's shape fitted to the fixture's chosen summaries: peaked logits for the parity check."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPTNeoX(PYTHIA["pythia-70m"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = daa.pair_batch(examples, list(range(16)), "train", pad_id, "cuda", prefix_sharing=False)
    for _ in range(steps):
        with BF16():
            chosen, _ = daa.pair_logps(model, batch)
        loss = -chosen.sum() / batch["chosen_tokens"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item(), batch


def parity(tok, examples):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, nll, batch = trained_model(examples, tok.eos_id)
    tokens = torch.cat((batch["chosen_tokens"], batch["rejected_tokens"]))
    with torch.no_grad():
        fp32 = torch.cat(daa.pair_logps(model, batch))
        with BF16():
            autocast = torch.cat(daa.pair_logps(model, batch))
        bf16 = torch.cat(daa.pair_logps(model.to(torch.bfloat16), batch))
    gap = lambda x: ((x.float() - fp32).abs() / tokens).max().item()  # noqa: E731
    out = {"trained_nll_per_token": nll, "autocast_vs_fp32_max_nats_per_token": gap(autocast),
           "bf16_weights_vs_fp32_max_nats_per_token": gap(bf16), "tolerance": TOLERANCE}
    h, w = torch.randn(4096, 768, device="cuda"), torch.randn(50304, 768, device="cuda") * 0.05
    t = torch.randint(0, 50304, (4096,), device="cuda")
    exact = token_logprobs(h, w, t)
    with BF16():
        out["kernel_autocast_equals_fp32"] = bool(torch.equal(token_logprobs(h, w, t), exact))
    torch.backends.cuda.matmul.allow_tf32 = True
    out["kernel_tf32_vs_fp32_max"] = (token_logprobs(h, w, t) - exact).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = False
    out["kernel_fp32_vs_fp64_max"] = (exact.double() - token_logprobs(h.double(), w.double(), t)).abs().max().item()
    out["ok"] = (out["autocast_vs_fp32_max_nats_per_token"] < TOLERANCE["autocast"] and out["kernel_autocast_equals_fp32"]
                 and out["bf16_weights_vs_fp32_max_nats_per_token"] < TOLERANCE["bf16_weights"]
                 and out["kernel_tf32_vs_fp32_max"] < TOLERANCE["tf32"])
    return out


def flash(tok, examples):
    """Right padding needs no mask, so SDPA may take FlashAttention: forced here, it raises if not."""
    with torch.device("cuda"):
        model = GPTNeoX(PYTHIA["pythia-160m"]).eval()
    batch = daa.pair_batch(examples, list(range(8)), "eval", tok.eos_id, "cuda", prefix_sharing=False)
    with torch.no_grad(), BF16(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        daa.pair_logps(model, batch)
    return {"flash_attention_on_right_padded_rows": True}


def step_flops(cfg, batch, checkpointing):
    """(model FLOPs of the real tokens, hardware FLOPs of every slot) of one DAA step: policy forward
    and backward (3×), reference forward (1×), each 2·N_body + 4·L·D·T per token (attention's QKᵀ and
    AV over the row's T positions: 12·L·D·T forward and backward), the unembedding 2·V·D per response
    token. The padding share: the batch's slots that hold no token."""
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    body = L * (4 * D * D + 2 * D * cfg.intermediate_size)  # per layer: qkv and out 4D², the MLP 2·D·I
    B, T = batch["input_ids"].shape
    real, response = int(batch["tokens"]), int((batch["labels"] != IGNORE).sum())
    per_token = lambda t: 2 * body + 4 * L * D * t  # noqa: E731
    passes = 4 + (1 if checkpointing else 0)  # policy fwd + bwd (3) + reference fwd (1), + recomputed fwd
    model = 4 * (per_token(T) * real + 2 * V * D * response)
    hardware = passes * (per_token(T) * B * T + 2 * V * D * response)
    return model, hardware, 1 - real / (B * T)


def daa_step(tok, examples, shared, checkpointing, attention, peak, n_pairs=8, steps=3):
    torch.manual_seed(0)
    with torch.device("cuda"):
        policy = GPTNeoX(PYTHIA["pythia-1b"])
        ref = training.freeze(GPTNeoX(PYTHIA["pythia-1b"]))
    policy.activation_checkpointing = checkpointing
    args = daa.get_parser().parse_args(["--init", "-", "--out", "-"])  # daa.py's defaults: DPO, β 0.1, RMSprop, App. B
    env = SimpleNamespace(world=1, rank=0, main=True, device=torch.device("cuda"), autocast=BF16)
    optimizer = training.make_optimizer(args, policy)
    loss_fn = daa.make_loss_fn(args, daa.make_reference(ref, {}, env))
    batch = daa.pair_batch(examples, list(range(n_pairs)), "train", tok.eos_id, "cuda", shared, attention)
    training.train_step(policy, optimizer, [batch], loss_fn, env, args, 0)  # warm-up (and flex's compile)
    torch.cuda.synchronize()
    fresh_peak()
    t0 = time.perf_counter()
    for step in range(steps):
        training.train_step(policy, optimizer, [batch], loss_fn, env, args, step + 1)
    torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / steps
    model, hardware, padding = step_flops(policy.config, batch, checkpointing)
    return {"shared": shared, "attention": attention, "checkpointing": checkpointing, "pairs": n_pairs,
            "s_per_step": s, "pairs_per_s": n_pairs / s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "model_flops_utilization": model / s / (peak * 1e12),
            "hardware_flops_utilization": hardware / s / (peak * 1e12), "padding_share": padding}


def sampling(batch_size=16, new_tokens=128):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPTNeoX(PYTHIA["pythia-1b"]).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50277, (batch_size, 256), device="cuda")
    model.generate(ids, max_new_tokens=4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    return {"batch": batch_size, "prompt": 256, "new_tokens": out.numel(),
            "tokens_per_s": out.numel() / (time.perf_counter() - t0)}


def descendants(pid):
    """Every live process below `pid`, found through /proc's parent links: a torchrun worker may run
    in its own session, where killing torchrun's process group does not reach it."""
    children = {}
    for d in (d for d in Path("/proc").iterdir() if d.name.isdigit()):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(p, timeout=30):
    """SIGKILL `p` (a Popen) and every process below it; True once all of them are gone."""
    pids = descendants(p.pid) + [p.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout)
    deadline = time.time() + timeout
    while not all(map(gone, pids)) and time.time() < deadline:
        time.sleep(0.1)
    return all(map(gone, pids))


def gone(pid):
    """No such process, or a zombie (dead, waiting for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def resume(tmp, pairs, timeout=300):
    """torchrun daa.py on every GPU: killed after the first of 2 checkpoints, resumed; vs uninterrupted."""
    from safetensors.torch import load_file
    model, data_dir = tmp / "model", tmp / "data"
    model.mkdir()
    data_dir.mkdir()
    (model / "config.json").write_text(json.dumps(PYTHIA["pythia-160m"].to_dict()))  # random init, seeded
    (model / "tokenizer.json").write_text((FIXTURES / "gpt-neox-20b-tokenizer.json").read_text())
    for name, rows in (("pref_train", pairs[:64]), ("pref_eval", pairs[64:])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = torch.cuda.device_count()
    cmd = lambda out: [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",  # noqa: E731
                       str(ROOT / "daa.py"), "--init", str(model), "--data", str(data_dir), "--out", str(out),
                       "--batch-size", str(2 * n), "--micro-batch-size", "1", "--lr", "1e-5", "--warmup", "1",
                       "--checkpoints", "2", "--eval-examples", "16"]
    full = subprocess.run(cmd(tmp / "full"), capture_output=True, text=True, timeout=timeout)
    if full.returncode:
        return {"ok": False, "error": full.stdout[-2000:] + full.stderr[-2000:]}
    p = subprocess.Popen(cmd(tmp / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not (tmp / "killed" / "latest").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    killed_mid_run = p.poll() is None
    if not kill_tree(p):
        return {"ok": False, "error": "a worker outlived SIGKILL", "keep_tmp": True}
    again = subprocess.run(cmd(tmp / "killed"), capture_output=True, text=True, timeout=timeout)
    a, b = (load_file(tmp / r / "latest" / "model.safetensors") for r in ("full", "killed"))
    return {"gpus": n, "killed_mid_run": killed_mid_run,
            "ok": killed_mid_run and again.returncode == 0 and "resuming from" in again.stdout,
            "max_weight_diff_vs_uninterrupted": max((a[k] - b[k]).abs().max().item() for k in a)}


def fresh_peak():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu.json"), help="the JSON report, rewritten after each section")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for the FLOP utilisations "
                   "(default: by device name, H100/H200 989, A100 312)")
    p.add_argument("--budget-minutes", type=float, default=4.0, help="sections that would start after this are skipped")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none is visible here", file=sys.stderr)
        sys.exit(2)
    name, t0 = torch.cuda.get_device_name(), time.time()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)
    one_gpu = torch.cuda.device_count() == 1
    report = {"device": name, "gpus": torch.cuda.device_count(), "torch": torch.__version__, "peak_tflops": peak,
              "not_measured": {k: NOT_ON_ONE_GPU if one_gpu else "not measured by this bench" for k in
                               ("nccl_across_gpus", "ddp", "fsdp", "watchdog", "precompute_ref_under_fsdp")}}
    tok, pairs, examples = data()
    tmp = Path(tempfile.mkdtemp(prefix="nanodaa-gpu-"))
    sections = [("parity", lambda: parity(tok, examples)), ("flash", lambda: flash(tok, examples)),
                *((f"daa_step_{'shared_' + a if s else 'two_rows'}{'_checkpointing' if c else ''}",
                   lambda s=s, c=c, a=a: daa_step(tok, examples, s, c, a, peak))
                  for s, c, a in ((True, False, "sdpa"), (True, False, "flex"), (False, False, "sdpa"), (True, True, "sdpa"))),
                ("sampling", sampling), ("resume", lambda: resume(tmp, pairs))]
    for section, fn in sections:
        if time.time() - t0 > 60 * args.budget_minutes:
            report[section] = {"skipped": f"past --budget-minutes {args.budget_minutes:g}"}
        else:
            fresh_peak()
            start = time.time()
            try:
                report[section] = fn()
            except Exception as e:  # noqa: BLE001 (the next sections still run)
                report[section] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            report[section]["seconds"] = time.time() - start
        files.write_json(args.out, report, indent=2)
        print(section, json.dumps(report[section]), flush=True)
    if not report["resume"].get("keep_tmp"):  # never delete a directory a live process may still write
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
