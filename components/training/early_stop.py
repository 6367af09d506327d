"""Early stopping on a held-out part of the labeled split, keeping the best state.

An epoch budget tuned on one dataset is too long or too short on another (issue 27): the remedy the
fine-tuning literature uses when no validation set is given is to set part of the training labels aside,
score the model on them during training, stop once the score has not improved for a few evaluations, and
keep the state that scored best (Prechelt, "Early Stopping - But When?", 1998; the held-out part never
meets the test set, so the test score stays unbiased).

:func:`holdout_split` picks that part, stratified by class and fixed by a seed; :class:`EarlyStopping`
follows the scores. Both are framework-free: the caller scores the model and says how to snapshot it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import Any


def holdout_split(
    indices: Sequence[int], labels: Sequence[Hashable], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, holdout): ``round(fraction * n_c)`` of each class's ``n_c`` indices go to holdout (at most
    ``n_c - 1``, so every class keeps a training image), drawn by ``random.Random(seed)``.

    Which indices are held out depends only on the indices, labels, fraction and seed (not on the order
    given); the two parts are disjoint and together are ``indices``. Train keeps the given order (with
    ``fraction`` 0 it is ``indices`` unchanged), holdout comes back sorted.
    """
    if len(indices) != len(labels):
        raise ValueError(f"holdout_split: {len(indices)} indices but {len(labels)} labels")
    if len(set(indices)) != len(indices):
        raise ValueError("holdout_split: indices repeat")
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout_split: fraction must be in [0, 1), got {fraction}")
    by_class: dict[Hashable, list[int]] = {}
    for i, y in sorted(zip(indices, labels, strict=True), key=lambda p: p[0]):
        by_class.setdefault(y, []).append(i)
    rng = random.Random(seed)
    holdout: list[int] = []
    for y in sorted(by_class, key=repr):
        members = by_class[y]
        take = min(round(fraction * len(members)), len(members) - 1)
        holdout += rng.sample(members, take)
    held = set(holdout)
    return [i for i in indices if i not in held], sorted(held)


class EarlyStopping:
    """Follow held-out scores (higher is better), keep the best state, say when to stop.

    Each :meth:`update` records one evaluation; on a strictly better score it calls ``snapshot()`` and keeps
    what it returns (e.g. a copy of the model's weights). After ``patience`` evaluations in a row without a
    better score, :attr:`stopped` turns true. ``best_state`` is then what to restore. Scores may be numbers
    or tuples (compared in order: e.g. (top-1, -loss) breaks ties of accuracy on a small held-out set by the
    lower loss). ``state_dict``/``load_state_dict`` let a resumed run carry on where it was interrupted.
    """

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1 evaluation, got {patience}")
        self.patience = patience
        self.best_score: Any = None
        self.best_epoch: int | None = None
        self.best_state: Any = None
        self.bad_evals = 0
        self.evals = 0
        self.stopped = False

    def update(self, score: Any, epoch: int, snapshot: Callable[[], Any]) -> bool:
        """Record the score of the state after ``epoch``; returns whether training should stop now."""
        self.evals += 1
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.best_state = score, epoch, snapshot()
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        self.stopped = self.bad_evals >= self.patience
        return self.stopped

    def state_dict(self) -> dict:
        return {
            "best_score": list(self.best_score) if isinstance(self.best_score, tuple) else self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_evals": self.bad_evals,
            "evals": self.evals,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict) -> None:
        score = state["best_score"]
        self.best_score = tuple(score) if isinstance(score, list) else score
        self.best_epoch, self.best_state = state["best_epoch"], state["best_state"]
        self.bad_evals, self.evals, self.stopped = state["bad_evals"], state["evals"], state["stopped"]
