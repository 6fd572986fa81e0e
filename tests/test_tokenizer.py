"""tokenizer.py against HF `tokenizers` on the real GPT-NeoX-20B tokenizer.json: the same ids, always."""
import csv
import json
import os
import random
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

import tokenizer
from tokenizer import TokenizerError, load_tokenizer, save_tiktoken

FIXTURES = Path(__file__).parent / "fixtures"
NEOX = FIXTURES / "gpt-neox-20b-tokenizer.json"


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(NEOX)


@pytest.fixture(scope="module")
def hf():
    return HFTokenizer.from_file(str(NEOX))


def real_texts():
    """Every text field of the TL;DR and HH fixtures."""
    texts = []
    with open(FIXTURES / "tldr_queries_first300.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            texts += [row["query"], row["postprocessed_response"], row["reference_responses"]]
    with open(FIXTURES / "tldr_comparisons_batch18_first100.jsonl", encoding="utf-8") as f:
        for line in f:
            c = json.loads(line)
            texts += [c["info"]["post"], c["info"]["title"]] + [s["text"] for s in c["summaries"]]
    with open(FIXTURES / "hh_rlhf_harmless_base_test_first100.jsonl", encoding="utf-8") as f:
        for line in f:
            h = json.loads(line)
            texts += [h["chosen"], h["rejected"]]
    return texts


SPACES = [s for n in range(1, 41) for s in (
    " " * n, f"a{' ' * n}b", f"{' ' * n}word", f"word{' ' * n}", f"x.{' ' * n}\n", f"\n{' ' * n}def f():",
    f"1{' ' * n}2", f"\t{' ' * n}\t", f"a{' ' * n}<|endoftext|>{' ' * n}b")]
WHITESPACE = ["\t", "\tx", "a\tb", "\t\t\tindent", "a\r\nb", "line1\r\n\r\nline2\r\n", "\r", " \r\n ", "\n\n\n",
              " \n", "\n ", "a \n b", "x \t y", "\u00a0nbsp", "a\u3000b", "\u2028\u2029", "a\x85b", "\u200bzw",
              "\u2009thin\u205f", "\ufeffbom", "\u180emongolian", "\x0b\x0c vt ff", "a\x1c\x1d\x1e\x1fb"]
NFC = ["cafe\u0301", "A\u030angstro\u0308m", "\u212b \u2126 \u00c5", "\u1100\u1161\u11a8 \ud55c\uad6d\uc5b4",
       "a\u0302\u0323 a\u0323\u0302", "\uff21\uff22\uff23\uff11\uff12\uff13\uff01", "\ufb01le \ufb02ow",
       "\u0958\u0915\u093c", "e\u0301\u0301\u0301", "\u0301leading mark", "\uff76\uff9e\uff85", "n\u0303o"]
EMOJI = ["\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
         "\U0001f3f3\ufe0f\u200d\U0001f308", "\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5", "\u2764\ufe0f love",
         "I'm \U0001f602\U0001f602\U0001f602!!!", "\u263a\ufe0e text", "\U0001f9d1\U0001f3ff\u200d\U0001f680"]
CODE = ["def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        '{"key": [1, 2.5e-3, null], "s": "a\\nb"}', "<div class=\"x\">&nbsp;</div>", "SELECT * FROM t WHERE a<>b;",
        "    if x:\n        y = 1\n\n    else:\n            z", "x=1;;y=2||z&&w", "~/.cache/nanodaa/hub",
        "```python\nprint('hi')\n```", "#!/usr/bin/env bash\nset -euo pipefail\n"]
NUMBERS = ["3.14159", "1,000,000", "2024-05-17T12:00:00Z", "0x1F 0b1010 1e-9", "\u0663\u0664\u0665 \u00b2\u00b3 \u00bd",
           "\u216b \u2460\u2461", "12345678901234567890", "$19.99 (50%)", "v1.2.3-rc4", "1st 2nd 3rd 4th"]
CONTRACTIONS = ["don't", "DON'T", "I'm", "I'M", "you're", "they've", "we'll", "he'd", "it's", "'s", "'ll'd",
                "O'Neil", "rock 'n' roll", "'tis", "can\u2019t", "''quoted''", "'''", "y'all'd've"]
SPECIAL = ["<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", "<|endoftext", "endoftext|>",
           "<|unk|>", "<|padding|>", " <|endoftext|> ", "TL;DR:<|endoftext|>\n", "<|<|endoftext|>|>",
           "<|endoftext|>\u0338", "x\u0338<|unk|>", "<|ENDOFTEXT|>"]
SCRIPTS = ["\u4e2d\u6587\u6587\u672c\u3002", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
           "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
           "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
           "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
           "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5", "\u05e9\u05dc\u05d5\u05dd", "a" * 700, "ab" * 400,
           "\x00\x01\x1b[31mred\x1b[0m", "\U00010348\U0001d11e\U0001f600", ""]
CORPUS = {"spaces": SPACES, "whitespace": WHITESPACE, "nfc": NFC, "emoji": EMOJI, "code": CODE,
          "numbers": NUMBERS, "contractions": CONTRACTIONS, "special": SPECIAL, "scripts": SCRIPTS}


def fuzz(n=3000, seed=0):
    """Random strings over the characters where tokenizers disagree when they disagree at all."""
    atoms = [" ", "  ", " ", "\t", "\n", "\r\n", "a", "Z", "word", "\u00e9", "e\u0301", "\u0301", "\u0338", ">", "\u00df",
             "1", "42", "\u0663", "\u00bd", "'", "'s", "'S", "'ll", "-", ".", "!?", "_", "<|endoftext|>", "<|unk|>", "<|",
             "|>", "\U0001f44d", "\u200d", "\U0001f3fd", "\u4e2d", "\u00a0", "\u3000", "\u2028", "\x85", "\ufb01",
             "\uff21", "\u212b", "\x00", "\uff76", "\u1100", "\u1161", "\u0915\u093c"]
    rng = random.Random(seed)
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def mismatches(ours, hf, texts):
    return [(t, ours.encode(t), hf.encode(t).ids) for t in texts if ours.encode(t) != hf.encode(t).ids]


@pytest.mark.parametrize("kind", [*CORPUS, "real", "fuzz"])
def test_same_ids_as_reference(ours, hf, kind):
    texts = {"real": real_texts, "fuzz": fuzz}[kind]() if kind in ("real", "fuzz") else CORPUS[kind]
    assert len(texts) > 0
    bad = mismatches(ours, hf, texts)
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]}"


