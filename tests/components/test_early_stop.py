"""Early stopping (issue 27): the held-out part of the labeled split, the stop rule, the best state restored."""

from __future__ import annotations

import random

import pytest
import torch

from components.io import torch_load
from components.training.distributed import EpochLoader
from components.training.early_stop import EarlyStopping, holdout_split
from components.training.engine import TrainConfig, Trainer

from .test_engine import NoisyToy, make_model, step_fn


def labeled_split(n: int = 144, classes: int = 10, seed: int = 3) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    ids = rng.sample(range(1000), n)  # a labeled split: indices into the training images, in prepare's order
    return ids, [i % classes for i in ids]


def test_holdout_is_disjoint_from_the_trained_images_and_covers_the_split():
    ids, labels = labeled_split()
    train, held = holdout_split(ids, labels, 0.2, seed=0)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(ids)
    assert 25 <= len(held) <= 33  # about 20 % of 144
    by_class = {y: [i for i in held if i % 10 == y] for y in range(10)}
    assert all(1 <= len(v) <= 4 for v in by_class.values())  # stratified: each class gives about 20 %
    assert all(any(i % 10 == y for i in train) for y in range(10))
    test_set = set(range(1000, 1360))  # the held-out test images are another list (index.val): never drawn
    assert not (set(held) | set(train)) & test_set


def test_holdout_is_fixed_by_the_seed_whatever_the_order():
    ids, labels = labeled_split()
    a = holdout_split(ids, labels, 0.2, seed=0)
    assert holdout_split(ids, labels, 0.2, seed=0) == a
    shuffled = list(zip(ids, labels, strict=True))
    random.Random(9).shuffle(shuffled)
    b = holdout_split([i for i, _ in shuffled], [y for _, y in shuffled], 0.2, seed=0)
    assert b[1] == a[1] and sorted(b[0]) == sorted(a[0])
    assert holdout_split(ids, labels, 0.2, seed=1)[1] != a[1]
    assert a[0] == [i for i in ids if i not in set(a[1])]  # training images keep prepare's order


def test_holdout_off_leaves_the_split_unchanged_and_bad_input_fails():
    ids, labels = labeled_split()
    assert holdout_split(ids, labels, 0.0, seed=0) == (ids, [])
    assert holdout_split([5, 6], [0, 1], 0.9, seed=0) == ([5, 6], [])  # a class of one image keeps it
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(ids, labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="repeat"):
        holdout_split([1, 1], [0, 0], 0.5, seed=0)


def test_stops_after_patience_evaluations_without_gain_and_keeps_the_best_snapshot():
    es = EarlyStopping(patience=2)
    taken = []

    def snap(tag):
        return lambda: taken.append(tag) or tag

    assert not es.update(50.0, 10, snap("e10"))
    assert not es.update(60.0, 20, snap("e20"))
    assert not es.update(60.0, 30, snap("e30"))  # a tie is no gain
    assert es.update(55.0, 40, snap("e40"))
    assert (es.best_score, es.best_epoch, es.best_state, es.stopped) == (60.0, 20, "e20", True)
    assert taken == ["e10", "e20"]  # snapshots only on a new best
    ties = EarlyStopping(patience=1)
    ties.update((50.0, -1.0), 1, lambda: "a")
    assert not ties.update((50.0, -0.5), 2, lambda: "b")  # same top-1, lower loss: better
    assert ties.best_state == "b"
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)


def test_trainer_stops_early_and_restoring_gives_back_the_best_weights(tmp_path):
    """Wired as finetune does: a score after each epoch, the trainer's stop_when, the best state restored,
    and the stopper's state in the checkpoint (so an interrupted run resumes it)."""
    model = make_model(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    cfg = TrainConfig(total_steps=60, batch_size=8, ckpt_dir=tmp_path, ckpt_every=100, log_every=1, progress=False)
    es = EarlyStopping(patience=2)
    trainer = Trainer(
        model, opt, cfg, torch.device("cpu"), extra_state={"early_stop": es}, stop_when=lambda: es.stopped
    )
    scores = iter([1.0, 3.0, 2.0, 2.5, 9.0, 9.0])  # best after epoch 2, then two evaluations without gain
    weights = {}

    def on_epoch_end(epoch):
        weights[epoch + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        es.update(next(scores), epoch + 1, lambda: {k: v.clone() for k, v in model.state_dict().items()})

    trainer.fit(EpochLoader(NoisyToy(48), 8, seed=0), step_fn, on_epoch_end)
    assert es.stopped and trainer.step == 4 * 6 < cfg.total_steps  # 4 epochs of 6 steps, not 10 epochs
    assert not torch.equal(model[0].weight, weights[2]["0.weight"])
    model.load_state_dict(es.best_state)
    assert all(torch.equal(v, weights[2][k]) for k, v in model.state_dict().items())
    saved = torch_load(trainer.checkpoint_path)["extra"]["early_stop"]
    assert (saved["best_epoch"], saved["stopped"], saved["best_score"]) == (2, True, 3.0)
    again = EarlyStopping(patience=2)
    again.load_state_dict(saved)
    assert again.stopped and torch.equal(again.best_state["0.weight"], weights[2]["0.weight"])
