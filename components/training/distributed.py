"""Devices, torchrun/DDP set-up and the resumable, rank-sharded data loader.

The loader visits a permutation fixed by (seed, epoch), split between ranks by stride, so the union of
the ranks' micro-batches at a step is exactly the single-process batch of the same global size. Each
sample's augmentation draws from its own RNG seeded by (seed, epoch, index), so augmentations do not
depend on the number of workers and a run resumed mid-epoch sees exactly the samples it would have seen.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), else run alone.

    gloo on CPU, nccl on CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_preference)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_preference, info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes (identity when running alone)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed, epoch)`` for one rank: the epoch's permutation, strided by rank,
    whole batches only, starting ``skip_batches`` batches in."""

    def __init__(self, n: int, batch_size: int, seed: int, info: DistInfo, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.info, self.shuffle = n, batch_size, seed, info, shuffle
        self.epoch, self.skip_batches = 0, 0

    def batches_per_epoch(self) -> int:
        return (self.n // self.info.world_size) // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        mine = order[self.info.rank :: self.info.world_size][: self.batches_per_epoch() * self.batch_size]
        for idx in mine[self.skip_batches * self.batch_size :]:
            yield idx, sample_seed(self.seed, self.epoch, idx), self.epoch


class SeededDataset(Dataset):
    """Calls ``dataset[index]`` with torch, random and numpy seeded from the sample seed, then puts the
    caller's RNG states back, so loading never disturbs the model's random stream. A dataset whose items
    depend on the epoch (Soft Teacher's views skip the unlabeled images during burn-in) has ``set_epoch``,
    called with the sample's epoch first (in the worker that loads it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        index, seed, epoch = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a CUDA/XPU/MTIA seed call, each with a
            # formatted stack trace, per sample (a third of a fine-tune's loading time on CPU)
            torch.random.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochLoader:
    """A DataLoader that can start any epoch at any batch: ``loader.epoch(e, skip_batches)``.

    Workers persist across epochs; ``len(loader)`` is the number of micro-batches per epoch per rank.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        info: DistInfo = DistInfo(),
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        shuffle: bool = True,
        pin_memory: bool = False,
    ):
        if len(dataset) // info.world_size < batch_size:
            raise ValueError(
                f"dataset of {len(dataset)} samples is smaller than one batch ({batch_size} x {info.world_size} "
                "processes)"
            )
        self.sampler = EpochSampler(len(dataset), batch_size, seed, info, shuffle)
        self.loader = DataLoader(
            SeededDataset(dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=num_workers > 0,
            # Workers' base seed comes from this generator, not the global RNG: starting an iterator
            # must not shift the model's random stream (drop path, masking), or a resumed run diverges.
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator:
        self.sampler.set_epoch(epoch, skip_batches)
        return iter(self.loader)
