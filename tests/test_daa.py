"""daa.py: the losses of Eq. 4 by hand, and short runs of the training script (resume, reference, eval, NaN)."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_training import ROOT, RUN, max_diff, tldr_pairs, weights, write_inputs

import daa  # noqa: E402  (test_training put the repository root on sys.path)
import files  # noqa: E402
import logprobs  # noqa: E402
import sft  # noqa: E402
import training  # noqa: E402

# Two pairs. Pair 0: log-ratios +1 (chosen) and −1 (rejected), h = 2. Pair 1: 0 and +1, h = −1.
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
BETA = 0.5  # βh = 1 and −0.5


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("loss,alpha,expected", [
    ("dpo", 0.0, [softplus(-1.0), softplus(0.5)]),  # −log σ(βh) = log(1 + e^(−βh))
    ("slic", 0.0, [0.0, 1.5]),  # max(0, 1 − βh)
    ("ipo", 0.0, [(2 - 1) ** 2, (-1 - 1) ** 2]),  # (h − 1/(2β))², 1/(2β) = 1
    # length regulariser, α = 0.1, |y_w| − |y_l| = 5 and 0: margins 1 + 0.5 = 1.5 and −0.5
    # (a longer chosen response is partly explained by its length: a smaller loss)
    ("dpo", 0.1, [softplus(-1.5), softplus(0.5)]),
    ("slic", 0.1, [0.0, 1.5]),
    ("ipo", 0.1, [4.0, 4.0]),  # ((margin − 1/2) / β)²
])
def test_daa_loss_by_hand(loss, alpha, expected):
    losses, chosen_rewards, rejected_rewards = daa.daa_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, loss,
        length_alpha=alpha, chosen_lengths=torch.tensor([10, 3]), rejected_lengths=torch.tensor([5, 3]))
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == [0.5, 0.0] and rejected_rewards.tolist() == [-0.5, 0.5]  # β·log-ratio


def test_dpo_gradient_raises_the_chosen_log_ratio():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    rejected = POLICY_REJECTED.clone().requires_grad_()
    losses, _, _ = daa.daa_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, BETA, "dpo")
    losses.sum().backward()
    sigma = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5))]  # σ(−βh)
    assert chosen.grad.tolist() == pytest.approx([-BETA * s for s in sigma])  # ∂/∂log π(y_w) = −βσ(−βh) < 0
    assert rejected.grad.tolist() == pytest.approx([BETA * s for s in sigma])
    step = chosen.detach() - 0.1 * chosen.grad
    assert ((step - REF_CHOSEN) > (chosen.detach() - REF_CHOSEN)).all()  # a descent step raises the chosen log-ratio


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        daa.daa_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, "kto")


# ---------------------------------------------------------------- the published fixes, in float64 against their sources' formulas

# Three pairs, each response's own log-ratio h = log π − log π_ref: h_w = 1, −0.5, 0 and h_l = −1, 1, −3;
# π(y_w) falls below π_ref(y_w) only in pair 1 (by 0.5). Token counts 4/2/3 (chosen) and 5/1/3 (rejected).
PC, PR = torch.tensor([-10.0, -5.0, -3.0], dtype=torch.float64), torch.tensor([-12.0, -4.0, -9.0], dtype=torch.float64)
RC, RR = torch.tensor([-11.0, -4.5, -3.0], dtype=torch.float64), torch.tensor([-11.0, -5.0, -6.0], dtype=torch.float64)
NC, NR = torch.tensor([4, 2, 3]), torch.tensor([5, 1, 3])
H_W, H_L = [1.0, -0.5, 0.0], [-1.0, 1.0, -3.0]


def log_sigmoid(z):
    return -math.log1p(math.exp(-z))


def by_formula(loss, beta, **o):
    """Per-pair losses and rewards of each source's formula, written out with `math`, pair by pair."""
    out = []
    for i, (hw, hl) in enumerate(zip(H_W, H_L)):
        pc, pr, rc = PC[i].item(), PR[i].item(), RC[i].item()
        if loss == "chipo":  # link φ(z) = z + log z: implicit reward β(e^h + h); logit clipped to [−2R, 2R]
            rw, rl = beta * (math.exp(hw) + hw), beta * (math.exp(hl) + hl)
            R = o.get("chipo_clip", 5.0)
            out.append((-log_sigmoid(min(max(rw - rl, -2 * R), 2 * R)), rw, rl))
        elif loss == "dpop":  # −log σ(β[(h_w − h_l) − λ·max(0, log π_ref(y_w) − log π(y_w))])
            lam = o.get("dpop_lambda", 50.0)
            out.append((-log_sigmoid(beta * ((hw - hl) - lam * max(0.0, rc - pc))), beta * hw, beta * hl))
        elif loss == "caldpo":  # −log σ(h_w − h_l) + ½[(h_w − 1/(2β))² + (h_l + 1/(2β))²]
            c = 1 / (2 * beta)
            out.append((-log_sigmoid(hw - hl) + 0.5 * ((hw - c) ** 2 + (hl + c) ** 2), beta * hw, beta * hl))
        elif loss == "simpo":  # reference-free, per-token means ā: −log σ(β(ā_w − ā_l) − γ), γ = (γ/β)·β
            aw, al = pc / NC[i].item(), pr / NR[i].item()
            gamma = o.get("simpo_gamma", 0.5 * beta)
            out.append((-log_sigmoid(beta * (aw - al) - gamma), beta * aw, beta * al))
    return [list(col) for col in zip(*out)]


