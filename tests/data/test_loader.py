"""Batches as TensorDicts, eval padding, determinism, and mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchdata.stateful_dataloader import StatefulDataLoader

from mtssm.data import build_dataset, make_dataloader
from mtssm.data.loader import CompactSamples, collate, finalize_batch
from mtssm.data.transforms import ToTensor

CROP = (32, 40)


def _ids(batches: list[TensorDict]) -> list[str]:
    return [m["id"] for b in batches for m in b["meta"].tolist()]


def test_train_batches_have_the_contracted_keys_and_dtypes(pascal_root: Path) -> None:
    ds = build_dataset("pascal", pascal_root, "train", train=True, crop_size=CROP)
    batch = next(iter(make_dataloader(ds, 2, train=True, num_workers=0)))
    assert isinstance(batch, TensorDict) and batch.batch_size == torch.Size([2])
    assert batch["image"].shape == (2, 3, *CROP) and batch["image"].dtype == torch.float32
    for key in ("semseg", "human_parts", "sal"):
        assert batch[key].shape == (2, *CROP) and batch[key].dtype == torch.int64
    assert batch["normals"].shape == (2, 3, *CROP) and batch["edge"].shape == (2, 1, *CROP)
    assert set(batch["sal"].unique().tolist()) <= {0, 1, 255}
    assert [set(m) for m in batch["meta"].tolist()] == [{"id", "size"}] * 2


def test_eval_pads_to_a_common_size_and_keeps_original_sizes(pascal_root: Path) -> None:
    ds = build_dataset("pascal", pascal_root, "train", train=False)
    loader = make_dataloader(ds, 5, train=False, num_workers=0)
    batch = next(iter(loader))
    metas = batch["meta"].tolist()
    sizes = [tuple(m["size"]) for m in metas]
    assert len(set(sizes)) > 1  # the rendered PASCAL images differ in size
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    assert batch["image"].shape[-2:] == (h, w)
    for i, (sh, sw) in enumerate(sizes):
        assert (batch["semseg"][i, sh:] == 255).all() and (batch["semseg"][i, :, sw:] == 255).all()
        assert (batch["normals"][i, :, sh:] == 0).all() and (batch["edge"][i, :, :, sw:] == 255).all()
        assert (batch["semseg"][i, :sh, :sw] != 255).any()
    assert [m["id"] for m in metas] == ds.ids[:5]  # eval keeps the order


def test_train_shuffles_per_epoch_and_is_deterministic(nyud_root: Path) -> None:
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    a = make_dataloader(ds, 2, train=True, num_workers=0, seed=1)
    b = make_dataloader(ds, 2, train=True, num_workers=0, seed=1)
    epoch1, epoch2 = list(a), list(a)
    assert _ids(epoch1) != _ids(epoch2) and sorted(_ids(epoch1)) == sorted(_ids(epoch2)) == sorted(ds.ids)
    for x, y in zip(epoch1, list(b)):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["semseg"], y["semseg"])
    c = make_dataloader(ds, 2, train=True, num_workers=0, seed=2)
    assert _ids(list(c)) != _ids(epoch1) or _ids(list(c)) != _ids(epoch2)


def test_drop_last(nyud_root: Path) -> None:
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    assert len(list(make_dataloader(ds, 4, train=True, num_workers=0))) == 1  # 6 samples
    assert len(list(make_dataloader(ds, 4, train=True, num_workers=0, drop_last=False))) == 2
    assert len(list(make_dataloader(ds, 4, train=False, num_workers=0))) == 2


@pytest.mark.parametrize("num_workers, resumed_workers, k", [(0, 0, 1), (0, 0, 3), (2, 2, 2), (2, 2, 3), (2, 0, 1), (0, 1, 2)])
def test_resume_mid_epoch_continues_exactly(nyud_root: Path, num_workers: int, resumed_workers: int, k: int) -> None:
    """k batches, save, rebuild from the state (with the same or another worker count): the rest
    (this epoch and the next) equals an uninterrupted run, ids and pixels."""
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)

    def loader(workers: int = num_workers):
        return make_dataloader(ds, 2, train=True, num_workers=workers, seed=3, drop_last=False)

    full = loader()
    reference = list(full) + list(full)  # two epochs of 3 batches
    interrupted = loader()
    it = iter(interrupted)
    consumed = [next(it) for _ in range(k)]  # k = 3 ends the first epoch
    state = interrupted.state_dict()
    del it, interrupted
    resumed = loader(resumed_workers)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    got = consumed + rest
    assert _ids(got) == _ids(reference)
    for x, y in zip(got, reference):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["depth"], y["depth"])


def test_skipped_samples_are_dropped_from_batches(corruptible_nyud: Path) -> None:
    sid = (corruptible_nyud / "gt_sets" / "train.txt").read_text().split()[0]
    (corruptible_nyud / "normals" / f"{sid}.png").unlink()
    ds = build_dataset("nyud", corruptible_nyud, "train", train=False, on_error="skip")
    with pytest.warns(UserWarning, match=sid):
        batches = list(make_dataloader(ds, 3, train=False, num_workers=0))
    ids = _ids(batches)
    assert sid not in ids and len(ids) == len(ds) - 1


def test_bad_arguments(nyud_root: Path) -> None:
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(ds, 0, train=True)
    with pytest.raises(ValueError, match="dataset name"):
        build_dataset("coco", nyud_root, "train", train=True)


def test_workers_do_not_change_the_stream(nyud_root: Path) -> None:
    """Augmentation seeds come from the sampler, so 0 or 2 workers give identical batches."""
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    runs = []
    for workers in (0, 2):
        loader = make_dataloader(ds, 3, train=True, num_workers=workers, seed=5)
        runs.append(list(loader) + list(loader))
    assert _ids(runs[0]) == _ids(runs[1])
    for x, y in zip(*runs):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["normals"], y["normals"])


@pytest.mark.parametrize("name", ["nyud", "pascal"])
@pytest.mark.parametrize("train", [True, False])
def test_compact_batches_finalize_to_the_float_batches(
    request: pytest.FixtureRequest, name: str, train: bool
) -> None:
    """Samples shipped compact (uint8) and finalised in the main process give exactly the batch of
    the float samples, padding included (eval batches mix image sizes)."""
    root = request.getfixturevalue(f"{name}_root")
    ds = build_dataset(name, root, "train", train=train, crop_size=CROP if train else None)
    assert isinstance(ds.transforms.transforms[-1], ToTensor)
    keys = [(i, 100 + i) for i in range(4)]
    floats = collate([ds[k] for k in keys])
    compact = collate([ds.sample(*k, compact=True) for k in keys])
    assert compact["image"].dtype == torch.uint8 and compact["normals"].dtype == torch.uint8
    got = finalize_batch(compact)
    assert set(got.keys()) == set(floats.keys())
    for key in floats.keys():
        if key == "meta":
            assert got["meta"].tolist() == floats["meta"].tolist()
            continue
        assert got[key].dtype == floats[key].dtype, key
        pad = (floats[key] == 0) if key in ("image", "normals") else None
        if key == "image" and not train:  # the collate pads levels (0), not normalised values
            same = got[key] == floats[key]
            assert (same | pad).all()
        else:
            assert torch.equal(got[key], floats[key]), key


def test_loader_batches_are_independent_of_later_batches(nyud_root: Path) -> None:
    """Batches held by the caller are never overwritten by later batches."""
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    held = list(make_dataloader(ds, 2, train=True, num_workers=0, seed=4))
    copies = [b["image"].clone() for b in held]
    again = list(make_dataloader(ds, 2, train=True, num_workers=0, seed=4))
    for x, y, c in zip(held, again, copies):
        assert torch.equal(x["image"], c) and torch.equal(x["image"], y["image"])
    assert len({b["image"].data_ptr() for b in held}) == len(held)


def test_loader_asks_the_dataset_for_compact_samples_and_leaves_it_alone(nyud_root: Path) -> None:
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    before = list(ds.transforms.transforms)
    loader = make_dataloader(ds, 2, train=True, num_workers=0)
    assert isinstance(loader.dataset, CompactSamples) and loader.dataset.dataset is ds
    assert ds.transforms.transforms == before  # the caller's dataset is untouched and still gives floats
    assert ds[(0, 1)]["image"].dtype == torch.float32
    compact = loader.dataset[(0, 1)]
    assert compact["image"].dtype == torch.uint8
    assert torch.equal(compact["image"], ds.sample(0, 1, compact=True)["image"])

    class OwnToTensor(ToTensor):
        pass

    ds.transforms.transforms[-1] = OwnToTensor()
    assert not ds.supports_compact
    with pytest.raises(ValueError, match="compact samples need transforms ending with ToTensor"):
        ds.sample(0, 1, compact=True)
    assert make_dataloader(ds, 2, train=True, num_workers=0).dataset is ds  # read as it is


def test_finalize_batch_rejects_a_plain_dict() -> None:
    with pytest.raises(TypeError, match="TensorDict"):
        finalize_batch({"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)})


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_torchdata_states_of_earlier_versions_resume_only_with_their_worker_count(nyud_root: Path) -> None:
    ds = build_dataset("nyud", nyud_root, "train", train=True, crop_size=CROP)
    old = StatefulDataLoader(list(range(8)), batch_size=2, num_workers=2)
    it = iter(old)
    next(it)
    state = old.state_dict()
    del it
    with pytest.raises(ValueError, match=r"earlier mtssm with data.num_workers=2; resume it with data.num_workers=2"):
        make_dataloader(ds, 2, train=True, num_workers=0).load_state_dict(state)
    make_dataloader(ds, 2, train=True, num_workers=2).load_state_dict(state)  # its own count: loads
