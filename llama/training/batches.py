"""Deterministic, resumable batches: the held-out split, micro-batches padded per batch, and
the loader every rank steps through in the same order from the same seed.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from llama.errors import BadInput
from llama.training.data import TokenizedDataset, make_micro_batch

# ----------------------------------------------------------------------------------------------
# Held-out split


def split_dataset(dataset: TokenizedDataset, eval_fraction: float = 0.05, seed: int = 0):
    """(train, held_out), the same for the same seed; each keeps the file's order."""
    if not 0 <= eval_fraction < 1:
        raise BadInput(f"eval_fraction {eval_fraction} must be at least 0 and below 1")
    n_examples = len(dataset)
    n_held_out = 0
    if eval_fraction > 0 and n_examples >= 2:
        n_held_out = max(1, int(n_examples * eval_fraction))
    if n_examples - n_held_out < 1:
        raise BadInput(f"holding out {n_held_out} of {n_examples} examples leaves none to train "
                       "on: lower eval_fraction or use more data")
    generator = torch.Generator().manual_seed(_mix_seed("split", seed))
    order = torch.randperm(n_examples, generator=generator).numpy()
    return dataset.select(np.sort(order[n_held_out:])), dataset.select(np.sort(order[:n_held_out]))


def _mix_seed(purpose: str, *numbers: int) -> int:
    """A 63-bit seed from a purpose and numbers, so (seed, epoch) pairs never collide."""
    text = " ".join([purpose] + [str(number) for number in numbers])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------
# Batches


class BatchLoader:
    """Global batches of micro-batches in a fresh seeded order each epoch; resumable."""

    def __init__(self, dataset: TokenizedDataset, global_batch_size: int, micro_batch_size: int,
                 pad_id: int, seed: int = 0, drop_last: bool = True):
        if micro_batch_size < 1 or global_batch_size < 1:
            raise BadInput(f"batch sizes must be positive (global {global_batch_size}, micro "
                           f"{micro_batch_size})")
        if global_batch_size % micro_batch_size:
            raise BadInput(f"micro_batch_size {micro_batch_size} does not divide "
                           f"global_batch_size {global_batch_size}: pick a divisor")
        if len(dataset) < global_batch_size:
            raise BadInput(f"the dataset has {len(dataset)} examples, fewer than one global batch "
                           f"of {global_batch_size}: lower global_batch_size or add data")
        self.dataset, self.pad_id, self.seed, self.drop_last = dataset, pad_id, seed, drop_last
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.epoch, self.position = 0, 0  # position: examples of this epoch's order used so far
        self._order, self._order_epoch = None, None

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return len(self.dataset) // self.global_batch_size
        return -(-len(self.dataset) // self.global_batch_size)

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_mix_seed("epoch", self.seed, self.epoch))
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
            self._order_epoch = self.epoch
        return self._order

    def next_global_batch(self) -> list:
        """global_batch_size // micro_batch_size micro-batches (fewer only at the end of an epoch
        with drop_last=False), each padded to its own longest example."""
        needed = self.global_batch_size if self.drop_last else 1
        if self.position + needed > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        chosen = self._epoch_order()[self.position:self.position + self.global_batch_size]
        self.position += len(chosen)
        return _micro_batches(self.dataset, chosen, self.micro_batch_size, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        epoch, position = state.get("epoch"), state.get("position")
        if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0
                   for value in (epoch, position)) or position > len(self.dataset):
            raise BadInput(f"data position {state} does not fit a dataset of {len(self.dataset)} "
                           "examples: resume with the same data file and settings")
        self.epoch, self.position = epoch, position


def eval_batches(dataset: TokenizedDataset, micro_batch_size: int, pad_id: int) -> list:
    """Every example once, in dataset order, micro_batch_size at a time (the last may be short)."""
    if micro_batch_size < 1:
        raise BadInput(f"micro_batch_size {micro_batch_size} must be positive")
    return _micro_batches(dataset, range(len(dataset)), micro_batch_size, pad_id)


def _micro_batches(dataset, indices, micro_batch_size: int, pad_id: int) -> list:
    groups = [indices[start:start + micro_batch_size]
              for start in range(0, len(indices), micro_batch_size)]
    return [make_micro_batch([dataset[i] for i in group], pad_id) for group in groups]
