"""training.py: batching, truncation, data order, LR, optimizer files, and DDP/FSDP under torchrun.

A tiny random GPT-NeoX (2 layers, width 32) with the real Pythia tokenizer, on prepared
JSONL written from the real TL;DR fixtures. test_sft.py and test_daa.py import the helpers.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

import logprobs  # noqa: E402
import training  # noqa: E402
from model import Config, GPTNeoX  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

TINY = Config(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# Small runs: 4 pairs per step, prompts cut to fit 40 tokens (truncation is exercised on every example).
RUN = ["--batch-size", "4", "--micro-batch-size", "2", "--max-length", "40", "--lr", "1e-3", "--warmup", "1",
       "--log-interval", "100"]


def tldr_prompt(info):
    return f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {info['post']}\n\nTL;DR:"


def tldr_pairs():
    """The fixture's 100 TL;DR comparisons as daa.py's (prompt, chosen, rejected) pairs."""
    pairs = []
    for line in open(FIXTURES / "tldr_comparisons_batch18_first100.jsonl", encoding="utf-8"):
        c = json.loads(line)
        texts = [s["text"] for s in c["summaries"]]
        chosen, rejected = texts[c["choice"]], texts[1 - c["choice"]]
        pairs.append({"prompt": tldr_prompt(c["info"]), "chosen": chosen, "rejected": rejected})
    return pairs


def write_inputs(tmp, weights=True):
    """tmp/model (config.json, tokenizer.json[, model.safetensors]) and tmp/data (prepared JSONL)."""
    model_dir, data = tmp / "model", tmp / "data"
    data.mkdir(parents=True)
    if weights:
        torch.manual_seed(0)
        GPTNeoX(TINY).save_pretrained(model_dir)
    else:
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(TINY.to_dict()))
    shutil.copy(FIXTURES / "gpt-neox-20b-tokenizer.json", model_dir / "tokenizer.json")
    with open(FIXTURES / "tldr_queries_first300.csv", encoding="utf-8") as f:
        rows = [{"prompt": r["query"], "response": r["reference_responses"]} for r in csv.DictReader(f)]
    (data / "sft_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (data / "sft_valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:48]))
    pairs = tldr_pairs()
    (data / "pref_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:60]))
    (data / "pref_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[60:]))
    return model_dir, data


def weights(run_dir):
    return load_file(Path(run_dir) / "latest" / "model.safetensors")


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def torchrun(script, args, nproc=2, launcher=("--standalone",)):
    """Start `torchrun --standalone --nproc_per_node N script args` (gloo on CPU), or with the
    `launcher` flags instead of --standalone; returns the Popen."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def single_env():
    return SimpleNamespace(rank=0, world=1, device=torch.device("cpu"), main=True)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer.json")


# ---------------------------------------------------------------- data

