"""model.py against transformers' GPTNeoXForCausalLM (the oracle), on tiny random configs."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from model import PYTHIA, Config, GPTNeoX, KVCache, left_padding, sample_token

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
CONFIGS = {  # the variations Pythia's suite spans, each on a model small enough to run in milliseconds
    "rotary0.25-head80": dict(TINY, hidden_size=160, num_attention_heads=2, rotary_pct=0.25),  # 20 rotary dims, as pythia-2.8b
    "rotary1.0": dict(TINY, rotary_pct=1.0, rotary_emb_base=500.0),
    "sequential": dict(TINY, use_parallel_residual=False, layer_norm_eps=1e-3),
    "odd-vocab": dict(TINY, vocab_size=97, num_hidden_layers=3),
}


def hf_model(tmp_path, cfg, seed=0):
    """A randomly initialised transformers model, saved to tmp_path/hf; returns (model, dir)."""
    rotary = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.get("rotary_emb_base", 10000.0),
                                  "partial_rotary_factor": cfg.get("rotary_pct", 0.25)}}
    hf_cfg = GPTNeoXConfig(**{k: v for k, v in cfg.items() if not k.startswith("rotary")}, **rotary)
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # transformers zeroes biases and sets LayerNorms to 1/0: randomise them so they are tested
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def padded(model, ids, mask, **kw):
    """A forward over a left-padded batch, mask and positions from its token mask (model.left_padding)."""
    visible, pos = left_padding(mask)
    return model(ids, visible, position_ids=pos, **kw)


def left_padded_batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, d = hf_model(tmp_path, CONFIGS[name])
    ours = GPTNeoX.from_pretrained(d)
    ids, mask = left_padded_batch(hf.config.vocab_size, [13, 9, 1])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = padded(ours, ids, mask)
        real = mask.bool()  # transformers' logits at padding positions are arbitrary
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
        hidden = ours(ids, return_hidden=True)
        torch.testing.assert_close(hidden @ ours.embed_out.weight.T, ours(ids), atol=1e-5, rtol=0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = GPTNeoX(Config(**CONFIGS["rotary0.25-head80"], rotary_emb_base=777.0)).eval()
    ours.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["rotary_pct"] == 0.25 and cfg["rotary_emb_base"] == 777.0  # original Pythia readers
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert hf.config.rope_parameters["rope_theta"] == 777.0
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)
    again = GPTNeoX.from_pretrained(tmp_path / "ckpt")
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_loads_original_pythia_style_dir(tmp_path):
    """Old-style config keys, fp16 weights and the buffers that older checkpoints carry."""
    hf, d = hf_model(tmp_path, CONFIGS["odd-vocab"])
    state = {k: v.half() for k, v in load_file(d / "model.safetensors").items()}
    max_pos = 2048
    for i in range(3):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, max_pos, max_pos, dtype=torch.bool))
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, old / "model.safetensors")
    (old / "config.json").write_text(json.dumps({
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "torch_dtype": "float16", "transformers_version": "4.24.0",
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False, "use_cache": True, "initializer_range": 0.02,
        "max_position_embeddings": max_pos, **CONFIGS["odd-vocab"]}))
    ours = GPTNeoX.from_pretrained(old)
    assert ours.embed_out.weight.dtype == torch.float32
    assert torch.equal(ours.embed_out.weight, state["embed_out.weight"].float())
    hf.load_state_dict({k.replace("embed_out", "lm_head"): v.float() for k, v in state.items() if k in load_file(d / "model.safetensors")})
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    half = GPTNeoX.from_pretrained(old, dtype=torch.bfloat16)
    assert half.embed_out.weight.dtype == torch.bfloat16 and half(ids).dtype == torch.float32


def test_loads_sharded_index(tmp_path):
    hf, d = hf_model(tmp_path, CONFIGS["sequential"])
    state = load_file(d / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((d / "config.json").read_text())
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, sharded / fname)
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    ours = GPTNeoX.from_pretrained(sharded)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_strict_loading_names_the_keys(tmp_path):
    _, d = hf_model(tmp_path, CONFIGS["odd-vocab"])
    state = load_file(d / "model.safetensors")
    bad = dict(state, **{"gpt_neox.layers.0.attention.extra": torch.zeros(1)})
    del bad["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    bad["embed_out.weight"] = torch.zeros(98, 64)
    save_file(bad, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        GPTNeoX.from_pretrained(d)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing gpt_neox.layers.1.mlp.dense_h_to_4h.bias" in msg
    assert "unexpected gpt_neox.layers.0.attention.extra" in msg
    assert "embed_out.weight has shape (98, 64), expected (97, 64)" in msg
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        GPTNeoX.from_pretrained(d)


def test_config_forms():
    new = {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
           "hidden_size": 32, "num_attention_heads": 4, "hidden_act": "gelu", "unknown_key": 1}
    assert Config.from_dict(new) == Config(hidden_size=32, num_attention_heads=4, rotary_pct=0.5, rotary_emb_base=500.0)
    assert Config.from_dict({"rotary_pct": 0.5, "rotary_emb_base": 500}) == Config(rotary_pct=0.5, rotary_emb_base=500)
    both = dict(new, rotary_pct=1.0, rotary_emb_base=1.0)  # disagreeing forms: rope_parameters wins, as in transformers
    assert Config.from_dict(both) == Config.from_dict(new) and GPTNeoXConfig(**both).rope_parameters["rope_theta"] == 500.0
    c = Config(**CONFIGS["sequential"])
    assert Config.from_dict(c.to_dict()) == c
    hf = GPTNeoXConfig(**c.to_dict())
    assert hf.rope_parameters["partial_rotary_factor"] == c.rotary_pct and not hf.use_parallel_residual
    with pytest.raises(ValueError, match="hidden_act"):
        Config.from_dict({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="divisible"):
        Config(hidden_size=100, num_attention_heads=8)


# Published Pythia parameter counts (total, non-embedding), from the suite's model cards;
# 14m and 31m are published as non-embedding counts only.
PUBLISHED = {
    "pythia-14m": (None, 1_189_888), "pythia-31m": (None, 4_739_072),
    "pythia-70m": (70_426_624, 18_915_328), "pythia-160m": (162_322_944, 85_056_000),
    "pythia-410m": (405_334_016, 302_311_424), "pythia-1b": (1_011_781_632, 805_736_448),
    "pythia-1.4b": (1_414_647_808, 1_208_602_624), "pythia-2.8b": (2_775_208_960, 2_517_652_480),
    "pythia-6.9b": (6_857_302_016, 6_444_163_072), "pythia-12b": (11_846_072_320, 11_327_027_200),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_pythia_configs_match_published_sizes(name):
    with torch.device("meta"):
        m = GPTNeoX(PYTHIA[name])
    total = sum(p.numel() for p in m.parameters())
    embed = m.gpt_neox.embed_in.weight.numel() + m.embed_out.weight.numel()
    want_total, want_non_embedding = PUBLISHED[name]
    assert total - embed == want_non_embedding and total == (want_total or total)
    assert set(PYTHIA) == {*PUBLISHED}


def test_random_init_like_transformers():
    torch.manual_seed(0)
    m = GPTNeoX(Config(**TINY))
    torch.manual_seed(0)
    again = GPTNeoX(Config(**TINY))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))  # seeded
    w = m.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(m.embed_out.weight.std().item() - 0.02) < 0.002
    assert not m.gpt_neox.layers[1].attention.query_key_value.bias.any()
    ln = m.gpt_neox.final_layer_norm
    assert torch.equal(ln.weight, torch.ones(64)) and not ln.bias.any()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPTNeoX(Config(**dict(TINY, initializer_range=0.3))).eval()  # wide init: peaked, tie-free distributions


def test_left_padded_rows_equal_rows_alone(tiny):
    lengths = [12, 7, 1]
    ids, mask = left_padded_batch(128, lengths)
    logits = padded(tiny, ids, mask)
    for row, n in enumerate(lengths):
        alone = tiny(ids[row:row + 1, -n:])
        torch.testing.assert_close(logits[row:row + 1, -n:], alone, atol=1e-5, rtol=0)
    # padding queries see only padding keys: their outputs and gradients must stay finite
    logits.masked_fill(~mask.bool()[..., None], 0).sum().backward()
    assert logits.isfinite().all() and all(p.grad.isfinite().all() for p in tiny.parameters())
    tiny.zero_grad(set_to_none=True)


def test_kv_cache_equals_full_forward(tiny):
    ids, mask = left_padded_batch(128, [10, 6])
    with torch.no_grad():
        full = padded(tiny, ids, mask)
        cache = KVCache(tiny.config, 2, 11)
        steps = [padded(tiny, ids[:, :4], mask[:, :4], kv_cache=cache)]  # a prefill chunk, then token by token
        for t in range(4, 10):
            visible, pos = left_padding(mask[:, :t + 1], 1)
            assert visible.shape == (2, 1, t + 1)  # the decode step's mask: [B, 1, past + 1]
            steps.append(tiny(ids[:, t:t + 1], visible, kv_cache=cache, position_ids=pos))
        with pytest.raises(ValueError, match="explicit attention_mask"):
            tiny(ids[:, :1], kv_cache=cache)  # after cached tokens, plain causal would be wrong
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


def test_greedy_generate_matches_transformers(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "t")
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "t").eval()
    ids, mask = left_padded_batch(128, [8, 3, 5], seed=3)
    new = tiny.generate(ids, mask, max_new_tokens=12, temperature=0)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                       pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert new.shape == (3, 12) and torch.equal(new, want)
    assert torch.equal(tiny.generate(ids, mask, max_new_tokens=12, temperature=0, use_cache=False), new)
    assert torch.equal(tiny.generate(ids, mask, max_new_tokens=12, top_k=1), new)  # top-k 1 is greedy


def test_sampling_is_seeded_and_cache_free_equal(tiny):
    ids, mask = left_padded_batch(128, [6, 4], seed=5)
    run = lambda seed, **kw: tiny.generate(ids, mask, max_new_tokens=20, top_k=50, top_p=0.9,
                                           generator=torch.Generator().manual_seed(seed), **kw)
    a = run(0)
    assert torch.equal(a, run(0)) and torch.equal(a, run(0, use_cache=False))
    assert not torch.equal(a, run(1))


def test_generate_fills_after_eos_and_stops_early(tiny):
    ids, mask = left_padded_batch(128, [5, 5, 4], seed=7)
    greedy = tiny.generate(ids, mask, max_new_tokens=10, temperature=0)
    eos = greedy[0, 2].item()
    first = [(g == eos).nonzero()[0].item() if (g == eos).any() else 10 for g in greedy]
    out = tiny.generate(ids, mask, max_new_tokens=10, temperature=0, eos_id=eos)
    assert out.shape == (3, min(10, max(first) + 1))  # stops once every row has emitted eos
    for row, g, stop in zip(out, greedy, first):
        assert torch.equal(row[:stop + 1], g[:stop + 1])  # unchanged up to its eos
        assert (row[stop:] == eos).all()  # eos afterwards
    single = tiny.generate(ids[:1], mask[:1], max_new_tokens=10, temperature=0, eos_id=eos)
    assert torch.equal(single[0], greedy[0, :first[0] + 1])


@pytest.mark.parametrize("kw, want", [
    (dict(), [0.5, 0.3, 0.15, 0.05, 0.0]),
    (dict(temperature=0.5), [0.25 / 0.3650, 0.09 / 0.3650, 0.0225 / 0.3650, 0.0025 / 0.3650, 0.0]),  # p^2, renormalised
    (dict(top_k=2), [0.625, 0.375, 0.0, 0.0, 0.0]),
    (dict(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0, 0.0]),  # smallest prefix holding 85 %
])
def test_sample_token_frequencies(kw, want):
    n = 40_000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).log().expand(n, 5)  # the last token is impossible
    draws = sample_token(logits, generator=torch.Generator().manual_seed(0), **kw)
    freq = torch.bincount(draws, minlength=5) / n
    torch.testing.assert_close(freq, torch.tensor(want), atol=0.01, rtol=0)  # ~4 standard errors
    assert (freq[torch.tensor(want) == 0] == 0).all()  # filtered tokens are never drawn


def record_sdpa(monkeypatch):
    """Capture the mask (and q's dtype) that every attention call receives."""
    import model as model_module
    calls, real = [], model_module.F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False):
        calls.append((attn_mask, is_causal, q.dtype))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", sdpa)
    return calls


