"""download.py and GPTNeoX.from_pretrained's hub path against a fake hub on 127.0.0.1."""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save_file

import download
from model import Config, GPTNeoX

SLEEP = time.sleep  # the real one: the hub fixture turns time.sleep off (no backoff waits in tests)
# Weights of about 2.2 MB: more than one of download.py's 1 MiB read blocks lies before the drop point.
TINY = Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


class FakeHub(BaseHTTPRequestHandler):
    """Serves `files` ({url path: bytes}) the way the hub does: HEAD reports size and, for
    weights (LFS files), sha256; GET honours Range. A path in `drop` loses its connection
    halfway through the body, once. `delay` seconds pass before each 64 KiB of a body (a slow link)."""
    files, drop, log, lie_sha, honour_range, delay = {}, set(), [], False, True, 0.0

    def do_HEAD(self):
        self.log.append(("HEAD", self.path, None, self.headers.get("Authorization")))
        body = self.files.get(self.path)
        if body is None:
            return self._status(404)
        lfs = self.path.endswith(".safetensors")
        self.send_response(302 if lfs else 200)
        if lfs:  # the hub redirects LFS files to a CDN and reports them in X-Linked-* headers
            sha = hashlib.sha256(b"other" if self.lie_sha else body).hexdigest()
            self.send_header("X-Linked-Size", str(len(body)))
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("Location", self.path)
        self.send_header("Content-Length", "0" if lfs else str(len(body)))
        self.end_headers()

    def do_GET(self):
        rng = self.headers.get("Range")
        self.log.append(("GET", self.path, rng, self.headers.get("Authorization")))
        body = self.files.get(self.path)
        if body is None:
            return self._status(404)
        start = int(rng.removeprefix("bytes=").removesuffix("-")) if rng and self.honour_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body)
        if self.path in self.drop:
            self.drop.discard(self.path)
            end = len(body) // 2  # then the connection closes early
        try:
            for i in range(start, end, 1 << 16):
                SLEEP(self.delay)
                self.wfile.write(body[i:min(i + (1 << 16), end)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed

    def _status(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh fake hub and empty cache; the hub's weights are those of `model`."""
    FakeHub.files, FakeHub.drop, FakeHub.log, FakeHub.lie_sha, FakeHub.honour_range = {}, set(), [], False, True
    FakeHub.delay = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("NANODAA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NANODAA_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(download.time, "sleep", lambda s: None)  # no backoff waits in tests
    torch.manual_seed(0)
    model = GPTNeoX(TINY).eval()
    model.save_pretrained(tmp_path / "src")
    yield FakeHub, model, tmp_path
    server.shutdown()
    server.server_close()


def serve(hub_cls, src, repo="EleutherAI/pythia-tiny", revision="main", names=("config.json", "model.safetensors")):
    for name in names:
        hub_cls.files[f"/{repo}/resolve/{revision}/{name}"] = (src / name).read_bytes()


@pytest.mark.parametrize("honour_range", [True, False])
def test_dropped_connection_resumes_to_identical_file(hub, monkeypatch, honour_range):
    fake, model, tmp = hub
    fake.honour_range = honour_range  # a server that ignores Range sends the whole file again
    serve(fake, tmp / "src")
    weights = "/EleutherAI/pythia-tiny/resolve/main/model.safetensors"
    fake.drop.add(weights)
    monkeypatch.setenv("HF_TOKEN", "secret")
    loaded = GPTNeoX.from_pretrained("pythia-tiny")
    cached = tmp / "cache" / "hub" / "EleutherAI" / "pythia-tiny" / "main"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]  # no .part left
    assert (cached / "model.safetensors").read_bytes() == (tmp / "src" / "model.safetensors").read_bytes()
    gets = [rng for method, path, rng, _ in fake.log if method == "GET" and path == weights]
    assert len(gets) == 2 and gets[0] is None
    resumed_at = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(fake.files[weights]) // 2  # the retry asked only for bytes it lacked
    assert all(auth == "Bearer secret" for *_, auth in fake.log)
    ids = torch.randint(0, 4096, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    fake.log.clear()
    GPTNeoX.from_pretrained("pythia-tiny")  # cached: nothing is fetched again
    assert fake.log == []


def test_sharded_checkpoint_on_the_hub(hub):
    fake, model, tmp = hub
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, tmp / "src" / fname)
    (tmp / "src" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    serve(fake, tmp / "src", repo="someone/neox", revision="step1000",
          names=["config.json", "model.safetensors.index.json", *shards])
    loaded = GPTNeoX.from_pretrained("someone/neox", revision="step1000")
    assert ("GET", "/someone/neox/resolve/step1000/model.safetensors", None, None) not in fake.log  # HEAD said 404
    ids = torch.randint(0, 4096, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert (tmp / "cache" / "hub" / "someone" / "neox" / "step1000" / "model-00002-of-00002.safetensors").exists()


def test_sha256_mismatch_keeps_nothing(hub):
    fake, _, tmp = hub
    serve(fake, tmp / "src")
    fake.lie_sha = True
    with pytest.raises(download.DownloadError, match="sha256 mismatch"):
        GPTNeoX.from_pretrained("pythia-tiny")
    cached = tmp / "cache" / "hub" / "EleutherAI" / "pythia-tiny" / "main"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json"]


def test_offline_names_the_file_and_where_to_put_it(hub, monkeypatch):
    fake, _, tmp = hub
    serve(fake, tmp / "src")
    monkeypatch.setenv("NANODAA_OFFLINE", "1")
    with pytest.raises(download.DownloadError) as e:
        GPTNeoX.from_pretrained("pythia-tiny")
    msg = str(e.value)
    dest = tmp / "cache" / "hub" / "EleutherAI" / "pythia-tiny" / "main" / "config.json"
    assert "\n" not in msg and "config.json" in msg and str(dest) in msg
    assert fake.log == []  # offline means no request at all


def test_no_network_names_the_file_and_where_to_put_it(hub, monkeypatch):
    _, _, tmp = hub
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(download.DownloadError) as e:
        GPTNeoX.from_pretrained("pythia-tiny")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp / "cache" / "hub" / "EleutherAI" / "pythia-tiny" / "main" / "config.json") in msg


def test_missing_local_dir_is_not_sent_to_the_hub(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        GPTNeoX.from_pretrained(str(tmp_path / "no" / "such" / "ckpt"))
    assert hub[0].log == []


def in_subprocess(code):
    env = dict(os.environ, PYTHONPATH=str(Path(download.__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_concurrent_fetches_of_one_file_all_end_with_the_verified_file(hub):
    """Issue 17.1: four processes (torchrun ranks, or jobs sharing a cache) fetch one file at once from a
    slow server that drops the connection once: one downloads under the lock, the others wait, and every
    process ends holding the verified file."""
    fake, _, tmp = hub
    serve(fake, tmp / "src")
    weights = "/EleutherAI/pythia-tiny/resolve/main/model.safetensors"
    fake.drop.add(weights)
    fake.delay = 0.02  # about 0.7 s per pass over the 2.2 MB file: the four processes overlap
    procs = [in_subprocess("import download; p = download.hub_file('EleutherAI/pythia-tiny', 'model.safetensors'); "
                           "print(download.sha256_of(p))") for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    expected = hashlib.sha256(fake.files[weights]).hexdigest()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.strip() == expected
    gets = [rng for method, path, rng, _ in fake.log if method == "GET" and path == weights]
    assert len(gets) == 2 and gets[0] is None and gets[1].startswith("bytes=")  # one downloader, resumed once
    cached = tmp / "cache" / "hub" / "EleutherAI" / "pythia-tiny" / "main"
    assert sorted(p.name for p in cached.iterdir()) == ["model.safetensors"]  # no .part, no .lock left


def test_a_killed_downloader_leaves_no_stale_lock(hub):
    """The lock is the OS's: a SIGKILLed holder frees it, and the next process resumes its .part."""
    fake, _, tmp = hub
    serve(fake, tmp / "src")
    weights = "/EleutherAI/pythia-tiny/resolve/main/model.safetensors"
    fake.delay = 0.1
    proc = in_subprocess("import download; download.hub_file('EleutherAI/pythia-tiny', 'model.safetensors')")
    cached = tmp / "cache" / "hub" / "EleutherAI" / "pythia-tiny" / "main"
    part = cached / "model.safetensors.part"
    deadline = time.time() + 30
    while not (part.exists() and part.stat().st_size > 0) and time.time() < deadline:
        SLEEP(0.01)
    proc.kill()
    proc.communicate()
    assert part.stat().st_size < len(fake.files[weights]) and (cached / "model.safetensors.lock").exists()
    fake.delay = 0.0
    path = download.hub_file("EleutherAI/pythia-tiny", "model.safetensors")  # would wait forever on a stale lock
    assert path.read_bytes() == fake.files[weights]
    gets = [rng for method, p, rng, _ in fake.log if method == "GET" and p == weights]
    assert len(gets) == 2 and gets[-1].startswith("bytes=")  # resumed from the killed one's .part


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_give_one_line_naming_the_file(tmp_path, damage):
    GPTNeoX(TINY).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x08" + data[1:200])
    with pytest.raises(ValueError, match=rf"^{weights} is not a readable safetensors file \(.*\): it is corrupt or "
                                         r"truncated; delete it") as e:
        GPTNeoX.from_pretrained(tmp_path / "ckpt")
    assert "\n" not in str(e.value)
    if damage == "truncate":  # and through a CLI: the one line, a non-zero exit
        root = Path(download.__file__).parent
        (tmp_path / "p.jsonl").write_text('{"id": "1", "prompt": "a", "reference": "b"}\n')
        r = subprocess.run([sys.executable, str(root / "sample.py"), "--ckpt", str(tmp_path / "ckpt"), "--ref",
                            str(tmp_path / "ckpt"), "--tokenizer", str(root / "tests/fixtures/gpt-neox-20b-tokenizer.json"),
                            "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s.jsonl")],
                           capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.splitlines() == [f"error: {e.value}"]
