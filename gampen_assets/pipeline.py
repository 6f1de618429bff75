"""Materialize every asset of a profile on the persistent Dagster instance, in order.

This is what ``make pipeline`` runs. Each stage is one ``dagster asset materialize``
call per partition, exactly as a user would type it, so every run, its logs, metadata
and asset checks appear in the UI afterwards (``make ui``)::

    DAGSTER_HOME=$(pwd)/dagster_home GAMPEN_PROFILE=quick python -m gampen_assets.pipeline

Stages: PSF library + noise pool -> every simulation shard -> one model per dropout rate
-> calibrated dropout rate -> catalog, flags and plots of the simulated test split.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from gampen_assets.partitions import SIM_TEST, datasets
from gampen_ml.config import dropout_key, get_profile, shard_keys

MODULE = "gampen_assets.definitions"
#: Run each step inside the run's process: the multiprocess executor would start a fresh
#: Python (dagster + torch + galsim imports, ~15 s here) for every asset and check step.
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


def _dagster_home() -> Path:
    home = os.environ.get("DAGSTER_HOME")
    if not home or not Path(home).is_absolute():
        raise SystemExit(
            "DAGSTER_HOME must be set to an absolute path, e.g. export DAGSTER_HOME=$(pwd)/dagster_home"
        )
    Path(home).mkdir(parents=True, exist_ok=True)
    return Path(home)


def materialize(select: str, partition: str | None = None) -> float:
    """Run ``dagster asset materialize`` for one selection (and partition); return seconds."""
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "asset",
        "materialize",
        "-m",
        MODULE,
        "--select",
        select,
        "--config-json",
        IN_PROCESS,
    ]
    if partition:
        cmd += ["--partition", partition]
    label = f"{select}" + (f" [{partition}]" if partition else "")
    print(f"==> {label}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(
            f"materializing {label} failed (exit {result.returncode}); see the run in the UI"
        )
    print(f"    done in {seconds:.0f} s", flush=True)
    return seconds


def register_dataset(key: str) -> None:
    """Add ``key`` to the ``datasets`` dynamic partitions (idempotent)."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        if not instance.has_dynamic_partition(datasets.name, key):
            instance.add_dynamic_partitions(datasets.name, [key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default=None, help="profile name (default $GAMPEN_PROFILE or quick)"
    )
    parser.add_argument(
        "--from-stage",
        choices=["inputs", "simulate", "train", "calibrate", "catalog"],
        default="inputs",
        help="skip the stages before this one (their partitions must exist)",
    )
    args = parser.parse_args(argv)
    _dagster_home()
    profile = get_profile(args.profile)
    os.environ["GAMPEN_PROFILE"] = profile.name
    stages = ["inputs", "simulate", "train", "calibrate", "catalog"]
    todo = stages[stages.index(args.from_stage) :]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if "inputs" in todo:
        timings["inputs"] = materialize("psf_library,noise_pool")
    if "simulate" in todo:
        timings["simulate"] = sum(
            materialize("simulated_galaxies", key) for key in shard_keys(profile)
        )
    if "train" in todo:
        timings["train"] = sum(
            materialize("trained_model", dropout_key(rate))
            for rate in profile.calibration.dropout_rates
        )
    if "calibrate" in todo:
        timings["calibrate"] = materialize("calibrated_dropout_rate")
    if "catalog" in todo:
        register_dataset(SIM_TEST)
        timings["catalog"] = materialize(
            "posterior_catalog,qualitative_flags,diagnostic_plots", SIM_TEST
        )
    total = time.perf_counter() - start
    print(f"profile {profile.name}: pipeline finished in {total / 60:.1f} min")
    for stage, seconds in timings.items():
        print(f"  {stage:<10} {seconds:7.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
