"""What every data/<name>/prepare.py shares: fetching raw files, reading JSON
lines with file:line errors, writing the output directory atomically, and the
read/kept/dropped table.

Raw files keep their upstream relative path (`rel`) in three places: under the
base URL, under `$NANODAA_CACHE/raw/<name>/` and under `--raw-dir`, so the
cache directory of one machine is a valid `--raw-dir` on another.
"""
import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from download import DownloadError, cache_dir, download


class DataError(ValueError):
    """Bad input data; the message is one line, `path:line: what is wrong` where a line is known."""


def comma_list(allowed):
    """argparse type: a comma-separated list of names from `allowed`."""
    def parse(text):
        items = [s for s in text.split(",") if s]
        if not items or set(items) - set(allowed):
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated list from {', '.join(allowed)}")
        return items
    return parse


def fetch(name, base_url, rel, raw_dir=None):
    """Path of the raw file `rel`: from `raw_dir` if given, else downloaded (once) into the cache."""
    if raw_dir is not None:
        path = Path(raw_dir) / rel
        if not path.is_file():
            raise DataError(f"{path} does not exist (--raw-dir must hold the upstream files at their relative paths: {rel})")
        return path
    url = f"{base_url.rstrip('/')}/{rel}"
    dest = cache_dir() / "raw" / name / rel
    try:
        return download(url, dest)
    except DownloadError as e:
        raise DownloadError(f"{e}, or put it at DIR/{rel} and pass --raw-dir DIR") from None


def read_jsonl(path, every=10.0):
    """Yield (line number, object) for each non-blank line of a .jsonl or .jsonl.gz file.

    Prints a progress line every `every` seconds (the rate includes the caller's work per line)."""
    path = Path(path)
    size = path.stat().st_size
    start = last = time.time()
    n = 0
    try:
        with open(path, "rb") as raw, (gzip.open(raw) if path.suffix == ".gz" else raw) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{n}: not valid UTF-8") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                yield n, obj
                if time.time() - last > every:
                    last, done = time.time(), raw.tell() / max(size, 1)
                    eta = (last - start) * (1 - done) / max(done, 1e-9)
                    rate = n / (last - start)
                    print(f"{path.name}: {n:,} lines, {done:.0%}, {rate:,.0f} lines/s, ETA {eta:.0f}s", flush=True)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e}); "
                        "if it is a partial download, delete it and run again") from None
    secs = time.time() - start
    print(f"{path.name}: {n:,} lines in {secs:.1f}s", flush=True)


def field(obj, key, where, kind=str):
    """obj[key], checked to be a `kind`; `where` is "path:line" (nested keys: "info.post")."""
    value = obj
    for k in key.split("."):
        if not isinstance(value, dict) or k not in value:
            raise DataError(f"{where}: missing field '{key}'")
        value = value[k]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field '{key}' should be {kind.__name__}, got {type(value).__name__}")
    return value


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(out_dir):
    """Yield a temporary directory beside `out_dir`; it becomes `out_dir` only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp)
        raise
    if out_dir.exists():  # a directory cannot be os.replace'd onto a non-empty one: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def print_table(stats, out_dir):
    """`stats`: output file -> Counter of 'read', 'kept', 'truncated' (kept, post shortened) and drop reasons."""
    print(f"{'file':<20} {'read':>9} {'kept':>9} {'truncated':>9} {'dropped':>9}  reasons")
    for name, c in stats.items():
        reasons = {k: v for k, v in c.items() if k not in ("read", "kept", "truncated")}
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "-"
        print(f"{name:<20} {c['read']:>9} {c['kept']:>9} {c['truncated']:>9} {sum(reasons.values()):>9}  {why}")
    print(f"wrote {out_dir}")

