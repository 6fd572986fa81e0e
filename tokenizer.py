"""Pythia's tokenizer (the GPT-NeoX-20B byte-level BPE) on tiktoken, token-for-token equal to HF `tokenizers`.

HF `Tokenizer.encode(text)` works in four steps, and so does `Tokenizer.encode` here:
1. added tokens that are matched on the raw text (`"normalized": false`: `<|endoftext|>` and, at id 1,
   `<|padding|>` in Pythia's files, `<|unk|>` in GPT-NeoX-20B's)
   are cut out first, leftmost-longest, so text that merely contains `<|endoftext|>` gets id 0;
2. the pieces between them are NFC-normalized;
3. added tokens matched on normalized text (the runs of 2-24 spaces, ids 50254-50276) are cut out of
   those, leftmost-longest: "a   b" is [a, "   ", b], not GPT-2's [a, "  ", " b"];
4. what is left goes through GPT-2's split regex and byte-level BPE, which is tiktoken's `encode_ordinary`.
Step 4 equals HF's BPE because the vocabulary's ids follow the merge order (checked on load), which is
exactly the rank tiktoken merges by. tiktoken's own special-token matching cannot do steps 1-3: it
matches special tokens in arbitrary order, not longest first, and only on raw text.

The same `Tokenizer` also runs nanoDAA's own small tiktoken JSON (`save_tiktoken`), used by the offline
miniature task: no normalizer, its special tokens matched on the raw text as in step 1.
"""
import base64
import functools
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

import files
from download import hub_file

# GPT-2's pre-tokenizer regex, as HF's ByteLevel(use_regex=True) spells it.
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or unsupported; the message is one line meant for the user."""


class Tokenizer:
    """`encode(str) -> list[int]`, `decode(list[int]) -> str`, `eos_id`, `vocab_size`."""

    def __init__(self, name, pat_str, mergeable_ranks, raw_added, normalized_added, nfc):
        added = {**raw_added, **normalized_added}
        if EOS not in added:
            raise TokenizerError(f"{name}: no {EOS} token")
        try:
            self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=added)
        except ValueError as e:  # e.g. a pat_str that does not compile
            raise TokenizerError(f"{name}: {str(e).splitlines()[0]}") from None
        self.added = added
        self.raw_split = _splitter(raw_added)
        self.normalized_split = _splitter(normalized_added)
        self.nfc = nfc
        self.eos_id = added[EOS]
        self.vocab_size = self.enc.max_token_value + 1
        self.ids = frozenset(mergeable_ranks.values()) | frozenset(added.values())

    def encode(self, text):
        ids = []
        for i, raw in enumerate(self.raw_split(text)):  # step 1: odd pieces are added tokens
            if i % 2:
                ids.append(self.added[raw])
                continue
            normalized = unicodedata.normalize("NFC", raw) if self.nfc else raw  # step 2
            for j, piece in enumerate(self.normalized_split(normalized)):  # step 3
                if j % 2:
                    ids.append(self.added[piece])
                elif piece:
                    ids += self._bpe(piece)  # step 4
        return ids

    def _bpe(self, text):
        try:
            return self.enc.encode_ordinary(text)
        except BaseException as e:  # tiktoken panics on bytes a closed (word-level) vocabulary has no token for
            if type(e).__name__ != "PanicException":
                raise
            raise ValueError(f"{self.enc.name}: cannot encode {text[:60]!r}: part of it is not in the vocabulary") from None

    def decode(self, ids):
        """Every id, special ones included, as UTF-8 text; bytes that are not valid UTF-8 become U+FFFD.

        An id with no token decodes to nothing, as in HF `tokenizers`: a policy can sample the
        model's padding rows (Pythia's embedding has 50304 rows for 50277 tokens)."""
        if any(not isinstance(i, int) or i < 0 for i in ids):
            bad = next(i for i in ids if not isinstance(i, int) or i < 0)
            raise ValueError(f"{self.enc.name}: {bad!r} is not a token id (ids are non-negative integers)")
        return self.enc.decode_bytes([i for i in ids if i in self.ids]).decode("utf-8", errors="replace")


def _splitter(tokens):
    """re.split by the tokens, leftmost-longest (HF's added-vocabulary matching); matches land at odd indices."""
    if not tokens:
        return lambda text: [text]
    alternation = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(f"({alternation})").split


def load_tokenizer(path_or_name, revision="main"):
    """A tokenizer.json (or nanoDAA tiktoken JSON) path, a directory holding `tokenizer.json`, or a
    Pythia name ("pythia-70m", "EleutherAI/pythia-70m-deduped"), fetched from the hub and cached on disk.
    Built once per file and process: building from 50k merges takes a noticeable fraction of a second."""
    name = str(path_or_name)
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{name}: directory has no tokenizer.json")
    elif not path.is_file():
        if not re.fullmatch(r"(EleutherAI/)?pythia-[\w.-]+", name):
            raise TokenizerError(f"{name}: no such file or directory, and not a Pythia name like pythia-70m")
        path = hub_file(name if "/" in name else f"EleutherAI/{name}", "tokenizer.json", revision)
    stat = path.stat()
    return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)  # a rewritten file is rebuilt


