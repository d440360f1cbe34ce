"""Preference losses: pure functions of the four per-pair log-prob vectors.

Each loss takes `PairLogps` (policy and reference summed log-probs of the chosen and rejected completions, shape
(P,) each) and returns a per-pair loss (P,). Nothing here knows about models, batches or files; the formulas follow
TRL 1.16's DPOTrainer term by term so the tests can hold us to its numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    chosen: torch.Tensor  # (P,) policy log p(chosen | prompt)
    rejected: torch.Tensor  # (P,)
    ref_chosen: torch.Tensor  # (P,) reference log p(chosen | prompt)
    ref_rejected: torch.Tensor  # (P,)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected


def sigmoid_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), with cDPO label smoothing.

    loss = -(1-ε) log σ(β Δ) - ε log σ(-β Δ),  Δ = (log πθ(yw) - log πref(yw)) - (log πθ(yl) - log πref(yl)).
    """
    delta = logps.chosen_logratios - logps.rejected_logratios
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


LOSS_TYPES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
}


def preference_loss(logps: PairLogps, loss_type: list[str], beta: float, label_smoothing: float) -> torch.Tensor:
    """Per-pair loss (P,): the sum of the selected losses."""
    total = torch.zeros_like(logps.chosen)
    for name in loss_type:
        total = total + LOSS_TYPES[name](logps, beta=beta, label_smoothing=label_smoothing)
    return total


def rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards β·log(πθ/πref) of chosen and rejected, detached: for metrics only."""
    return beta * logps.chosen_logratios.detach(), beta * logps.rejected_logratios.detach()
