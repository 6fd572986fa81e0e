"""The tree MDP of Appendix E: DAAs move probability onto trajectories that appear in no data.

Fig. 6's MDP: start state s1, three actions in every state, deterministic
transitions, depth 3 (s1 -> s2..s4 -> s5..s13 -> leaves -> absorbing terminal),
so 27 trajectories, each a sequence of three actions. Transitions are
deterministic, so a state is its action history and the policy is a recurrent
network over that history. Every probability here is exact: we enumerate all
27 trajectories, never sample.

1. SFT on the three demonstrations (a0,a0,a0), (a1,a1,a0), (a2,a2,a2).
2. DPO / IPO / SLiC (Eq. 4, `daa.daa_loss`) on the single preference
   (a1,a1,a0) > (a0,a0,a0), reference = the SFT policy, for each beta and seed.
3. Track the mass on the 24 out-of-distribution (OOD) trajectories (Figs. 7, 9-18).

Also Proposition 1's single-state example (`proposition1`).

    python toy_mdp.py --out out/toy_mdp
"""
import argparse
import copy
import itertools
import math
import os
import sys
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import files
from daa import LOSSES, daa_loss

N_ACTIONS, DEPTH = 3, 3
TRAJECTORIES = torch.tensor(list(itertools.product(range(N_ACTIONS), repeat=DEPTH)))  # [27, 3]
DEMOS = [(0, 0, 0), (1, 1, 0), (2, 2, 2)]  # App. E: the SFT data
CHOSEN, REJECTED = (1, 1, 0), (0, 0, 0)  # App. E: the one preference
BETAS = (0.01, 0.1, 0.5)


def index(traj):
    """Row of `traj` in TRAJECTORIES (itertools.product order: base-3 digits)."""
    return sum(a * N_ACTIONS ** (DEPTH - 1 - t) for t, a in enumerate(traj))


def name(traj):
    return "(" + ",".join(f"a{a}" for a in traj) + ")"


OOD = [i for i in range(len(TRAJECTORIES)) if i not in {index(d) for d in DEMOS}]


class Policy(nn.Module):
    """pi(a_t | a_<t): a GRU over embeddings of the previous action (a start token first)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(N_ACTIONS + 1, hidden)  # index N_ACTIONS is the start token
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, N_ACTIONS)

    def forward(self, trajs):
        """Exact log pi(tau) of each trajectory [N, DEPTH] -> [N]: the sum of per-step log-probs."""
        start = torch.full_like(trajs[:, :1], N_ACTIONS)
        h, _ = self.gru(self.embed(torch.cat([start, trajs[:, :-1]], 1)))
        logp = F.log_softmax(self.head(h), -1)
        return logp.gather(-1, trajs.unsqueeze(-1)).squeeze(-1).sum(-1)


def sft(policy, steps, lr):
    """Maximum likelihood on the demonstrations, full batch (App. E)."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    demos = torch.tensor(DEMOS)
    for _ in range(steps):
        loss = -policy(demos).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def train_daa(policy, ref_logps, loss, beta, steps, lr):
    """Optimise Eq. 4 on the single preference; returns the probabilities of all 27
    trajectories after every step [steps + 1, 27] (row 0 = the reference)."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    w, l = index(CHOSEN), index(REJECTED)
    history = []
    for step in range(steps + 1):
        logps = policy(TRAJECTORIES)  # all 27 in one forward: the loss needs 2, the plots all
        history.append(logps.detach().exp())
        if step == steps:
            break
        losses, _, _ = daa_loss(logps[w:w + 1], logps[l:l + 1], ref_logps[w:w + 1], ref_logps[l:l + 1],
                                beta, loss)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    return torch.stack(history)


def run_summary(loss, beta, seed, probs, n_top=5):
    """One row of summary.json["runs"] from a run's probability history [steps + 1, 27]."""
    ood = probs[:, OOD].sum(1)
    final = probs[-1]
    top = sorted(OOD, key=lambda i: -final[i].item())[:n_top]
    return {"loss": loss, "beta": beta, "seed": seed,
            "final_ood_mass": ood[-1].item(), "max_ood_mass": ood.max().item(),
            "final_pref_probs": {"chosen": final[index(CHOSEN)].item(),
                                 "rejected": final[index(REJECTED)].item()},
            "top_ood": [[TRAJECTORIES[i].tolist(), final[i].item()] for i in top]}


