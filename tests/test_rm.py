"""rm.py: rewards read at the last response token in both pair layouts, Eq. 2 by hand, the labeller's
ceiling, checkpoints that stay plain GPT-NeoX, 2 gloo ranks against one process, and an exact resume."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_daa import PAIRS
from test_training import ROOT, RUN, max_diff, torchrun, weights, write_inputs

import daa  # noqa: E402  (test_training put the repository root on sys.path)
import rm  # noqa: E402
import sft  # noqa: E402
import training  # noqa: E402
from model import Config, GPTNeoX  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ROOT / "tests" / "fixtures" / "gpt-neox-20b-tokenizer.json")


def small_rm(seed=0):
    torch.manual_seed(seed)
    model = GPTNeoX(Config(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64))
    return rm.add_head(model, seed).double().eval()


@pytest.mark.parametrize("max_length", [1024, 24])  # no truncation; prompts and responses cut
@pytest.mark.parametrize("shared", [True, False])
def test_pair_rewards_equal_score_and_a_by_hand_forward_in_float64(tok, shared, max_length):
    """r of each response of a daa.pair_batch (prefix-shared or two rows) is what rm.score gives the same
    (prompt, response), and what the head reads off one unpadded forward at the response's last token."""
    model = small_rm()
    batch = daa.pair_batch(training.tokenize(tok, PAIRS, ("chosen", "rejected"), max_length), list(range(len(PAIRS))),
                           "rm", tok.eos_id, "cpu", prefix_sharing=shared)
    with torch.no_grad():
        chosen, rejected = rm.pair_rewards(model, batch)
    if max_length > 100:  # untruncated; else a pair's two responses share one prompt cut, and score cuts each alone
        prompts = [p["prompt"] for p in PAIRS]
        scored = rm.score(model, tok, prompts * 2, [p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS],
                          max_length, batch_size=3)
        torch.testing.assert_close(torch.cat([chosen, rejected]).double(), scored.double(), atol=1e-6, rtol=0)
    for k, pair in enumerate(PAIRS):  # by hand: the row alone, its last token
        for key, got in (("chosen", chosen[k]), ("rejected", rejected[k])):
            ids = training.encode(tok, pair["prompt"], [pair["chosen"], pair["rejected"]], max_length)[key == "rejected"][0]
            with torch.no_grad():
                h = model(torch.tensor([ids]), return_hidden=True)[0, -1]
                want = model.reward_head(h).item()
            assert got.item() == pytest.approx(want, abs=1e-10)
    assert (chosen - rejected).abs().min() > 1e-3  # a random head tells the responses apart: the check has teeth


def test_bradley_terry_loss_and_statistics_by_hand(monkeypatch):
    monkeypatch.setattr(rm, "pair_rewards", lambda model, batch: (torch.tensor([2.0, 0.0, 1.0]),
                                                                 torch.tensor([1.0, 0.5, 1.0])))
    loss, stats = rm.bt_loss(None, None)
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5)), math.log(2)]  # −log σ(r_w − r_l), Eq. 2
    assert stats["loss"].tolist() == pytest.approx(expected)
    assert loss.item() == pytest.approx(sum(expected) / 3)
    assert stats["accuracy"].tolist() == [1.0, 0.0, 0.5]  # a tie is half right
    assert stats["margin"].tolist() == [1.0, -0.5, 0.0]


def test_labeller_ceiling_by_hand():
    spec = {"important": ["rent", "job", "exam"], "gold_scale": 3.0, "length_bias": 0.5}
    prompt = "POST: rent really job just exam TLDR:"
    # proxy = 1.5·hits − 0.25·others (aligned labeller): " rent job" 3.0, " rent" 1.5, " really" −0.25
    pairs = [{"prompt": prompt, "chosen": " rent job", "rejected": " rent"},   # p = σ(1.5)
             {"prompt": prompt, "chosen": " really", "rejected": " rent"}]     # p = σ(−1.75): the labeller erred
    sig = lambda x: 1 / (1 + math.exp(-x))
    c = rm.labeller_ceiling(pairs, spec)
    assert c["eval/ceiling_accuracy"] == pytest.approx((sig(1.5) + sig(1.75)) / 2)
    assert c["eval/labeller_accuracy"] == 0.5
    assert c["eval/labeller_loss"] == pytest.approx(-(math.log(sig(1.5)) + math.log(sig(-1.75))) / 2)


