"""bench/gpu.py's pieces a CPU can check: the resume check's kill reaches a worker in its own
session (torchrun's workers are), and the FLOP count's padding share."""
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import daa  # noqa: E402
from bench import gpu  # noqa: E402
from model import PYTHIA  # noqa: E402

# A launcher whose worker runs in a session of its own, as a torchrun worker may: killing the
# launcher's process group would leave the worker running.
LAUNCHER = """
import subprocess, sys, time
w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(w.pid))
time.sleep(600)
"""


def test_kill_reaches_a_worker_in_its_own_session(tmp_path):
    pid_file = tmp_path / "worker.pid"
    p = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(pid_file)], start_new_session=True)
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert worker in gpu.descendants(p.pid) and not gpu.gone(worker)
    assert gpu.kill_tree(p, timeout=10)
    assert gpu.gone(worker) and p.poll() is not None


def test_step_flops_count_real_tokens_and_the_padding():
    tok, _, examples = gpu.data()
    cfg = PYTHIA["pythia-1b"]
    for shared in (True, False):
        batch = daa.pair_batch(examples, list(range(8)), "train", tok.eos_id, "cpu", shared)
        model, hardware, padding = gpu.step_flops(cfg, batch, checkpointing=False)
        B, T = batch["input_ids"].shape
        assert padding == 1 - int(batch["tokens"]) / (B * T) and 0 < padding < 1
        assert model < hardware  # the padded slots cost hardware FLOPs, not model FLOPs
        assert gpu.step_flops(cfg, batch, checkpointing=True)[1] == hardware * 5 / 4  # the recomputed forward