@pytest.mark.parametrize("loss,beta,options", [
    ("chipo", 0.5, {}),  # R = 5: no logit reaches ±10
    ("chipo", 0.5, {"chipo_clip": 1.0}),  # pair 0's logit 2.175 clipped to 2; 1.975 and −1.806 are not
    ("chipo", 0.05, {}),
    ("dpop", 0.5, {}),  # λ = 50: pair 1's logit β(−1.5 − 25) = −13.25
    ("dpop", 0.5, {"dpop_lambda": 2.0}),
    ("caldpo", 0.5, {}), ("caldpo", 0.1, {}),
    ("simpo", 2.0, {}),  # the authors' β with their γ/β = 0.5
    ("simpo", 0.5, {"simpo_gamma": 0.3}),
])
def test_published_losses_by_formula_in_float64(loss, beta, options):
    losses, chosen_rewards, rejected_rewards = daa.daa_loss(PC, PR, RC, RR, beta, loss, chosen_lengths=NC,
                                                            rejected_lengths=NR, **options)
    expected, rewards_w, rewards_l = by_formula(loss, beta, **options)
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, torch.tensor(rewards_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, torch.tensor(rewards_l, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_chipo_clip_stops_the_gradient_and_dpop_penalises_only_a_falling_chosen():
    pc = PC.clone().requires_grad_()
    daa.daa_loss(pc, PR, RC, RR, 0.5, "chipo", chipo_clip=1.0)[0].sum().backward()
    assert pc.grad[0] == 0 and pc.grad[1] < 0 and pc.grad[2] < 0  # pair 0 is clipped: no gradient
    dpo, dpop = (daa.daa_loss(PC, PR, RC, RR, 0.5, loss)[0] for loss in ("dpo", "dpop"))
    assert dpop[[0, 2]].tolist() == dpo[[0, 2]].tolist() and dpop[1] > dpo[1]  # only pair 1's π(y_w) < π_ref(y_w)


@pytest.mark.parametrize("h_w,h_l", [(50.0, -50.0), (-50.0, 50.0), (50.0, 50.0), (-50.0, -50.0)])
def test_chipo_gradient_is_finite_at_large_log_ratios_in_float32(h_w, h_l):
    ref = torch.tensor([-20.0, -20.0])
    for clip in (5.0, 1e30):  # the default R, and an R that never binds (the gradient then flows through e^h)
        pc, pr = (ref + h_w).requires_grad_(), (ref + h_l).requires_grad_()
        losses, chosen_rewards, _ = daa.daa_loss(pc, pr, ref, ref, 0.1, "chipo", chipo_clip=clip)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(chosen_rewards).all()
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if h_w < h_l:  # the unclipped loss still pushes: log π(y_w) up, log π(y_l) down
        assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_losses_refuse_what_they_do_not_take():
    with pytest.raises(ValueError, match="--loss dpo takes no --dpop-lambda"):
        daa.daa_loss(PC, PR, RC, RR, 0.5, "dpo", dpop_lambda=1.0)
    with pytest.raises(ValueError, match="--length-alpha changes the margin βh, which --loss chipo does not use"):
        daa.daa_loss(PC, PR, RC, RR, 0.5, "chipo", length_alpha=0.1, chosen_lengths=NC, rejected_lengths=NR)
    with pytest.raises(ValueError, match="need the token counts"):
        daa.daa_loss(PC, PR, RC, RR, 0.5, "simpo")
    args = daa.get_parser().parse_args(["--init", "-", "--out", "-", "--chipo-clip", "2"])  # --loss dpo
    with pytest.raises(ValueError, match="--loss dpo takes no --chipo-clip"):
        daa.make_loss_fn(args, None)  # at once, before any batch


def test_help_shows_every_loss_its_source_and_options():
    text = daa.get_parser().format_help()
    for name, e in daa.LOSSES.items():
        assert f"    {name} " in text and e["source"] in text
        for option, (default, _) in e["options"].items():
            assert f"--{option.replace('_', '-')}" + (f" {default:g}" if default else "") in text


# ---------------------------------------------------------------- the training script

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An SFT run (2 steps) whose `latest` is the DAA runs' --init, and a reference DAA run (3 steps)."""
    tmp = tmp_path_factory.mktemp("daa")
    model_dir, data = write_inputs(tmp)
    sft.main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp / "sft"), *RUN, "--max-examples", "8"])
    args = ["--init", str(tmp / "sft" / "latest"), "--data", str(data), *RUN, "--max-examples", "12",
            "--checkpoints", "3", "--eval-examples", "4", "--loss", "ipo", "--beta", "0.5"]
    daa.main([*args, "--out", str(tmp / "reference")])
    return tmp, args


def test_kill_after_first_checkpoint_then_resume_is_exact(inputs, capsys):
    tmp, args = inputs
    out = tmp / "killed"
    # A real SIGKILL, half-way through writing the second checkpoint (after its weights, before its optimizer state).
    killer = ("import os, signal, sys, daa, training\n"
              "save, calls = training.save_optimizer, []\n"
              "def save_or_die(*a):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(*a)\n"
              "training.save_optimizer = save_or_die\n"
              "daa.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", killer, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))  # as this process: same float sums
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert Path(out / "latest").resolve().name == "ckpt-4" and list(out.glob(".ckpt-8.tmp-*/model.safetensors"))

    daa.main([*args, "--out", str(out)])  # the same command again
    assert "resuming from" in capsys.readouterr().out
    assert max_diff(weights(out), weights(tmp / "reference")) <= 1e-6
    assert sorted(p.name for p in out.iterdir()) == \
        ["args.json", "ckpt-12", "ckpt-4", "ckpt-8", "latest", "metrics.jsonl"]  # the half-written one is gone
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss"), r.get("eval/loss")) for r in logged] == \
           [(r["step"], r.get("loss"), r.get("eval/loss")) for r in reference]

    daa.main([*args, "--out", str(out)])  # finished: says so and returns
    assert "run already finished" in capsys.readouterr().out


def test_sigterm_saves_a_resume_state_and_the_same_command_continues_exactly(inputs, capsys):
    """SIGTERM in step 2 of 3 (one checkpoint, at the end): the step finishes, OUT/resume/ is written,
    the run exits 143 with `latest` unmoved; the same command continues to the uninterrupted weights."""
    tmp, args = inputs
    args, out = [*args, "--checkpoints", "1"], tmp / "sigterm"
    term = ("import os, signal, sys, daa, training\n"
            "step = training.train_step\n"
            "def term_in_step_2(*a):\n"
            "    if a[-1] == 1:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return step(*a)\n"
            "training.train_step = term_in_step_2\n"
            "daa.main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", term, *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert r.returncode == 143 and "saved the resume state" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "resume" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "latest").exists() and not list(out.glob("ckpt-*"))  # not an evaluation checkpoint
    daa.main([*args, "--out", str(out)])
    assert f"resuming from {(out / 'resume').resolve()} (step 2/3)" in capsys.readouterr().out
    assert max_diff(weights(out), weights(tmp / "reference")) == 0  # bit-equal: same threads, fp32
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "ckpt-12", "latest", "metrics.jsonl"]