# ---------------------------------------------------------------- the training script

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An SFT run (2 steps) whose `latest` is --init, and a reference reward-model run (3 steps, 3 checkpoints)."""
    tmp = tmp_path_factory.mktemp("rm")
    model_dir, data = write_inputs(tmp)
    sft.main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp / "sft"), *RUN, "--max-examples", "8"])
    args = ["--init", str(tmp / "sft" / "latest"), "--data", str(data), *RUN, "--max-examples", "12",
            "--checkpoints", "3", "--eval-examples", "4", "--seed", "3"]
    rm.main([*args, "--out", str(tmp / "reference")])
    return tmp, args


def test_checkpoints_are_plain_gpt_neox_and_the_head_has_its_own_file(inputs):
    tmp, _ = inputs
    run, init = tmp / "reference", load_file(tmp / "sft" / "latest" / "model.safetensors")
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "ckpt-12", "ckpt-4", "ckpt-8", "latest", "metrics.jsonl"]
    trained = weights(run)
    assert trained.keys() == init.keys()  # the GPT-NeoX layout, nothing more
    assert torch.equal(trained["embed_out.weight"], init["embed_out.weight"])  # never read, so frozen
    assert max_diff({k: v for k, v in trained.items() if k != "embed_out.weight"}, init) > 1e-4  # the rest trained
    head = load_file(run / "latest" / "head.safetensors")
    assert {k: tuple(v.shape) for k, v in head.items()} == {"reward_head.weight": (1, 32), "reward_head.bias": (1,)}
    fresh = rm.add_head(GPTNeoX(Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64)), seed=3).reward_head.weight
    assert fresh.std().item() == pytest.approx(1 / math.sqrt(33), rel=0.5) and not torch.equal(fresh, head["reward_head.weight"])
    from transformers import GPTNeoXForCausalLM
    GPTNeoXForCausalLM.from_pretrained(run / "latest")  # loads as a plain language model
    ev = json.loads((run / "latest" / "eval.json").read_text())
    assert ev["eval/examples"] == 4 and 0 <= ev["eval/accuracy"] <= 1 and ev["eval/loss"] > 0
    model = rm.load(run)  # the run directory: its latest, with its head
    assert torch.equal(model.reward_head.weight.detach(), head["reward_head.weight"])
    with pytest.raises(ValueError, match="has no head.safetensors: not a reward model"):
        rm.load(tmp / "sft")  # bon.py must not pick by a random head


def test_kill_after_first_checkpoint_then_resume_is_exact(inputs, capsys):
    tmp, args = inputs
    out = tmp / "killed"
    killer = ("import os, signal, sys, rm, training\n"
              "save, calls = training.save_optimizer, []\n"
              "def save_or_die(*a):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(*a)\n"
              "training.save_optimizer = save_or_die\n"
              "rm.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", killer, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert Path(out / "latest").resolve().name == "ckpt-4"
    rm.main([*args, "--out", str(out)])  # the same command again
    assert "resuming from" in capsys.readouterr().out
    assert max_diff(weights(out), weights(tmp / "reference")) <= 1e-6
    head, ref_head = (load_file(run / "latest" / "head.safetensors") for run in (out, tmp / "reference"))
    assert max_diff(head, ref_head) <= 1e-6
    logged, reference = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                         for run in (out, tmp / "reference"))
    assert [(r["step"], r.get("loss"), r.get("eval/loss")) for r in logged] == \
           [(r["step"], r.get("loss"), r.get("eval/loss")) for r in reference]


def test_two_gloo_ranks_equal_one_process_with_accumulation(inputs):
    """The same global batch of 4 pairs: 2 ranks × micro 2 (DDP) against 1 process × micro 2 × accumulation 2."""
    tmp, args = inputs
    common = [*args[:args.index("--checkpoints")], "--checkpoints", "1", "--eval-examples", "8"]
    p = torchrun("rm.py", [*common, "--out", str(tmp / "ddp")])
    rm.main([*common, "--out", str(tmp / "one")])
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log
    assert "2 per forward × 1 accumulation × 2 processes" in log
    one, ddp, init = weights(tmp / "one"), weights(tmp / "ddp"), load_file(tmp / "sft" / "latest" / "model.safetensors")
    update = max_diff(one, init)
    assert update > 1e-4 and max_diff(ddp, one) <= 0.01 * update
    heads = [load_file(tmp / run / "latest" / "head.safetensors") for run in ("one", "ddp")]
    assert max_diff(*heads) <= 0.01 * update
    ev1, ev2 = (json.loads((tmp / run / "latest" / "eval.json").read_text()) for run in ("one", "ddp"))
    assert ev1["eval/examples"] == ev2["eval/examples"] == 8
    assert ev2["eval/loss"] == pytest.approx(ev1["eval/loss"], rel=1e-4)


def test_every_flag_is_explained():
    for action in rm.get_parser()._actions:
        assert action.help, action.option_strings
