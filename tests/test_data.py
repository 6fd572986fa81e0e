"""data/tldr/prepare.py and data/hh/prepare.py on real upstream lines (tests/fixtures), offline."""
import csv
import gzip
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER = str(FIXTURES / "gpt-neox-20b-tokenizer.json")
COMPARISONS = FIXTURES / "tldr_comparisons_batch18_first100.jsonl"
QUERIES = FIXTURES / "tldr_queries_first300.csv"
HH = FIXTURES / "hh_rlhf_harmless_base_test_first100.jsonl"
N_TRAIN = 40  # the fixture is all valid1/valid2; its first 40 comparisons are relabelled "train"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", ROOT / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tldr, hh = load_script("tldr"), load_script("hh")


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def prompt_of(subreddit, title, post):  # the format written out independently of the script
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def tldr_raw(tmp_path):
    """A --raw-dir with the real comparison lines and tldr_3_filtered files made from the same posts."""
    comparisons = read(COMPARISONS)
    for row in comparisons[:N_TRAIN]:
        row["split"] = "train"
    raw = tmp_path / "raw"
    write_lines(raw / "dataset" / "comparisons" / "batch18.json", comparisons)
    posts = list({c["info"]["id"]: dict(c["info"], summary=c["summaries"][0]["text"]) for c in comparisons}.values())
    sft = {"train": posts[0::3], "valid": posts[1::3], "test": posts[2::3]}
    for split, rows in sft.items():
        write_lines(raw / "datasets" / "tldr_3_filtered" / f"{split}.jsonl", rows)
    return raw, comparisons, sft


def run_tldr(raw, out, *extra):
    tldr.main(["--raw-dir", str(raw), "--batches", "batch18", "--tokenizer", TOKENIZER, "--out-dir", str(out), *extra])


def test_tldr_outputs(tldr_raw, tmp_path, capsys):
    raw, comparisons, sft = tldr_raw
    out = tmp_path / "out" / "tldr"
    run_tldr(raw, out)
    table = capsys.readouterr().out
    train = [c for c in comparisons if c["split"] == "train"]
    valid2 = [c for c in comparisons if c["split"] == "valid2"]
    n_valid1 = sum(c["split"] == "valid1" for c in comparisons)
    assert len(train) == N_TRAIN and valid2 and n_valid1
    for name, expected in (("pref_train", train), ("pref_eval", valid2)):
        rows = read(out / f"{name}.jsonl")
        assert len(rows) == len(expected)
        for row, c in zip(rows, expected):
            info, texts = c["info"], [s["text"] for s in c["summaries"]]
            assert row["prompt"] == prompt_of(info["subreddit"], info["title"], info["post"])  # all fit in 512
            assert row["chosen"] == " " + texts[c["choice"]].strip()
            assert row["rejected"] == " " + texts[1 - c["choice"]].strip()
            assert row["chosen"] != row["rejected"]
    for name, split in (("sft_train", "train"), ("sft_valid", "valid")):
        rows = read(out / f"{name}.jsonl")
        assert [r["prompt"] for r in rows] == [prompt_of(p["subreddit"], p["title"], p["post"]) for p in sft[split]]
        assert [r["response"] for r in rows] == [" " + p["summary"].strip() for p in sft[split]]
    evals = read(out / "eval_prompts.jsonl")
    assert [e["id"] for e in evals] == [p["id"] for p in sft["test"]]
    assert [e["reference"] for e in evals] == [" " + p["summary"].strip() for p in sft["test"]]
    assert all(e["prompt"].endswith("\n\nTL;DR:") for e in evals)
    row = rf"pref_eval\s+{len(valid2) + n_valid1}\s+{len(valid2)}\s.*split valid1 not in --eval-splits: {n_valid1}"
    assert re.search(row, table)

    run_tldr(raw, out, "--eval-splits", "valid1,valid2")  # replaces the previous output, leaves nothing beside it
    assert len(read(out / "pref_eval.jsonl")) == len(valid2) + n_valid1
    assert sorted(p.name for p in out.parent.iterdir()) == ["tldr"]


def parse_query(query):
    m = re.fullmatch(r"SUBREDDIT: r/(.*?)\n\nTITLE: (.*?)\n\nPOST: (.*)\n\nTL;DR:", query, re.S)
    return m.groups()


def test_tldr_prompts_equal_a_reference_implementation():
    """Prompts another TL;DR replication built: we rebuild each one that is within 512 tokens exactly.

    Its own truncation let 4 of these 300 reach 513-516 tokens; those we cut further."""
    tok = tldr.load_tokenizer(TOKENIZER)
    prompt = tldr.prompter(tok, 512)
    queries = [row["query"] for row in csv.DictReader(open(QUERIES, encoding="utf-8"))]
    within = [len(tok.encode(q)) <= 512 for q in queries]
    assert len(queries) == 300 and sum(within) == 296
    for query, fits in zip(queries, within):
        text, truncated = prompt(*parse_query(query))
        assert (text, truncated) == (query, False) if fits else truncated and len(tok.encode(text)) <= 512


