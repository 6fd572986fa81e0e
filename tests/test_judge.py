"""judge.py against a scripted OpenAI-compatible server on 127.0.0.1, and the gold judge."""
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import judge
from data.tiny import task

KEY = "sk-test-Secret-0123456789"
ROOT = Path(__file__).resolve().parents[1]


class Server:
    """Answers POST /v1/chat/completions with `script(n, body) -> (status, headers, reply_or_raw, delay)`.

    Records every request body and Authorization header, and the most requests in flight at once.
    """

    def __init__(self, script):
        self.script, self.bodies, self.auth, self.times = script, [], [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.bodies)
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    server.times.append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                status, headers, reply, delay = script(n, body)
                time.sleep(delay)
                with server.lock:
                    server.in_flight -= 1
                if isinstance(reply, str) and status == 200:
                    reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                                        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})
                data = reply.encode() if isinstance(reply, str) else reply
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def ok(reply, delay=0.0):
    return lambda n, body: (200, {}, reply, delay)


def write_samples(tmp_path, n=20):
    rows = [{"id": f"p{i}", "prompt": f"POST: post number {i}\n\nTL;DR:", "sample": f" policy summary {i}",
             "reference": f" human summary number {i} " + "word " * (i % 3)} for i in range(n)]
    path = tmp_path / "samples-ckpt-100.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def run(server, samples, *extra):
    return judge.main([str(samples), "--base-url", server.url, "--model", "judge-model", "--backoff", "0.01", *extra])


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_always_a_judge_wins_follow_the_flips(serve, tmp_path):
    server = serve(ok("Comparison: A is shorter.\nPreferred: A"))
    samples, rows = write_samples(tmp_path, 40)
    s = run(server, samples, "--concurrency", "4")
    out = tmp_path / "judgments-ckpt-100.jsonl"  # default name beside the samples
    judged = {r["id"]: r for r in rows_of(out)}
    assert len(judged) == 40 and len(server.bodies) == 40
    flips = [judged[r["id"]]["policy_first"] for r in rows]
    assert 10 <= sum(flips) <= 30  # a fair coin per item
    for r in rows:
        j = judged[r["id"]]
        assert j["verdict"] == "A" and j["win"] == (1.0 if j["policy_first"] else 0.0)
        assert j["policy_first"] == judge.policy_first(0, r["id"])
    for body in server.bodies:  # the policy's sample sits where the flip says
        content = body["messages"][0]["content"]
        i = content.split("post number ")[1].split("\n")[0]
        first = judge.policy_first(0, f"p{i}")
        assert content.index(f"policy summary {i}") < content.index(f"human summary number {i}") if first else \
            content.index(f"policy summary {i}") > content.index(f"human summary number {i}")
        assert body["model"] == "judge-model" and "Preferred:" in content
    assert s["win_rate"] == pytest.approx(sum(flips) / 40)
    assert s["win_rate_se"] == pytest.approx(np.std(np.array(flips, float), ddof=1) / np.sqrt(40))
    assert s["n"] == 40 and s["unparseable"] == 0 and s["tokens"] == 40 * 110
    assert json.loads((tmp_path / "judgments-ckpt-100.summary.json").read_text()) == s
    # another seed flips other items
    run(server, samples, "--out", str(tmp_path / "seed1.jsonl"), "--seed", "1")
    other = {r["id"]: r["policy_first"] for r in rows_of(tmp_path / "seed1.jsonl")}
    assert len(other) == 40 and any(other[i] != judged[i]["policy_first"] for i in other)


def test_429_honours_retry_after(serve, tmp_path):
    def script(n, body):
        if n == 0:
            return 429, {"Retry-After": "0"}, '{"error": {"message": "slow down"}}', 0
        if n == 1:
            return 429, {"retry-after-ms": "300"}, '{"error": {"message": "slow down"}}', 0
        return 200, {}, "Comparison: x.\nPreferred: B", 0

    server = serve(script)
    samples, _ = write_samples(tmp_path, 1)
    s = judge.main([str(samples), "--base-url", server.url, "--backoff", "0", "--concurrency", "1"])
    assert len(server.bodies) == 3 and s["n"] == 1 and s["unparseable"] == 0
    assert server.times[2] - server.times[1] >= 0.28  # waited what retry-after-ms said (backoff alone is 0)


