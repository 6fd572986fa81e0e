"""What every data/<name>/prepare.py shares: fetching raw files, checked fields, JSONL output
(written inside files.atomic_dir), and the read/kept/dropped table.

Raw files keep their upstream relative path (`rel`) in three places: under the
base URL, under `$NANODAA_CACHE/raw/<name>/` and under `--raw-dir`, so the
cache directory of one machine is a valid `--raw-dir` on another.
"""
import argparse
import json
from pathlib import Path

import files
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


def read_jsonl(path):
    """(line number, object) of a raw .jsonl or .jsonl.gz download, with a progress line every 10 s."""
    return files.iter_jsonl(path, progress_every=10.0)


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


def print_table(stats, out_dir):
    """`stats`: output file -> Counter of 'read', 'kept', 'truncated' (kept, post shortened) and drop reasons."""
    print(f"{'file':<20} {'read':>9} {'kept':>9} {'truncated':>9} {'dropped':>9}  reasons")
    for name, c in stats.items():
        reasons = {k: v for k, v in c.items() if k not in ("read", "kept", "truncated")}
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "-"
        print(f"{name:<20} {c['read']:>9} {c['kept']:>9} {c['truncated']:>9} {sum(reasons.values()):>9}  {why}")
    print(f"wrote {out_dir}")

