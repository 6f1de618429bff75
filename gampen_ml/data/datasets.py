"""Memory-mapped shards of simulated galaxies, and the batch iterator that feeds training.

A shard folder holds ``images.npy`` ``(N, S, S)`` float32 (nJy per pixel) and
``labels.parquet`` (schema in ``docs/architecture.md``). :class:`ShardImages` memory-maps the
images of every shard and keeps the rows of one split; nothing is read until a batch asks
for it. :func:`iterate_batches` shuffles across shards and gathers each batch with one
sorted fancy-index per shard (no per-image file opens, no per-item ``__getitem__``).
:func:`prefetch` runs such an iterator one or two batches ahead in a background thread,
so gathering, augmentation and the arsinh scaling (NumPy, which releases the GIL) overlap
the optimizer step. :class:`SplitImages` is a lazy ``(N, S, S)`` view of one split for
inference (:func:`split_inputs`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import torch

from gampen_ml.config import PARAMETERS
from gampen_ml.data.transforms import LabelScaler, arsinh_image
from gampen_ml.io import StorageError, load_npy_mmap
from gampen_ml.store import IMAGES_FILE, LABELS_FILE

T = TypeVar("T")
#: Columns of the simulation labels that a catalog keeps as truths.
TRUTH_COLUMNS = (*PARAMETERS, "component")

SPLITS = ("train", "val", "test")


class ShardImages:
    """Images and labels of one split over several shard folders.

    Parameters
    ----------
    shard_dirs : sequence of path
        Shard folders, each with ``images.npy`` and ``labels.parquet``.
    split : {"train", "val", "test"} or None
        Rows to keep; ``None`` keeps every row.

    Attributes
    ----------
    labels : polars.DataFrame
        The kept label rows, in shard order, plus ``_shard`` (index into ``shard_dirs``) and
        ``_row`` (row in that shard's image stack).
    image_px : int
        Side ``S`` of the images.
    """

    def __init__(self, shard_dirs: Sequence[Path | str], split: str | None) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"ShardImages: split must be one of {SPLITS} or None, got {split!r}")
        if not shard_dirs:
            raise ValueError("ShardImages: no shard folders given")
        self.shard_dirs = [Path(d) for d in shard_dirs]
        self.split = split
        self._images: list[np.ndarray] = []
        frames = []
        for i, folder in enumerate(self.shard_dirs):
            images = load_npy_mmap(folder / IMAGES_FILE)
            labels = _read_labels(folder / LABELS_FILE)
            if images.ndim != 3 or images.shape[1] != images.shape[2]:
                raise StorageError(
                    f"{folder / IMAGES_FILE}: expected (N, S, S) images, got shape {images.shape}"
                )
            if images.shape[0] != labels.height:
                raise StorageError(
                    f"{folder}: {IMAGES_FILE} has {images.shape[0]} images but {LABELS_FILE} "
                    f"has {labels.height} rows"
                )
            if self._images and images.shape[1:] != self._images[0].shape[1:]:
                raise StorageError(
                    f"{folder / IMAGES_FILE}: image size {images.shape[1:]} differs from "
                    f"{self._images[0].shape[1:]} in {self.shard_dirs[0]}"
                )
            self._images.append(images)
            labels = labels.with_columns(
                pl.lit(i, dtype=pl.Int32).alias("_shard"),
                pl.int_range(labels.height, dtype=pl.Int64).alias("_row"),
            )
            if split is not None:
                labels = labels.filter(pl.col("split") == split)
            frames.append(labels)
        self.labels = pl.concat(frames, how="vertical_relaxed")
        self.image_px = int(self._images[0].shape[1])
        self._shard = self.labels["_shard"].to_numpy()
        self._row = self.labels["_row"].to_numpy()

    def __len__(self) -> int:
        return self.labels.height

    def physical_labels(self) -> np.ndarray:
        """``(N, 3)`` float64 ``[bt, re_arcsec, flux_nJy]`` of the kept rows."""
        return self.labels.select(PARAMETERS).to_numpy().astype(np.float64)

    def images(self, index: np.ndarray) -> np.ndarray:
        """Gather images ``(len(index), S, S)`` float32 (nJy/px) in the order of ``index``.

        One sorted fancy-index per shard touched: sequential reads of the memory maps.
        """
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((index.size, self.image_px, self.image_px), dtype=np.float32)
        shards = self._shard[index]
        for s in np.unique(shards):
            where = np.flatnonzero(shards == s)
            rows = self._row[index[where]]
            order = np.argsort(rows, kind="stable")
            out[where[order]] = self._images[s][rows[order]]
        return out


def _read_labels(path: Path) -> pl.DataFrame:
    if not path.is_file():
        raise StorageError(f"missing labels file {path}")
    try:
        labels = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for a bad file
        raise StorageError(f"cannot read labels file {path}: {exc}") from exc
    missing = [c for c in (*PARAMETERS, "split") if c not in labels.columns]
    if missing:
        raise StorageError(f"{path}: missing label columns {missing}")
    return labels


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and 90-degree rotations of ``(B, S, S)`` images (preserve B/T, Re, flux).

    Each image gets one of the 8 symmetries of the square; images are grouped by symmetry,
    so the work is 8 vectorized operations whatever the batch size.
    """
    choice = rng.integers(0, 8, size=images.shape[0])
    out = np.empty_like(images)
    for k in range(8):
        sel = choice == k
        if not sel.any():
            continue
        block = np.rot90(images[sel], k % 4, axes=(1, 2))
        out[sel] = block[:, :, ::-1] if k >= 4 else block
    return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Permutation of ``range(n)`` for one epoch, a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(
    dataset: ShardImages,
    scaler: LabelScaler,
    batch_size: int,
    *,
    order: np.ndarray,
    augment_rng: np.random.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images (B, 1, S, S) float32 arsinh-scaled, labels (B, 3) float32 scaled)``.

    Parameters
    ----------
    dataset : ShardImages
        Source split.
    scaler : LabelScaler
        Maps physical labels to the network's space.
    batch_size : int
        Images per batch on this rank.
    order : numpy.ndarray
        ``(N,)`` indices into ``dataset`` (e.g. :func:`epoch_order`).
    augment_rng : numpy.random.Generator, optional
        If given, apply :func:`augment_batch` with it.
    rank, world_size : int
        Distributed training: this rank takes ``order[rank::world_size]`` after trimming
        ``order`` to a multiple of ``world_size`` (every rank sees as many batches).
    drop_last : bool
        Drop a final incomplete batch.
    """
    if world_size > 1:
        order = order[: len(order) - len(order) % world_size][rank::world_size]
    scaled = scaler.transform(dataset.physical_labels())
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        images = dataset.images(index)
        if augment_rng is not None:
            images = augment_batch(images, augment_rng)
        x = torch.from_numpy(arsinh_image(images)).unsqueeze(1)
        yield x, torch.from_numpy(scaled[index])


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield the items of ``items`` in order, produced up to ``depth`` ahead by a thread.

    The producer runs the whole iterator (so a random generator it holds, e.g. the
    augmentation one, is consumed in exactly the same order as without prefetching); an
    exception in it is re-raised here. Closing the returned generator early (``break``)
    stops the producer.

    Parameters
    ----------
    items : iterable
        Typically :func:`iterate_batches` (the batches are identical with or without it).
    depth : int
        Batches held ready, >= 1.
    """
    if depth < 1:
        raise ValueError(f"prefetch: depth must be >= 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer
            ready.put((_DONE, exc))

    worker = threading.Thread(target=produce, name="gampen-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


class SplitImages:
    """Lazy ``(N, S, S)`` float32 view of one split over several shards.

    Slicing (``view[a:b]``) gathers only those galaxies from the memory-mapped shards, so
    MC-dropout inference streams a split of any size in chunks.
    """

    def __init__(self, data: ShardImages) -> None:
        self._data = data
        self.shape = (len(data), data.image_px, data.image_px)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice):
            raise TypeError(f"SplitImages supports slices only, got {type(item).__name__}")
        return self._data.images(np.arange(self.shape[0])[item])


def split_inputs(
    shard_dirs: Sequence[Path | str], split: str
) -> tuple[SplitImages, pl.DataFrame, pl.DataFrame]:
    """Images, meta (``galaxy_id``, ``psf_id``) and truths (:data:`TRUTH_COLUMNS`) of one
    split of the simulated shards."""
    data = ShardImages(shard_dirs, split)
    meta = data.labels.select("galaxy_id", "psf_id")
    return SplitImages(data), meta, data.labels.select(TRUTH_COLUMNS)
