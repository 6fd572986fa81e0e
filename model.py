"""GPT-NeoX exactly as Pythia defines it, plus loading and saving Hugging Face-layout checkpoints.

The paper's policies and references are Pythia models (Sec. 4, App. B). Module and
parameter names mirror transformers' `GPTNeoXForCausalLM`, so a checkpoint is a plain
state-dict copy in both directions: `gpt_neox.embed_in`, `gpt_neox.layers.N.{input_layernorm,
post_attention_layernorm, attention.query_key_value, attention.dense, mlp.dense_h_to_4h,
mlp.dense_4h_to_h}`, `gpt_neox.final_layer_norm`, `embed_out`.
"""
import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint
from safetensors.torch import load_file, save_file

import download
import files


@dataclass
class Config:
    """Field names as transformers' GPTNeoXConfig (original Pythia form for the rotary ones)."""
    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25  # rotary embedding on the first rotary_pct * head_size dims of q and k
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); False: sequential
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d):
        """Read a config.json dict: original Pythia keys or the `rope_parameters` form of transformers 5."""
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope_type {rope.get('rope_type', rope.get('type'))!r}: Pythia uses 'default'")
        # precedence as transformers 5: rope_parameters, then the original keys, then transformers 4.4x's top-level ones
        d["rotary_pct"] = rope.get("partial_rotary_factor", d.get("rotary_pct", d.get("partial_rotary_factor", 0.25)))
        d["rotary_emb_base"] = rope.get("rope_theta", d.get("rotary_emb_base", d.get("rope_theta", 10000.0)))
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: Pythia uses exact-erf 'gelu'")
        if d.get("tie_word_embeddings") or d.get("attention_bias") is False:
            raise ValueError("tied embeddings or bias-free attention is not the Pythia architecture")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self):
        """A config.json that transformers 5 (rope_parameters) and older readers (rotary_pct) both load."""
        rope = {"rope_type": "default", "rope_theta": self.rotary_emb_base, "partial_rotary_factor": self.rotary_pct}
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **asdict(self),
                "rope_parameters": rope, "hidden_act": "gelu", "tie_word_embeddings": False,
                "attention_bias": True, "use_cache": True}


# The Pythia suite (Biderman et al., 2023): name -> (padded vocab, width, layers, heads); MLP width is 4x.
# Every model: rotary_pct 0.25, rotary_emb_base 10000, 2048 positions, eps 1e-5, parallel residual.
# Confirmed: shapes against EleutherAI/pythia's training configs (models/*/pythia-*.yml) and the model
# cards' parameter counts (tests/test_model.py), which also pin the padded vocab of 70m ... 12b
# (6.9b: 50432, 12b: 50688). Not confirmed: the 50304 vocab of 14m and 31m (their cards give only
# non-embedding counts).
PYTHIA = {name: Config(vocab_size=v, hidden_size=d, num_hidden_layers=n, num_attention_heads=h, intermediate_size=4 * d)
          for name, (v, d, n, h) in {
              "pythia-14m": (50304, 128, 6, 4),
              "pythia-31m": (50304, 256, 6, 8),
              "pythia-70m": (50304, 512, 6, 8),
              "pythia-160m": (50304, 768, 12, 12),
              "pythia-410m": (50304, 1024, 24, 16),
              "pythia-1b": (50304, 2048, 16, 8),
              "pythia-1.4b": (50304, 2048, 24, 16),
              "pythia-2.8b": (50304, 2560, 32, 32),
              "pythia-6.9b": (50432, 4096, 32, 32),
              "pythia-12b": (50688, 5120, 36, 40),
          }.items()}


class KVCache:
    """Keys and values of past tokens for incremental decoding.

    k, v: [n_layer, B, n_head, max_len, head_size], preallocated so a decode step writes in
    place instead of concatenating; `length` positions are filled. The forward pass writes
    each layer's new keys/values at [length, length + T) and advances `length` once at the end.
    """
    def __init__(self, config, batch_size, max_len, dtype=torch.float32, device="cpu"):
        hs = config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, max_len, hs)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0