def test_tldr_truncation_cuts_at_the_last_newline_else_word():
    tok = tldr.load_tokenizer(TOKENIZER)
    limit = 120
    prompt = tldr.prompter(tok, limit)
    cut_at = {"newline": 0, "word": 0}
    for row in csv.DictReader(open(QUERIES, encoding="utf-8")):
        subreddit, title, post = parse_query(row["query"])

        def fits(p):
            return len(tok.encode(prompt_of(subreddit, title, p))) <= limit

        result = prompt(subreddit, title, post)
        if result is None:  # not even the first word fits
            assert not fits(post.split()[0])
            continue
        text, truncated = result
        assert len(tok.encode(text)) <= limit and text.endswith("\n\nTL;DR:")
        assert truncated == (not fits(post))
        if not truncated:
            assert text == prompt_of(subreddit, title, post)
            continue
        # the kept post ends at a newline (else a word) boundary, and the next such cut would not fit
        newline_cuts, word_cuts = (list(dict.fromkeys(post[:m.start()].rstrip() for m in re.finditer(b, post)
                                                      if post[:m.start()].strip())) for b in ("\n", r"\s"))
        kind, cuts = ("newline", newline_cuts) if newline_cuts and fits(newline_cuts[0]) else ("word", word_cuts)
        kept = parse_query(text)[2]
        assert kept in cuts
        later = cuts[cuts.index(kept) + 1:]
        assert not later or not fits(later[0])
        cut_at[kind] += 1
    assert cut_at["newline"] > 10 and cut_at["word"] > 0  # both rules were exercised
    assert prompt("AskReddit", "word " * 200, "a post") is None  # the title alone is too long: dropped


def test_tldr_counts_dropped_prompts(tldr_raw, tmp_path, capsys):
    raw, comparisons, _ = tldr_raw
    comparisons[0]["info"]["title"] = "long title " * 300
    write_lines(raw / "dataset" / "comparisons" / "batch18.json", comparisons)
    run_tldr(raw, tmp_path / "out")
    assert len(read(tmp_path / "out" / "pref_train.jsonl")) == N_TRAIN - 1
    assert re.search(rf"pref_train\s+{N_TRAIN}\s+{N_TRAIN - 1}\s.*prompt too long: 1", capsys.readouterr().out)


def test_hh_prompt_split_on_real_lines():
    lines = read(HH)
    multi_turn = 0
    for line in lines:
        prompt, chosen, rejected = hh.split_dialogue(line["chosen"], line["rejected"])
        assert prompt + chosen == line["chosen"] and prompt + rejected == line["rejected"]
        assert prompt.startswith("\n\nHuman:") and prompt.endswith("\n\nAssistant:")
        if hh.drop_reason(prompt, chosen, rejected) is None:
            # every human turn is in the prompt; the replies are one assistant turn each
            assert prompt.count("\n\nHuman:") == line["chosen"].count("\n\nHuman:") == line["rejected"].count("\n\nHuman:")
            assert chosen.startswith(" ") and rejected.startswith(" ")
            multi_turn += prompt.count("\n\nHuman:") > 1
    assert multi_turn >= 50

    # the replies differ earlier than the final turn: the shared prompt is shorter, and the line is dropped
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye"
    rejected = "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: and?\n\nAssistant: bye"
    split = hh.split_dialogue(chosen, rejected)
    prompt = "\n\nHuman: hi\n\nAssistant:"
    assert split == (prompt, chosen[len(prompt):], rejected[len(prompt):])
    assert hh.drop_reason(*split) == "dialogues part before the final reply"
    # they differ right after the space of "Assistant: "; the prompt still ends at the colon
    assert hh.split_dialogue("\n\nHuman: q\n\nAssistant: yes", "\n\nHuman: q\n\nAssistant: no") == (
        "\n\nHuman: q\n\nAssistant:", " yes", " no")
    same = "\n\nHuman: q\n\nAssistant: a"
    assert hh.drop_reason(*hh.split_dialogue(same, same)) == "identical replies"


def gzip_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(lines)


