"""The guard against reward hacking: a trained reward that keeps rising while a held-out one,
never trained on, falls.

Every `eval_every` epochs the fixed eval batch is scored by both (`reward.heldout`). The guard
keeps the evaluation with the best held-out reward (its checkpoint is `checkpoints/best`) and
counts the evaluations in a row since then where

    r_trained > r_trained(best)  and  r_heldout < r_heldout(best) - tolerance,

the trained reward above its value at the best held-out point while the held-out one has
fallen more than `tolerance` below its best. At `patience` such evaluations it fires: once per
run of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    epoch: int  # the last epoch trained before it (-1: before training)
    trained: float  # the eval batch's mean trained reward
    heldout: float  # its mean held-out reward


class HackingGuard:
    def __init__(self, tolerance: float, patience: int):
        self.tolerance, self.patience = tolerance, patience
        self.best: Evaluation | None = None
        self.streak = 0  # evaluations in a row that look like hacking

    def observe(self, evaluation: Evaluation) -> tuple[bool, bool]:
        """Take an evaluation; returns (it is the best held-out one so far, the guard fires now)."""
        if self.best is None or evaluation.heldout > self.best.heldout:
            self.best, self.streak = evaluation, 0
            return True, False
        hacking = (evaluation.trained > self.best.trained
                   and evaluation.heldout < self.best.heldout - self.tolerance)
        self.streak = self.streak + 1 if hacking else 0
        return False, self.streak == self.patience

    def warning(self, evaluation: Evaluation, heldout_label: str) -> str:
        """The one line the run prints when the guard fires."""
        best = self.best
        since = "training began" if best.epoch < 0 else f"epoch {best.epoch}"
        return (f"warning: epoch {evaluation.epoch}: reward hacking? the trained reward rose "
                f"{best.trained:.3f} -> {evaluation.trained:.3f} while the held-out {heldout_label} fell "
                f"{best.heldout:.3f} -> {evaluation.heldout:.3f} since {since} "
                f"({self.patience} evaluation{'s' if self.patience > 1 else ''} in a row)")
