"""A process SIGKILLed while writing a shard, a catalog or a checkpoint leaves no partial
file visible; the rerun completes and equals an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RATE, REPO, TINY, child_env, copy_world

from gampen_ml import stages
from gampen_ml.catalog import read_catalog
from gampen_ml.config import dropout_key
from gampen_ml.database import ensure_schema, query
from gampen_ml.io import StorageError, atomic_partition_dir, partition_dir
from gampen_ml.sim.shards import open_shard, simulate_shard

pytestmark = pytest.mark.slow

#: Imported by every child: ``hang(ready)`` marks the moment to kill and waits for it.
PRELUDE = """
import json, os, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
def hang(ready):
    Path(ready).touch()
    time.sleep(600)
"""


def run_until_ready_then_kill(body: str, args: dict, ready: Path, timeout_s: float = 120):
    """Start ``body`` in a child; SIGKILL it once it touched ``ready``; return its stderr."""
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(args)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} early:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return proc.stderr.read()


def visible(folder: Path) -> list[str]:
    """Entries a reader sees (hidden temporaries excluded)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_shard_killed_mid_render_leaves_nothing_and_rerun_is_byte_identical(tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "storage", ["psf_library", "noise_pool"])
    ready = tmp_path / "ready"
    run_until_ready_then_kill(
        """
        from gampen_ml.config import get_profile
        from gampen_ml.io import atomic_partition_dir, partition_dir
        from gampen_ml.sim import shards
        real = shards._render_chunk
        calls = []
        def render_then_hang(*a):
            n = real(*a)
            calls.append(n)
            if len(calls) == 1:  # images.npy is half filled, labels.parquet not written
                hang(args["ready"])
            return n
        shards._render_chunk = render_then_hang
        root = Path(args["root"])
        tiny = get_profile("tiny")
        with atomic_partition_dir(partition_dir(root, "simulated_galaxies", "shard-000")) as tmp:
            shards.simulate_shard(tiny, "shard-000", partition_dir(root, "psf_library"),
                                  partition_dir(root, "noise_pool"), tmp, n_workers=1)
        """,
        {"root": str(root), "ready": str(ready)},
        ready,
    )
    shards_dir = root / "simulated_galaxies"
    hidden = [p for p in shards_dir.iterdir() if p.name.startswith(".tmp-shard-000")]
    assert len(hidden) == 1 and (hidden[0] / "images.npy").is_file()  # the torn write...
    assert visible(shards_dir) == []  # ...is invisible
    with pytest.raises(StorageError):
        open_shard(partition_dir(root, "simulated_galaxies", "shard-000"))
    ensure_schema(tmp_path / "g.duckdb", root)
    assert query(tmp_path / "g.duckdb", "SELECT count(*) AS n FROM simulations")[0]["n"] == 0

    # Rerun: completes, and equals (byte for byte) the shard of an uninterrupted run.
    for _ in range(2):  # twice: rerunning a successful partition is idempotent too
        final = partition_dir(root, "simulated_galaxies", "shard-000")
        with atomic_partition_dir(final) as tmp:
            simulate_shard(TINY, "shard-000", root / "psf_library" / "all",
                           root / "noise_pool" / "all", tmp, n_workers=1)  # fmt: skip
        reference = tiny_world / "simulated_galaxies" / "shard-000"
        for name in ("images.npy", "labels.parquet"):
            assert (final / name).read_bytes() == (reference / name).read_bytes(), name
    assert visible(shards_dir) == ["shard-000"]
    # The killed writer's torn folder was removed by the rerun (its process is gone).
    assert not hidden[0].exists() and sorted(p.name for p in shards_dir.iterdir()) == ["shard-000"]
    ensure_schema(tmp_path / "g.duckdb", root)
    rows = query(tmp_path / "g.duckdb", "SELECT count(*) AS n FROM simulations")
    assert rows[0]["n"] == open_shard(final)[1].height


