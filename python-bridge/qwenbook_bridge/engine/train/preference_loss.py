"""Preference losses on chosen/rejected pairs: DPO, ORPO and SimPO, with the metrics TRL logs under the same names.

Each takes the policy's log-probabilities of the two answers of every pair (summed over the answer tokens, with
the answer token counts, so that the length-normalised methods can average) and returns one loss per pair and
per-pair metrics. The step sums both over its micro-batches and divides by the step's pair count, so the loss
and the metrics do not depend on how pairs split into micro-batches.

- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on summed log-probs; with
  `label_smoothing` e, the conservative form -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d) (cDPO).
  rewards = beta * (pi - ref).
- ORPO (Hong et al. 2024): NLL of the chosen answer (its mean token loss) minus beta * log sigmoid(log odds),
  where the odds of an answer come from its mean token log-prob: log odds = (c - r) - (log(1 - e^c) - log(1 - e^r)).
  rewards = beta * mean log-prob. TRL's ORPOTrainer takes the NLL over prompt and answer; here, as in
  LLaMA-Factory, over the chosen answer's tokens only (the prompt is never trained).
- SimPO (Meng et al. 2024): -log sigmoid(beta * (c - r) - gamma) on mean token log-probs, no reference model.
  rewards = beta * mean log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PreferenceMethod = Literal["dpo", "orpo", "simpo"]
METHODS: tuple[str, ...] = ("dpo", "orpo", "simpo")

# Per-step metrics every method reports (TRL's names), and ORPO's extra terms.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "logps/chosen", "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@dataclass
class PairLogps:
    """The policy's log-probabilities of each pair's two answers, summed over the answer tokens ([pairs] each)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens.clamp_min(1), self.rejected / self.rejected_tokens.clamp_min(1)


@dataclass
class PairLoss:
    losses: torch.Tensor                # [pairs], to be summed and divided by the step's pair count
    metrics: dict[str, torch.Tensor]    # name -> [pairs], detached


def _rewards(beta: float, chosen: torch.Tensor, rejected: torch.Tensor, logp_c: torch.Tensor,
             logp_r: torch.Tensor) -> dict[str, torch.Tensor]:
    rc, rr = (beta * chosen).detach(), (beta * rejected).detach()
    return {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
            "rewards/accuracies": (rc > rr).float(), "logps/chosen": logp_c.detach(),
            "logps/rejected": logp_r.detach()}


def dpo_loss(policy: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0) -> PairLoss:
    chosen_ratio = policy.chosen.float() - ref_chosen.float()
    rejected_ratio = policy.rejected.float() - ref_rejected.float()
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return PairLoss(losses, _rewards(beta, chosen_ratio, rejected_ratio, policy.chosen, policy.rejected))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (the two branches meet at -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: PairLogps, *, beta: float) -> PairLoss:
    chosen, rejected = (t.float() for t in policy.mean())
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    metrics = _rewards(beta, chosen, rejected, chosen, rejected)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
    return PairLoss(nll - beta * ratio, metrics)


def simpo_loss(policy: PairLogps, *, beta: float, gamma: float) -> PairLoss:
    chosen, rejected = (t.float() for t in policy.mean())
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return PairLoss(losses, _rewards(beta, chosen, rejected, chosen, rejected))


def metric_names(method: str) -> tuple[str, ...]:
    return REWARD_METRICS + (ORPO_METRICS if method == "orpo" else ())
