"""File plumbing, torch-free: atomic writes, JSONL reading, and the one-writer OS lock.

Every file nanoDAA writes goes through `atomic_file` (or `write_text` / `write_json` /
`write_bytes` on top of it): the content goes to a fresh temporary file in the same
directory, which then replaces the target with one rename. A reader sees the old file or
the new one, never half of either, and two processes writing one path cannot interleave:
each has its own temporary name. A directory (a checkpoint, a prepared dataset) is built
the same way by `atomic_dir`.

The lock keeps one writer per run directory or output file (sft.py, daa.py, rm.py,
sample.py, judge.py): `hold` refuses at once when another process holds it, `locked` waits
its turn (concurrent downloads of one file). It is an OS lock (fcntl.flock), so the OS
drops it when its process dies: a killed run leaves no stale lock.
"""
import atexit
import fcntl
import gzip
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


# ---------------------------------------------------------------- atomic writes

def _fresh_mode(path):
    """The permissions a newly created file would get (mkstemp/mkdtemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fresh_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data):
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text):
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite(obj):
    """`obj` with every NaN or infinity replaced by None: strict JSON has no NaN (jq and
    JavaScript reject it), so an undefined statistic is written as null."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj, indent=2):
    """`obj` as strict JSON (NaN and infinities as null), atomically."""
    write_text(path, json.dumps(finite(obj), indent=indent, allow_nan=False) + "\n")


def save_figure(fig, path):
    """A matplotlib figure as a PNG, atomically (any object with savefig(file, format=...))."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")


@contextmanager
def atomic_dir(path):
    """Yield a temporary directory beside `path`; it becomes `path` only if the block succeeds.
    An existing `path` is moved aside first (a directory cannot be renamed onto a non-empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    _fresh_mode(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------- reading

def iter_jsonl(path, progress_every=None):
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file; a line that is
    not a JSON object is a ValueError naming `path:line`. With `progress_every` (seconds), prints a
    progress line with rate and ETA that often (large raw downloads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size, start, last = path.stat().st_size, time.time(), time.time()
    try:
        with open(path, "rb") as raw, (gzip.open(raw) if path.suffix == ".gz" else raw) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{n}: not valid UTF-8") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                yield n, obj
                if progress_every and time.time() - last > progress_every:
                    last, done = time.time(), raw.tell() / max(size, 1)
                    print(f"{path.name}: {n:,} lines, {done:.0%}, {n / (last - start):,.0f} lines/s, "
                          f"ETA {(last - start) * (1 - done) / max(done, 1e-9):.0f}s", flush=True)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e}); if it is a partial download, "
                         "delete it and run again") from None


def read_jsonl(path, keys=(), limit=None):
    """The first `limit` objects of a JSONL file, each checked to hold `keys` (`path:line` errors)."""
    rows = []
    for n, row in iter_jsonl(path) if limit != 0 else ():
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        rows.append(row)
        if len(rows) == limit:
            break
    return rows


# ---------------------------------------------------------------- the one-writer lock

class Busy(ValueError):
    """Another process holds the lock on an output; the message is one line meant for the user."""


_held = {}  # path -> fd: the locks this process holds (hold / release)


def _lock(path, wait):
    """An fd of `path` (a directory, or a lock file, created if missing) under an exclusive flock;
    None when another process holds it and not `wait`."""
    while True:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the lock file while we waited: lock the new one


def _unlock(path, fd):
    if not path.is_dir():
        path.unlink(missing_ok=True)  # while still held: a process waiting on it sees it gone and retries
    os.close(fd)


@contextmanager
def locked(path):
    """Wait for, then hold, an exclusive lock on the lock file `path` while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, wait=True)
    try:
        yield
    finally:
        _unlock(path, fd)


def hold(path, what):
    """Lock `path` (a run directory, or an output's lock file) until release(path) or exit; refuse at
    once, with one line naming `what`, when another process holds it. Re-entrant within a process."""
    path = Path(path).resolve()
    if path in _held:
        return
    fd = _lock(path, wait=False)
    if fd is None:
        raise Busy(f"{what} is being written by another process (it holds the lock on {path}): let it finish, "
                   "or choose another output")
    if not _held:
        atexit.register(lambda: [release(p) for p in list(_held)])
    _held[path] = fd


def release(path):
    path = Path(path).resolve()
    if path in _held:
        _unlock(path, _held.pop(path))