def test_catalog_killed_mid_rewrite_keeps_the_old_catalog_and_rerun_has_same_rows(
    tiny_world, tmp_path
):
    root = copy_world(tiny_world, tmp_path / "storage")
    # The old catalog: built with fewer MC passes, so the rewrite changes every file.
    eight = TINY.replace(inference=dataclasses.replace(TINY.inference, n_passes=8))
    first = stages.catalog_and_publish(eight, root, "sim-test", device="cpu")
    final = partition_dir(root, "posterior_catalog", "sim-test")
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    ready = tmp_path / "ready"
    run_until_ready_then_kill(
        """
        import gampen_ml.catalog as catalog
        from gampen_ml import stages
        from gampen_ml.config import get_profile
        real = catalog.write_catalog
        def write_then_hang(directory, df):
            path = real(directory, df)
            hang(args["ready"])
        catalog.write_catalog = write_then_hang
        stages.catalog_and_publish(get_profile("tiny"), Path(args["root"]), "sim-test",
                                   device="cpu")
        """,
        {"root": str(root), "ready": str(ready)},
        ready,
    )
    # The complete new catalog sits in a hidden folder; readers still see the old one.
    assert visible(final.parent) == ["sim-test"]
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    ensure_schema(tmp_path / "g.duckdb", root)
    n = query(tmp_path / "g.duckdb", "SELECT count(*) AS n, count(DISTINCT galaxy_id) AS k "
              "FROM posterior_catalog")[0]  # fmt: skip
    assert n == {"n": first.height, "k": first.height}  # no duplicates from the hidden copy

    again = stages.catalog_and_publish(TINY, root, "sim-test", device="cpu")
    assert not again.equals(first)
    assert read_catalog(final).equals(again)
    # Rerunning the successful partition: same seed, same rows.
    assert stages.catalog_and_publish(TINY, root, "sim-test", device="cpu").equals(again)


def _two_epochs():
    return TINY.replace(training=dataclasses.replace(TINY.training, epochs=2))


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory):
    """State dict of a 2-epoch model trained without interruption."""
    root = copy_world(tiny_world, tmp_path_factory.mktemp("ref") / "s", ["simulated_galaxies"])
    from gampen_ml.train import train_model

    out = root.parent / "model"
    train_model(_two_epochs(), RATE, stages.shard_dirs(TINY, root), out, device="cpu",
                progress=False)  # fmt: skip
    return torch.load(out / "state_dict.pt", weights_only=True)


TRAIN_CHILD = """
import dataclasses
import torch
import gampen_ml.train as train
from gampen_ml import stages
from gampen_ml.config import get_profile
tiny = get_profile("tiny")
profile = tiny.replace(training=dataclasses.replace(tiny.training, epochs=2))
{patch}
stages.train_and_publish(profile, args["rate"], Path(args["root"]), device="cpu")
"""

MID_EPOCH = """
real = train.iterate_batches
state = {"train_calls": 0}
def batches(*a, **k):
    training = k.get("augment_rng") is not None
    state["train_calls"] += training
    for i, batch in enumerate(real(*a, **k)):
        if training and state["train_calls"] == 2 and i == 1:
            hang(args["ready"])  # epoch 2, after its first optimizer step
        yield batch
train.iterate_batches = batches
"""

MID_CHECKPOINT = """
from gampen_ml.io import atomic_file
saves = []
def torn_save(obj, path):
    saves.append(path)
    if len(saves) < 2:
        return real_save(obj, path)
    with atomic_file(path) as tmp:  # the epoch-2 checkpoint: half written, then killed
        torch.save(obj, tmp)
        data = tmp.read_bytes()
        tmp.write_bytes(data[: len(data) // 2])
        hang(args["ready"])
real_save = train._save_torch
train._save_torch = torn_save
"""


@pytest.mark.parametrize("where", ["mid-epoch", "mid-checkpoint-write"])
def test_training_killed_resumes_from_last_checkpoint(where, uninterrupted, tiny_world, tmp_path):
    root = copy_world(tiny_world, tmp_path / "storage", ["simulated_galaxies"])
    ready = tmp_path / "ready"
    patch = MID_EPOCH if where == "mid-epoch" else MID_CHECKPOINT
    run_until_ready_then_kill(
        TRAIN_CHILD.format(patch=patch), {"root": str(root), "rate": RATE, "ready": str(ready)},
        ready,
    )  # fmt: skip
    key = dropout_key(RATE)
    work = root / "trained_model" / f".work-{key}"
    assert visible(root / "trained_model") == []  # no model published
    # The checkpoint under its name is whole: the one written after epoch 1.
    ckpt = torch.load(work / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    assert not (work / "state_dict.pt").exists()

    lines: list[str] = []
    result = stages.train_and_publish(_two_epochs(), RATE, root, device="cpu", log=lines.append)
    assert lines[0].startswith("resumed from") and "after epoch 1" in lines[0]
    assert [h["epoch"] for h in result.history] == [1, 2]
    final = partition_dir(root, "trained_model", key)
    assert visible(root / "trained_model") == [key] and not work.exists()
    state = torch.load(final / "state_dict.pt", weights_only=True)
    assert state.keys() == uninterrupted.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, uninterrupted[name]), name
    assert json.loads((final / "model.json").read_text())["epochs_trained"] == 2
    assert np.isfinite(result.final_val_loss)