def test_500_then_success_and_malformed_200(serve, tmp_path):
    def script(n, body):
        return [(500, {}, "oops", 0), (200, {}, b"<html>proxy</html>", 0)][n] if n < 2 else (200, {}, "Preferred: A", 0)

    server = serve(script)
    samples, _ = write_samples(tmp_path, 1)
    s = run(server, samples)
    assert len(server.bodies) == 3 and s["n"] == 1 and rows_of(tmp_path / "judgments-ckpt-100.jsonl")[0]["verdict"] == "A"


def test_timeout_is_retried(serve, tmp_path):
    server = serve(lambda n, body: (200, {}, "Preferred: B", 1.0 if n == 0 else 0))
    samples, _ = write_samples(tmp_path, 1)
    s = run(server, samples, "--timeout", "0.2")
    assert len(server.bodies) == 2 and s["n"] == 1


def test_retries_run_out(serve, tmp_path):
    server = serve(lambda n, body: (503, {}, "unavailable", 0))
    samples, _ = write_samples(tmp_path, 1)
    with pytest.raises(judge.Fatal, match="after 2 retries"):
        run(server, samples, "--max-retries", "2")
    assert len(server.bodies) == 3


def test_garbage_reply_is_unparseable(serve, tmp_path):
    server = serve(lambda n, body: (200, {}, "I like turtles." if n % 2 else "Preferred: A", 0))
    samples, _ = write_samples(tmp_path, 6)
    s = run(server, samples, "--concurrency", "1")
    bad = [r for r in rows_of(tmp_path / "judgments-ckpt-100.jsonl") if r["verdict"] is None]
    assert len(bad) == 3 and all(r["win"] == 0.5 and r["reply"] == "I like turtles." for r in bad)
    assert s["unparseable"] == 3


def test_slow_replies_keep_several_in_flight(serve, tmp_path):
    server = serve(ok("Preferred: A", delay=0.5))
    samples, _ = write_samples(tmp_path, 8)
    t = time.monotonic()
    s = run(server, samples, "--concurrency", "4")
    assert s["n"] == 8 and server.max_in_flight == 4  # exactly --concurrency, never more
    assert time.monotonic() - t < 3.5  # one at a time would take 4 s


def test_resume_sends_no_new_requests(serve, tmp_path):
    server = serve(ok("Preferred: B"))
    samples, _ = write_samples(tmp_path, 10)
    out = tmp_path / "judgments-ckpt-100.jsonl"
    first = run(server, samples)
    assert len(server.bodies) == 10
    assert run(server, samples) == first and len(server.bodies) == 10  # nothing left to judge
    # a crash after 4 rows, mid-line: the cut line is dropped and only the missing 6 are asked for
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:15])
    again = run(server, samples)
    assert len(server.bodies) == 16 and again == first
    assert sorted(r["id"] for r in rows_of(out)) == sorted(f"p{i}" for i in range(10))


def test_key_is_sent_but_never_written(serve, tmp_path):
    # the server echoes the key back in its replies; it must still reach no file
    server = serve(lambda n, body: (200, {}, "Comparison: you sent " + KEY + "\nPreferred: A", 0))
    samples, _ = write_samples(tmp_path, 5)
    run(server, samples)
    assert set(server.auth) == {f"Bearer {KEY}"}
    files = list(tmp_path.iterdir())
    assert len(files) == 3 and all(KEY not in f.read_text() for f in files)


def test_bad_key_stops_at_once_with_one_line(serve, tmp_path):
    server = serve(lambda n, body: (401, {}, '{"error": {"message": "Incorrect API key provided: ' + KEY + '"}}', 0))
    samples, _ = write_samples(tmp_path, 20)
    out = tmp_path / "j.jsonl"
    p = subprocess.run([sys.executable, "judge.py", str(samples), "--base-url", server.url, "--out", str(out),
                        "--concurrency", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"OPENAI_API_KEY": KEY, "PATH": "/usr/bin:/bin"})
    assert p.returncode != 0 and len(server.bodies) == 1
    assert p.stderr.startswith("error: HTTP 401") and p.stderr.count("\n") == 1 and KEY not in p.stderr + p.stdout
    assert out.read_text() == ""


def test_insufficient_quota_stops_at_once(serve, tmp_path):
    server = serve(lambda n, body: (429, {"Retry-After": "0"}, '{"error": {"code": "insufficient_quota"}}', 0))
    samples, _ = write_samples(tmp_path, 3)
    with pytest.raises(judge.Fatal, match="insufficient_quota"):
        run(server, samples, "--concurrency", "1")
    assert len(server.bodies) == 1