def test_save_minutes_resume_state_replaces_the_last_and_resumes_exactly(inputs, monkeypatch, capsys):
    """--save-minutes (here: every step) keeps one resume state, the newest; a run killed in step 3
    continues from step 2's to the uninterrupted weights."""
    tmp, args = inputs
    args, out = [*args, "--checkpoints", "1", "--save-minutes", "1e-9"], tmp / "periodic"
    real_step, saved = training.train_step, []

    def die_in_step_3(*a):
        saved.append(json.loads((out / "resume" / "trainer_state.json").read_text())["step"] if a[-1] else 0)
        if a[-1] == 2:
            raise KeyboardInterrupt
        return real_step(*a)
    monkeypatch.setattr(training, "train_step", die_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        daa.main([*args, "--out", str(out)])
    files.release(out)  # as the OS would for a killed process
    monkeypatch.undo()
    assert saved == [0, 1, 2] and sorted(p.name for p in out.iterdir()) == ["args.json", "metrics.jsonl", "resume"]
    daa.main([*args, "--out", str(out)])
    assert f"resuming from {(out / 'resume').resolve()} (step 2/3)" in capsys.readouterr().out
    assert max_diff(weights(out), weights(tmp / "reference")) == 0


def test_precomputed_reference_equals_live_reference(inputs):
    tmp, args = inputs
    daa.main([*args, "--precompute-ref", "--out", str(tmp / "precomputed")])
    assert max_diff(weights(tmp / "precomputed"), weights(tmp / "reference")) <= 1e-6
    ev = json.loads((tmp / "precomputed" / "latest" / "eval.json").read_text())
    assert ev == json.loads((tmp / "reference" / "latest" / "eval.json").read_text())


def test_eval_metrics_at_every_checkpoint(inputs):
    tmp, _ = inputs
    run = tmp / "reference"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/loss" in r]
    assert [r["examples"] for r in evals] == [4, 8, 12]
    for r in evals:
        assert r == {"step": r["step"], "examples": r["examples"],
                     **json.loads((run / f"ckpt-{r['examples']}" / "eval.json").read_text())}
        assert r["eval/examples"] == 4 and 0 <= r["eval/accuracy"] <= 1
        margin = 0.5 * (r["eval/logratio_chosen"] - r["eval/logratio_rejected"])  # β = 0.5
        assert r["eval/margin"] == pytest.approx(margin, rel=1e-4)
        assert r["eval/rewards_chosen"] == pytest.approx(0.5 * r["eval/logratio_chosen"], rel=1e-4)
    train = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and train[0]["rewards/margin"] == 0  # policy = reference at step 1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected",
                "lr", "grad_norm", "tokens_per_s", "examples_per_s"):
        assert all(math.isfinite(r[key]) for r in train), key
    state = json.loads((run / "ckpt-8" / "trainer_state.json").read_text())
    assert (state["step"], state["examples"], state["total_steps"], state["fraction"]) == (2, 8, 3, 2 / 3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(inputs, monkeypatch):
    tmp, args = inputs
    out = tmp / "nan"
    real_logps, real_save = logprobs.sequence_logps, training.save_checkpoint
    poisoned = []

    def save_then_poison(*a, **kw):
        real_save(*a, **kw)
        poisoned.append(True)

    def logps(*a, **kw):
        return real_logps(*a, **kw) * (math.nan if poisoned else 1.0)
    monkeypatch.setattr(training, "save_checkpoint", save_then_poison)
    monkeypatch.setattr(logprobs, "sequence_logps", logps)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\).* at step 2: stopped; the last good "
                                                 r"checkpoint is .*ckpt-4"):
        daa.main([*args, "--out", str(out)])
    assert Path(out / "latest").resolve().name == "ckpt-4" and not (out / "ckpt-8").exists()
    assert all(torch.isfinite(v).all() for v in load_file(out / "ckpt-4" / "model.safetensors").values())


@pytest.mark.parametrize("loss", ["chipo", "dpop", "caldpo", "simpo"])
def test_published_loss_trains(inputs, loss):
    """A short run per published loss (β = 0.5): finite throughout, and at step 1, where the policy is the
    reference (h = 0), its loss and rewards are what its formula gives there."""
    tmp, args = inputs
    daa.main([*args, "--loss", loss, "--out", str(tmp / loss)])
    logged = [json.loads(line) for line in (tmp / loss / "metrics.jsonl").read_text().splitlines()]
    train, evals = [r for r in logged if "loss" in r], [r for r in logged if "eval/loss" in r]
    assert len(train) == 3 and len(evals) == 3
    assert all(math.isfinite(v) for r in logged for v in r.values() if isinstance(v, float))
    at_reference = {"chipo": math.log(2), "dpop": math.log(2), "caldpo": math.log(2) + 1.0}  # ½[(0 − 1)² + (0 + 1)²]
    if loss in at_reference:
        assert train[0]["loss"] == pytest.approx(at_reference[loss], rel=1e-6)
        assert train[0]["rewards/margin"] == 0
    else:  # SimPO's reward is the policy's own β·ā, not a log-ratio: it is not 0 at the reference
        assert train[0]["rewards/chosen"] < 0 and train[0]["rewards/margin"] != 0
    if loss in ("dpop", "caldpo"):  # their implicit reward is DPO's β·log π/π_ref
        assert evals[-1]["eval/rewards_chosen"] == pytest.approx(0.5 * evals[-1]["eval/logratio_chosen"], rel=1e-4)


# ---------------------------------------------------------------- --average-logps and --nll-alpha on a hand-built batch

def hand_batch():
    """Two pairs of a tiny random model, response lengths 3/1 (chosen) and 2/4 (rejected), EOS included."""
    from model import Config, GPTNeoX
    torch.manual_seed(0)
    model = GPTNeoX(Config(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16))
    prompts, chosen, rejected = [[1, 2], [3]], [[4, 5, 0], [0]], [[6, 0], [7, 8, 9, 0]]
    batch = training.collate([(np.array(p), np.array(r)) for p, r in zip(prompts + prompts, chosen + rejected)], 0)
    tokens = (batch["labels"] != logprobs.IGNORE).sum(1)
    batch.update(idx=[0, 1], split="train", chosen_tokens=tokens[:2], rejected_tokens=tokens[2:])
    # Σ log π per response by hand: the logits at position t score the token at t + 1.
    logp = model(batch["input_ids"]).log_softmax(-1)
    by_hand = []
    for row, (p, r) in enumerate(zip(prompts + prompts, chosen + rejected)):
        by_hand.append(sum(logp[row, len(p) - 1 + t, tok].item() for t, tok in enumerate(r)))
    return model, batch, torch.tensor(by_hand), [len(r) for r in chosen + rejected]


