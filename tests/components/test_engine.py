"""The shared training loop: resume identity, accumulation, DDP equivalence, NaN stop."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from components.io import torch_load
from components.training.distributed import DistInfo, EpochLoader
from components.training.engine import NonFiniteLossError, TrainConfig, Trainer, is_finished, mark_finished
from components.training.optim import adamw, param_groups
from components.training.schedules import warmup_cosine


class NoisyToy(Dataset):
    """Regression data with a random augmentation drawn from the global torch RNG."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(8), self.y[i]


def make_model(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))


def step_fn(model, batch, step):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    return loss, {"mse": loss.item()}


def train(tmp, steps, batch_size=4, accum=1, dropout=0.1, fail_at=None, info=DistInfo(), ckpt_every=3, fingerprint="a"):
    model = make_model(dropout)
    opt = adamw(param_groups(model, 0.05), lr=1e-2)
    cfg = TrainConfig(
        total_steps=steps,
        batch_size=batch_size,
        accum_steps=accum,
        clip_grad=1.0,
        ckpt_dir=tmp,
        ckpt_every=ckpt_every,
        log_every=1,
        fingerprint=fingerprint,
        progress=False,
    )
    trainer = Trainer(model, opt, cfg, torch.device("cpu"), info, lr_fn=lambda s: warmup_cosine(s, steps, 2, 1e-2))

    def fn(m, batch, step):
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt("killed")
        return step_fn(m, batch, step)

    loader = EpochLoader(NoisyToy(), batch_size, seed=7, info=info)
    trainer.fit(loader, fn)
    return model, trainer


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path):
    straight, _ = train(tmp_path / "a", steps=20, ckpt_every=5)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", steps=20, ckpt_every=5, fail_at=14)  # 12 steps an epoch; last checkpoint mid-epoch
    resumed, trainer = train(tmp_path / "b", steps=20, ckpt_every=5)
    assert trainer.resumed_from == 10
    assert torch.equal(flat(straight), flat(resumed))
    assert [r["step"] for r in trainer.history] == list(range(1, 21))


def test_checkpoint_from_other_params_is_not_resumed(tmp_path):
    train(tmp_path, steps=6)
    _, trainer = train(tmp_path, steps=6, fingerprint="b")
    assert trainer.resumed_from is None


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    big, _ = train(tmp_path / "a", steps=6, batch_size=8, dropout=0.0)
    acc, _ = train(tmp_path / "b", steps=6, batch_size=4, accum=2, dropout=0.0)
    assert not torch.allclose(flat(big), flat(make_model(0.0)))
    # Same samples in the same order per optimizer step; only the summation order differs.
    loader_big = EpochLoader(NoisyToy(), 8, seed=7)
    loader_acc = EpochLoader(NoisyToy(), 4, seed=7)
    idx_big = [i for i, _, _ in loader_big.sampler]
    idx_acc = [i for i, _, _ in loader_acc.sampler]
    assert idx_big[:40] == idx_acc[:40]
    torch.testing.assert_close(flat(big), flat(acc), rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(tmp_path):
    model = make_model()
    opt = adamw(param_groups(model, 0.0), lr=1e-2)
    cfg = TrainConfig(total_steps=10, batch_size=4, ckpt_dir=tmp_path, ckpt_every=2, progress=False)
    trainer = Trainer(model, opt, cfg, torch.device("cpu"))

    def fn(m, batch, step):
        loss, logs = step_fn(m, batch, step)
        return (loss * float("nan") if step == 5 else loss), logs

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5.*last good checkpoint"):
        trainer.fit(EpochLoader(NoisyToy(), 4, seed=0), fn)
    state = torch_load(tmp_path / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = train(tmp, steps=6, batch_size=4, dropout=0.0, info=DistInfo(rank, world, rank))
        if rank == 0:
            torch.save(flat(model), out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    port = _free_port()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, tmp_path / "ddp", out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single, _ = train(tmp_path / "single", steps=6, batch_size=8, dropout=0.0)
    torch.testing.assert_close(ddp, flat(single), rtol=1e-5, atol=1e-6)


def _ddp_draws_worker(rank, world, port, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # every rank seeds alike, as the stages do, so that the models start alike
        model = make_model(0.0)
        cfg = TrainConfig(total_steps=3, batch_size=4, log_every=1, progress=False)
        trainer = Trainer(
            model, adamw(param_groups(model, 0.05), lr=1e-2), cfg, torch.device("cpu"), DistInfo(rank, world, rank)
        )
        draws = []

        def fn(m, batch, step):
            draws.append(torch.rand(()).item())  # what drop path or box jitter would draw
            loss, _ = step_fn(m, batch, step)
            return loss, {"rank": float(rank)}

        history = trainer.fit(EpochLoader(NoisyToy(), 4, seed=7, info=DistInfo(rank, world, rank)), fn)
        torch.save({"draws": draws, "logged": [r["rank"] for r in history]}, out / f"{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_draw_their_own_randomness_and_log_the_mean(tmp_path):
    """Under DDP every rank starts from the same seed (identical models), but drop path and jitter must
    differ between ranks, or two GPUs add nothing but a copy; the logged stats are the mean over ranks."""
    port = _free_port()
    mp.spawn(_ddp_draws_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["draws"]) == 3 and all(a != b for a, b in zip(r0["draws"], r1["draws"])), (r0, r1)
    assert r0["logged"] == r1["logged"] == [0.5, 0.5, 0.5]


def test_a_finished_runs_checkpoint_is_not_resumed_but_a_later_interrupted_one_is(tmp_path):
    """``dvc repro --force`` keeps the persisted checkpoint: once the run is marked finished, the next run
    trains from scratch (same weights, its own history); a checkpoint that run leaves when killed resumes."""
    first, _ = train(tmp_path, steps=20, ckpt_every=5)
    assert mark_finished(tmp_path) and is_finished(tmp_path)
    shutil.copytree(tmp_path, tmp_path.parent / "copy")  # a clone, a DVC checkout: still the finished run's
    assert is_finished(tmp_path.parent / "copy")
    again, trainer = train(tmp_path, steps=20, ckpt_every=5)
    assert trainer.resumed_from is None and torch.equal(flat(first), flat(again))
    assert mark_finished(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, steps=20, ckpt_every=5, fail_at=14)
    assert not is_finished(tmp_path)  # the marker names the finished run's file, not this one
    _, trainer = train(tmp_path, steps=20, ckpt_every=5)
    assert trainer.resumed_from == 10