def test_hh_prompt_and_parsing(serve, tmp_path):
    server = serve(ok("Comparison: B answers the question.\nMore helpful: B"))
    samples, rows = write_samples(tmp_path, 6)
    run(server, samples, "--task", "hh")
    assert all("More helpful:" in b["messages"][0]["content"] for b in server.bodies)
    for r in rows_of(tmp_path / "judgments-ckpt-100.jsonl"):
        assert r["verdict"] == "B" and r["win"] == (0.0 if r["policy_first"] else 1.0)


@pytest.mark.parametrize("task,reply,verdict", [
    ("tldr", "Comparison: both fine.\nPreferred: B", "B"),
    ("tldr", "**Comparison:** meh\n**Preferred:** A", "A"),
    ("tldr", "Comparison: x\n**Preferred**: \"B\"", "B"),
    ("tldr", "Preferred: Summary A", "A"),
    ("tldr", "Preferred: A\n...on reflection...\nPreferred: B", "B"),
    ("tldr", "I prefer A.", None),
    ("tldr", "More helpful: A", None),
    ("tldr", "Preferred: Both", None),
    ("hh", "Comparison: x\nmore helpful: a", "A"),
    ("hh", "More helpful: Response B", "B"),
    ("hh", "Preferred: A", None),
])
def test_parse_verdict(task, reply, verdict):
    assert judge.parse_verdict(reply, judge.VERDICT[task]) == verdict


def test_lc_win_rate_removes_a_length_effect():
    rng = np.random.default_rng(0)
    d = rng.normal(5.0, 10.0, 4000)  # samples mostly longer than references, and the judge likes length
    y = rng.random(4000) < 1 / (1 + np.exp(-(0.3 + 0.2 * d)))
    assert y.mean() > 0.65
    assert judge.lc_win_rate(y, d) == pytest.approx(1 / (1 + np.exp(-0.3)), abs=0.04)
    assert 0.99 < judge.lc_win_rate(np.ones(50), d[:50]) <= 1.0  # separable: the L2 keeps it finite
    assert judge.lc_win_rate(np.full(20, 0.5), np.zeros(20)) == pytest.approx(0.5)


SPEC = {"important": ["apple", "dog", "sun", "car"]}
PROMPT = "POST: apple red dog cat sun moon star sky TLDR:"


@pytest.mark.parametrize("response,gold", [
    ("apple dog sun", 1.0),
    ("apple dog dog red", 2 / 3 - 0.25 * 2),  # the repeat and the filler both cost
    ("car", -0.25),  # important, but not in this post
    ("", 0.0),
    ("sun sun sun", 1 / 3 - 0.5),
])
def test_gold_reward(response, gold):
    assert task.gold_reward(PROMPT, response, SPEC) == pytest.approx(gold)


def test_gold_judge_offline(tmp_path):
    spec = tmp_path / "gold.json"
    spec.write_text(json.dumps(SPEC))
    rows = [{"id": 0, "prompt": PROMPT, "sample": "apple dog sun", "reference": "apple dog"},  # better: win
            {"id": 1, "prompt": PROMPT, "sample": "sun apple", "reference": "dog sun"},  # tie
            {"id": 2, "prompt": PROMPT, "sample": "apple apple apple cat red", "reference": "apple"}]  # padding: loss
    samples = tmp_path / "samples-ckpt-4.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = judge.main([str(samples), "--judge", "gold", "--task", "tiny", "--gold-spec", str(spec)])
    judged = {r["id"]: r for r in rows_of(tmp_path / "judgments-ckpt-4.jsonl")}
    assert [judged[i]["win"] for i in range(3)] == [1.0, 0.5, 0.0]
    assert judged[2]["gold_sample"] == pytest.approx(1 / 3 - 1.0) and judged[2]["gold_reference"] == pytest.approx(1 / 3)
    assert s["win_rate"] == pytest.approx(0.5) and s["n"] == 3 and s["unparseable"] == 0 and s["tokens"] == 0


