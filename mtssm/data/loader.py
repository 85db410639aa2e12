"""Resumable streaming: a seeded sampler, a padding collate to :class:`tensordict.TensorDict`, and
:func:`make_dataloader` on torchdata's :class:`StatefulDataLoader`.

The sampler yields ``(index, seed)`` pairs: the index order is a permutation drawn from
``(seed, epoch)`` (train) or ``0..N-1`` (eval), and each sample's augmentation seed is drawn from
``(seed, epoch, index)``. Both are pure functions of the loader's state, so a loader rebuilt from
``state_dict()`` yields exactly the batches (ids and pixels) an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from mtssm.data.constants import PAD_VALUES

__all__ = ["SeededSampler", "collate", "make_dataloader"]


class _SeededIterator(Iterator[tuple[int, int]]):
    def __init__(self, sampler: SeededSampler, epoch: int, start: int = 0) -> None:
        self.sampler, self.epoch, self.yielded = sampler, epoch, start
        self._order, self._seeds = sampler.epoch_plan(epoch)

    def __next__(self) -> tuple[int, int]:
        if self.yielded >= len(self._order):
            self.sampler.epoch = max(self.sampler.epoch, self.epoch + 1)  # this epoch is done
            raise StopIteration
        i = self.yielded
        self.yielded += 1
        return int(self._order[i]), int(self._seeds[i])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.__init__(self.sampler, int(state["epoch"]), int(state["yielded"]))
        self.sampler.epoch = self.epoch


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` for ``n`` samples; shuffled per epoch if ``shuffle``.

    ``epoch`` counts the passes run to the end; ``iter()`` starts a pass over epoch ``epoch``
    (creating an iterator twice, as the multi-worker loader does, does not skip an epoch).
    ``state_dict()`` holds ``epoch``.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, seeds) of ``epoch``: order (n,) sample indices, seeds (n,) uint32."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**32, self.n, dtype=np.uint64)
        return order, seeds[order]

    def __iter__(self) -> _SeededIterator:
        return _SeededIterator(self, self.epoch)

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])


def _pad(t: torch.Tensor, h: int, w: int, value: float) -> torch.Tensor:
    dh, dw = h - t.shape[-2], w - t.shape[-1]
    if dh == 0 and dw == 0:
        return t
    return torch.nn.functional.pad(t, (0, dw, 0, dh), value=value)


def collate(samples: Sequence[dict[str, Any] | None]) -> TensorDict:
    """Stack samples (from :class:`mtssm.data.transforms.ToTensor`) into a TensorDict with batch
    size [B]; ``None`` (skipped) samples are dropped. Samples of different sizes are padded at
    the bottom/right to the largest (image 0, labels 255, depth and normals 0); ``meta`` is a
    non-tensor stack of ``{"id", "size"}`` dicts whose ``size`` (H, W) says where to crop back."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return TensorDict({}, batch_size=[0])
    h = max(s["image"].shape[-2] for s in kept)
    w = max(s["image"].shape[-1] for s in kept)
    in_worker = torch.utils.data.get_worker_info() is not None
    data = {}
    for key in kept[0]:
        if key == "meta":
            continue
        parts = [_pad(s[key], h, w, PAD_VALUES[key]) for s in kept]
        out = None
        if in_worker:  # write straight into shared memory, as default_collate does
            numel = sum(p.numel() for p in parts)
            storage = parts[0]._typed_storage()._new_shared(numel, device=parts[0].device)
            out = parts[0].new(storage).resize_(len(parts), *parts[0].shape)
        data[key] = torch.stack(parts, out=out)
    td = TensorDict(data, batch_size=[len(kept)])
    td["meta"] = NonTensorStack(*[NonTensorData(s["meta"]) for s in kept])
    return td


def _worker_init(worker_id: int) -> None:
    """Let glibc reuse freed heap memory for the many same-sized per-sample arrays instead of
    mapping and faulting in fresh pages each time (several times faster on busy machines)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 2,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = 4,
) -> StatefulDataLoader:
    """A resumable loader of :class:`TensorDict` batches over ``dataset``.

    ``train``: shuffle per epoch and drop the last incomplete batch (unless ``drop_last`` says
    otherwise); eval keeps the order and every sample. ``dataset`` must accept ``(index, seed)``
    indices (every :mod:`mtssm.data` dataset does) and produce tensors (use
    :func:`mtssm.data.build_dataset`). ``state_dict()`` / ``load_state_dict()`` resume mid-epoch
    (or between epochs) with exactly the batches an uninterrupted run would give, whatever
    ``num_workers``. An epoch counts as done once iterated to its end; a pass abandoned midway is
    replayed from its start by the next ``iter()``. Workers are persistent across epochs.
    ``pin_memory`` defaults to whether CUDA is available.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return StatefulDataLoader(
        dataset,
        worker_init_fn=_worker_init,
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), shuffle=train, seed=seed),
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=train if drop_last is None else drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