@functools.cache
def compiled_flex_attention():
    """flex_attention makes one fused kernel only when compiled (eager, it materialises the scores).
    Compiled on first use: importing torch.compile's machinery takes seconds."""
    return torch.compile(flex_attention)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotary embedding on the first cos.shape[-1] dims of each head, the rest passes through."""
    r = cos.shape[-1]
    x_rot, x_pass = x.split((r, x.shape[-1] - r), dim=-1)  # not two slices: their backward zero-fills q's size
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.head_size = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query_key_value = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, D = x.shape
        # GPT-NeoX fuses QKV per head: the output holds [q_h, k_h, v_h] for head 0, then head 1, ...
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size)
        q, k, v = (t.transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # split, then transpose: no copy in backward
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            t0 = cache.length
            cache.k[layer, :, :, t0:t0 + T] = k
            cache.v[layer, :, :, t0:t0 + T] = v
            k, v = cache.k[layer, :, :, :t0 + T], cache.v[layer, :, :, :t0 + T]
        if isinstance(mask, BlockMask):  # daa.py --attention flex: blocks no query sees are skipped
            y = compiled_flex_attention()(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.dense(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact erf GELU, as Pythia


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.parallel = c.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = Attention(c)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer):
        a = self.attention(self.input_layernorm(x), cos, sin, mask, cache, layer)
        if self.parallel:  # summed in transformers' order, so the two agree to the last bit more often
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_in = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


def left_padding(token_mask, n_query=None):
    """The visibility mask and position ids of a left-padded batch, from its token mask [B, T] (1 = token).

    Returns a boolean [B, Tq, T] mask (query q sees key k: k <= q and k is a token) and position
    ids [B, Tq] that count tokens only, so a left-padded row gives the logits of the row alone;
    both for the last Tq = n_query positions (default: all T; a decode step with a KV cache asks
    for its one new position, [B, 1, past + 1]). A padding query sees itself, so its softmax has
    a key and never gives NaN. generate and sample.py's scoring build their masks here.
    """
    m = token_mask.bool()
    T = m.shape[1]
    Tq = T if n_query is None else n_query
    k = torch.arange(T, device=m.device)
    q = k[T - Tq:, None]
    visible = (k <= q) & (m[:, None, :] | (k == q))
    pos = (m.long().cumsum(-1) - 1).clamp(min=0)[:, T - Tq:]
    return visible, pos


def attention_bias(mask, dtype):
    """The boolean visibility mask [B, Tq, Tk] as the additive [B, 1, Tq, Tk] one SDPA adds to the
    scores (0 = sees, -inf = does not), built once per forward in the compute dtype: SDPA (and
    autocast) would otherwise convert a boolean mask in every layer. A flex BlockMask passes as it is."""
    if mask is None or isinstance(mask, BlockMask):
        return mask
    bias = torch.zeros((mask.shape[0], 1, *mask.shape[1:]), dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask[:, None], float("-inf"))


def compute_dtype(x):
    """The dtype the matmuls run in: autocast's when it is on, else the activations'."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class GPTNeoX(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied from embed_in
        self.activation_checkpointing = False  # training.py's --activation-checkpointing sets it
        self.apply(self._init_weights)

    def _init_weights(self, m):
        """As transformers initialises GPT-NeoX: normal(0, initializer_range), zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, idx, attention_mask=None, kv_cache=None, return_hidden=False, position_ids=None):
        """idx [B, T] -> float32 logits [B, T, V], or final-norm hidden states [B, T, D].

        attention_mask: None is plain causal attention, exact for right-padded batches (no token
        sees a later position, and padding is never scored). Otherwise a boolean [B, T, past+T]
        "query sees key" matrix, used as it is: `left_padding` builds it for left-padded prompts,
        daa.py for prefix-shared pairs (or, for flex_attention, a BlockMask of such a rule).
        position_ids [B, T] default to past .. past+T-1.
        With `activation_checkpointing` set, forwards under grad keep only each block's input and
        recompute the block in backward (non-reentrant torch.utils.checkpoint: DDP and FSDP work).
        """
        c, T = self.config, idx.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and past + T > kv_cache.k.shape[3]:
            raise ValueError(f"KV cache holds {kv_cache.k.shape[3]} positions; {past} used, {T} more requested")
        if attention_mask is None and past:
            raise ValueError("tokens after cached ones need an explicit attention_mask (model.left_padding)")
        if torch.is_tensor(attention_mask) and (attention_mask.dtype != torch.bool or attention_mask.dim() != 3
                                                or attention_mask.shape[1:] != (T, past + T)):
            raise ValueError(f"attention_mask must be a boolean [B, {T}, {past + T}] visibility mask, got "
                             f"{attention_mask.dtype} {tuple(attention_mask.shape)} (model.left_padding makes one "
                             "from a padding mask)")
        pos = position_ids if position_ids is not None else torch.arange(past, past + T, device=idx.device)[None]
        x = self.gpt_neox.embed_in(idx)
        dtype = compute_dtype(x)
        mask = attention_bias(attention_mask, dtype)
        # Rotary angles in float32 (as transformers), computed here so that casting the model cannot round them;
        # cos/sin in the compute dtype, so under autocast they do not promote q and k back to float32.
        hs = c.hidden_size // c.num_attention_heads
        r = int(hs * c.rotary_pct)
        inv_freq = 1.0 / (c.rotary_emb_base ** (torch.arange(0, r, 2, device=idx.device, dtype=torch.float32) / r))
        angles = pos[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B|1, 1, T, r]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.gpt_neox.layers):
            if recompute:
                x = checkpoint(block, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.gpt_neox.final_layer_norm(x)
        return x if return_hidden else self.embed_out(x).float()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
                 eos_id=None, generator=None, use_cache=True):
        """Sample continuations of left-padded prompts (attention_mask: their token mask [B, T], 1 = token);
        returns the new tokens only, [B, n_new].

        After a row emits eos_id its remaining positions are eos_id; decoding stops once every
        row is done. temperature 0 is greedy. Sampling draws one uniform per row from `generator`
        each step, so the same seed gives the same tokens with or without the KV cache.
        """
        B, T = input_ids.shape
        tokens = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        cache = KVCache(self.config, B, T + max_new_tokens, self.embed_out.weight.dtype, input_ids.device) if use_cache else None
        x = input_ids  # what the next forward reads (only the new token with a cache)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new = []
        for _ in range(max_new_tokens):
            mask, pos = left_padding(tokens, x.shape[1])
            h = self(x, mask, cache, return_hidden=True, position_ids=pos)[:, -1]  # unembed the last position only
            nxt = sample_token(self.embed_out(h).float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            new.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
            x = nxt[:, None] if use_cache else torch.cat((x, nxt[:, None]), dim=1)
            tokens = torch.cat((tokens, torch.ones_like(tokens[:, :1])), dim=1)
        return torch.stack(new, dim=1) if new else input_ids.new_zeros(B, 0)

    @classmethod
    def from_pretrained(cls, name_or_dir, revision="main", dtype=torch.float32, device="cpu"):
        """A local checkpoint directory, or a Pythia name (`pythia-70m` -> hub repo EleutherAI/pythia-70m)."""
        fetch = _local_files(Path(name_or_dir)) if Path(name_or_dir).is_dir() else _hub_files(name_or_dir, revision)
        config = Config.from_dict(json.loads(fetch("config.json").read_text()))
        try:
            paths = [fetch("model.safetensors")]
        except download.NotFound:  # large checkpoints come as shards listed in an index
            index = json.loads(fetch("model.safetensors.index.json").read_text())
            paths = [fetch(f) for f in sorted(set(index["weight_map"].values()))]
        with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
            model = cls(config)
        state = {}
        for p in paths:  # convert file by file (fp16 on the hub -> dtype) to bound peak memory
            state.update((k, v.to(device=device, dtype=dtype)) for k, v in _load_weights(p).items()
                         if not k.endswith(IGNORED_KEYS))
        _check_state(model, state, name_or_dir)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, out_dir):
        """config.json + model.safetensors in transformers' GPT-NeoX layout, each written atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = str(self.embed_out.weight.dtype).removeprefix("torch.")
        cfg = dict(self.config.to_dict(), dtype=dtype, torch_dtype=dtype)
        files.write_json(out_dir / "config.json", cfg)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with files.atomic_file(out_dir / "model.safetensors") as tmp:
            save_file(state, tmp, metadata={"format": "pt"})


