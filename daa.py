"""Direct Alignment Algorithms: DPO, IPO and SLiC (Rafailov et al., 2024, Eq. 4).

All three minimise  E_(x, y_w, y_l) [ g(h) ]  over preference pairs, where

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))

is the difference of implicit rewards (over β) and sequence log-probs are sums
over response tokens. Only the convex function g differs:

    loss   g                       source
    dpo    −log σ(βh)              Rafailov et al. 2023
    slic   max(0, 1 − βh)          Zhao et al. 2023 (hinge, calibration term only)
    ipo    (h − 1/(2β))²           Azar et al. 2023
"""
import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "slic")


def daa_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss, length_alpha=0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-example DAA loss (Eq. 4) and the implicit rewards β·log(π/π_ref) of both responses.

    `length_alpha` > 0 adds Park et al.'s length regulariser (used in the paper's
    Fig. 3): the margin βh becomes βh − α(|y_w| − |y_l|), so a longer chosen
    response has to earn its extra length.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)  # βh
    if length_alpha:
        margin = margin - length_alpha * (chosen_lengths - rejected_lengths)
    if loss == "dpo":
        losses = -F.logsigmoid(margin)
    elif loss == "slic":
        losses = torch.relu(1 - margin)
    elif loss == "ipo":
        # (h − 1/(2β))² written through the margin: (βh − 1/2)² / β². This is the
        # DPO reference code's IPO on summed log-probs. It is Eq. 4's form only up
        # to how β enters (the paper's Eq. 4 places β inside g); the minimiser is the
        # same, h* = 1/(2β). TRL's "ipo" averages log-probs over tokens instead of
        # summing them, which changes h by a per-sequence length factor and hence
        # which β values are comparable across the two codebases.
        losses = (margin - 0.5) ** 2 / beta ** 2
    else:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