def test_every_vocab_entry_encodes_like_reference(ours, hf):
    # Each token's own text, where it is valid UTF-8: covers every merge tiktoken could order differently.
    vocab = json.loads(NEOX.read_text(encoding="utf-8"))["model"]["vocab"]
    texts = []
    for i in sorted(vocab.values()):
        try:
            texts.append(ours.enc.decode_single_token_bytes(i).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    assert len(texts) > 45000
    got = [ours.encode(t) for t in texts]
    want = [e.ids for e in hf.encode_batch(texts)]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, f"{len(bad)} differ, first: {bad[0]}"


def test_space_runs_are_added_tokens(ours, hf):
    # HF matches the 2-24-space added tokens before BPE: "a   b" is [a, "   ", b], not GPT-2's [a, "  ", " b"].
    assert ours.encode("a   b") == [ours.encode("a")[0], 50275, ours.encode("b")[0]] == hf.encode("a   b").ids
    assert ours.encode(" " * 30) == [50254, 50272]  # leftmost-longest: 24 + 6


def test_round_trip_is_nfc(ours):
    texts = real_texts() + fuzz(500) + [t for ts in CORPUS.values() for t in ts]
    # HF cuts raw-text added tokens before normalizing, so ">" of <|endoftext|> never composes with U+0338.
    split_first = [t for t in texts if "|>\u0338" in t]
    assert split_first
    for t in texts:
        if t not in split_first:
            assert ours.decode(ours.encode(t)) == unicodedata.normalize("NFC", t), repr(t)
    assert ours.decode(ours.encode("<|endoftext|>\u0338")) == "<|endoftext|>\u0338"


def test_ids_and_sizes(ours, hf):
    assert ours.eos_id == 0 == hf.token_to_id("<|endoftext|>")
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True) == 50277
    assert ours.encode("a<|endoftext|>") == [ours.encode("a")[0], 0]


def test_decode_edge_cases(ours, hf):
    e_acute = ours.encode("\u00e9")
    assert len(e_acute) == 1
    first_byte = ours.enc._mergeable_ranks["\u00e9".encode()[:1]]
    assert ours.decode([first_byte]) == "\ufffd"  # half a UTF-8 character
    assert ours.decode([]) == ""
    # Ids with no token (the model's padded vocabulary rows) decode to nothing, as the reference does.
    for padded in (50277, 50303, 2**31):
        assert ours.decode([5, padded, 6]) == hf.decode([5, padded, 6], skip_special_tokens=False) == ours.decode([5, 6])
    with pytest.raises(ValueError, match="not a token id") as e:
        ours.decode([5, -1])
    assert "\n" not in str(e.value)


def test_load_forms_and_cache(ours, tmp_path, monkeypatch):
    assert load_tokenizer(str(NEOX)) is ours  # built once per process and file
    link_dir = tmp_path / "model"
    link_dir.mkdir()
    (link_dir / "tokenizer.json").symlink_to(NEOX)
    assert load_tokenizer(link_dir) is ours
    # A Pythia name resolves through download.hub_file's cache: no network when the file is there.
    monkeypatch.setenv("NANODAA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANODAA_OFFLINE", "1")
    for name, repo in [("pythia-70m", "EleutherAI/pythia-70m"), ("EleutherAI/pythia-160m-deduped", "EleutherAI/pythia-160m-deduped")]:
        cached = tmp_path / "cache" / "hub" / repo / "main" / "tokenizer.json"
        cached.parent.mkdir(parents=True)
        cached.symlink_to(NEOX)
        assert load_tokenizer(name) is ours
    with pytest.raises(Exception, match="pythia-1b") as e:  # not cached, offline: download.py's one line
        load_tokenizer("pythia-1b")
    assert "\n" not in str(e.value)