def proposition1(beta=0.1, steps=1000, lr=1e-2):
    """Prop. 1: one state, three responses, D = {y1 > y2, y2 > y1}, uniform reference.

    The DPO loss sees only log pi(y1) - log pi(y2), so every policy with
    pi(y1) = pi(y2) has the same loss, log 2 -- the minimum for this D -- whatever it
    puts on y3, which is in no data: (0.5, 0.5, 0) and (0, 0, 1) tie. Training from the
    reference (softmax logits, Adam) shows the objective does nothing to y3: full batch,
    the gradient is exactly zero; one random pair per step, y3's logit still gets zero
    gradient and its mass moves only through the normaliser.
    """
    ref = torch.full((3,), 1 / 3, dtype=torch.float64).log()

    def dpo(logits, pairs=((0, 1), (1, 0))):
        logp = F.log_softmax(logits, -1)
        w, l = [p[0] for p in pairs], [p[1] for p in pairs]
        return daa_loss(logp[w], logp[l], ref[w], ref[l], beta, "dpo")[0].mean()

    # (0, 0, 1) as a limit: pi(y1) = pi(y2) = e^-100 / Z, which is 0 at any printed precision
    policies = {"(0.5, 0.5, 0)": torch.tensor([0.0, 0.0, -math.inf], dtype=torch.float64),
                "(0, 0, 1)": torch.tensor([-100.0, -100.0, 0.0], dtype=torch.float64)}
    out = {"beta": beta, "log2": math.log(2), "losses": {k: dpo(v).item() for k, v in policies.items()}}
    gen = torch.Generator().manual_seed(0)
    for mode in ("full_batch", "one_pair_per_step"):
        logits = ref.clone().requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=lr)
        for _ in range(steps):
            pairs = ((0, 1), (1, 0))
            if mode == "one_pair_per_step":
                pairs = (pairs[torch.randint(2, (1,), generator=gen).item()],)
            opt.zero_grad()
            dpo(logits, pairs).backward()
            opt.step()
        out[mode] = {"y3_mass": F.softmax(logits.detach(), -1)[2].item(), "loss": dpo(logits.detach()).item(),
                     "probs": F.softmax(logits.detach(), -1).tolist()}
    out["y3_mass_reference"] = 1 / 3
    return out


def save_figure(fig, path):
    files.save_figure(fig, path)
    plt.close(fig)


def plot_run(ax_ood, ax_pref, probs, legend=True):
    """Figs. 9-17: top, every OOD trajectory's probability; bottom, the preference pair's."""
    steps = torch.arange(len(probs))
    shown = [i for i in OOD if probs[:, i].max() > 0.02]
    for i in OOD:
        if i in shown:
            ax_ood.plot(steps, probs[:, i], lw=1.2, label=name(TRAJECTORIES[i].tolist()))
        else:
            ax_ood.plot(steps, probs[:, i], lw=0.5, color="0.75")
    ax_ood.plot(steps, probs[:, OOD].sum(1), "k--", lw=1.2, label="all OOD")
    ax_ood.set_ylabel("P(OOD trajectory)")
    ax_pref.plot(steps, probs[:, index(CHOSEN)], color="tab:green", label=f"chosen {name(CHOSEN)}")
    ax_pref.plot(steps, probs[:, index(REJECTED)], color="tab:red", label=f"rejected {name(REJECTED)}")
    ax_pref.plot(steps, probs[:, index(DEMOS[2])], color="tab:blue", ls=":", label=f"demo {name(DEMOS[2])}")
    ax_pref.set_ylabel("P(trajectory)")
    ax_pref.set_xlabel("DAA step (log scale past 10)")
    for ax in (ax_ood, ax_pref):
        ax.set_ylim(-0.02, 1.02)
        ax.set_xscale("symlog", linthresh=10)  # most of the movement happens in the first ~30 steps
        if legend:
            ax.legend(fontsize=6, loc="upper left", ncol=2)


