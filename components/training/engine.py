"""The training loop every stage shares (MAE, iBOT, fine-tuning, Soft Teacher).

One optimizer step = ``accum_steps`` micro-batches. Schedules are functions of the optimizer step and
are applied before each step (``group['lr'] = lr * group['lr_scale']``; weight decay only on groups that
decay). Mixed precision: bf16 autocast on CUDA, fp32 on CPU (fp16 with a GradScaler on request).
Checkpoints (model, optimizer, scaler, extra state such as an EMA teacher, history and every rank's RNG
state) are written atomically every ``ckpt_every`` steps and at the end, and a run started again with
the same fingerprint resumes from the last one and ends with the same weights as an uninterrupted run.
Only an interrupted run resumes: once the caller has written a run's results it calls :func:`mark_finished`,
and a later run with the same checkpoint directory (``dvc repro --force``, a params change that leaves the
fingerprint alone) trains from scratch, so its weights and timings are its own.
A non-finite loss stops the run before the optimizer step, so the last checkpoint stays good.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from components.io import read_json, torch_load, torch_save, write_json
from components.training.distributed import DistInfo, all_reduce_mean, sample_seed

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
FINISHED = "finished.json"  # names the checkpoint of a completed run, which is never resumed


def _run_token(path: Path) -> str | None:
    """The token of the run that wrote the checkpoint at ``path`` (memory-mapped: the tensors are not read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run")
    except Exception as e:  # noqa: BLE001 (a checkpoint cut short is reported when it is resumed)
        log.debug("%s: no run token (%s)", path, e)
        return None


def mark_finished(ckpt_dir: str | Path) -> bool:
    """Record that the run whose checkpoint is in ``ckpt_dir`` completed; returns whether there was one.
    The marker holds that run's token (written into each of its checkpoints), so it survives copies of the
    directory and does not cover a checkpoint a later run writes: that one was interrupted and resumes."""
    path = Path(ckpt_dir) / CHECKPOINT
    token = _run_token(path) if path.is_file() else None
    if token is None:
        return False
    write_json(Path(ckpt_dir) / FINISHED, {"run": token})
    return True


def finished_token(ckpt_dir: str | Path) -> str | None:
    """The token :func:`mark_finished` recorded in ``ckpt_dir``, if any."""
    marker = Path(ckpt_dir) / FINISHED
    try:
        return read_json(marker).get("run") if marker.is_file() else None
    except (ValueError, AttributeError):
        return None


def is_finished(ckpt_dir: str | Path) -> bool:
    """Whether the checkpoint in ``ckpt_dir`` was written by a run :func:`mark_finished` recorded."""
    path = Path(ckpt_dir) / CHECKPOINT
    token = finished_token(ckpt_dir)
    return token is not None and path.is_file() and _run_token(path) == token


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before corrupting the weights."""


class ResumableLoader(Protocol):
    def __len__(self) -> int: ...  # micro-batches per epoch (this rank)

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterable: ...


@dataclass
class TrainConfig:
    total_steps: int  # optimizer steps
    batch_size: int  # micro-batch per process (for images/s)
    accum_steps: int = 1
    clip_grad: float | None = None
    clip_mode: str = "norm"  # "norm": global norm; "per_param": each tensor's norm (iBOT)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    ckpt_dir: str | Path | None = None
    ckpt_every: int = 100
    log_every: int = 10
    fingerprint: str = ""  # a checkpoint written under another fingerprint is not resumed
    desc: str = "train"
    progress: bool = True
    compile: bool = False
    compile_backend: str = field(default_factory=lambda: compile_backend())

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.clip_mode not in ("norm", "per_param"):
            raise ValueError(f"clip_mode must be 'norm' or 'per_param', got {self.clip_mode!r}")


def compile_backend() -> str:
    """torch.compile's backend: inductor, or ``MIMFLOW_COMPILE_BACKEND`` (``eager`` runs dynamo's graph capture
    without code generation: the CPU smoke runs of the GPU profile)."""
    return os.environ.get("MIMFLOW_COMPILE_BACKEND", "inductor")


def move_to(batch: Any, device: torch.device) -> Any:
    """Move tensors in nested tuples/lists/dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def clip_per_param(params: Iterable[torch.Tensor], clip: float) -> None:
    """Scale each parameter's gradient to norm <= clip (DINO/iBOT ``clip_gradients``)."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs ``step_fn`` over a resumable loader for ``cfg.total_steps`` optimizer steps.

    ``step_fn(model, batch, step) -> (loss, logs)`` gets the (DDP-wrapped) model and a batch already on
    the device, runs under autocast, and returns the loss to minimise and floats to log.

    The order of one optimizer step ``step`` (counted from 0; ``fit`` and ``_optimizer_step``):

    1. schedules: ``lr_fn(step)`` x each group's ``lr_scale`` (layer decay) and ``wd_fn(step)`` on the
       groups that decay, written into the optimizer;
    2. ``accum_steps`` micro-batches: moved to the device, ``step_fn`` under autocast, backward of
       ``loss / accum_steps`` (DDP synchronises the gradients on the last micro-batch only);
    3. the loss and logs averaged over micro-batches and processes; a non-finite loss stops the run here,
       before the optimizer touches the weights;
    4. gradients unscaled (fp16), then ``grad_hook(step)`` (iBOT: the head's last layer frozen), then
       clipping (global norm, or each tensor's norm with ``clip_mode="per_param"``);
    5. the optimizer step, the scaler update, gradients zeroed;
    6. ``after_step(step)``: the EMA teacher update (iBOT, Soft Teacher);
    7. ``step += 1``; every ``log_every`` steps (and at the last) a record (loss, lr, images/s, logs) is
       appended to ``history`` and passed to ``on_log(step, record)``;
    8. at the end of an epoch, ``on_epoch_end(epoch)`` (evaluation; the model is put back in train mode),
       its results appended to ``history`` and passed to ``on_log``;
    9. a checkpoint every ``ckpt_every`` steps, at the end of an epoch (with ``on_epoch_end``) and at the
       last step.

    Before the first step, ``fit`` resumes from the last checkpoint of an interrupted run (see the module).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        device: torch.device,
        info: DistInfo = DistInfo(),
        *,
        lr_fn: Callable[[int], float] | None = None,
        wd_fn: Callable[[int], float] | None = None,
        grad_hook: Callable[[int], None] | None = None,
        after_step: Callable[[int], None] | None = None,
        extra_state: dict[str, Any] | None = None,
        on_log: Callable[[int, dict], None] | None = None,
        stop_when: Callable[[], bool] | None = None,
        find_unused_parameters: bool = False,
    ):
        self.raw, self.optimizer, self.cfg, self.device, self.info = model, optimizer, cfg, device, info
        self.lr_fn, self.wd_fn, self.grad_hook, self.after_step = lr_fn, wd_fn, grad_hook, after_step
        self.extra_state = extra_state or {}
        self.on_log = on_log
        self.stop_when = stop_when or (lambda: False)  # checked after each epoch's on_epoch_end (early stopping)
        model.to(device)
        wrapped: nn.Module = model
        if info.is_distributed:
            wrapped = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        self.model = torch.compile(wrapped, backend=cfg.compile_backend) if cfg.compile else wrapped
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.history: list[dict] = []
        self.resumed_from: int | None = None
        self.run_token = uuid.uuid4().hex  # in each checkpoint of this run (a resumed run keeps the one it resumes)
        # Set the initial weight decay so wd_fn groups start right (iBOT weight-decay schedule).
        for g in optimizer.param_groups:
            g.setdefault("lr_scale", 1.0)
            g["decays"] = g.get("weight_decay", 0.0) > 0

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.cfg.ckpt_dir) / CHECKPOINT if self.cfg.ckpt_dir else None

    def _gather_rng(self) -> list[dict]:
        mine = rng_state()
        if not self.info.is_distributed:
            return [mine]
        states: list = [None] * self.info.world_size
        dist.all_gather_object(states, mine)
        return states

    def save_checkpoint(self) -> None:
        rngs = self._gather_rng()  # collective: every rank takes part
        if self.checkpoint_path is None or not self.info.is_main:
            return
        state = {
            "run": self.run_token,
            "fingerprint": self.cfg.fingerprint,
            "step": self.step,
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
            "history": self.history,
            "rng": rngs,
        }
        torch_save(self.checkpoint_path, state)

    def try_resume(self) -> bool:
        """Load the last checkpoint if there is one written under the same fingerprint by a run that was
        interrupted (a finished run's checkpoint is not resumed: the run trains from scratch)."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        state = torch_load(path)
        finished = finished_token(path.parent)
        if finished is not None and state.get("run") == finished:
            log.info("%s: the checkpoint of a finished run; training %s from scratch", path, self.cfg.desc)
            return False
        if state.get("fingerprint") != self.cfg.fingerprint:
            log.warning("%s: written for other params (fingerprint differs); starting from scratch", path)
            return False
        try:
            self.raw.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            for k, v in self.extra_state.items():
                v.load_state_dict(state["extra"][k])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: checkpoint does not match the model ({str(e).splitlines()[0]})") from None
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.run_token = state.get("run") or self.run_token
        rngs = state["rng"]
        set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        self.resumed_from = self.step
        log.info("resumed %s from %s at step %d", self.cfg.desc, path, self.step)
        return True

    # ----------------------------------------------------------------- one step
    def autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _apply_schedules(self) -> float:
        lr = self.lr_fn(self.step) if self.lr_fn else self.optimizer.param_groups[0]["lr"]
        wd = self.wd_fn(self.step) if self.wd_fn else None
        for g in self.optimizer.param_groups:
            if self.lr_fn:
                g["lr"] = lr * g["lr_scale"]
            if wd is not None and g["decays"]:
                g["weight_decay"] = wd
        return lr

    def _optimizer_step(self, batches: Iterable, step_fn: Callable) -> tuple[float, dict]:
        cfg = self.cfg
        logs_sum: dict[str, float] = defaultdict(float)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.accum_steps):
            batch = move_to(next(batches), self.device)
            last = micro == cfg.accum_steps - 1
            sync = (
                self.model.no_sync()
                if self.info.is_distributed and not last and hasattr(self.model, "no_sync")
                else nullcontext()
            )
            with sync:
                with self.autocast():
                    loss, logs = step_fn(self.model, batch, self.step)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().float()
            for k, v in logs.items():
                logs_sum[k] += float(v) / cfg.accum_steps
        keys = sorted(logs_sum)  # every rank logs the same keys: one all-reduce averages them with the loss
        stats = torch.tensor([0.0] + [logs_sum[k] for k in keys], dtype=torch.float64, device=self.device)
        stats[0] = loss_sum / cfg.accum_steps
        stats = all_reduce_mean(stats)
        loss_value, logs_sum = float(stats[0]), dict(zip(keys, stats[1:].tolist()))
        if not math.isfinite(loss_value):
            where = (
                f"; the last good checkpoint is {self.checkpoint_path}"
                if self.checkpoint_path and self.checkpoint_path.exists()
                else ""
            )
            raise NonFiniteLossError(
                f"{cfg.desc}: loss is {loss_value} at step {self.step}, stopped before the optimizer step{where}"
            )
        self.scaler.unscale_(self.optimizer)
        if self.grad_hook:
            self.grad_hook(self.step)
        if cfg.clip_grad:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.clip_mode == "per_param":
                clip_per_param(params, cfg.clip_grad)
            else:
                logs_sum["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step:
            self.after_step(self.step)
        return loss_value, dict(logs_sum)

    # ----------------------------------------------------------------- the loop
    def fit(
        self, loader: ResumableLoader, step_fn: Callable, on_epoch_end: Callable[[int], dict | None] | None = None
    ) -> list[dict]:
        cfg = self.cfg
        steps_per_epoch = len(loader) // cfg.accum_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"{cfg.desc}: an epoch has {len(loader)} micro-batches, fewer than accum_steps={cfg.accum_steps}"
            )
        if self.info.world_size > 1:  # the ranks share the model's init, not their draws (drop path, jitter)
            torch.manual_seed(sample_seed(torch.initial_seed(), 0, self.info.rank))
        self.try_resume()  # a checkpoint restores each rank's own RNG state
        self.raw.train()
        images_per_step = cfg.batch_size * cfg.accum_steps * self.info.world_size
        bar = tqdm(
            total=cfg.total_steps,
            initial=self.step,
            desc=cfg.desc,
            disable=not (cfg.progress and self.info.is_main),
            dynamic_ncols=True,
        )
        window_t, window_n = time.perf_counter(), 0
        while self.step < cfg.total_steps and not self.stop_when():
            epoch, pos = divmod(self.step, steps_per_epoch)
            batches = iter(loader.epoch(epoch, skip_batches=pos * cfg.accum_steps))
            while pos < steps_per_epoch and self.step < cfg.total_steps:
                lr = self._apply_schedules()
                loss, logs = self._optimizer_step(batches, step_fn)
                self.step, pos, window_n = self.step + 1, pos + 1, window_n + 1
                if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                    elapsed = time.perf_counter() - window_t
                    record = {
                        "step": self.step,
                        "epoch": epoch,
                        "loss": loss,
                        "lr": lr,
                        "images_per_s": images_per_step * window_n / max(elapsed, 1e-9),
                        **logs,
                    }
                    self.history.append(record)
                    window_t, window_n = time.perf_counter(), 0
                    if self.info.is_main and self.on_log:
                        self.on_log(self.step, record)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.0f}")
                bar.update(1)
                epoch_done = pos == steps_per_epoch and on_epoch_end is not None
                if epoch_done:
                    extra = on_epoch_end(epoch)
                    self.raw.train()
                    if extra and self.info.is_main:
                        self.history.append({"step": self.step, "epoch": epoch, **extra})
                        if self.on_log:
                            self.on_log(self.step, extra)
                if cfg.ckpt_dir and (self.step % cfg.ckpt_every == 0 or self.step == cfg.total_steps or epoch_done):
                    self.save_checkpoint()
                if epoch_done and self.stop_when():
                    break
        bar.close()
        return self.history