def test_hh_outputs(tmp_path, capsys):
    lines = open(HH, encoding="utf-8").readlines()
    raw = tmp_path / "raw"
    gzip_lines(raw / "harmless-base" / "train.jsonl.gz", lines[:60])
    gzip_lines(raw / "harmless-base" / "test.jsonl.gz", lines[60:])
    out = tmp_path / "hh"
    hh.main(["--raw-dir", str(raw), "--subsets", "harmless-base", "--out-dir", str(out)])
    table = capsys.readouterr().out
    for split, src, outputs in (("train", lines[:60], ("sft_train", "pref_train")),
                                ("test", lines[60:], ("sft_valid", "pref_eval", "eval_prompts"))):
        kept = [(n, json.loads(line)) for n, line in enumerate(src, 1)
                if hh.drop_reason(*hh.split_dialogue(**json.loads(line))) is None]
        assert len(kept) >= len(src) - 3
        rows = {name: read(out / f"{name}.jsonl") for name in outputs}
        assert all(len(r) == len(kept) for r in rows.values())
        for i, (n, line) in enumerate(kept):
            sft, pref = rows[outputs[0]][i], rows[outputs[1]][i]
            assert sft["prompt"] + sft["response"] == line["chosen"]
            assert pref["prompt"] + pref["chosen"] == line["chosen"]
            assert pref["prompt"] + pref["rejected"] == line["rejected"]
            if split == "test":
                assert rows["eval_prompts"][i] == {"id": f"harmless-base/test/{n}", "prompt": pref["prompt"],
                                                   "reference": pref["chosen"]}
        assert re.search(rf"{outputs[1]}\s+{len(src)}\s+{len(kept)}\s", table)


def serve(root, flaky):
    """An HTTP server for the files under `root` that honours Range; its first answer for the path `flaky`
    stops halfway through the file and closes the connection. Returns the server and a log of (path, Range)."""
    log = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = root / self.path.lstrip("/")
            log.append((self.path, self.headers.get("Range")))
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if self.path == flaky and sum(p == flaky for p, _ in log) == 1:
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # drop it mid-file
                return
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, log


def test_download_resumes_after_a_dropped_connection(tldr_raw, tmp_path, monkeypatch):
    raw, _, sft = tldr_raw
    flaky = "/datasets/tldr_3_filtered/test.jsonl"
    # over 2 MiB, so the bytes before the drop fill at least one of download.py's 1 MiB chunks and are kept
    write_lines(raw / flaky[1:], sft["test"] * 1500)
    monkeypatch.setenv("NANODAA_CACHE", str(tmp_path / "cache"))
    server, log = serve(raw, flaky)
    try:
        tldr.main(["--base-url", f"http://127.0.0.1:{server.server_port}", "--batches", "batch18",
                   "--tokenizer", TOKENIZER, "--out-dir", str(tmp_path / "downloaded")])
    finally:
        server.shutdown()
        server.server_close()
    ranges = [r for p, r in log if p == flaky]  # the second request asks only for the bytes not yet received
    assert len(ranges) == 2 and ranges[0] is None
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1)) <= (raw / flaky[1:]).stat().st_size // 2
    for src in raw.rglob("*.json*"):
        assert (tmp_path / "cache" / "raw" / "tldr" / src.relative_to(raw)).read_bytes() == src.read_bytes()
    run_tldr(raw, tmp_path / "local")
    for out in (tmp_path / "local").iterdir():
        assert (tmp_path / "downloaded" / out.name).read_bytes() == out.read_bytes()


def run_script(name, *args, **env):
    return subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, **env), timeout=60)


def test_failed_download_names_the_url_and_raw_dir(tmp_path):
    server, _ = serve(tmp_path, None)  # an empty directory: every file is a 404
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        r = run_script("hh", "--base-url", base, "--subsets", "helpful-base", "--out-dir", str(tmp_path / "out"),
                       NANODAA_CACHE=str(tmp_path / "cache"))
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"{base}/helpful-base/train.jsonl.gz" in r.stderr and "--raw-dir" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tldr", "hh"])
def test_malformed_line_names_file_and_line(name, tldr_raw, tmp_path):
    raw, _, _ = tldr_raw
    if name == "tldr":
        path = raw / "dataset" / "comparisons" / "batch18.json"
        lines = path.read_text().splitlines(keepends=True)
        lines[6] = lines[6][:100] + "\n"  # a line cut short
        path.write_text("".join(lines))
        args, wrong = ["--batches", "batch18", "--tokenizer", TOKENIZER], f"{path}:7: not valid JSON"
    else:
        lines = open(HH, encoding="utf-8").readlines()
        gzip_lines(raw / "harmless-base" / "train.jsonl.gz", lines)
        line = json.loads(lines[2])
        del line["rejected"]
        lines[2] = json.dumps(line) + "\n"
        path = raw / "harmless-base" / "test.jsonl.gz"
        gzip_lines(path, lines)
        args, wrong = ["--subsets", "harmless-base"], f"{path}:3: missing field 'rejected'"
    out = tmp_path / "prepared" / name
    out.parent.mkdir()
    r = run_script(name, "--raw-dir", str(raw), "--out-dir", str(out), *args)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"error: {wrong}") and r.stderr.count("\n") == 1
    assert list(out.parent.iterdir()) == []  # neither the output nor its temporary directory


@pytest.mark.parametrize("name", ["tldr", "hh"])
def test_help_documents_every_flag(name):
    r = run_script(name, "--help")
    assert r.returncode == 0
    module = {"tldr": tldr, "hh": hh}[name]
    flags = [a for a in module.parser._actions if a.dest != "help"]
    assert len(flags) >= 4
    for action in flags:
        assert action.help and action.option_strings[0] in r.stdout
