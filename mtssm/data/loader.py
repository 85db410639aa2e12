"""Resumable streaming: a seeded sampler, a padding collate to :class:`tensordict.TensorDict`, and
:func:`make_dataloader` on torchdata's :class:`StatefulDataLoader`.

The sampler yields ``(index, seed)`` pairs: the index order is a permutation drawn from
``(seed, epoch)`` (train) or ``0..N-1`` (eval), and each sample's augmentation seed is drawn from
``(seed, epoch, index)``. Both are pure functions of the epoch and the position in it, so the
loader's ``state_dict()`` is just those two numbers (counted in the main process as batches are
handed out): a loader rebuilt from it yields exactly the batches (ids and pixels) an uninterrupted
run would have, with any ``num_workers``.

Batches cross from the worker processes compact (uint8 image levels, labels and normal codes, see
``ToTensor(compact=True)``, about a third of the float bytes) and :func:`finalize_batch` turns
them into the float / int64 batch contract in the main process as they are handed out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from mtssm.data.constants import PAD_VALUES
from mtssm.data.datasets import decode_normals
from mtssm.data.io import DataFileError
from mtssm.data.transforms import Compose, ToTensor, normalize_image
from mtssm.runtime import keep_freed_memory

__all__ = ["CompactSamples", "SeededSampler", "collate", "finalize_batch", "make_dataloader"]

_LABEL_KEYS = ("semseg", "human_parts", "sal")
_ENCODED_NORMAL_PAD = 128  # an invalid flag in every channel of the normal codes, see mtssm.data.datasets


class _SeededIterator(Iterator[tuple[int, int]]):
    def __init__(self, sampler: SeededSampler, epoch: int, start: int = 0) -> None:
        self.sampler, self.epoch, self.yielded = sampler, epoch, start
        self._order, self._seeds = sampler.epoch_plan(epoch)

    def __next__(self) -> tuple[int, int]:
        if self.yielded >= len(self._order):
            if self.epoch >= self.sampler.epoch:  # this epoch is done
                self.sampler.epoch, self.sampler.start = self.epoch + 1, 0
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

    ``epoch`` counts the passes run to the end; ``iter()`` starts a pass over epoch ``epoch`` at
    position ``start`` (0 unless a resumed loader set it; creating an iterator twice, as the
    multi-worker loader does, does not skip an epoch). ``state_dict()`` holds ``epoch``.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch, self.start = n, shuffle, seed, 0, 0

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, seeds) of ``epoch``: order (n,) sample indices, seeds (n,) uint32."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**32, self.n, dtype=np.uint64)
        return order, seeds[order]

    def __iter__(self) -> _SeededIterator:
        return _SeededIterator(self, self.epoch, self.start)

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


def _pad_value(key: str, t: torch.Tensor) -> float:
    if key == "normals" and t.dtype == torch.uint8:
        return _ENCODED_NORMAL_PAD
    return PAD_VALUES[key]


def collate(samples: Sequence[dict[str, Any] | None]) -> TensorDict:
    """Stack samples (from :class:`mtssm.data.transforms.ToTensor`, compact or not) into a
    TensorDict with batch size [B]; ``None`` (skipped) samples are dropped. Samples of different
    sizes are padded at the bottom/right, key by key, to the largest of that key (image 0, labels
    255, depth and normals 0, normal codes 128 whose flag is invalid; a compact uint8 image is
    padded with level 0; labels may be larger than the image, see ResizeImage); ``meta`` is
    a non-tensor stack of ``{"id", "size"}`` dicts whose ``size`` (H, W) says where to crop back."""
    for s in samples:
        if isinstance(s, _FileError):  # raised again by the loader in the main process
            return s  # type: ignore[return-value]
    kept = [s for s in samples if s is not None]
    if not kept:
        return TensorDict({}, batch_size=[0])
    in_worker = torch.utils.data.get_worker_info() is not None
    data = {}
    for key in kept[0]:
        if key == "meta":
            continue
        h = max(s[key].shape[-2] for s in kept)
        w = max(s[key].shape[-1] for s in kept)
        parts = [_pad(s[key], h, w, _pad_value(key, s[key])) for s in kept]
        out = None
        if in_worker:  # write straight into shared memory, as default_collate does
            numel = sum(p.numel() for p in parts)
            storage = parts[0]._typed_storage()._new_shared(numel, device=parts[0].device)
            out = parts[0].new(storage).resize_(len(parts), *parts[0].shape)
        data[key] = torch.stack(parts, out=out)
    td = TensorDict(data, batch_size=[len(kept)])
    td["meta"] = NonTensorStack(*[NonTensorData(s["meta"]) for s in kept])
    return td


def finalize_batch(batch: TensorDict, pin_memory: bool = False,
                   normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> TensorDict:
    """A compact batch (from ``ToTensor(compact=True)`` samples) -> the batch contract: ``image``
    uint8 (B, 3, H, W) -> float32 normalised with ``normalization`` (``(mean, std)``; None:
    ImageNet's); ``semseg``, ``human_parts``, ``sal`` -> int64 (B, H, W); ``edge`` uint8 (B, 1, H, W)
    -> float32; ``normals`` uint8 (B, 4, H, W) codes -> float32 (B, 3, H, W) normals (0 where
    invalid, see ``mtssm.data.datasets.decode_normals``). Keys already in their final dtype, and ``meta``,
    are kept as they are. With ``pin_memory`` every tensor of the result is in pinned memory."""

    if not isinstance(batch, TensorDict):
        raise TypeError(f"finalize_batch expects a TensorDict batch (from collate), got {type(batch).__name__}")

    def empty(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype, pin_memory=pin_memory)

    out = {}
    for key, t in batch.items():
        if key == "meta":
            continue
        if key == "image" and t.dtype == torch.uint8:
            t = normalize_image(t, out=empty(t, torch.float32), normalization=normalization)
        elif (key in _LABEL_KEYS and t.dtype != torch.int64) or (key == "edge" and t.dtype != torch.float32):
            dst = empty(t, torch.int64 if key in _LABEL_KEYS else torch.float32)
            np.copyto(dst.numpy(), t.numpy(), casting="unsafe")  # numpy: one thread, see normalize_image
            t = dst
        elif key == "normals" and t.dtype == torch.uint8:
            codes = t.numpy()
            n = torch.empty((t.shape[0], 3) + tuple(t.shape[2:]), dtype=torch.float32, pin_memory=pin_memory)
            for i, dst in enumerate(n.numpy()):
                decode_normals(codes[i].transpose(1, 2, 0), channels_first=True, out=dst)
            t = n
        elif pin_memory and not t.is_pinned():
            t = t.pin_memory()
        out[key] = t
    td = TensorDict(out, batch_size=batch.batch_size)
    if "meta" in batch.keys():
        td["meta"] = batch.get("meta")
    return td


class _FinalizingIterator(Iterator[TensorDict]):
    """Wraps the loader's iterator: each compact batch goes through :func:`finalize_batch`."""

    def __init__(self, it: Iterator[TensorDict], pin_memory: bool, normalization: Any = None) -> None:
        self._it, self._pin_memory, self._normalization = it, pin_memory, normalization

    def __next__(self) -> TensorDict:
        batch = next(self._it)
        if isinstance(batch, _FileError):
            raise batch.error()
        return finalize_batch(batch, self._pin_memory, self._normalization)

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]


