"""Downloads into the nanoDAA cache: weights, tokenizers and datasets share this code.

One function does the work: stream to `<dest>.part`, resume it with an HTTP
Range request after a dropped connection, retry with exponential backoff,
verify size and sha256 when known, then rename atomically. A finished file in
the cache is never fetched again. With no network (or NANODAA_OFFLINE=1) the
error names the file and the place to put it by hand. Processes fetching one
file at once (torchrun ranks, two jobs sharing a cache) take turns under
files.locked: one downloads, the others wait and then find the verified file.
"""
import hashlib
import os
import time
from pathlib import Path

import requests

from files import locked

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched; the message is one line meant for the user."""


class NotFound(DownloadError):
    """The server answered 404: the file does not exist there (not a network failure)."""


def cache_dir():
    return Path(os.environ.get("NANODAA_CACHE", Path.home() / ".cache" / "nanodaa"))


def offline():
    return os.environ.get("NANODAA_OFFLINE", "") not in ("", "0")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, size=None, sha256=None, headers=None, retries=5, timeout=30, backoff=1.0):
    """Fetch `url` to `dest` unless it is already there; returns `dest` as a Path."""
    dest = Path(dest)
    if dest.exists():
        return dest
    if offline():
        raise DownloadError(f"{dest.name} is not cached and NANODAA_OFFLINE is set: download {url} to {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.with_name(dest.name + ".lock")):  # one downloader per file; the others wait here
        if not dest.exists():  # else another process fetched and verified it while we waited
            _fetch(url, dest, size, sha256, headers, retries, timeout, backoff)
    if size is not None and dest.stat().st_size != size:
        raise DownloadError(f"{dest} has {dest.stat().st_size} bytes, expected {size}: delete it and run again")
    return dest


def _fetch(url, dest, size, sha256, headers, retries, timeout, backoff):
    """Download `url` to `dest` through `<dest>.part` (resumed if present), verified, renamed into place."""
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _stream(url, part, headers or {}, timeout)
            break
        except NotFound:
            raise
        except (requests.RequestException, DownloadError) as e:
            if attempt == retries:
                raise DownloadError(f"cannot download {url} ({type(e).__name__}: {e}); "
                                    f"download it by hand to {dest}") from None
            time.sleep(backoff * 2 ** attempt)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; run again to re-download")
    if sha256 is not None and sha256_of(part) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 mismatch; run again to re-download")
    os.replace(part, dest)


def _stream(url, part, headers, timeout):
    """Append the rest of `url` to `part`, asking only for the bytes it lacks."""
    have = part.stat().st_size if part.exists() else 0
    req_headers = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
    with requests.get(url, headers=req_headers, stream=True, timeout=timeout) as r:
        if r.status_code == 404:
            raise NotFound(f"{url} does not exist (HTTP 404)")
        if r.status_code == 416:  # we already hold every byte
            return
        if r.status_code in (401, 403):
            raise NotFound(f"{url}: HTTP {r.status_code} (gated or private? set HF_TOKEN)")
        r.raise_for_status()
        mode = "ab" if have and r.status_code == 206 else "wb"  # 200: server ignored Range, start over
        expected = r.headers.get("Content-Length")
        got = 0
        with open(part, mode) as f:
            for block in r.iter_content(CHUNK):
                f.write(block)
                got += len(block)
        if expected is not None and got < int(expected):
            raise DownloadError(f"connection dropped after {got} of {expected} bytes")


def hub_file(repo, filename, revision="main"):
    """A file of a Hugging Face repo, cached at $NANODAA_CACHE/hub/<repo>/<revision>/<filename>.

    The hub reports an LFS file's size and sha256 on the redirect it answers a
    HEAD with (X-Linked-Size, X-Linked-Etag); small files get only a size.
    """
    dest = cache_dir() / "hub" / repo / revision / filename
    if dest.exists() or offline():
        return download(None if dest.exists() else _hub_url(repo, filename, revision), dest)
    url = _hub_url(repo, filename, revision)
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    size = sha256 = None
    try:
        head = requests.head(url, headers=headers, allow_redirects=False, timeout=30)
        if head.status_code == 404:
            raise NotFound(f"{url} does not exist (HTTP 404)")
        size = head.headers.get("X-Linked-Size") or (head.headers.get("Content-Length") if head.status_code == 200 else None)
        etag = head.headers.get("X-Linked-Etag", "").strip('"').removeprefix("W/").strip('"')
        sha256 = etag if len(etag) == 64 else None
    except requests.RequestException:
        pass  # the GET below retries and reports
    return download(url, dest, size=int(size) if size else None, sha256=sha256, headers=headers)


def _hub_url(repo, filename, revision):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")  # tests point this at 127.0.0.1
    return f"{endpoint}/{repo}/resolve/{revision}/{filename}"