def loss_of(model, batch, ref, **flags):
    args = daa.get_parser().parse_args(["--init", "-", "--out", "-", "--beta", "0.5"])  # daa.py's defaults
    return daa.make_loss_fn(SimpleNamespace(**{**vars(args), **flags}), lambda b: ref)(model, batch)


REF = (torch.tensor([-9.0, -3.0]), torch.tensor([-7.0, -12.0]))


def test_hand_batch_token_counts():
    _, batch, _, lengths = hand_batch()
    assert batch["chosen_tokens"].tolist() == lengths[:2] and batch["rejected_tokens"].tolist() == lengths[2:]


def test_average_logps_by_hand():
    model, batch, logps, lengths = hand_batch()
    n = torch.tensor(lengths, dtype=torch.float)
    mean_c, mean_r = logps[:2] / n[:2], logps[2:] / n[2:]
    ref_c, ref_r = REF[0] / n[:2], REF[1] / n[2:]
    expected = [softplus(-0.5 * ((mean_c[i] - ref_c[i]) - (mean_r[i] - ref_r[i])).item()) for i in range(2)]
    summed = [softplus(-0.5 * ((logps[i] - REF[0][i]) - (logps[2 + i] - REF[1][i])).item()) for i in range(2)]
    _, stats = loss_of(model, batch, REF, average_logps=True)
    assert stats["loss"].tolist() == pytest.approx(expected, rel=1e-5)
    assert stats["rewards/chosen"].tolist() == pytest.approx((0.5 * (mean_c - ref_c)).tolist(), rel=1e-5)
    assert stats["logps/chosen"].tolist() == pytest.approx(logps[:2].tolist(), rel=1e-5)  # logged as sums
    assert stats["logratios/rejected"].tolist() == pytest.approx((logps[2:] - REF[1]).tolist(), rel=1e-5)
    h = (mean_c - ref_c) - (mean_r - ref_r)  # TRL's IPO: (h − 1/(2β))² on per-token means
    _, stats = loss_of(model, batch, REF, average_logps=True, loss="ipo")
    assert stats["loss"].tolist() == pytest.approx(((h - 1 / (2 * 0.5)) ** 2).tolist(), rel=1e-5)
    _, stats = loss_of(model, batch, REF)
    assert stats["loss"].tolist() == pytest.approx(summed, rel=1e-5)  # sums by default
    assert abs(summed[0] - expected[0]) > 1e-3  # the two conventions differ here


@pytest.mark.parametrize("loss", daa.LOSSES)
def test_nll_alpha_adds_the_per_token_nll_of_chosen(loss):
    model, batch, logps, lengths = hand_batch()
    nll = [-logps[i].item() / lengths[i] for i in range(2)]
    mean0, plain = loss_of(model, batch, REF, loss=loss)
    mean0_again, zero = loss_of(model, batch, REF, loss=loss, nll_alpha=0.0)
    mean, rpo = loss_of(model, batch, REF, loss=loss, nll_alpha=0.3)
    assert zero["loss"].tolist() == plain["loss"].tolist() and mean0_again.item() == mean0.item()  # A = 0: unchanged
    assert (rpo["loss"] - plain["loss"]).tolist() == pytest.approx([0.3 * x for x in nll], rel=1e-5)
    assert rpo["loss/nll"].tolist() == pytest.approx(nll, rel=1e-5) == plain["loss/nll"].tolist()
    assert mean.item() == pytest.approx(mean0.item() + 0.3 * sum(nll) / 2, rel=1e-5)


def test_nll_alpha_gradient_flows():
    model, batch, _, _ = hand_batch()
    grads = []
    for alpha in (0.0, 1.0):
        model.zero_grad()
        loss_of(model, batch, REF, nll_alpha=alpha)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.isfinite(grads[1]).all() and (grads[1] - grads[0]).abs().max() > 1e-4
    # The NLL term alone, by its own backward, is the difference.
    model.zero_grad()
    _, stats = loss_of(model, batch, REF)
    chosen, _ = daa.pair_logps(model, batch)
    (-(chosen / batch["chosen_tokens"]).mean()).backward()
    alone = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads[1] - grads[0], alone, atol=1e-6)


# ---------------------------------------------------------------- one run per directory (an OS lock)