def test_right_padding_takes_plain_causal_attention(monkeypatch):
    """No mask: SDPA's causal path in every layer, and the tokens of a right-padded batch get the logits of
    each row alone. A left-padded batch's mask is built once per forward, for all layers."""
    torch.manual_seed(0)
    model = GPTNeoX(Config(**TINY)).eval()
    ids = torch.randint(0, 128, (3, 10))
    lengths = [10, 6, 2]
    calls = record_sdpa(monkeypatch)
    with torch.no_grad():
        out = model(ids)
        assert all(m is None and causal for m, causal, _ in calls) and len(calls) == 2
        for i, n in enumerate(lengths):
            torch.testing.assert_close(out[i, :n], model(ids[i:i + 1, :n])[0], atol=1e-5, rtol=0)
        calls.clear()
        left = torch.tensor([[0] * (10 - n) + [1] * n for n in lengths])
        padded(model, ids, left)
        assert calls[0][0] is not None and calls[0][0] is calls[1][0] and calls[0][0].dtype == torch.float32


def test_left_padding_mask_and_positions():
    visible, pos = left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert visible[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]  # padding sees itself
    assert torch.equal(visible[1], torch.ones(4, 4, dtype=torch.bool).tril())
    last, last_pos = left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 1)
    assert torch.equal(last, visible[:, -1:]) and torch.equal(last_pos, pos[:, -1:])


