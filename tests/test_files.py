"""files.py: atomic writes (two writers cannot interleave, a failed write leaves the old file), strict
JSON, JSONL reading with path:line errors, and the one-writer OS lock."""
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import files


def test_atomic_file_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    files.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    files.write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's private 0600


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_two_writers_of_one_path_never_interleave(tmp_path):
    path = tmp_path / "shared.json"
    texts = {k: json.dumps({"writer": k, "payload": "x" * 200_000}) for k in range(4)}

    def write(k):
        for _ in range(20):
            files.write_text(path, texts[k])
    threads = [threading.Thread(target=write, args=(k,)) for k in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_text() in texts.values()  # one whole write, never a mix or a truncation
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_write_json_is_strict_with_null_for_nan(tmp_path):
    files.write_json(tmp_path / "s.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}


def test_atomic_dir_replaces_a_directory_whole(tmp_path):
    out = tmp_path / "data"
    with files.atomic_dir(out) as tmp:
        (tmp / "a.jsonl").write_text("1\n")
    with pytest.raises(ValueError):
        with files.atomic_dir(out) as tmp:
            (tmp / "b.jsonl").write_text("2\n")
            raise ValueError("bad input")
    assert sorted(p.name for p in out.iterdir()) == ["a.jsonl"]
    with files.atomic_dir(out) as tmp:
        (tmp / "c.jsonl").write_text("3\n")
    assert sorted(p.name for p in out.iterdir()) == ["c.jsonl"] and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2, "win": 1}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: missing field\(s\) win"):
        files.read_jsonl(p, ("id", "win"))
    assert files.read_jsonl(p, ("id",), limit=1) == [{"id": 1}]
    p.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: expected a JSON object"):
        files.read_jsonl(p)
    p.write_text('{"id": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:3: not valid JSON"):
        files.read_jsonl(p)
    with pytest.raises(FileNotFoundError, match="nothing.jsonl does not exist"):
        files.read_jsonl(tmp_path / "nothing.jsonl")


@contextlib.contextmanager
def held_by_another_process(path):
    """While the block runs, a child process holds files.hold's lock on `path`."""
    code = "import files, sys, time; files.hold(sys.argv[1], 'x'); print('held', flush=True); time.sleep(300)"
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(Path(files.__file__).parent)))
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.kill()
        child.wait()


def test_hold_refuses_another_process_is_reentrant_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with held_by_another_process(run):
        with pytest.raises(files.Busy, match=r"^my run is being written by another process \(it holds the lock"):
            files.hold(run, "my run")
    files.hold(run, "my run")  # the killed holder left no stale lock
    files.hold(run, "my run")  # re-entrant in one process
    files.release(run)
    lock = tmp_path / "out.jsonl.lock"
    files.hold(lock, "out.jsonl")
    assert lock.exists()
    files.release(lock)
    assert not lock.exists() and run.is_dir()  # a lock file goes with its release; a directory stays


def test_files_is_torch_free():
    code = "import sys, files; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(files.__file__).parent)