class _CountingIterator(Iterator[Any]):
    """Wraps one pass of a :class:`_Loader`: records in the loader the sampler position of every
    batch handed out (``(epoch, position)``; ``(epoch + 1, 0)`` once the pass ends)."""

    def __init__(self, it: Iterator[Any], loader: _Loader, epoch: int, start: int) -> None:
        self._it, self._loader, self._epoch, self._position = it, loader, epoch, start
        loader._position = (epoch, start)

    def __next__(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            self._loader._position = (self._epoch + 1, 0)
            raise
        self._position += self._loader.batch_size
        self._loader._position = (self._epoch, self._position)
        return batch

    def __len__(self) -> int:
        return len(self._it)  # type: ignore[arg-type]


class _Loader(StatefulDataLoader):
    """:class:`StatefulDataLoader` whose batches go through :func:`finalize_batch` when
    ``finalize_pin_memory`` is not None (the value says whether to pin them), and whose state is
    the sampler's epoch and position, the same whatever ``num_workers`` (torchdata's own state
    holds the workers' and does not load into a loader with another count; such states, from
    older checkpoints, still load into a loader of their count)."""

    STATE_KEY = "mtssm_sampler_position"

    def __init__(self, *args: Any, finalize_pin_memory: bool | None = None, normalization: Any = None,
                 **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata's __init__ calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self._finalize_pin_memory = finalize_pin_memory
        self._normalization = normalization

    def __iter__(self) -> Iterator[TensorDict]:
        sampler: SeededSampler = self.sampler  # type: ignore[assignment]
        epoch, start = sampler.epoch, sampler.start
        it: Iterator[Any] = _CountingIterator(super().__iter__(), self, epoch, start)
        if self._finalize_pin_memory is None:
            return it
        return _FinalizingIterator(it, self._finalize_pin_memory, self._normalization)

    def state_dict(self) -> dict[str, Any]:
        """``{STATE_KEY: [epoch, position]}``: the pass and the sampler position of the next batch."""
        sampler: SeededSampler = self.sampler  # type: ignore[assignment]
        position = getattr(self, "_position", None) or (sampler.epoch, sampler.start)
        return {self.STATE_KEY: [int(position[0]), int(position[1])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.STATE_KEY not in state:  # torchdata's own state (checkpoints of earlier versions)
            saved = state.get("_snapshot", {}).get("_main_snapshot", {}).get("_num_workers", 0)
            if saved != self.num_workers:
                raise ValueError(
                    f"this loader state was written by an earlier mtssm with data.num_workers={saved}; "
                    f"resume it with data.num_workers={saved}"
                )
            super().load_state_dict(state)
            return
        epoch, position = (int(v) for v in state[self.STATE_KEY])
        sampler: SeededSampler = self.sampler  # type: ignore[assignment]
        sampler.epoch, sampler.start = epoch, position
        self._position = (epoch, position)


class _FileError:
    """A :class:`DataFileError` raised while reading a sample, carried (in a worker process, as the
    batch) to the main process, where the loader raises it again: the same one line whatever
    ``num_workers``, instead of the worker's traceback."""

    def __init__(self, exc: DataFileError) -> None:
        self.path, self.problem = exc.path, exc.problem

    def error(self) -> DataFileError:
        return DataFileError(self.path, self.problem)


class CompactSamples(Dataset):
    """The compact samples of ``dataset`` (``dataset.sample(index, seed, compact=True)``, see
    :meth:`mtssm.data.datasets.DenseDataset.sample`), indexed by the sampler's ``(index, seed)``.
    A file error becomes a value that :func:`collate` passes on and the loader raises."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | _FileError | None:
        index, seed = key
        try:
            return self.dataset.sample(index, seed, compact=True)  # type: ignore[attr-defined]
        except DataFileError as exc:
            return _FileError(exc)


def _normalization_of(dataset: Dataset) -> Any:
    """The ``(mean, std)`` of the final :class:`ToTensor` of ``dataset.transforms`` (None: ImageNet's),
    which :func:`finalize_batch` applies to compact batches."""
    transforms = getattr(dataset, "transforms", None)
    last = transforms.transforms[-1] if isinstance(transforms, Compose) and transforms.transforms else transforms
    return last.normalization if isinstance(last, ToTensor) else None


def _worker_init(worker_id: int) -> None:
    """Let glibc reuse freed heap memory for the many same-sized per-sample arrays instead of
    mapping and faulting in fresh pages each time (several times faster on busy machines)."""
    keep_freed_memory(mmap_threshold=256 << 20, trim_threshold=512 << 20)


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

    When ``dataset.supports_compact`` (the datasets of :func:`mtssm.data.build_dataset`), the
    loader asks it for compact samples (:class:`CompactSamples`, its ``dataset`` attribute) and
    converts each batch with :func:`finalize_batch` before handing it out: the workers ship a
    third of the bytes and the batches are the same, except that eval batches mixing image sizes
    pad the image with level 0 (normalised, as :class:`~mtssm.data.transforms.PadTo` and the
    train crop pad it) rather than with 0.0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    compact = CompactSamples(dataset) if getattr(dataset, "supports_compact", False) else None
    if compact is not None and pin and not torch.cuda.is_available():
        warnings.warn("pin_memory=True but CUDA is not available: batches are not pinned", stacklevel=2)
        pin = False
    return _Loader(
        dataset if compact is None else compact,
        finalize_pin_memory=None if compact is None else pin,
        normalization=None if compact is None else _normalization_of(dataset),
        worker_init_fn=_worker_init,
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), shuffle=train, seed=seed),
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=train if drop_last is None else drop_last,
        pin_memory=pin and compact is None,  # finalize_batch pins what it writes
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