def test_mask_and_rotary_in_the_compute_dtype_under_autocast(monkeypatch):
    torch.manual_seed(0)
    model = GPTNeoX(Config(**TINY)).eval()
    ids, mask = left_padded_batch(128, [7, 4])
    calls = record_sdpa(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded(model, ids, mask)
    # the mask in bf16, and q stays bf16 after the rotary embedding (float32 cos/sin would promote it)
    assert [(m.dtype, q) for m, _, q in calls] == [(torch.bfloat16, torch.bfloat16)] * 2


def test_custom_mask_and_position_ids_equal_separate_rows():
    """[B, T, T] mask + explicit positions: a row [a | b] where b sees only itself and restarts at position 0
    gives, on b, the logits of b alone."""
    torch.manual_seed(0)
    model = GPTNeoX(Config(**CONFIGS["rotary1.0"])).eval()
    a, b = torch.randint(0, 128, (5,)), torch.randint(0, 128, (4,))
    part = torch.tensor([0] * 5 + [1] * 4)
    allowed = (part[:, None] == part[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    pos = torch.cat((torch.arange(5), torch.arange(4)))[None]
    with torch.no_grad():
        out = model(torch.cat((a, b))[None], attention_mask=allowed[None], position_ids=pos)
        torch.testing.assert_close(out[0, 5:], model(b[None])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0, :5], model(a[None])[0], atol=1e-5, rtol=0)
    for bad in (allowed[None].long(), torch.ones(1, 9, dtype=torch.bool), allowed[None, :8]):
        with pytest.raises(ValueError, match=r"boolean \[B, 9, 9\] visibility mask"):
            model(torch.cat((a, b))[None], attention_mask=bad)  # a padding mask, an int mask, a wrong shape


@pytest.mark.parametrize("name", ["rotary0.25-head80", "sequential"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = GPTNeoX(Config(**CONFIGS[name])).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        model(ids).log_softmax(-1)[..., 3].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # what autograd keeps from the forward: with checkpointing, a block's intermediates are not among it
    saved = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        numel = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: numel.append(t.numel()) or t, lambda t: t):
            model(ids).sum()
        saved.append(sum(numel))
    assert saved[1] < 0.5 * saved[0]


def test_bench_prints_the_ratio_table():
    """bench/model.py on a small shape, one round: both rows of the table, with ratios, and the greedy
    tokens of the two implementations identical (it checks parity as well as speed)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/model.py", "--model", "pythia-14m", "--rounds", "1", "--batch-size", "1",
                        "--seq-len", "16", "--decode-batch", "2", "--prompt-len", "8", "--new-tokens", "3"],
                       cwd=root, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"\| (forward\+backward|greedy decode)", line)]
    assert len(rows) == 2 and all(re.search(r"\| \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) \| \d+\.\d\dx \| \d+\.\d\dx \|$", row)
                                  for row in rows), r.stdout
    assert "2 threads" in r.stdout and "load average" in r.stdout
    assert "greedy tokens identical to transformers: True" in r.stdout