@functools.lru_cache(maxsize=8)
def _load(path, mtime_ns, size):
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read it ({e})") from None
    if isinstance(spec, dict) and "nanodaa_tiktoken" in spec:
        return _from_nanodaa_json(path, spec["nanodaa_tiktoken"])
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        return _from_hf_json(path, spec)
    raise TokenizerError(f"{path}: neither a Hugging Face tokenizer.json nor a nanoDAA tiktoken file")


def _from_hf_json(path, spec):
    """A `tokenizers` JSON with a byte-level BPE model, refusing anything this file does not reproduce."""
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise TokenizerError(f"{path}: model is {model.get('type')!r}, not a BPE with vocab and merges")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise TokenizerError(f"{path}: pre_tokenizer must be ByteLevel(add_prefix_space=false, use_regex=true), got {json.dumps(pre)}")
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise TokenizerError(f"{path}: normalizer {json.dumps(spec['normalizer'])} is not supported (only NFC)")
    if (spec.get("post_processor") or {"type": "ByteLevel"}).get("type") != "ByteLevel":
        raise TokenizerError(f"{path}: post_processor {spec['post_processor'].get('type')!r} would add tokens; not supported")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: BPE dropout/continuing_subword_prefix/end_of_word_suffix are not supported")
    nfc = spec.get("normalizer") is not None
    raw, normalized = {}, {}
    for t in spec.get("added_tokens") or []:
        if t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
            raise TokenizerError(f"{path}: added token {t['content']!r} uses single_word/lstrip/rstrip; not supported")
        if t.get("normalized", not t.get("special")):  # HF matches these on the normalized text
            normalized[unicodedata.normalize("NFC", t["content"]) if nfc else t["content"]] = t["id"]
        else:
            raw[t["content"]] = t["id"]
    added_ids = {*raw.values(), *normalized.values()}
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {}
    for token, i in model["vocab"].items():
        if i in added_ids:
            continue
        if any(c not in byte_of for c in token):
            raise TokenizerError(f"{path}: vocab entry {token!r} is not in GPT-2's byte-level alphabet")
        ranks[bytes(byte_of[c] for c in token)] = i
    _check_merge_order(path, model["vocab"], model["merges"], added_ids)
    _check_ids(path, ranks, {**raw, **normalized})
    return Tokenizer(path, GPT2_PAT, ranks, raw, normalized, nfc)


def _check_merge_order(path, vocab, merges, added_ids):
    """tiktoken merges the adjacent pair whose concatenation has the lowest id; HF merges the pair listed
    first in `merges`. They agree when every merge's result has a larger id than the merges before it and
    every multi-character token comes from a merge (true for GPT-NeoX; its test checks every vocab entry)."""
    last, made = -1, set()
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise TokenizerError(f"{path}: merge {a!r} {b!r} does not give a token with a larger id than the "
                                 f"merges before it; tiktoken cannot reproduce this BPE")
        last = i
        made.add(a + b)
    unmerged = [t for t, i in vocab.items() if len(t) > 1 and t not in made and i not in added_ids]
    if unmerged:
        raise TokenizerError(f"{path}: vocab entry {unmerged[0]!r} is made by no merge; tiktoken cannot reproduce this BPE")


def _check_ids(path, ranks, special_tokens):
    """tiktoken panics on two tokens with one id; say it in a line instead."""
    ids = list(ranks.values()) + list(special_tokens.values())
    if len(set(ids)) != len(ids):
        raise TokenizerError(f"{path}: two tokens share an id")


@functools.cache
def _bytes_to_unicode():
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def save_tiktoken(path, pat_str, mergeable_ranks, special_tokens):
    """Write nanoDAA's own tokenizer JSON, atomically: tiktoken's split regex, its ranks (bytes -> id,
    base64-keyed) and special tokens (matched in the raw text, longest first). `load_tokenizer` reads it."""
    path = Path(path)
    _check_ids(path, mergeable_ranks, special_tokens)
    Tokenizer(str(path), pat_str, mergeable_ranks, special_tokens, {}, False)  # fail here, not at load
    ranks = {base64.b64encode(k).decode("ascii"): int(v) for k, v in sorted(mergeable_ranks.items(), key=lambda kv: kv[1])}
    spec = {"nanodaa_tiktoken": {"pat_str": pat_str, "mergeable_ranks": ranks, "special_tokens": dict(special_tokens)}}
    files.write_json(path, spec, indent=1)


def _from_nanodaa_json(path, spec):
    try:
        pat_str = spec["pat_str"]
        ranks = {base64.b64decode(k, validate=True): int(v) for k, v in spec["mergeable_ranks"].items()}
        special_tokens = {k: int(v) for k, v in spec["special_tokens"].items()}
        if not isinstance(pat_str, str) or not all(isinstance(k, str) for k in special_tokens):
            raise TypeError("pat_str and special tokens must be strings")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{path}: malformed nanodaa_tiktoken entry ({type(e).__name__}: {e})") from None
    _check_ids(path, ranks, special_tokens)
    return Tokenizer(path, pat_str, ranks, special_tokens, {}, False)
