"""Memory-mapped shard reading, cross-shard shuffling, batch gathering and augmentation."""

import numpy as np
import polars as pl
import pytest
import torch

from gampen_ml.data.datasets import (
    ShardImages,
    augment_batch,
    epoch_order,
    iterate_batches,
)
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.io import StorageError, save_npy

PX = 12


def _write_shard(folder, shard_index: int, n: int = 10):
    """Images whose pixel [0, 0] holds the galaxy id, so gathered batches are checkable."""
    folder.mkdir(parents=True)
    ids = shard_index * 1000 + np.arange(n)
    images = np.random.default_rng(shard_index).normal(size=(n, PX, PX)).astype(np.float32)
    images[:, 0, 0] = ids
    save_npy(folder / "images.npy", images)
    splits = np.array(["train", "val", "test", "train", "train"] * (n // 5 + 1))[:n]
    pl.DataFrame(
        {
            "galaxy_id": ids,
            "split": splits,
            "bt": np.linspace(0.0, 1.0, n),
            "re_arcsec": np.linspace(0.5, 3.0, n) + shard_index,
            "flux_nJy": np.linspace(1e4, 1e6, n),
        }
    ).write_parquet(folder / "labels.parquet")
    return images


@pytest.fixture
def shards(tmp_path):
    dirs = [tmp_path / f"shard-{i:03d}" for i in range(3)]
    for i, d in enumerate(dirs):
        _write_shard(d, i)
    return dirs


def test_split_selection_and_gather(shards):
    train = ShardImages(shards, "train")
    assert len(train) == 3 * 6 and train.image_px == PX
    assert set(train.labels["split"]) == {"train"}
    ids = train.labels["galaxy_id"].to_numpy()
    index = np.array([17, 0, 5, 12, 6, 1])  # mixes all three shards, unsorted
    images = train.images(index)
    assert images.shape == (6, PX, PX) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0, 0], ids[index])
    labels = train.physical_labels()
    assert labels.shape == (18, 3)
    np.testing.assert_allclose(labels[:, 1], train.labels["re_arcsec"].to_numpy())


def test_batches_cover_an_epoch_once_and_shuffle_across_shards(shards):
    train = ShardImages(shards, "train")
    scaler = LabelScaler.fit(train.physical_labels())
    order = epoch_order(len(train), seed=7, epoch=0)
    assert not np.array_equal(order, np.arange(len(train)))
    np.testing.assert_array_equal(order, epoch_order(len(train), seed=7, epoch=0))
    assert not np.array_equal(order, epoch_order(len(train), seed=7, epoch=1))
    seen, first_shards = [], set()
    for x, y in iterate_batches(train, scaler, 4, order=order):
        assert x.shape[1:] == (1, PX, PX) and x.dtype == torch.float32
        gid = np.rint(np.sinh(x[:, 0, 0, 0].double().numpy())).astype(int)  # arsinh undone
        seen.extend(gid)
        first_shards |= set(gid // 1000)
        expected = scaler.transform(
            train.physical_labels()[order[len(seen) - len(gid) : len(seen)]]
        )
        np.testing.assert_allclose(y.numpy(), expected)
    assert sorted(seen) == sorted(train.labels["galaxy_id"].to_list())
    assert first_shards == {0, 1, 2}


def test_distributed_ranks_partition_the_epoch(shards):
    train = ShardImages(shards, "train")
    scaler = LabelScaler.fit(train.physical_labels())
    order = epoch_order(len(train), seed=1, epoch=0)
    per_rank = []
    for rank in range(4):
        ids = []
        for x, _ in iterate_batches(train, scaler, 3, order=order, rank=rank, world_size=4):
            ids.extend(np.rint(np.sinh(x[:, 0, 0, 0].double().numpy())).astype(int))
        per_rank.append(ids)
    assert {len(r) for r in per_rank} == {4}  # 18 trimmed to 16, 4 each
    flat = [i for r in per_rank for i in r]
    assert len(set(flat)) == 16


def test_augmentation_is_a_symmetry_of_the_square():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 6, 6)).astype(np.float32)
    out = augment_batch(images, np.random.default_rng(1))
    symmetries = []
    for img, aug in zip(images, out, strict=True):
        candidates = [np.rot90(img, k) for k in range(4)]
        candidates += [c[:, ::-1] for c in candidates]
        match = [i for i, c in enumerate(candidates) if np.array_equal(c, aug)]
        assert match, "augmented image is not a flip/rotation of its input"
        symmetries.append(match[0])
        assert aug.sum() == pytest.approx(img.sum(), rel=1e-5)  # flux preserved
    assert len(set(symmetries)) == 8  # all eight symmetries used over 64 images


def test_mismatched_shard_is_reported(tmp_path):
    folder = tmp_path / "shard-000"
    _write_shard(folder, 0)
    save_npy(folder / "images.npy", np.zeros((3, PX, PX), np.float32))
    with pytest.raises(StorageError, match="3 images but labels.parquet has 10 rows"):
        ShardImages([folder], "train")
    with pytest.raises(StorageError, match="missing array file"):
        ShardImages([tmp_path / "nowhere"], None)
