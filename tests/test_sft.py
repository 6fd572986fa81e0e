"""sft.py: the loss against a full-softmax oracle, a run from random init, transformers loads its checkpoints."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_training import ROOT, RUN, TINY, weights, write_inputs

import daa  # noqa: E402  (test_training put the repository root on sys.path)
import sft  # noqa: E402
import training  # noqa: E402
from model import GPTNeoX  # noqa: E402


def test_loss_is_summed_response_nll_averaged_over_sequences():
    torch.manual_seed(0)
    model = GPTNeoX(TINY)
    batch = training.collate([(np.array([5, 6]), np.array([7, 8, 9])), (np.array([11]), np.array([12, 13]))], 0)
    loss, stats = sft.sft_loss(model, batch)
    logp = F.log_softmax(model(batch["input_ids"]), dim=-1)  # the naive way, full logits
    nll = [-sum(logp[b, t - 1, batch["input_ids"][b, t]] for t in ts) for b, ts in [(0, [2, 3, 4]), (1, [1, 2])]]
    assert stats["loss"].tolist() == pytest.approx([x.item() for x in nll], rel=1e-5)
    assert loss.item() == pytest.approx((nll[0] + nll[1]).item() / 2, rel=1e-5)
    assert stats["response_tokens"].tolist() == [3, 2]


def test_random_init_run_learns_and_transformers_loads_its_checkpoints(tmp_path, monkeypatch):
    model_dir, data = write_inputs(tmp_path, weights=False)  # config.json + tokenizer.json only
    assert training.load_model(model_dir, seed=7, device="cpu").state_dict().keys() == GPTNeoX(TINY).state_dict().keys()
    torch.manual_seed(7)
    init = GPTNeoX(TINY).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in training.load_model(model_dir, 7, "cpu").state_dict().items())

    out = tmp_path / "sft"
    encoded, real_encode = [], training.encode
    monkeypatch.setattr(training, "encode", lambda *a: encoded.append(1) or real_encode(*a))
    sft.main(["--model", str(model_dir), "--data", str(data), "--out", str(out), *RUN, "--max-examples", "8",
              "--epochs", "3", "--checkpoints", "2", "--optimizer", "adamw", "--seed", "7"])
    assert len(encoded) == 8 + 8  # 8 training and 8 validation examples, tokenised once, not once per epoch
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(logged) == 6 and logged[-1]["loss"] < logged[0]["loss"] - 1  # third pass over the same 8 examples
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "ckpt-12", "ckpt-24", "latest", "metrics.jsonl"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"):
        assert (out / "latest" / f).is_file(), f

    # held-out NLL per token at the last checkpoint, against full log-softmax over sft_valid.jsonl's 8 rows
    ev = json.loads((out / "latest" / "eval.json").read_text())
    tok, model = sft.load_tokenizer(str(out / "latest")), training.load_model(out, seed=0, device="cpu").eval()
    nll, tokens = 0.0, 0
    for line in (data / "sft_valid.jsonl").read_text().splitlines():
        row = json.loads(line)
        (ids, labels), = training.encode(tok, row["prompt"], [row["response"]], 40)  # RUN's --max-length
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
        scored = [t for t in range(1, len(ids)) if labels[t] != -100]
        nll -= sum(logp[t - 1, ids[t]].item() for t in scored)
        tokens += len(scored)
    assert ev["eval/examples"] == 8 and ev["eval/nll_per_token"] == pytest.approx(nll / tokens, rel=1e-4)
    assert ev["eval/nll"] == pytest.approx(nll / 8, rel=1e-4)

    from transformers import GPTNeoXForCausalLM
    hf = GPTNeoXForCausalLM.from_pretrained(out / "latest").eval()
    ours = training.load_model(out, seed=0, device="cpu").eval()  # a run directory stands for its `latest`
    assert max(v.abs().max().item() for v in weights(out).values()) > 0
    ids = torch.tensor([[5, 17, 300, 2000, 9]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)


def test_every_flag_is_explained():
    for parser in (sft.get_parser(), daa.get_parser()):
        for action in parser._actions:
            assert action.help, action.option_strings
    assert "random init" in sft.get_parser().format_help()


def test_bad_flags_exit_with_one_line_and_write_nothing(tmp_path):
    model_dir, data = write_inputs(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(model_dir), "--data", str(data),
                        "--out", str(tmp_path / "out"), "--batch-size", "3", "--micro-batch-size", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr.strip().splitlines() == \
        ["error: --batch-size 3 must be a multiple of --micro-batch-size 2 × 1 processes"]


def test_a_run_directory_being_written_refuses_a_second_sft_with_one_line(tmp_path):
    from test_files import held_by_another_process
    model_dir, data = write_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with held_by_another_process(out):
        r = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(model_dir), "--data", str(data),
                            "--out", str(out), *RUN, "--max-examples", "8"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and list(out.iterdir()) == []
    assert r.stderr.strip().splitlines() == [f"error: run directory {out} is being written by another process (it "
                                             f"holds the lock on {out.resolve()}): let it finish, or choose another output"]


def test_activation_checkpointing_trains_the_same_model_and_may_change_on_resume(tmp_path):
    model_dir, data = write_inputs(tmp_path)
    common = ["--model", str(model_dir), "--data", str(data), *RUN, "--max-examples", "8", "--checkpoints", "2"]
    sft.main([*common, "--out", str(tmp_path / "plain")])
    sft.main([*common, "--out", str(tmp_path / "checkpointed"), "--activation-checkpointing"])
    plain, checkpointed = weights(tmp_path / "plain"), weights(tmp_path / "checkpointed")
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-6
    init = GPTNeoX.from_pretrained(model_dir).state_dict()
    assert max((plain[k] - init[k]).abs().max().item() for k in plain) > 1e-4  # it did train
    # the same run, resumed without it: accepted (it changes memory, not the math); finished, nothing to do
    sft.main([*common, "--out", str(tmp_path / "checkpointed")])