def test_second_launch_refuses_while_the_first_runs_and_a_rerun_after_sigkill_resumes(inputs, capsys):
    tmp, args = inputs
    out = tmp / "locked"
    # The first run stops after its first checkpoint, still alive and holding the run directory.
    pause = ("import sys, time, daa, training\n"
             "save = training.save_checkpoint\n"
             "def save_and_pause(*a, **kw):\n"
             "    save(*a, **kw)\n"
             "    print('CHECKPOINT', flush=True)\n"
             "    time.sleep(300)\n"
             "training.save_checkpoint = save_and_pause\n"
             "daa.main(sys.argv[1:])\n")
    first = subprocess.Popen([sys.executable, "-c", pause, *args, "--out", str(out)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    try:
        for line in first.stdout:
            if line.startswith("CHECKPOINT"):
                break
        assert first.poll() is None
        with pytest.raises(files.Busy, match=r"run directory .*locked is being written by another process") as e:
            daa.main([*args, "--out", str(out)])
        assert "\n" not in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == ["args.json", "ckpt-4", "latest", "metrics.jsonl"]  # untouched
    finally:
        first.kill()
        first.wait()
    daa.main([*args, "--out", str(out)])  # the OS dropped the killed run's lock: this resumes
    assert "resuming from" in capsys.readouterr().out
    assert max_diff(weights(out), weights(tmp / "reference")) <= 1e-6


# ---------------------------------------------------------------- prefix-shared pairs

PAIRS = [  # chosen shorter, longer, an empty response (EOS only), a long prompt that truncation cuts
    {"prompt": "SUBREDDIT: r/test\n\nPOST: my cat keeps waking me up at night.\n\nTL;DR:",
     "chosen": " cat wakes me", "rejected": " I have a cat and it wakes me up at night, every night"},
    {"prompt": "POST: short post\nTL;DR:", "chosen": " a chosen summary that is longer than the other",
     "rejected": " brief"},
    {"prompt": "POST: nothing to say\nTL;DR:", "chosen": " something", "rejected": ""},
    {"prompt": "POST: " + "many words in a long post " * 20 + "\nTL;DR:", "chosen": " long post",
     "rejected": " words words words words"},
]


@pytest.fixture(scope="module")
def tok():
    from tokenizer import load_tokenizer
    return load_tokenizer(ROOT / "tests" / "fixtures" / "gpt-neox-20b-tokenizer.json")


def pair_batch(tok, idx, max_length, prefix_sharing=True, pairs=PAIRS):
    """daa.py's batch of `pairs` [idx], tokenised (and cut to max_length) as daa.main does."""
    return daa.pair_batch(training.tokenize(tok, pairs, ("chosen", "rejected"), max_length), idx, "train",
                          tok.eos_id, "cpu", prefix_sharing)


@pytest.mark.parametrize("cfg,max_length", [
    (dict(), 1024), (dict(), 24),  # no truncation; truncation of the prompt and of responses
    (dict(use_parallel_residual=False, rotary_pct=1.0, num_hidden_layers=3), 40),
])
def test_prefix_shared_pairs_equal_two_rows_in_float64(tok, cfg, max_length):
    """Log-probs and gradients of one row [prompt | chosen | rejected] equal those of two rows, to 1e-10."""
    from model import Config, GPTNeoX
    torch.manual_seed(0)
    model = GPTNeoX(Config(vocab_size=50304, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           **{"num_hidden_layers": 2, **cfg})).double()
    idx = list(range(len(PAIRS)))
    shared, rows = (pair_batch(tok, idx, max_length, prefix_sharing=s) for s in (True, False))
    assert shared["input_ids"].shape[0] == 4 and rows["input_ids"].shape[0] == 8
    assert shared["chosen_tokens"].tolist() == rows["chosen_tokens"].tolist() == \
        (rows["labels"][:4] != logprobs.IGNORE).sum(1).tolist()
    assert shared["rejected_tokens"].tolist() == (rows["labels"][4:] != logprobs.IGNORE).sum(1).tolist()
    assert shared["rejected_tokens"][2] == 1  # the empty response: its EOS
    assert shared["tokens"] < rows["tokens"]  # the point: each prompt once
    w = torch.tensor([0.3, -1.0, 0.7, 2.0], dtype=torch.float64)
    results = []
    for batch in (shared, rows):
        model.zero_grad()
        chosen, rejected = daa.pair_logps(model, batch)
        (w @ chosen - w.flip(0) @ rejected).backward()
        results.append((chosen.detach(), rejected.detach(), [p.grad.clone() for p in model.parameters()]))
    (c1, r1, g1), (c2, r2, g2) = results
    torch.testing.assert_close(c1, c2, atol=1e-10, rtol=0)
    torch.testing.assert_close(r1, r2, atol=1e-10, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_precomputed_reference_is_the_same_from_shared_and_two_row_pairs(tok):
    """--precompute-ref's table of π_ref log-probs, built from one-row and from two-row batches, in float64:
    equal to 1e-10, and each layout's lookup gives what a live reference computes on it."""
    from types import SimpleNamespace
    from contextlib import nullcontext
    from model import Config, GPTNeoX
    torch.manual_seed(1)
    ref = GPTNeoX(Config(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).double().eval()
    env = SimpleNamespace(autocast=nullcontext, main=False)
    batches = {s: [pair_batch(tok, idx, 40, prefix_sharing=s) for idx in ([0, 1], [2, 3])]
               for s in (True, False)}
    tables = {s: daa.precompute(ref, b, len(b), env) for s, b in batches.items()}
    assert tables[True].keys() == tables[False].keys() == {("train", i) for i in range(4)}
    for key in tables[True]:
        assert tables[True][key] == pytest.approx(tables[False][key], abs=1e-10, rel=0)
    for shared, table in tables.items():
        lookup, live = daa.make_reference(None, table, env), daa.make_reference(ref, {}, env)
        for batch in batches[shared]:
            for a, b in zip(lookup(batch), live(batch)):
                torch.testing.assert_close(a, b.to(a.dtype), atol=1e-10, rtol=0)


def test_prefix_shared_mask_positions_and_labels(tok):
    """The rules, read off the batch: rejected sees the prompt and itself, never chosen; its positions
    restart where the prompt ends; the prompt's last position predicts both responses' first token."""
    b = pair_batch(tok, [0, 2], 1024)
    for i, pair in enumerate([PAIRS[0], PAIRS[2]]):
        p, c = tok.encode(pair["prompt"]), tok.encode(pair["chosen"]) + [tok.eos_id]
        r = tok.encode(pair["rejected"]) + [tok.eos_id]
        P, C, R = len(p), len(c), len(r)
        assert b["input_ids"][i, :P + C + R].tolist() == p + c + r
        assert b["position_ids"][i, :P + C + R].tolist() == list(range(P + C)) + list(range(P, P + R))
        m = b["attention_mask"][i]
        causal = torch.ones(P + C + R, P + C + R, dtype=torch.bool).tril()
        assert torch.equal(m[:P + C, :P + C], causal[:P + C, :P + C])  # prompt and chosen: plain causal
        assert not m[P + C:P + C + R, P:P + C].any()  # rejected never sees chosen ...
        assert m[P + C:P + C + R, :P].all()  # ... sees the whole prompt ...
        assert torch.equal(m[P + C:P + C + R, P + C:P + C + R], causal[:R, :R])  # ... and itself, causally
        assert not m[:P + C + R, P + C + R:].any()  # no token sees padding
        labels = b["labels"][i]
        assert labels[0, P] == c[0] and labels[1, P] == r[0]  # both predicted by position P - 1
        assert labels[0, P:P + C].tolist() == c and labels[1, P + C + 1:P + C + R].tolist() == r[1:]
        assert (labels[0] != logprobs.IGNORE).sum() == C and (labels[1] != logprobs.IGNORE).sum() == R


def test_no_prefix_sharing_trains_the_same_model(inputs):
    tmp, args = inputs
    daa.main([*args, "--no-prefix-sharing", "--out", str(tmp / "two-rows")])
    # float32 sums in another order (the float64 test above is the exact one). Step 1 starts from the same
    # weights; after it, RMSprop's g/√v turns the rounding of near-zero gradients into whole steps (lr 1e-3).
    logged, reference = ([r for r in map(json.loads, (tmp / run / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r] for run in ("two-rows", "reference"))
    assert (logged[0]["loss"], logged[0]["grad_norm"]) == pytest.approx((reference[0]["loss"], reference[0]["grad_norm"]), rel=1e-5)
    a, b, init = weights(tmp / "two-rows"), weights(tmp / "reference"), load_file(tmp / "sft" / "latest" / "model.safetensors")
    # in norm over all weights: a few near-zero gradients that flip sign each move a weight by whole steps
    distance = lambda x, y: sum(((x[k] - y[k]).double() ** 2).sum().item() for k in x) ** 0.5
    assert distance(a, b) <= 0.02 * distance(b, init)  # measured: 0.002
    # later losses and eval.json values are not compared: rounding moves them beyond any fixed rel bound on
    # another CPU (seen: > 1e-3 on a fresh 2-core machine); the weights' distance is what rounding cannot move
    ev = json.loads((tmp / "two-rows" / "latest" / "eval.json").read_text())
    assert ev.keys() == json.loads((tmp / "reference" / "latest" / "eval.json").read_text()).keys()


def test_optimizer_state_only_in_the_newest_checkpoint(inputs):
    tmp, _ = inputs
    run = tmp / "reference"
    assert [p.parent.name for p in sorted(run.glob("ckpt-*/optimizer.safetensors"))] == ["ckpt-12"]
    assert Path(run / "latest").resolve().name == "ckpt-12"
    assert all((run / f"ckpt-{n}" / "model.safetensors").is_file() for n in (4, 8, 12))


def test_activation_checkpointing_trains_the_same_model(inputs):
    tmp, args = inputs
    daa.main([*args, "--activation-checkpointing", "--out", str(tmp / "checkpointed")])
    assert max_diff(weights(tmp / "checkpointed"), weights(tmp / "reference")) <= 1e-6


FSDP_CHECK = """
import sys
import torch
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
import daa, training
from types import SimpleNamespace
from model import Config, GPTNeoX
env = training.setup(SimpleNamespace(device="cpu", fsdp=True, dtype="bfloat16", seed=0, dist_timeout=5))
torch.manual_seed(0)
ref = training.freeze(GPTNeoX(Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)))
ref = training.wrap(ref, env, fsdp=True)
gathered = []
ref.gpt_neox.layers[0].mlp.dense_h_to_4h.register_forward_pre_hook(lambda m, a: gathered.append(m.weight.dtype))
import numpy as np
pair = (np.array([1, 2, 3]), np.array([4, 5]), np.array([7]))  # prompt, chosen, rejected
batch = daa.pair_batch([pair, pair], [0, 1], "train", 0, "cpu")
chosen, rejected = daa.ref_logps(ref, batch, env)
assert gathered == [torch.bfloat16], gathered  # FSDP gathers bf16 weights under a bf16 run
assert chosen.dtype == torch.float32 and torch.isfinite(chosen).all()
for name, p in ref.named_parameters():  # the root's weights too: resharded after the reference's forward
    assert isinstance(p, DTensor) and p.to_local().numel() < p.numel(), name
print("fsdp ok")
"""


def test_fsdp_gathers_bf16_weights_and_reshards_the_reference(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(FSDP_CHECK)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(ROOT)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and r.stdout.count("fsdp ok") == 2, r.stdout + r.stderr


def test_fsdp_precomputed_reference_has_the_policys_bf16_numerics(tmp_path):
    """--fsdp --precompute-ref under bf16: the reference, run whole on each process, sees the bf16
    weights the policy's FSDP policy gathers, so the policy starts at h = 0 (it equals the reference)."""
    from test_training import torchrun
    model_dir, data = write_inputs(tmp_path)
    p = torchrun("daa.py", ["--init", str(model_dir), "--data", str(data), *RUN, "--max-examples", "4",
                            "--checkpoints", "1", "--eval-examples", "0", "--fsdp", "--precompute-ref",
                            "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "run")])
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["rewards/chosen"] == first["rewards/rejected"] == 0, first


def test_precomputed_reference_is_freed_before_training(inputs, monkeypatch):
    """--precompute-ref: once the table is built nothing holds the reference model (under --fsdp it is
    never wrapped, as an FSDP module that has run a forward outlives `del`)."""
    import gc
    import weakref
    tmp, args = inputs
    models, alive = [], []
    real_load, real_step = training.load_model, training.train_step
    monkeypatch.setattr(training, "load_model", lambda *a: models.append(weakref.ref(m := real_load(*a))) or m)
    monkeypatch.setattr(training, "train_step", lambda *a: (gc.collect(), alive.append(sum(r() is not None for r in models)))
                        and real_step(*a))
    daa.main([*args, "--precompute-ref", "--out", str(tmp / "freed")])
    assert len(models) == 2 and alive == [1, 1, 1]  # the policy only


# ---------------------------------------------------------------- the data path: bucketing, host syncs, compile, flex

def tiny_models(dtype=torch.float64):
    from model import Config, GPTNeoX
    torch.manual_seed(0)
    config = Config(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return GPTNeoX(config).to(dtype), training.freeze(GPTNeoX(config).to(dtype))


def dpo_loss_fn(ref):
    from contextlib import nullcontext
    env = SimpleNamespace(autocast=nullcontext)
    args = daa.get_parser().parse_args(["--init", "-", "--out", "-"])  # daa.py's defaults: DPO, β 0.1
    return daa.make_loss_fn(args, daa.make_reference(ref, {}, env))


def bucketing_plan(batch, micro, n, lengths):
    import argparse
    args = argparse.Namespace(batch_size=batch, micro_batch_size=micro, epochs=1, checkpoints=1, seed=0)
    return training.make_plan(args, SimpleNamespace(world=1, rank=0), n, lengths)


def test_length_bucketing_leaves_the_step_gradient_unchanged(tok):
    """One step of 8 TL;DR pairs in 4 micro-batches, grouped by length or in data order: the same
    gradient, in float64 (each micro-batch's mean loss / 4, summed: the mean over the 8 pairs)."""
    model, ref = tiny_models()
    loss_fn = dpo_loss_fn(ref)
    examples = training.tokenize(tok, tldr_pairs()[:8], ("chosen", "rejected"), 64)
    lengths = [len(p) + len(c) + len(r) for p, c, r in examples]
    grads, groups = [], []
    for known in (None, lengths):
        idx = training.micro_batch_indices(bucketing_plan(8, 2, 8, known), 0)
        model.zero_grad()
        for i in idx:
            (loss_fn(model, daa.pair_batch(examples, i, "train", tok.eos_id, "cpu"))[0] / len(idx)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        groups.append(idx)
    assert groups[0] != groups[1] and sorted(sum(groups[0], [])) == sorted(sum(groups[1], []))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_length_bucketing_cuts_padding_on_tldr(tok):
    """The fixture's 100 TL;DR pairs, prefix-shared, 3 steps of 32 in micro-batches of 4: the share of
    padded slots in the batches daa.py builds (measured: 20.0 % in data order, 3.6 % grouped)."""
    examples = training.tokenize(tok, tldr_pairs(), ("chosen", "rejected"), 512)
    lengths = [len(p) + len(c) + len(r) for p, c, r in examples]
    padding = []
    for known in (None, lengths):
        plan, slots, tokens = bucketing_plan(32, 4, len(examples), known), 0, 0
        for step in range(plan.total_steps):
            for idx in training.micro_batch_indices(plan, step):
                b = daa.pair_batch(examples, idx, "train", tok.eos_id, "cpu")
                slots, tokens = slots + b["input_ids"].numel(), tokens + int(b["tokens"])
        padding.append(1 - tokens / slots)
    assert padding[0] > 0.15 and padding[1] < 0.5 * padding[0], padding


def aten_ops_that_wait_for_the_gpu(fn):
    """Run fn; the aten ops it dispatched that, on CUDA, make the host wait for the GPU: nonzero and
    boolean-mask indexing (their output size is data-dependent), item / bool / tolist (a scalar read)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        found = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            masked = name in ("index", "index_put") and any(getattr(i, "dtype", None) == torch.bool
                                                            for i in (args[1] or []))
            if name in ("nonzero", "masked_select", "_local_scalar_dense", "item") or masked:
                self.found.add(name)
            return func(*args, **(kwargs or {}))
    with Record() as r:
        fn()
    return r.found


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_a_micro_step_has_no_host_sync(tok, prefix_sharing):
    """The scored (row, position) indices come with the batch, found on the CPU before the copy: the
    forward and backward of policy and reference dispatch no op that would wait for the GPU."""
    model, ref = tiny_models(torch.float32)
    loss_fn = dpo_loss_fn(ref)
    batch = pair_batch(tok, [0, 1, 2, 3], 64, prefix_sharing)
    assert aten_ops_that_wait_for_the_gpu(lambda: loss_fn(model, batch)[0].backward()) == set()
    # the probe sees one: without the batch's indices, sequence_logps finds them by nonzero
    rescored = lambda: logprobs.sequence_logps(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                               position_ids=batch.get("position_ids"))
    assert "nonzero" in aten_ops_that_wait_for_the_gpu(rescored)


def test_pairs_are_tokenised_once_before_training(inputs, monkeypatch):
    tmp, args = inputs
    calls, stepping = [], []
    real_encode, real_step = training.encode, training.train_step
    monkeypatch.setattr(training, "encode", lambda *a: calls.append(bool(stepping)) or real_encode(*a))
    monkeypatch.setattr(training, "train_step", lambda *a: stepping.append(1) or real_step(*a))
    daa.main([*args, "--out", str(tmp / "tokenised-once")])
    assert len(stepping) == 3 and calls == [False] * (12 + 4)  # 12 training and 4 eval pairs, once each, up front
    assert max_diff(weights(tmp / "tokenised-once"), weights(tmp / "reference")) == 0


def test_compiled_daa_step_equals_uncompiled(tok):
    """--compile (each block through torch.compile, inductor): one DAA micro-step's loss and gradients
    equal the eager ones in float64 to 1e-10. Fusion only reorders float64 sums (measured: 6e-17);
    a wrong mask, position or cast would move them by 1e-3 or more."""
    import copy
    from torch._dynamo.utils import counters
    model, ref = tiny_models()
    compiled = training.wrap(copy.deepcopy(model), SimpleNamespace(world=1), fsdp=False, compile=True)
    loss_fn, batch = dpo_loss_fn(ref), pair_batch(tok, [0, 1, 2, 3], 40)
    results, graphs = [], counters["stats"]["unique_graphs"]
    for m in (model, compiled):
        loss = loss_fn(m, batch)[0]
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in m.parameters()])
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_flex_attention_block_mask_equals_sdpa_on_cpu(tok, inputs):
    """--attention flex: the BlockMask's rule is the [n, T, T] mask's, element for element, and the
    compiled flex_attention forward gives SDPA's log-probs (float32, another summation order: bound
    1e-4 on sums of 10-170 nats; measured equal). Training needs CUDA: no flex backward on the CPU."""
    from torch.nn.attention.flex_attention import create_mask
    model, _ = tiny_models(torch.float32)
    sdpa = pair_batch(tok, [0, 1, 2, 3], 1024)
    flex = daa.pair_batch(training.tokenize(tok, PAIRS, ("chosen", "rejected"), 1024), [0, 1, 2, 3], "train",
                          tok.eos_id, "cpu", attention="flex")
    n, T = sdpa["input_ids"].shape
    assert torch.equal(create_mask(flex["attention_mask"].mask_mod, n, 1, T, T)[:, 0], sdpa["attention_mask"])
    with torch.no_grad():
        for a, b in zip(daa.pair_logps(model, sdpa), daa.pair_logps(model, flex)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    tmp, args = inputs
    with pytest.raises(ValueError, match="--attention flex needs --device cuda"):
        daa.main([*args, "--attention", "flex", "--out", str(tmp / "flex")])
    assert not (tmp / "flex").exists()


# ---------------------------------------------------------------- --online (issue 23)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_bon import tiny_task
    return tiny_task(tmp_path_factory.mktemp("online"))


def test_online_labels_follow_the_labellers_probabilities(tiny, tmp_path):
    """Every pair of the policy's two samples is labelled by the labeller's Bradley–Terry draw: the
    proxy-better sample is chosen with probability max(p, 1 − p), neither always (an argmax) nor half
    the time (no labeller). Checked over 2048 pairs by a χ² over bins of that probability (and by the
    stored p_chosen, recomputed); a second draw of the same round is the same file."""
    from data.tiny import task
    data, sft_run = tiny
    spec = task.read_spec(data / "gold.json")
    prompts = [r["prompt"] for r in files.read_jsonl(data / "sft_train.jsonl")]
    pairs = [{"prompt": p, "chosen": "", "rejected": ""} for p in prompts * 4]
    args = SimpleNamespace(gold_spec=str(data / "gold.json"), max_length=512, online_max_new_tokens=12,
                           online_batch_size=512, seed=0)
    env = SimpleNamespace(rank=0, world=1, main=True, device=torch.device("cpu"))
    policy = training.load_model(sft_run, 0, "cpu")
    daa.draw_round(args, env, load_tokenizer_of(sft_run), policy, pairs, list(range(len(pairs))), 1, tmp_path / "a.jsonl")
    rows = files.read_jsonl(tmp_path / "a.jsonl")
    assert [r["index"] for r in rows] == list(range(2048)) and all(r["prompt"] == pairs[r["index"]]["prompt"] for r in rows)
    bins = {}
    for r in rows:
        p = task.preference_probability(r["prompt"], r["chosen"], r["rejected"], spec)
        assert r["p_chosen"] == pytest.approx(p, abs=1e-12)
        better = max(p, 1 - p)
        if better > 0.5:  # identical samples or equal proxies carry no label to check
            b = bins.setdefault(min(int((better - 0.5) * 10), 4), [0, 0, 0.0, 0.0])  # bins of width 0.1 over (½, 1]
            b[0] += 1
            b[1] += p > 0.5  # the better one was chosen
            b[2] += better  # ... as often as expected,
            b[3] += better * (1 - better)  # give or take

    def chi2(chosen_better):
        return sum((chosen_better(n, o) - e) ** 2 / v for n, o, e, v in bins.values())
    assert sum(b[0] for b in bins.values()) > 1500 and len(bins) >= 4  # many labels, across the range of p
    assert chi2(lambda n, o: o) < 20.5  # χ² with ≤ 5 degrees of freedom: 20.5 is its 0.999 quantile
    assert chi2(lambda n, o: n) > 100 and chi2(lambda n, o: n / 2) > 100  # an argmax, a coin: far off
    daa.draw_round(args, env, load_tokenizer_of(sft_run), policy, pairs, list(range(len(pairs))), 1, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def load_tokenizer_of(run):
    from tokenizer import load_tokenizer
    return load_tokenizer(training.model_dir(run))


def test_online_run_trains_every_pair_once_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """--online 2: two rounds of 4 steps (256 pairs, batch 32), each on the policy's own samples, with the
    offline run's pairs and steps; killed after its first checkpoint, the rerun draws round 2 again from
    that checkpoint and ends with the same weights. fit.py reads its rows as arm dpo+online2."""
    import fit
    import judge
    import sample
    data, sft_run = tiny
    args = ["--init", str(sft_run), "--data", str(data), "--batch-size", "32", "--micro-batch-size", "16",
            "--lr", "1e-3", "--warmup", "1", "--checkpoints", "2", "--eval-examples", "16", "--log-interval", "100",
            "--beta", "0.1", "--online", "2", "--gold-spec", str(data / "gold.json"), "--online-max-new-tokens", "12"]
    daa.main([*args, "--out", str(tmp_path / "full")])
    full = tmp_path / "full"
    rounds = [files.read_jsonl(full / f"online-round{r}.jsonl") for r in (1, 2)]
    assert [len(r) for r in rounds] == [128, 128]
    assert sorted(x["index"] for r in rounds for x in r) == list(range(256))  # the offline epoch's pairs, each once
    assert [json.loads((full / c / "online.json").read_text())["round"] for c in ("ckpt-128", "ckpt-256")] == [1, 2]
    assert len([r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines()) if "loss" in r]) == 8

    real, saved = training.save_checkpoint, []

    def save_then_die(*a, **kw):
        real(*a, **kw)
        saved.append(1)
        raise KeyboardInterrupt  # killed right after the first checkpoint, before round 2 is drawn
    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        daa.main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(training, "save_checkpoint", real)
    files.release(tmp_path / "killed")
    assert not (tmp_path / "killed" / "online-round2.jsonl").exists()
    daa.main([*args, "--out", str(tmp_path / "killed")])
    for r in (1, 2):
        assert (tmp_path / "killed" / f"online-round{r}.jsonl").read_bytes() == (full / f"online-round{r}.jsonl").read_bytes()
    assert max_diff(weights(tmp_path / "killed"), weights(full)) <= 1e-6

    sample.main(["--ckpt", str(full / "ckpt-128"), str(full / "ckpt-256"), "--ref", str(sft_run), "--prompts",
                 str(data / "eval_prompts.jsonl"), "--n", "6", "--max-new-tokens", "12", "--gold-spec",
                 str(data / "gold.json")])
    for c in ("ckpt-128", "ckpt-256"):
        judge.main([str(full / f"samples-{c}.jsonl"), "--judge", "gold", "--task", "tiny", "--gold-spec",
                    str(data / "gold.json")])
    rows = fit.read_run(full)
    assert [(fit.arm(r), r["online"], r["online_round"], r["in_support"]) for r in rows] == \
        [("dpo+online2", 2, 1, 0), ("dpo+online2", 2, 2, 0)]


def test_online_flags_that_cannot_work_are_one_line(tiny, tmp_path):
    data, sft_run = tiny
    base = [sys.executable, str(ROOT / "daa.py"), "--init", str(sft_run), "--data", str(data), "--online", "2"]
    for extra, message in ((["--out", str(tmp_path / "a")], "error: --online labels the policy's samples with the "
                            "miniature's labeller: give --gold-spec"),
                           (["--gold-spec", str(data / "gold.json"), "--precompute-ref", "--out", str(tmp_path / "b")],
                            "error: --online draws new pairs every round, with each process's whole policy: it works "
                            "without --precompute-ref and --fsdp")):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 1 and r.stderr.strip() == message and not (tmp_path / "a").exists()
