import json
import math

import pytest
import torch

import toy_mdp
from toy_mdp import DEMOS, OOD, TRAJECTORIES, Policy, index, proposition1, sft


def test_enumeration_covers_the_tree_once():
    assert TRAJECTORIES.shape == (27, 3)
    assert len({tuple(t) for t in TRAJECTORIES.tolist()}) == 27
    assert all(index(t) == i for i, t in enumerate(TRAJECTORIES.tolist()))
    assert len(OOD) == 24 and not {index(d) for d in DEMOS} & set(OOD)


@pytest.mark.parametrize("seed", [0, 1])
def test_27_probabilities_sum_to_one(seed):
    torch.manual_seed(seed)
    policy = Policy()
    with torch.no_grad():
        for p in policy.parameters():  # a far-from-uniform policy, so the check has teeth
            p.normal_(0, 1)
        probs = policy(TRAJECTORIES).exp()
    assert probs.std() > 1e-3
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_sft_puts_mass_on_demonstrations():
    torch.manual_seed(0)
    policy = Policy()
    with torch.no_grad():
        before = policy(TRAJECTORIES).exp()[[index(d) for d in DEMOS]].sum()
    sft(policy, steps=100, lr=1e-3)  # the script's defaults
    with torch.no_grad():
        after = policy(TRAJECTORIES).exp()[[index(d) for d in DEMOS]]
    assert before < 0.5
    assert after.sum() >= 0.9
    assert after.min() > 0.25  # all three demonstrations, not just one


def test_proposition1_equal_losses():
    out = proposition1(steps=50)
    assert out["losses"]["(0.5, 0.5, 0)"] == pytest.approx(math.log(2), abs=1e-12)
    assert out["losses"]["(0, 0, 1)"] == pytest.approx(out["losses"]["(0.5, 0.5, 0)"], abs=1e-12)
    # the reference is already a minimiser: full-batch training leaves y3 where it was
    assert out["full_batch"]["y3_mass"] == pytest.approx(1 / 3, abs=1e-9)


def test_proposition1_loss_is_not_constant():
    # the equality above is not vacuous: unequal pi(y1), pi(y2) raise the loss above log 2
    ref = torch.full((2,), 1 / 3).log()
    logp = torch.tensor([0.7, 0.2]).log()
    losses, _, _ = toy_mdp.daa_loss(logp[[0, 1]], logp[[1, 0]], ref, ref, 0.1, "dpo")
    assert losses.mean() > math.log(2) + 1e-4


def test_short_run_writes_summary_and_plots(tmp_path):
    losses, betas, seeds = ("dpo", "slic"), (0.1, 0.5), 2  # a subset of the grid keeps the plotting fast
    toy_mdp.main(["--out", str(tmp_path), "--seeds", str(seeds), "--sft-steps", "20", "--steps", "5",
                  "--losses", ",".join(losses), "--betas", ",".join(map(str, betas))])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"config", "runs", "proposition1"}
    assert summary["config"]["steps"] == 5 and summary["config"]["seeds"] == seeds
    runs = summary["runs"]
    assert sorted((r["loss"], r["beta"], r["seed"]) for r in runs) == [
        (l, b, s) for l in losses for b in betas for s in range(seeds)]
    for r in runs:
        assert set(r) == {"loss", "beta", "seed", "final_ood_mass", "max_ood_mass", "final_pref_probs", "top_ood"}
        assert 0 <= r["final_ood_mass"] <= r["max_ood_mass"] <= 1
        assert set(r["final_pref_probs"]) == {"chosen", "rejected"}
        assert r["final_pref_probs"]["chosen"] + r["final_pref_probs"]["rejected"] + r["final_ood_mass"] <= 1 + 1e-5
        top = r["top_ood"]
        assert len(top) == 5 and all(len(t) == 3 and tuple(t) not in DEMOS for t, _ in top)
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        assert sum(p for _, p in top) <= r["final_ood_mass"] + 1e-5
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert pngs == {f"{l}_beta{b}.png" for l in losses for b in betas} | {
        f"fig18_dpo_beta{b}_seeds.png" for b in betas} | {"grid.png"}
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not list(tmp_path.glob("*.tmp*"))


def test_bad_flags_raise(tmp_path):
    with pytest.raises(ValueError, match="--losses"):
        toy_mdp.main(["--out", str(tmp_path), "--losses", "dpo,ppo"])
    with pytest.raises(ValueError, match="--steps"):
        toy_mdp.main(["--out", str(tmp_path), "--steps", "0"])
    assert not (tmp_path / "summary.json").exists()
