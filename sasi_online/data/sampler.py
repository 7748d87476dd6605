"""The trainers' sample order as a pure function of (seed, step, trainer rank).

Each epoch is a seeded permutation of the dataset; step s of an epoch takes the s-th
global batch of it, and trainer r takes the r-th share. Being a pure function, it
resumes from a step number alone, and online producers replay it to generate SASI for
the images the trainers will reach soon (look-ahead).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from sasi_online.errors import UserInputError


class StepSampler:
    def __init__(self, dataset_size: int, batch_size: int, num_trainers: int = 1, seed: int = 0):
        if batch_size < 1 or num_trainers < 1:
            raise UserInputError(f"train.batch_size ({batch_size}) and the number of trainers "
                                 f"({num_trainers}) must both be >= 1")
        if dataset_size < batch_size * num_trainers:
            raise UserInputError(
                f"the dataset has {dataset_size} images, fewer than one global batch "
                f"({batch_size} x {num_trainers} trainers): lower train.batch_size"
            )
        self.n = dataset_size
        self.batch_size = batch_size
        self.num_trainers = num_trainers
        self.seed = seed
        self.global_batch = batch_size * num_trainers
        self.steps_per_epoch = dataset_size // self.global_batch  # the remainder is dropped

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int, trainer_rank: int = 0) -> list[int]:
        """Image indices of trainer `trainer_rank`'s batch at global step `step`."""
        perm = self._permutation(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch + trainer_rank * self.batch_size
        return perm[start: start + self.batch_size].tolist()

    def upcoming(self, first_step: int, steps: int) -> list[tuple[int, int, int]]:
        """(step, trainer rank, image index) for the next `steps` steps, in the order trainers reach them."""
        out = []
        for s in range(first_step, first_step + steps):
            for r in range(self.num_trainers):
                out.extend((s, r, i) for i in self.indices(s, r))
        return out