def one_line_error(path, match):
    with pytest.raises(TokenizerError, match=match) as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_files(tmp_path):
    assert "nope.json" in one_line_error(tmp_path / "nope.json", "no such file")
    one_line_error("not/a/model", "not a Pythia name")
    one_line_error(tmp_path, "no tokenizer.json")
    (tmp_path / "broken.json").write_text('{"model": {\n  "type": "BPE",,\n')
    assert "broken.json:2:" in one_line_error(tmp_path / "broken.json", "not valid JSON")
    (tmp_path / "list.json").write_text("[1, 2]")
    one_line_error(tmp_path / "list.json", "neither a Hugging Face tokenizer.json nor")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    one_line_error(tmp_path / "latin1.json", "cannot read")


@pytest.fixture(scope="module")
def neox_spec():
    return json.loads(NEOX.read_text(encoding="utf-8"))


@pytest.mark.parametrize("change, match", [
    (lambda s: s["model"].update(type="WordPiece"), "not a BPE"),
    (lambda s: s["model"].pop("merges"), "not a BPE"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer must be ByteLevel"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre_tokenizer must be ByteLevel"),
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda s: s.update(post_processor={"type": "TemplateProcessing"}), "post_processor"),
    (lambda s: s["added_tokens"][2].update(lstrip=True), "lstrip"),
    (lambda s: s["model"]["merges"].reverse(), "larger id"),
    (lambda s: s["model"]["vocab"].update({"\u4e2d": 60000}), "byte-level alphabet"),
    (lambda s: s["model"]["vocab"].update({"zzqx": 60000}), "made by no merge"),
    (lambda s: s["model"]["vocab"].update({"\u00f5": 2}), "share an id"),  # byte 0xF5, absent from the vocab
    (lambda s: s["added_tokens"][0].update(content="<|eos|>"), "no <\\|endoftext\\|> token"),
])
def test_unsupported_tokenizer_json(neox_spec, tmp_path, change, match):
    spec = json.loads(json.dumps(neox_spec))
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    assert str(path) in one_line_error(path, match)


WORDS = ["POST:", " the", " cat", " sat", " TLDR:", " mat", "\n"]
TINY_PAT = r" ?\S+|\n"


def test_tiktoken_format_round_trip(tmp_path):
    ranks = {w.encode(): i + 1 for i, w in enumerate(WORDS)}
    path = tmp_path / "tiny" / "tokenizer.json"
    save_tiktoken(path, TINY_PAT, ranks, {"<|endoftext|>": 0, "<|pad|>": 8})
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    tok = load_tokenizer(path.parent)
    assert isinstance(tok, tokenizer.Tokenizer)
    assert (tok.eos_id, tok.vocab_size) == (0, 9)
    words = ["POST:", " the", " cat", " sat", "\n", " TLDR:", " the", " cat"]
    text = "".join(words) + "<|endoftext|><|pad|>"
    assert tok.encode(text) == [ranks[w.encode()] for w in words] + [0, 8]
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="not in the vocabulary") as e:
        tok.encode("POST: the dog")
    assert "\n" not in str(e.value)
    # Rewriting the file rebuilds it (the cache is keyed on path and modification time).
    save_tiktoken(path, TINY_PAT, {**ranks, b" dog": 9}, {"<|endoftext|>": 0})
    os.utime(path, ns=(1, 1))
    assert load_tokenizer(path).encode("POST: the dog") == [1, 2, 9]


def test_tiktoken_format_errors(tmp_path):
    path = tmp_path / "tok.json"
    for ranks, special, match in [({b"a": 1, b"b": 1}, {"<|endoftext|>": 0}, "share an id"),
                                  ({b"a": 1}, {"<|eos|>": 0}, "no <\\|endoftext\\|>")]:
        with pytest.raises(TokenizerError, match=match):
            save_tiktoken(path, TINY_PAT, ranks, special)
        assert not path.exists()  # nothing half-written
    with pytest.raises(TokenizerError, match="Opening parenthesis"):
        save_tiktoken(path, "(", {b"a": 1}, {"<|endoftext|>": 0})
    path.write_text(json.dumps({"nanodaa_tiktoken": {"pat_str": TINY_PAT, "mergeable_ranks": {"not base64!": 1},
                                                     "special_tokens": {"<|endoftext|>": 0}}}))
    one_line_error(path, "malformed nanodaa_tiktoken")
    path.write_text(json.dumps({"nanodaa_tiktoken": {"pat_str": TINY_PAT}}))
    one_line_error(path, "malformed nanodaa_tiktoken")
