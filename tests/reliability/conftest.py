"""Fixtures of the reliability suite: one tiny trained world per session, FITS writers."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from gampen_ml.config import dropout_key, get_profile

REPO = Path(__file__).resolve().parents[2]
TINY = get_profile("tiny")
#: The dropout rate of the one model the suite trains.
RATE = 0.05


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child Python process that imports the repo's packages."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    return env


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A storage root with PSFs, noise, both tiny shards, one trained model (dropout 0.05)
    and a hand-written calibration choosing it: everything a catalog needs.

    Built once per session (about 10 s on 2 cores); tests copy it with :func:`copy_world`.
    """
    from gampen_ml import stages
    from gampen_ml.io import atomic_partition_dir, partition_dir
    from gampen_ml.train import train_model

    root = tmp_path_factory.mktemp("world") / "storage"
    list(stages.simulate_inputs(TINY, root))
    model_dir = partition_dir(root, "trained_model", dropout_key(RATE))
    with atomic_partition_dir(model_dir) as tmp:
        train_model(TINY, RATE, stages.shard_dirs(TINY, root), tmp, device="cpu", progress=False)
    with atomic_partition_dir(partition_dir(root, "calibrated_dropout_rate")) as tmp:
        (tmp / "calibration.json").write_text(
            json.dumps(
                {
                    "chosen_dropout_rate": RATE,
                    "model_name": "gampen-tiny",
                    "model_version": "unregistered",
                    "mlflow_run_id": None,
                    "recalibrated": False,
                    "n_val_galaxies": 0,
                }
            )
        )
    return root


def copy_world(world: Path, dest: Path, assets=None) -> Path:
    """Copy ``assets`` (default all) of the session world to a fresh root ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in sorted(world.iterdir()):
        if assets is None or folder.name in assets:
            shutil.copytree(folder, dest / folder.name)
    return dest


@pytest.fixture
def world(tiny_world, tmp_path):
    """A private copy of the session world (tests may write into it)."""
    return copy_world(tiny_world, tmp_path / "storage")


@pytest.fixture
def python() -> str:
    return sys.executable