# Buffers that older GPT-NeoX checkpoints carry (causal-mask constants, rotary frequencies); recomputed here.
IGNORED_KEYS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def unreadable(path, error):
    """The one-line error for a corrupt or truncated safetensors file (weights or optimizer state)."""
    return ValueError(f"{path} is not a readable safetensors file ({error}): it is corrupt or truncated; "
                      "delete it and write or download it again")


def _load_weights(path):
    try:
        return load_file(path)
    except SafetensorError as e:
        raise unreadable(path, e) from None


def _check_state(model, state, where):
    """Strict loading: name every missing, unexpected or wrongly shaped tensor in one line."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in want if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in want]
    problems += [f"{k} has shape {tuple(v.shape)}, expected {want[k]}" for k, v in state.items()
                 if k in want and tuple(v.shape) != want[k]]
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ValueError(f"{where}: checkpoint does not match the config: {'; '.join(problems[:20])}{more}")


def _local_files(d):
    def fetch(name):
        p = d / name
        if not p.exists():
            if name == "model.safetensors":  # as on the hub: from_pretrained then looks for a sharded index
                raise download.NotFound(f"{p} does not exist")
            raise FileNotFoundError(f"{p} does not exist (expected config.json and model.safetensors "
                                    f"or model.safetensors.index.json with its shards)")
        return p
    return fetch


def _hub_files(name, revision):
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such model directory")
    repo = name if "/" in name else f"EleutherAI/{name}"
    return lambda filename: download.hub_file(repo, filename, revision)


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from float logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix holding top_p of the mass
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Inverse-CDF draw, one uniform per row: torch.multinomial draws an exponential per vocabulary entry,
    # 10x slower on CPU (19 vs 2 ms for 8 x 50k), most of a small model's decode step. float64 cumsum keeps
    # tiny probabilities exact; right=True never picks a zero-probability (masked) token.
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    u = torch.rand(len(cdf), 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(1)
