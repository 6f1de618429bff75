"""Training throughput on CPU: the platform's loop vs a straightforward reference loop.

Both loops train the same GaMPEN (``quick`` preset unless ``--profile``) on the same
synthetic 239x239 images, in one process:

* **platform** — images memory-mapped from one ``images.npy`` shard, each batch gathered with
  one sorted fancy-index (:func:`gampen_ml.data.datasets.iterate_batches`) one batch ahead
  in a background thread (:func:`gampen_ml.data.datasets.prefetch`), channels-last
  tensors, as in :func:`gampen_ml.train.train_model`.
* **reference** — what a first implementation does: one ``.npy`` file per galaxy opened per
  item, per-item tensors stacked per batch, default memory format, fp32, the network with
  torch's stock ``F.affine_grid`` STN and ``nn.Dropout`` (:mod:`benchmarks.reference`).

It also times a few optimizer steps of the ``paper`` preset (Table 3) at its batch size.

Usage::

    .venv/bin/python benchmarks/bench_training.py --threads 1 2 --paper-steps 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from benchmarks.reference import reference_model
from gampen_ml.config import get_profile
from gampen_ml.data.datasets import ShardImages, epoch_order, iterate_batches, prefetch
from gampen_ml.data.transforms import LabelScaler, arsinh_image
from gampen_ml.io import save_npy
from gampen_ml.model import GaMPEN, gaussian_nll
from gampen_ml.store import IMAGES_FILE, LABELS_FILE, Store
from gampen_ml.train import make_optimizer


def make_data(folder: Path, n: int, px: int) -> tuple[Path, Path]:
    """One memory-mappable shard and the same images as one file per galaxy."""
    rng = np.random.default_rng(0)
    images = rng.normal(0, 2.3, size=(n, px, px)).astype(np.float32)
    images[:, px // 2 - 5 : px // 2 + 5, px // 2 - 5 : px // 2 + 5] += 500.0
    shard = Store(folder).shard("shard-000")
    shard.mkdir(parents=True)
    save_npy(shard / IMAGES_FILE, images)
    bt = rng.uniform(0, 1, n)
    bt[:5] = 0.0
    pl.DataFrame(
        {
            "split": ["train"] * n,
            "bt": bt,
            "re_arcsec": rng.uniform(0.2, 4, n),
            "flux_nJy": rng.uniform(1e3, 1e6, n),
        }
    ).write_parquet(shard / LABELS_FILE)
    per_file = folder / "per_file"
    per_file.mkdir()
    for i in range(n):
        np.save(per_file / f"{i:06d}.npy", images[i])
    return shard, per_file


def platform_loop(profile, shard: Path, steps: int) -> tuple[float, float]:
    """Images/s (wall, process CPU time) of the platform's loop (after one warm-up step)."""
    cfg = profile.training
    data = ShardImages([shard], "train")
    scaler = LabelScaler.fit(data.physical_labels())
    torch.manual_seed(0)
    model = GaMPEN(profile.network, 0.01, data.image_px).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    model.train()
    done, started = 0, None
    order = epoch_order(len(data), 0, 0)
    rng = np.random.default_rng(0)
    batches = iterate_batches(data, scaler, cfg.batch_size, order=order, augment_rng=rng)
    for step, (x, y) in enumerate(prefetch(batches)):
        if step == 1:
            started, cpu, done = time.perf_counter(), time.process_time(), 0
        x = x.contiguous(memory_format=torch.channels_last)
        loss = gaussian_nll(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(x)
        if step == steps:
            break
    return done / (time.perf_counter() - started), done / (time.process_time() - cpu)


def reference_loop(profile, per_file: Path, labels: np.ndarray, steps: int) -> tuple[float, float]:
    """Images/s (wall, CPU) of a per-file, per-item, fp32 default-format loop (after warm-up)."""
    cfg = profile.training
    scaler = LabelScaler.fit(labels)
    scaled = scaler.transform(labels)
    files = sorted(per_file.glob("*.npy"))
    torch.manual_seed(0)
    model = reference_model(GaMPEN(profile.network, 0.01, np.load(files[0]).shape[0]))
    optimizer = make_optimizer(model, cfg)
    model.train()
    order = np.random.default_rng(0).permutation(len(files))
    done, started = 0, None
    for step in range(steps + 1):
        if step == 1:
            started, cpu, done = time.perf_counter(), time.process_time(), 0
        index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        xs = [torch.from_numpy(arsinh_image(np.load(files[i])))[None] for i in index]
        ys = [torch.from_numpy(scaled[i]) for i in index]
        x, y = torch.stack(xs), torch.stack(ys)
        loss = gaussian_nll(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += len(x)
    return done / (time.perf_counter() - started), done / (time.process_time() - cpu)


def paper_seconds_per_step(steps: int, batch_size: int | None) -> tuple[float, int]:
    """Seconds per optimizer step of the Table-3 network at the paper batch size."""
    profile = get_profile("paper")
    batch = batch_size or profile.training.batch_size
    px = profile.imaging.stamp_size_px
    torch.manual_seed(0)
    model = GaMPEN(profile.network, 7e-4, px).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, profile.training)
    x = torch.randn(batch, 1, px, px).contiguous(memory_format=torch.channels_last)
    y = torch.randn(batch, 3)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = gaussian_nll(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return float(np.mean(times[1:])), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per loop")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--paper-steps", type=int, default=2, help="0 skips the paper preset")
    parser.add_argument("--paper-batch", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    profile = get_profile(args.profile)
    n = profile.training.batch_size * (args.steps + 2)
    results: dict = {"profile": profile.name, "batch_size": profile.training.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        shard, per_file = make_data(Path(tmp), n, profile.imaging.stamp_size_px)
        labels = ShardImages([shard], None).physical_labels()
        for threads in args.threads:
            torch.set_num_threads(threads)
            # interleaved repeats, medians: load drift on a shared machine hits both alike
            refs, ours_ = [], []
            for _ in range(args.repeats):
                refs.append(reference_loop(profile, per_file, labels, args.steps))
                ours_.append(platform_loop(profile, shard, args.steps))
            ref, ours = np.median(refs, axis=0), np.median(ours_, axis=0)
            results[f"threads_{threads}"] = {
                "reference_images_per_s_wall_cpu": [round(v, 1) for v in ref],
                "platform_images_per_s_wall_cpu": [round(v, 1) for v in ours],
                "speedup_wall": round(ours[0] / ref[0], 2),
                "speedup_cpu_time": round(ours[1] / ref[1], 2),
            }
            print(f"{profile.name}, {threads} thread(s), median of {args.repeats}: reference "
                  f"{ref[0]:.0f} images/s (CPU-time {ref[1]:.0f}), platform {ours[0]:.0f} "
                  f"images/s (CPU-time {ours[1]:.0f}); speed-up wall {ours[0] / ref[0]:.2f}x, "
                  f"CPU-time {ours[1] / ref[1]:.2f}x")  # fmt: skip
    if args.paper_steps:
        torch.set_num_threads(max(args.threads))
        seconds, batch = paper_seconds_per_step(args.paper_steps, args.paper_batch)
        results["paper"] = {
            "threads": max(args.threads),
            "batch_size": batch,
            "seconds_per_step": round(seconds, 2),
        }
        print(f"paper preset, batch {batch}, {max(args.threads)} thread(s): {seconds:.2f} s/step")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