def plot_cell(probs, loss, beta, seed, path):
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True, dpi=90)
    plot_run(a, b, probs)
    a.set_title(f"{loss.upper()}, beta = {beta}, seed {seed}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_seeds(histories, loss, beta, path):
    """Fig. 18: the same run repeated with different seeds."""
    n = len(histories)
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 5.5), sharex=True, squeeze=False, dpi=90)
    for s, probs in enumerate(histories):
        plot_run(axes[0, s], axes[1, s], probs, legend=True)
        axes[0, s].set_title(f"{loss.upper()}, beta = {beta}, seed {s}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_grid(results, losses, betas, n_seeds, path):
    """All (loss, beta) cells: OOD mass (solid) and the chosen trajectory's probability
    (dashed) over training, one colour per seed."""
    fig, axes = plt.subplots(len(losses), len(betas), figsize=(3.2 * len(betas), 2.6 * len(losses)),
                             sharex=True, sharey=True, squeeze=False, dpi=90)
    for r, loss in enumerate(losses):
        for c, beta in enumerate(betas):
            ax = axes[r, c]
            finals = []
            for seed in range(n_seeds):
                probs = results[loss, beta, seed]
                ood = probs[:, OOD].sum(1)
                finals.append(ood[-1].item())
                ax.plot(ood, color=f"C{seed}", lw=1.2, label=f"OOD mass, seed {seed}")
                ax.plot(probs[:, index(CHOSEN)], color=f"C{seed}", lw=0.8, ls="--",
                        label=f"P{name(CHOSEN)}, seed {seed}")
            ax.set_title(f"{loss.upper()} beta={beta}: final OOD {sum(finals) / len(finals):.2f}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xscale("symlog", linthresh=10)
            if c == 0:
                ax.set_ylabel("probability")
            if r == len(losses) - 1:
                ax.set_xlabel("DAA step (log past 10)")
    axes[0, 0].legend(fontsize=5, loc="center right")
    fig.suptitle("Tree MDP (App. E): OOD mass (solid) and chosen probability (dashed), mean over seeds in titles",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def report(results, runs, losses, betas, args):
    """The per-cell, seed and grid plots (Figs. 7, 9–18) and the table of final OOD mass."""
    for loss in losses:
        for beta in betas:
            plot_cell(results[loss, beta, 0], loss, beta, 0, os.path.join(args.out, f"{loss}_beta{beta}.png"))
    if "dpo" in losses:
        for beta in betas:
            plot_seeds([results["dpo", beta, s] for s in range(args.seeds)], "dpo", beta,
                       os.path.join(args.out, f"fig18_dpo_beta{beta}_seeds.png"))
    plot_grid(results, losses, betas, args.seeds, os.path.join(args.out, "grid.png"))

    print("\nfinal OOD mass, mean over seeds (min-max)")
    print("loss  " + "".join(f"{'beta=' + str(b):>20}" for b in betas))
    for loss in losses:
        cells = []
        for beta in betas:
            v = [r["final_ood_mass"] for r in runs if r["loss"] == loss and r["beta"] == beta]
            cells.append(f"{sum(v) / len(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        print(f"{loss:<6}" + "".join(f"{c:>20}" for c in cells))


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for plots and summary.json")
    p.add_argument("--seeds", type=int, default=3, help="seeds per (loss, beta); each seed re-initialises and re-runs SFT")
    p.add_argument("--sft-steps", type=int, default=100, help="full-batch Adam steps of SFT on the 3 demonstrations")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="Adam learning rate of SFT")
    p.add_argument("--steps", type=int, default=1000, help="full-batch Adam steps of each DAA run")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the DAA runs")
    p.add_argument("--hidden", type=int, default=64, help="GRU hidden size (also the action embedding size)")
    p.add_argument("--losses", default="dpo,ipo,slic", help="comma-separated DAA losses (daa.LOSSES; default: the "
                   "paper's three, App. E)")
    p.add_argument("--betas", default=",".join(map(str, BETAS)), help="comma-separated betas")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    losses = args.losses.split(",")
    try:
        betas = [float(b) for b in args.betas.split(",")]
    except ValueError:
        raise ValueError(f"--betas {args.betas!r}: expected comma-separated numbers, e.g. 0.01,0.1,0.5") from None
    if any(l not in LOSSES for l in losses):
        raise ValueError(f"--losses {args.losses!r}: choose from {', '.join(LOSSES)}")
    if args.seeds < 1 or args.steps < 1 or args.sft_steps < 0 or min(betas) <= 0:
        raise ValueError("--seeds and --steps must be >= 1, --sft-steps >= 0, every beta > 0")
    torch.set_num_threads(1)  # 27 x 3 x 64 tensors: threads only add overhead
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    prop1 = proposition1()
    print(f"Proposition 1 (DPO, beta={prop1['beta']}): loss at (0.5, 0.5, 0) = {prop1['losses']['(0.5, 0.5, 0)']:.6f}, "
          f"at (0, 0, 1) = {prop1['losses']['(0, 0, 1)']:.6f} (log 2 = {math.log(2):.6f}); training from the "
          f"uniform reference leaves y3 at {prop1['full_batch']['y3_mass']:.4f} (full batch), "
          f"{prop1['one_pair_per_step']['y3_mass']:.4f} (one pair per step)")

    results, runs = {}, []
    n_runs, done = args.seeds * len(losses) * len(betas), 0
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        ref = sft(Policy(args.hidden), args.sft_steps, args.sft_lr)
        for q in ref.parameters():
            q.requires_grad_(False)
        with torch.no_grad():
            ref_logps = ref(TRAJECTORIES)
        demo_mass = ref_logps[[index(d) for d in DEMOS]].exp()
        print(f"seed {seed}: SFT puts {demo_mass.sum():.3f} on the demonstrations "
              f"({', '.join(f'{m:.3f}' for m in demo_mass)})")
        for loss in losses:
            for beta in betas:
                policy = copy.deepcopy(ref).requires_grad_(True)
                probs = train_daa(policy, ref_logps, loss, beta, args.steps, args.lr)
                results[loss, beta, seed] = probs
                runs.append(run_summary(loss, beta, seed, probs))
                done += 1
                rate = (time.time() - t0) / done
                r = runs[-1]
                print(f"{loss} beta={beta} seed {seed}: final OOD {r['final_ood_mass']:.3f} "
                      f"(max {r['max_ood_mass']:.3f}), chosen {r['final_pref_probs']['chosen']:.3f} "
                      f"| run {done}/{n_runs}, {rate:.1f} s/run, ETA {rate * (n_runs - done):.0f} s")

    report(results, runs, losses, betas, args)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "losses", "betas")}
    config.update(losses=losses, betas=betas, optimizer="Adam, full batch", policy="GRU",
                  demonstrations=DEMOS, chosen=CHOSEN, rejected=REJECTED)
    runtime = time.time() - t0
    files.write_json(os.path.join(args.out, "summary.json"),
                     {"config": config, "runs": runs, "proposition1": prop1, "runtime_s": runtime}, indent=1)
    print(f"wrote {args.out}/summary.json and plots in {runtime:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