def test_encode_truncates_the_prompt_middle_and_keeps_tldr(tok):
    with open(FIXTURES / "tldr_queries_first300.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    prompt, response = row["query"], row["reference_responses"]
    (ids, labels), = training.encode(tok, prompt, [response], max_length=40)
    n_prompt = sum(label == logprobs.IGNORE for label in labels)
    r = tok.encode(response) + [tok.eos_id]
    assert len(ids) == 40 and len(r) > 20
    assert ids[n_prompt:] == labels[n_prompt:] == r[:20]  # a long prompt leaves the response half the budget
    text = tok.decode(ids[:n_prompt])
    assert text.startswith("SUBREDDIT: r/AskReddit\n\nTITLE") and text.endswith("\nTL;DR:")
    assert "\nTL;DR:" not in text[:-len("\nTL;DR:")]
    (ids, labels), = training.encode(tok, prompt, [response], max_length=2000)  # fits: untouched, EOS appended
    assert ids == tok.encode(prompt) + r and labels == [logprobs.IGNORE] * len(tok.encode(prompt)) + r


def test_encode_pairs_share_the_prompt_cut(tok):
    prompt = "POST: " + "word " * 100 + "\nTL;DR:"
    (cw, lw), (cr, lr) = training.encode(tok, prompt, [" short", " a longer answer here"], 24)
    nw, nr = lw.count(logprobs.IGNORE), lr.count(logprobs.IGNORE)
    assert nw == nr and cw[:nw] == cr[:nr] and len(cr) == 24 and cw[-1] == tok.eos_id


def test_collate_pads_right_with_ignored_labels():
    b = training.collate([(np.array([5]), np.array([6, 7])), (np.array([], np.int32), np.array([8]))], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert "attention_mask" not in b and b["tokens"] == 4  # right padding: plain causal attention
    # the scored tokens, found on the CPU: (row, position, sequence, target), position t predicting t + 1
    assert b["scored"].tolist() == [[0, 0], [0, 1], [0, 0], [6, 7]]


def test_tokenize_once_as_encode_cuts(tok):
    rows = [{"prompt": "POST: " + "word " * 100 + "\nTL;DR:", "chosen": " short", "rejected": " a longer answer"}]
    (p, c, r), = training.tokenize(tok, rows, ("chosen", "rejected"), 24)
    (ids_c, labels_c), (ids_r, _) = training.encode(tok, rows[0]["prompt"], [" short", " a longer answer"], 24)
    assert p.dtype == c.dtype == np.int32 and list(p) + list(c) == ids_c and list(p) + list(r) == ids_r
    assert len(p) == labels_c.count(logprobs.IGNORE) and c[-1] == r[-1] == tok.eos_id


def test_read_examples_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: needs string field\(s\) response"):
        training.read_examples(p, ("prompt", "response"))
    p.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        training.read_examples(p, ("prompt", "response"))
    assert training.read_examples(p, ("prompt", "response"), limit=1) == [{"prompt": "a", "response": "b"}]


def plan(world=1, rank=0, batch=8, micro=2, n=40, epochs=2, checkpoints=4, lengths=None):
    args = argparse.Namespace(batch_size=batch, micro_batch_size=micro, epochs=epochs, checkpoints=checkpoints, seed=3)
    return training.make_plan(args, SimpleNamespace(world=world, rank=rank), n, lengths)


def test_shards_cover_the_global_batch_whatever_the_world_size():
    p1 = plan()
    assert (p1.accum, p1.steps_per_epoch, p1.total_steps, p1.checkpoint_steps) == (4, 5, 10, [2, 5, 8, 10])
    for step in range(p1.total_steps):
        one = training.micro_batch_indices(p1, step)
        two = [training.micro_batch_indices(plan(world=2, rank=r), step) for r in range(2)]
        assert two[0] + two[1] == one[0::2] + one[1::2] and len(sum(one, [])) == 8  # the same micro-batches
    epoch0 = sum((sum(training.micro_batch_indices(p1, s), []) for s in range(5)), [])
    epoch1 = sum((sum(training.micro_batch_indices(p1, s), []) for s in range(5, 10)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1  # reshuffled per epoch
    assert training.micro_batch_indices(plan(), 7) == training.micro_batch_indices(p1, 7)  # from (seed, epoch) only


def test_length_bucketing_regroups_within_each_step_only():
    """Sorted by length inside each step's global batch: the same examples form every step, each
    micro-batch holds neighbouring lengths, the processes take the micro-batches in turn; and with
    one micro-batch per step nothing changes, not even the order."""
    lengths = np.random.default_rng(0).integers(10, 500, 40)
    unsorted = plan()
    for step in range(unsorted.total_steps):
        one = training.micro_batch_indices(plan(lengths=lengths), step)
        assert sorted(sum(one, [])) == sorted(sum(training.micro_batch_indices(unsorted, step), []))
        assert list(lengths[sum(one, [])]) == sorted(lengths[sum(one, [])])  # micro-batch j: the j-th shortest
        two = [training.micro_batch_indices(plan(world=2, rank=r, lengths=lengths), step) for r in range(2)]
        assert two == [one[0::2], one[1::2]]  # at each accumulation step the processes hold neighbouring lengths
        whole = dict(batch=8, micro=8)
        assert training.micro_batch_indices(plan(lengths=lengths, **whole), step) == \
            training.micro_batch_indices(plan(**whole), step)
    assert one != training.micro_batch_indices(unsorted, unsorted.total_steps - 1)  # it did regroup


def test_copies_to_cuda_are_pinned_and_non_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, **kw: calls.append((str(device), kw)) or t)
    batch = training.to_device({"input_ids": torch.zeros(2, 3), "idx": [0, 1]}, "cuda")
    assert calls == ["pin", ("cuda", {"non_blocking": True})] and batch["idx"] == [0, 1]
    calls.clear()
    training.move(torch.zeros(1), torch.device("cpu"))
    assert calls == [("cpu", {})]  # no pinning off CUDA


def test_batch_size_must_divide():
    with pytest.raises(ValueError, match="--batch-size 8 must be a multiple of --micro-batch-size 3 × 2 processes"):
        plan(world=2, micro=3)
    with pytest.raises(ValueError, match="fewer than --batch-size"):
        plan(n=7)


def test_lr_warms_up_linearly_then_stays():
    args = argparse.Namespace(lr=5e-7, warmup=150)
    assert training.lr_at(0, args) == pytest.approx(5e-7 / 151)
    assert training.lr_at(74, args) == pytest.approx(5e-7 * 75 / 151)
    assert training.lr_at(150, args) == training.lr_at(10_000, args) == 5e-7


@pytest.mark.parametrize("name", ["rmsprop", "adamw"])
def test_optimizer_state_round_trips_through_safetensors(tmp_path, name):
    def fresh():
        torch.manual_seed(0)
        m = GPTNeoX(Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32))
        return m, training.make_optimizer(argparse.Namespace(optimizer=name, lr=1e-2), m)

    def step(m, opt):
        m(torch.arange(8)[None]).logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = fresh()
    step(a, opt_a)
    full = training.StateDictOptions(full_state_dict=True)
    state = training.get_optimizer_state_dict(a, opt_a, options=full)
    training.save_optimizer(state, tmp_path / "optimizer.safetensors")
    b, opt_b = fresh()
    b.load_state_dict(a.state_dict())
    training.load_optimizer(b, opt_b, tmp_path)
    step(a, opt_a)
    step(b, opt_b)
    assert max_diff(a.state_dict(), b.state_dict()) == 0


def test_resume_refuses_other_flags(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text(json.dumps({"out": str(out), "lr": 1e-6, "micro_batch_size": 4}))
    args = argparse.Namespace(out=str(out), lr=5e-7, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"other flags \(--lr 1e-06 -> 5e-07\)"):
        training.prepare_out(args, single_env())
    args.lr = 1e-6  # a different micro-batch size does not change the run: accepted
    assert training.prepare_out(args, single_env()) is None


# ---------------------------------------------------------------- torchrun

def test_ddp_and_fsdp_equal_one_process_with_accumulation(tmp_path):
    """Same global batch of 4 pairs: 2 ranks × micro 2 (DDP, then FSDP) vs 1 process × micro 2 × accumulation 2."""
    import daa
    model_dir, data = write_inputs(tmp_path)
    common = ["--init", str(model_dir), "--data", str(data), *RUN, "--max-examples", "8", "--checkpoints", "1",
              "--eval-examples", "8"]
    procs = {name: torchrun("daa.py", [*common, "--out", str(tmp_path / name), *flags])
             for name, flags in [("ddp", []), ("fsdp", ["--fsdp"]),
                                 ("ddp-checkpointing", ["--activation-checkpointing"]),
                                 ("fsdp-checkpointing", ["--fsdp", "--activation-checkpointing", "--precompute-ref"])]}
    daa.main([*common, "--out", str(tmp_path / "one")])
    for name, p in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
        assert "1 per forward" not in out and "2 per forward × 1 accumulation × 2 processes" in out
    one, init = weights(tmp_path / "one"), load_file(model_dir / "model.safetensors")
    update = max_diff(one, init)
    assert update > 1e-4
    for name in procs:
        assert max_diff(weights(tmp_path / name), one) <= 0.01 * update, name
        ev = json.loads((tmp_path / name / "latest" / "eval.json").read_text())
        ev1 = json.loads((tmp_path / "one" / "latest" / "eval.json").read_text())
        assert ev["eval/examples"] == ev1["eval/examples"] == 8
        assert ev["eval/loss"] == pytest.approx(ev1["eval/loss"], rel=1e-4)


def test_process_group_timeout_is_the_flag(monkeypatch):
    """--dist-timeout reaches init_process_group: NCCL's 10 minutes are shorter than rank 0 writing a large checkpoint."""
    seen = {}
    monkeypatch.setattr(training.dist, "init_process_group", lambda backend, timeout: seen.update(b=backend, t=timeout))
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = training.add_args(argparse.ArgumentParser(), checkpoints=1).parse_args(["--out", "x", "--device", "cpu"])
    env = training.setup(args)
    assert seen == {"b": "gloo", "t": training.timedelta(minutes=180)} and env.owns_group
    training.setup(argparse.Namespace(**{**vars(args), "dist_timeout": 5}))
    assert seen["t"].total_seconds() == 300


def test_wrap_ddp_grads_in_buckets_fsdp_bf16_policy(monkeypatch):
    """DDP keeps gradients as views into its buckets (4 B/param less); FSDP under bf16 gathers bf16, reduces fp32."""
    calls = []
    monkeypatch.setattr(training, "DDP", lambda model, **kw: calls.append(kw) or model)
    monkeypatch.setattr(training, "fully_shard", lambda module, mp_policy: calls.append(mp_policy))
    model = GPTNeoX(TINY)
    env = SimpleNamespace(world=2, device=torch.device("cpu"), dtype="bfloat16")
    assert training.wrap(model, env, fsdp=False, checkpointing=True) is model and model.activation_checkpointing
    assert calls.pop() == {"device_ids": None, "gradient_as_bucket_view": True}
    training.wrap(model, env, fsdp=True)
    assert len(calls) == TINY.num_hidden_layers + 1 and not model.activation_checkpointing
    assert all((p.param_dtype, p.reduce_dtype) == (torch.bfloat16, torch.float32) for p in calls)
    calls.clear()
    training.wrap(model, SimpleNamespace(**{**vars(env), "dtype": "float32"}), fsdp=True)
    assert all(p.param_dtype is None for p in calls)  # float32 runs: no casting


def test_corrupt_optimizer_state_is_one_line(tmp_path):
    path = tmp_path / "optimizer.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")  # a header length, then half a header
    with pytest.raises(ValueError, match=r"optimizer.safetensors is not a readable safetensors file .*corrupt"):
        training.read_optimizer(path)


DDP_BUCKETS = r"""
import sys, argparse, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import training
from model import Config, GPTNeoX
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

def run(set_to_none):
    env = training.setup(argparse.Namespace(device="cpu", seed=0, dist_timeout=1, fsdp=False, dtype=None))
    model = training.wrap(GPTNeoX(Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32)), env, fsdp=False)
    buckets = []
    def hook(state, bucket):  # where DDP's buckets live
        buckets.append((bucket.buffer().data_ptr(), bucket.buffer().data_ptr() + bucket.buffer().nbytes))
        return allreduce_hook(state, bucket)
    model.register_comm_hook(None, hook)
    args = argparse.Namespace(optimizer="rmsprop", lr=1e-2, warmup=0, max_grad_norm=10.0, out=".")
    opt = training.make_optimizer(args, model)
    ptrs, in_buckets = [], []
    def loss_fn(m, batch):
        if batch["i"] == 1:  # the gradients of the previous micro-step, which ran without sync
            ptrs[:] = [p.grad.data_ptr() for p in m.parameters()]
        loss = m(batch["input_ids"]).logsumexp(-1).mean()
        return loss, {"loss": loss.detach()[None]}
    if set_to_none:  # the old behaviour
        zero = torch.optim.Optimizer.zero_grad
        torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: zero(self, True)
    g = torch.Generator().manual_seed(env.rank)
    for step in range(3):
        batches = [{"i": i, "input_ids": torch.randint(64, (2, 8), generator=g), "tokens": torch.tensor(16)}
                   for i in range(2)]  # accumulation 2
        buckets.clear()
        training.train_step(model, opt, batches, loss_fn, env, args, step)
        # inside this step's buckets (DDP rebuilds them once, in the second step's forward)?
        in_buckets.append(all(any(a <= p < b for a, b in buckets) for p in ptrs))
    if set_to_none:
        torch.optim.Optimizer.zero_grad = zero
    return in_buckets, training.unwrap(model).state_dict()

views, new = run(False)
old_views, old = run(True)
assert views[1:] == [True, True] and old_views[1:] == [False, False], (views, old_views)
assert all(torch.equal(new[k], old[k]) for k in new)
print("buckets ok")
"""


def test_ddp_accumulation_keeps_gradients_in_the_buckets(tmp_path):
    """With accumulation, each no-sync micro-step's gradients are views into DDP's buckets (zeroed in
    place, not set to None), and the weights are bit-equal to those of set_to_none's fresh gradients."""
    script = tmp_path / "check.py"
    script.write_text(DDP_BUCKETS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(ROOT)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and r.stdout.count("buckets ok") == 2, r.stdout + r.stderr


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_agents_equal_one_process(tmp_path):
    """Two torchrun node agents on 127.0.0.1 (--nnodes 2, c10d rendezvous), one process each, give one
    process's weights (up to float sums over 2 processes against 1: the tolerance of the DDP test)."""
    import daa
    model_dir, data = write_inputs(tmp_path)
    common = ["--init", str(model_dir), "--data", str(data), *RUN, "--max-examples", "8", "--checkpoints", "1",
              "--eval-examples", "0"]
    rdzv = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            "--rdzv-id", "two-nodes"]
    nodes = [torchrun("daa.py", [*common, "--out", str(tmp_path / "nodes")], nproc=1, launcher=rdzv)
             for _ in range(2)]
    daa.main([*common, "--out", str(tmp_path / "one")])
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs
    assert any("2 per forward × 1 accumulation × 2 processes" in out for out in outs)
    one = weights(tmp_path / "one")
    update = max_diff(one, load_file(model_dir / "model.safetensors"))
    assert update > 1e-4 and max_diff(weights(tmp_path / "nodes"), one) <= 0.01 * update