def test_bad_samples_file_names_the_line(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": 1, "prompt": "p", "sample": "s", "reference": "r"}\n{"id": 2, "prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2: missing field\(s\) sample, reference"):
        judge.main([str(samples), "--base-url", "http://127.0.0.1:9/v1"])


def test_default_judge_is_the_papers(serve, tmp_path):
    server = serve(ok("Preferred: A"))
    samples, _ = write_samples(tmp_path, 2)
    judge.main([str(samples), "--base-url", server.url])
    assert {b["model"] for b in server.bodies} == {"gpt-4-turbo-2024-04-09"}  # App. B


def test_request_json_fixes_a_server_that_rejects_max_tokens(serve, tmp_path, capsys):
    """A reasoning-model-like server: 400 on max_tokens (as OpenAI words it), and the advice works."""
    def script(n, body):
        if "max_tokens" in body:
            return 400, {}, json.dumps({"error": {"message": "Unsupported parameter: 'max_tokens' is not supported "
                                                  "with this model. Use 'max_completion_tokens' instead.",
                                       "type": "invalid_request_error", "param": "max_tokens",
                                       "code": "unsupported_parameter"}}), 0.0
        return 200, {}, "Comparison: x\nPreferred: A", 0.0
    server = serve(script)
    samples, _ = write_samples(tmp_path, 4)
    with pytest.raises(judge.Fatal, match=r"rejects the request parameter 'max_tokens': drop or rename it with "
                                          r"--request-json"):
        run(server, samples, "--concurrency", "1")
    assert len(server.bodies) == 1  # a 400 is not retried
    s = run(server, samples, "--request-json", '{"max_tokens": null, "max_completion_tokens": 64, "temperature": null,'
                                               ' "reasoning_effort": "low"}')
    assert s["n"] == 4 and s["unparseable"] == 0
    for body in server.bodies[1:]:
        assert "max_tokens" not in body and "temperature" not in body
        assert body["max_completion_tokens"] == 64 and body["reasoning_effort"] == "low" and body["model"] == "judge-model"


def test_prompt_file_and_verdict_label(serve, tmp_path):
    server = serve(ok("Reasoning: short.\nWinner: B"))
    samples, rows = write_samples(tmp_path, 6)
    template = tmp_path / "prompt.txt"
    template.write_text("Which {{summary}} is better?\nPOST: {prompt}\nFIRST: {a}\nSECOND: {b}\nEnd with 'Winner: A' or 'Winner: B'.")
    run(server, samples, "--prompt-file", str(template), "--verdict-label", "Winner")
    for body in server.bodies:
        content = body["messages"][0]["content"]
        assert content.startswith("Which {summary} is better?\nPOST: POST: post number") and "Preferred" not in content
        assert body["max_tokens"] == 256 and body["temperature"] == 0  # the defaults without --request-json
    for r in rows_of(tmp_path / "judgments-ckpt-100.jsonl"):
        assert r["verdict"] == "B" and r["win"] == (0.0 if r["policy_first"] else 1.0)


@pytest.mark.parametrize("text,extra,message", [
    ("{prompt} {a}", ["--verdict-label", "W"], r"needs the fields \{prompt\}, \{a\} and \{b\} and no others, has \{a\}, \{prompt\}"),
    ("{prompt} {a} {b} {c}", ["--verdict-label", "W"], r"and no others, has \{a\}, \{b\}, \{c\}, \{prompt\}"),
    ("{prompt} {a} {b} {", ["--verdict-label", "W"], "not a valid template"),
])
def test_bad_prompt_file(tmp_path, text, extra, message):
    samples, _ = write_samples(tmp_path, 2)
    (tmp_path / "p.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        judge.main([str(samples), "--prompt-file", str(tmp_path / "p.txt"), *extra])
    assert not (tmp_path / "judgments-ckpt-100.jsonl").exists()


def test_bad_request_json_and_missing_label(tmp_path, capsys):
    samples, _ = write_samples(tmp_path, 2)
    for bad, message in (("{oops", "argument --request-json: not JSON"), ("[1]", "must be a JSON object, got '[1]'")):
        with pytest.raises(SystemExit):  # argparse reports a bad value in one line
            judge.main([str(samples), "--request-json", bad])
        assert message in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("{prompt} {a} {b}")
    with pytest.raises(SystemExit):
        judge.main([str(samples), "--prompt-file", str(tmp_path / "p.txt")])
    assert "--prompt-file needs --verdict-label" in capsys.readouterr().err


def test_a_judgments_file_being_written_refuses_a_second_judge(tmp_path):
    from test_files import held_by_another_process
    samples, _ = write_samples(tmp_path, 2)
    out = tmp_path / "judgments-ckpt-100.jsonl"
    with held_by_another_process(f"{out}.lock"):
        r = subprocess.run([sys.executable, str(ROOT / "judge.py"), str(samples), "--judge", "gold", "--task", "tiny"],
                           capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {out} is being written by another process")
    assert not out.exists()
