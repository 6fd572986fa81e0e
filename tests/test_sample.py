"""sample.py on a tiny random GPT-NeoX with the real Pythia tokenizer and real TL;DR prompts."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import files
import sample
import training
from model import Config, GPTNeoX
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
EOS = 0


def tiny_model(seed, eos_weight=2.0):
    """Random weights, large enough (std 0.2) that greedy decoding has clear argmaxes. With
    eos_weight 2, sampling ends some samples with EOS within a dozen tokens and not others;
    greedy decoding wants eos_weight 0 (else EOS is nearly always the argmax)."""
    torch.manual_seed(seed)
    model = GPTNeoX(Config(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, initializer_range=0.2)).eval()
    with torch.no_grad():  # EOS logit ≈ 3·eos_weight + eos_weight·(a normalised feature)
        model.gpt_neox.final_layer_norm.bias[0] = 3.0
        model.embed_out.weight[EOS, 0] = eos_weight
        model.embed_out.weight[50277:, 0] = -10.0  # never the padding rows beyond the tokenizer's vocabulary
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    for name, seed, eos_weight in (("run/ckpt-100", 0, 2.0), ("sft", 1, 2.0), ("greedy", 2, 0.0)):
        tiny_model(seed, eos_weight).save_pretrained(d / name)
        shutil.copy(FIXTURES / "gpt-neox-20b-tokenizer.json", d / name / "tokenizer.json")
    with open(FIXTURES / "tldr_queries_first300.csv") as f:
        rows = [{"id": f"q{i}", "prompt": r["query"], "reference": r["reference_responses"]}
                for i, r in enumerate(csv.DictReader(f)) if i < 40]
    (d / "eval_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(env, out, *extra, ckpt="run/ckpt-100", ref="sft"):
    sample.main(["--ckpt", str(env / ckpt), "--ref", str(env / ref), "--prompts", str(env / "eval_prompts.jsonl"),
                 "--n", "6", "--max-new-tokens", "12", "--batch-size", "4", "--out", str(out), *extra])
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    return rows, json.loads(Path(out).with_suffix(".summary.json").read_text())


def fresh_scores(model, prompt_tokens, sample_tokens):
    """Sum of log-probs of the sample and the naive top-10 indicators, from one unpadded full forward."""
    ids = torch.tensor([prompt_tokens + sample_tokens])
    with torch.no_grad():  # the unembedding on the sample's positions only: same numbers, less time
        hidden = model(ids, return_hidden=True)[0, len(prompt_tokens) - 1:-1]
        logp = model.embed_out(hidden).float().log_softmax(-1)
    top = logp.exp().topk(10, dim=-1).values
    q = top / top.sum(-1, keepdim=True)
    return (logp.gather(1, torch.tensor(sample_tokens)[:, None]).sum().item(),
            -(q * q.log()).sum(-1).mean().item(), top.sum(-1).mean().item())


def test_recorded_logps_equal_a_fresh_full_forward(env, tmp_path):
    rows, summary = run(env, tmp_path / "s.jsonl")
    tok = load_tokenizer(env / "sft")
    policy, ref = GPTNeoX.from_pretrained(env / "run/ckpt-100"), GPTNeoX.from_pretrained(env / "sft")
    assert len(rows) == 6
    for r in rows:
        prompt = sample.encode_prompt(tok, dict(r), 512, 256)  # the defaults: some of these prompts are cut
        assert len(prompt) == r["prompt_tokens"]
        logp, entropy, mass = fresh_scores(policy, prompt, r["sample_tokens"])
        assert r["policy_logp"] == pytest.approx(logp, abs=1e-3)
        assert r["ref_logp"] == pytest.approx(fresh_scores(ref, prompt, r["sample_tokens"])[0], abs=1e-3)
        assert r["top10_entropy"] == pytest.approx(entropy, abs=1e-4) and r["top10_mass"] == pytest.approx(mass, abs=1e-4)
        # a sample ends at its first EOS and keeps it (its log-prob counts); the text and length do not
        toks = r["sample_tokens"]
        assert EOS not in toks[:-1] and r["eos"] == (toks[-1] == EOS)
        assert r["length_tokens"] == len(toks) - r["eos"] and r["sample"] == tok.decode(toks[:r["length_tokens"]])
        assert r["eos"] or len(toks) == 12  # without EOS it runs to --max-new-tokens
    assert 0 < sum(r["eos"] for r in rows) < 6  # both kinds occur here
    diff = torch.tensor([r["policy_logp"] - r["ref_logp"] for r in rows], dtype=torch.float64)
    assert summary["kl"] == pytest.approx(diff.mean().item()) and summary["n"] == 6
    assert summary["kl_se"] == pytest.approx((diff.std() / 6 ** 0.5).item())
    assert summary["sqrt_kl"] == pytest.approx(max(summary["kl"], 0) ** 0.5)
    assert summary["length_tokens"] == pytest.approx(sum(r["length_tokens"] for r in rows) / 6)
    assert summary["top10_mass"] == pytest.approx(sum(r["top10_mass"] for r in rows) / 6)


def test_indicators_in_chunks_equal_all_at_once():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = labels[1, :5] = labels[2, 6:] = -100  # prompt and padding positions
    whole = sample.top10_indicators(hidden, weight, labels)
    chunked = sample.top10_indicators(hidden, weight, labels, chunk_size=2)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    p = (hidden[0, 2:6] @ weight.T).softmax(-1).topk(10).values  # row 0 predicts tokens 3..6 from positions 2..5
    q = p / p.sum(-1, keepdim=True)
    assert whole[0][0].item() == pytest.approx(-(q * q.log()).sum(-1).mean().item(), abs=1e-5)
    assert whole[1][0].item() == pytest.approx(p.sum(-1).mean().item(), abs=1e-5)
    p = (hidden[1, 4:6] @ weight.T).softmax(-1).topk(10).values  # row 1 predicts tokens 5, 6
    assert whole[1][1].item() == pytest.approx(p.sum(-1).mean().item(), abs=1e-5)


def test_cached_decoding_equals_uncached():
    model = tiny_model(0, eos_weight=0.0)
    ids, mask = sample.left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], EOS)
    cached = model.generate(ids, mask, 16, eos_id=EOS, generator=torch.Generator().manual_seed(3))
    uncached = model.generate(ids, mask, 16, eos_id=EOS, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert cached.shape == (3, 16)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


def test_left_padded_batch_equals_one_prompt_at_a_time(env, tmp_path):
    batched, _ = run(env, tmp_path / "b.jsonl", "--temperature", "0", "--batch-size", "6", ckpt="greedy")
    single, _ = run(env, tmp_path / "s.jsonl", "--temperature", "0", "--batch-size", "1", ckpt="greedy")
    assert [r["id"] for r in batched] == [r["id"] for r in single]
    assert all(len(r["sample_tokens"]) == 12 for r in batched)  # no EOS: every position is compared
    for b, s in zip(batched, single):
        assert b["sample_tokens"] == s["sample_tokens"]
        for key in ("policy_logp", "ref_logp", "top10_entropy", "top10_mass"):
            assert b[key] == pytest.approx(s[key], abs=1e-3)


def test_kl_is_zero_when_ckpt_is_ref(env, tmp_path):
    rows, summary = run(env, tmp_path / "s.jsonl", ref="run/ckpt-100")
    assert all(r["policy_logp"] == r["ref_logp"] for r in rows)
    assert summary["kl"] == 0 and summary["kl_se"] == 0 and summary["sqrt_kl"] == 0


def test_same_seed_same_output_and_same_prompts_for_every_checkpoint(env, tmp_path):
    run(env, tmp_path / "a.jsonl", "--seed", "7")
    run(env, tmp_path / "b.jsonl", "--seed", "7")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    other, _ = run(env, tmp_path / "c.jsonl", "--seed", "7", ckpt="sft")
    ids = [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in other] == ids
    rows = [{"id": i} for i in range(40)]
    assert sample.select_prompts(rows, 6, 8) != sample.select_prompts(rows, 6, 7) == sample.select_prompts(rows, 6, 7)


def test_run_directory_and_default_out(env):
    (env / "run" / "latest").symlink_to("ckpt-100")  # as training.save_checkpoint leaves it
    sample.main(["--ckpt", str(env / "run"), "--ref", str(env / "sft"), "--prompts", str(env / "eval_prompts.jsonl"),
                 "--n", "2", "--max-new-tokens", "3"])
    rows = (env / "run" / "samples-ckpt-100.jsonl").read_text().splitlines()
    summary = json.loads((env / "run" / "samples-ckpt-100.summary.json").read_text())
    assert len(rows) == 2 and summary["n"] == 2 and not list((env / "run").glob("*.tmp"))


def test_several_checkpoints_in_one_call_equal_one_at_a_time(env, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(env / "run" / "ckpt-100" if name == "a" else env / "greedy", tmp_path / "run" / f"ckpt-{name}")
    args = ["--ref", str(env / "sft"), "--prompts", str(env / "eval_prompts.jsonl"), "--n", "3", "--max-new-tokens", "5"]
    sample.main(["--ckpt", str(tmp_path / "run" / "ckpt-a"), str(tmp_path / "run" / "ckpt-b"), *args])
    for name in ("a", "b"):
        together = (tmp_path / "run" / f"samples-ckpt-{name}.jsonl").read_text()
        sample.main(["--ckpt", str(tmp_path / "run" / f"ckpt-{name}"), "--out", str(tmp_path / f"{name}.jsonl"), *args])
        assert together == (tmp_path / f"{name}.jsonl").read_text()
    with pytest.raises(ValueError, match="--out names one file"):
        sample.main(["--ckpt", str(tmp_path / "run" / "ckpt-a"), str(tmp_path / "run" / "ckpt-b"), "--out", "x.jsonl", *args])


def test_bad_prompts_fail_with_one_line(env, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "1", "prompt": "a", "reference": "b"}\n{"id": "2", "prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: needs string field\(s\) reference"):
        sample.main(["--ckpt", str(env / "sft"), "--ref", str(env / "sft"), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    bad.write_text('{"id": "1", "prompt": "", "reference": "b"}\n')
    with pytest.raises(ValueError, match="prompt '1' is empty"):
        sample.main(["--ckpt", str(env / "sft"), "--ref", str(env / "sft"), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    with pytest.raises(ValueError, match="--max-prompt-length 0 and the max length 100 .* must leave a prompt"):
        run(env, tmp_path / "o.jsonl", "--max-length", "100", "--max-prompt-length", "0")
    assert not (tmp_path / "o.jsonl").exists()


def test_long_prompt_is_cut_and_max_length_counts_prompt_and_sample(env, tmp_path):
    """--max-length bounds prompt + sample; a prompt that leaves no room for its reference is cut to
    --max-prompt-length by training.cut_prompt (start and last line kept); --max-new-tokens caps on top."""
    tok = load_tokenizer(env / "sft")
    long = "SUBREDDIT: r/test\n\nTITLE: a long post\n\nPOST: " + "word " * 300 + "\n\nTL;DR:"
    short = "SUBREDDIT: r/test\n\nPOST: short\n\nTL;DR:"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "long", "prompt": long, "reference": "a summary"}) + "\n" +
                       json.dumps({"id": "short", "prompt": short, "reference": "a summary"}) + "\n")
    args = ["--ckpt", str(env / "greedy"), "--ref", str(env / "sft"), "--prompts", str(prompts), "--n", "2",
            "--temperature", "0", "--max-length", "100", "--max-prompt-length", "40"]
    sample.main([*args, "--out", str(tmp_path / "s.jsonl")])
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["prompts_cut"] == 1 and rows["long"]["prompt_cut"] and not rows["short"]["prompt_cut"]
    n_short = len(tok.encode(short))
    assert (rows["long"]["prompt_tokens"], rows["short"]["prompt_tokens"]) == (40, n_short)
    for r in rows.values():  # greedy, and EOS is never the argmax here: every sample runs to the budget
        assert not r["eos"] and len(r["sample_tokens"]) == 100 - r["prompt_tokens"]
    cut = tok.encode(long)
    cut = training.cut_prompt(tok, long, cut, 40)
    assert len(cut) == 40 and tok.decode(cut).startswith("SUBREDDIT: r/test") and tok.decode(cut).endswith("\nTL;DR:")
    policy = GPTNeoX.from_pretrained(env / "greedy")
    logp, _, _ = fresh_scores(policy, cut, rows["long"]["sample_tokens"])  # sampled after the cut prompt
    assert rows["long"]["policy_logp"] == pytest.approx(logp, abs=1e-3)

    sample.main([*args[:-1], "70", "--out", str(tmp_path / "half.jsonl")])  # above half of 100: 50 it is
    assert json.loads((tmp_path / "half.jsonl").read_text().splitlines()[0])["prompt_tokens"] == 50

    sample.main([*args, "--max-new-tokens", "5", "--out", str(tmp_path / "capped.jsonl")])
    assert all(len(json.loads(l)["sample_tokens"]) == 5 for l in (tmp_path / "capped.jsonl").read_text().splitlines())


def test_torchrun_shards_and_gathers_one_file(env, tmp_path):
    single, _ = run(env, tmp_path / "one.jsonl", "--temperature", "0", ckpt="greedy")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sample.py",
           "--ckpt", str(env / "greedy"), "--ref", str(env / "sft"), "--prompts", str(env / "eval_prompts.jsonl"),
           "--num-prompts", "6", "--max-new-tokens", "12", "--batch-size", "4", "--temperature", "0", "--out", str(tmp_path / "two.jsonl")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["id"] for r in two] == [r["id"] for r in single]
    for a, b in zip(two, single):
        assert a["sample_tokens"] == b["sample_tokens"] and a["policy_logp"] == pytest.approx(b["policy_logp"], abs=1e-3)


def test_an_output_being_written_refuses_a_second_sampler(env, tmp_path):
    from test_files import held_by_another_process
    out = tmp_path / "s.jsonl"
    with held_by_another_process(f"{out}.lock"):
        with pytest.raises(files.Busy, match=f"{out} is being written by another process"):
            run(env, out)
    assert not out.exists()
    run(env, out)  # the holder is gone: no stale lock
    assert not Path(f"{out}.lock").exists()


def test_ood_token_rate_is_exact_on_a_hand_built_set(tmp_path):
    """The token set comes from every training response (SFT and both sides of each pair) plus EOS;
    the rate pools sampled tokens, EOS included, over all samples."""
    tok = load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer.json")
    (tmp_path / "sft_train.jsonl").write_text(json.dumps({"prompt": "p", "response": " the cat"}) + "\n")
    (tmp_path / "pref_train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a dog",
                                                           "rejected": " the"}) + "\n")
    seen = sample.response_token_ids(tmp_path, tok)
    assert seen == set(tok.encode(" the cat") + tok.encode(" a dog") + [tok.eos_id])
    (tmp_path / "sft_train.jsonl").unlink()  # computed once: the next run reads the cache beside the data
    assert sample.response_token_ids(tmp_path, tok) == seen and len(list(tmp_path.glob("response_token_ids-*"))) == 1
    cat, dog, new = tok.encode(" cat")[0], tok.encode(" dog")[0], tok.encode(" zebra")[0]
    assert new not in seen
    rows = [sample.add_diagnostics({"prompt": "p", "sample": "", "sample_tokens": toks}, seen, None)
            for toks in ([cat, new, tok.eos_id], [new, new, dog, new, tok.eos_id])]
    assert [r["ood_tokens"] for r in rows] == [1, 3]
    for r in rows:
        r.update(policy_logp=0.0, ref_logp=0.0, length_tokens=len(r["sample_tokens"]) - 1, length_words=1, eos=True,
                 top10_entropy=0.0, top10_mass=1.0, prompt_cut=False)
    s = sample.summarize(rows, SimpleNamespace(ref="ref", seed=0, temperature=1.0), "ckpt")
    assert s["ood_token_rate"] == 4 / 8


def test_gold_and_proxy_diagnostics():
    spec = {"important": ["rent", "job", "exam"], "gold_scale": 3.0, "length_bias": 0.5}
    row = sample.add_diagnostics({"prompt": "POST: rent really job just exam TLDR:", "sample": " rent job really",
                                  "sample_tokens": [1, 2, 3, 0]}, None, spec)
    assert "ood_tokens" not in row
    assert row["gold_reward"] == pytest.approx(2 / 3 - 0.25)
    assert (row["hits"], row["other_words"]) == (2, 1)
    assert row["proxy_reward"] == pytest.approx(3 * (2 / 3 - 0.25) + 0.5 * 3)
    assert row["length_words"] == 3


def test_bfloat16_weights_keep_the_kl_within_a_hundredth_of_a_nat_per_token(env):
    """CUDA's default: the same samples scored with bf16 weights (log-probs still accumulated in fp32)
    give nearly the fp32 KL. Measured here: mean KL 0.0625 (fp32) vs 0.0565 (bf16) over 16 samples,
    at most 0.0035 nats per token apart on one sample."""
    tok = load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer.json")
    ref = tiny_model(1)
    policy = tiny_model(0)
    with torch.no_grad():  # a policy near its reference, as DAA training leaves it
        for p, q in zip(policy.parameters(), ref.parameters()):
            p.copy_(q + 0.01 * (p - q))
    with open(FIXTURES / "tldr_queries_first300.csv") as f:
        prompts = [tok.encode(r["query"])[-60:] for _, r in zip(range(16), csv.DictReader(f))]
    args = SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0)
    rows = sample.sample_batch(policy, ref, prompts, [30] * 16, EOS, args, torch.Generator().manual_seed(0))
    bf16 = [m.to(torch.bfloat16) for m in (policy, ref)]

    def kl(models, prompt, s):
        ids = torch.tensor([prompt + s])
        labels = ids.masked_fill(torch.arange(ids.shape[1]) < len(prompt), -100)
        with torch.no_grad():
            a, b = (sample.sequence_logps(m, ids, labels).item() for m in models)
        return a - b

    fp32 = torch.tensor([r["policy_logp"] - r["ref_logp"] for r in rows])
    half = torch.tensor([kl(bf16, p, r["sample_tokens"]) for p, r in zip(prompts, rows)])
    n = torch.tensor([len(r["sample_tokens"]) for r in rows])
    assert 0 < (half - fp32).abs().max()  # bf16 is not exact: the bound below is a real one
    assert ((half - fp32).abs() / n).max() < 0.01
    assert abs(half.mean() - fp32.mean()) < 0.02
    assert sample.sequence_logps(bf16[0], torch.tensor([prompts[0]]), torch.tensor([prompts[0]])).dtype == torch.float32


def test_bfloat16_sampling_is_scored_with_float32_weights(env, tmp_path):
    """--sample-dtype bfloat16 (CUDA's default): a bf16 copy draws the samples, but the log-probs that KL
    uses are the float32 models' (issue 24.7), not the bf16 copy's, which differ by more than the bound."""
    rows, _ = run(env, tmp_path / "s.jsonl", "--sample-dtype", "bfloat16")
    tok = load_tokenizer(env / "sft")
    policy = GPTNeoX.from_pretrained(env / "run/ckpt-100")
    half, gaps = GPTNeoX.from_pretrained(env / "run/ckpt-100").to(torch.bfloat16), []
    for r in rows:
        prompt = sample.encode_prompt(tok, dict(r), 512, 256)
        fp32 = fresh_scores(policy, prompt, r["sample_tokens"])[0]
        assert r["policy_logp"] == pytest.approx(fp32, abs=1e-3)
        gaps.append(abs(fresh_scores(half, prompt, r["sample_tokens"])[0] - fp32))
    assert max(gaps) > 5e-3  # bf16 scoring would move a sample beyond the bound above (measured: 0.031)


def test_one_policy_at_a_time_and_float32_on_cpu(env, tmp_path, monkeypatch):
    """Several --ckpt: the previous policy is freed before the next loads (at 6.9B, three models do
    not fit one GPU); on CPU the weights default to float32 (bfloat16 on CUDA)."""
    import weakref
    loaded, alive_at_load = [], []
    real = sample.GPTNeoX.from_pretrained

    def load(*a, **kw):
        alive_at_load.append(sum(r() is not None for r in loaded))
        model = real(*a, **kw)
        loaded.append(weakref.ref(model))
        assert kw["dtype"] == torch.float32
        return model
    monkeypatch.setattr(sample.GPTNeoX, "from_pretrained", load)
    for name in ("a", "b", "c"):
        shutil.copytree(env / "greedy", tmp_path / "run" / f"ckpt-{name}")
    sample.main(["--ckpt", *(str(tmp_path / "run" / f"ckpt-{n}") for n in "abc"), "--ref", str(env / "sft"),
                 "--prompts", str(env / "eval_prompts.jsonl"), "--n", "2", "--max-new-tokens", "3"])
    assert alive_at_load == [0, 1, 1, 1]  # the reference, then each policy with only the reference alive


# ---------------------------------------------------------------- --in-support (issue 23)

def test_in_support_never_emits_an_unseen_token_and_scores_the_renormalised_policy(env, tmp_path):
    """The restricted distribution is the one sampled and the one scored: its log-prob of each sample is
    the log-softmax over the allowed tokens' logits alone, computed here from one full forward."""
    tok = load_tokenizer(env / "sft")
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft_train.jsonl").write_text(json.dumps({"prompt": "p", "response": " the cat sat on"}) + "\n")
    (data / "pref_train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a dog", "rejected": " the"}) + "\n")
    seen = sample.response_token_ids(data, tok)
    plain, _ = run(env, tmp_path / "plain.jsonl", "--train-data", str(data))
    assert sum(r["ood_tokens"] for r in plain) > 0  # unrestricted, this policy leaves the set: the check has teeth
    rows, summary = run(env, tmp_path / "s.jsonl", "--train-data", str(data), "--in-support")
    assert all(t in seen for r in rows for t in r["sample_tokens"]) and len(seen) == 7
    assert summary["ood_token_rate"] == 0 and summary["in_support"] and summary["support_tokens"] == 7
    assert summary["ckpt"] == str((env / "run/ckpt-100").resolve())  # pairs it with its plain twin
    policy, ref = GPTNeoX.from_pretrained(env / "run/ckpt-100"), GPTNeoX.from_pretrained(env / "sft")
    allowed = torch.tensor(sorted(seen))
    for r in rows:
        prompt = sample.encode_prompt(tok, dict(r), 512, 256)
        ids = torch.tensor([prompt + r["sample_tokens"]])
        with torch.no_grad():
            logits = policy(ids)[0, len(prompt) - 1:-1]
        restricted = logits[:, allowed].log_softmax(-1)
        want = sum(restricted[t, sorted(seen).index(tok_id)].item() for t, tok_id in enumerate(r["sample_tokens"]))
        assert r["policy_logp"] == pytest.approx(want, abs=1e-3)
        assert r["ref_logp"] == pytest.approx(fresh_scores(ref, prompt, r["sample_tokens"])[0], abs=1e-3)  # π_ref as is
    assert summary["kl"] == pytest.approx(sum(r["policy_logp"] - r["ref_logp"] for r in rows) / len(rows))


def test_in_support_default_output_sits_beside_the_plain_samples(env, tmp_path):
    shutil.copytree(env / "run" / "ckpt-100", tmp_path / "run" / "ckpt-100")
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft_train.jsonl").write_text(json.dumps({"prompt": "p", "response": " the cat"}) + "\n")
    (data / "pref_train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a dog", "rejected": " the"}) + "\n")
    args = ["--ckpt", str(tmp_path / "run" / "ckpt-100"), "--ref", str(env / "sft"), "--prompts",
            str(env / "eval_prompts.jsonl"), "--n", "2", "--max-new-tokens", "3", "--train-data", str(data)]
    sample.main(args)
    sample.main([*args, "--in-support"])
    assert sorted(p.name for p in (tmp_path / "run").glob("samples-*")) == [
        "samples-ckpt-100+in_support.jsonl", "samples-ckpt-100+in_support.summary.json",
        "samples-ckpt-100.jsonl", "samples-ckpt-100.summary.json"]
    with pytest.raises(ValueError, match="--in-support samples from the tokens of the training responses"):
        sample.main([*args[:-2], "--in-support"])
