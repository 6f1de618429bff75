"""Materialize every asset of a profile on the persistent Dagster instance, in order.

This is what ``make pipeline`` runs. Each stage is one Dagster run per partition on the
instance in ``$DAGSTER_HOME`` — the run ``dg launch --assets SELECTION --partition KEY``
makes — so every run, its logs, metadata and asset checks appear in the UI afterwards
(``make ui``)::

    DAGSTER_HOME=$(pwd)/dagster_home GAMPEN_PROFILE=quick python -m gampen_assets.pipeline

Stages: PSF library + noise pool -> every simulation shard -> one model per dropout rate
-> calibrated dropout rate -> catalog, flags and plots of the simulated test split.

Launchers (``--launcher``):

``inprocess`` (default)
    Every run executes in this Python process through the function ``dg launch --assets``
    calls: Dagster, torch and the definitions are imported once for the whole pipeline
    instead of once per run.
``dg``
    Every run is a ``dg launch`` subprocess (a fresh interpreter per run).

Runs are one per partition because the assets read ``context.partition_key``; a partition
range in one run (``dg launch --partition-range``) needs assets with a single-run backfill
policy that take a key range.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gampen_assets.partitions import SIM_TEST, datasets
from gampen_ml import store
from gampen_ml.config import PROFILE_ENV_VAR, ConfigError, dropout_key, get_profile, shard_keys
from gampen_ml.settings import instance_home

MODULE = "gampen_assets.definitions"
#: Run each step inside the run's process: the multiprocess executor would start a fresh
#: Python (dagster + torch + galsim imports) for every asset and check step.
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})
STAGES = ("inputs", "simulate", "train", "calibrate", "catalog")
LAUNCHERS = ("inprocess", "dg")


def _dagster_home() -> Path:
    try:
        home = instance_home()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    home.mkdir(parents=True, exist_ok=True)
    return home


def dg_launch_command(select: Sequence[str], partition: str | None = None) -> list[str]:
    """The ``dg launch`` argv that materializes ``select`` (and ``partition``) in process."""
    dg = Path(sys.executable).with_name("dg")
    exe = str(dg) if dg.is_file() else shutil.which("dg")
    if exe is None:
        raise SystemExit("no `dg` executable: pip install dagster-dg-cli (see pyproject.toml)")
    cmd = [exe, "launch", "-m", MODULE, "--assets", ",".join(select), "--config-json", IN_PROCESS]
    return cmd + (["--partition", partition] if partition else [])


def run_in_process(select: Sequence[str], partition: str | None = None) -> bool:
    """Execute one run of ``select`` (and ``partition``) in this process; True on success.

    Calls what ``dg launch --assets`` calls (``asset_materialize_command_impl`` of
    Dagster's CLI): the implicit asset job restricted to the selected assets and their
    checks, the partition validated and tagged, the instance of ``$DAGSTER_HOME``.
    """
    import click

    # Private, but the exact function dagster_dg_cli's `launch` command calls for --assets;
    # both packages are pinned to the same release in pyproject.toml.
    from dagster._cli.asset import asset_materialize_command_impl

    try:
        asset_materialize_command_impl(
            select=",".join(select),
            partition=partition,
            partition_range=None,
            config=(),
            config_json=IN_PROCESS,
            module_name=MODULE,
        )
    except click.ClickException as exc:
        print(exc.format_message(), file=sys.stderr, flush=True)
        return False
    return True


def materialize(
    select: Sequence[str], partition: str | None = None, *, launcher: str = "inprocess"
) -> float:
    """Materialize ``select`` (and ``partition``); return the run's wall seconds.

    ``launcher`` ``inprocess`` runs it in this process, ``dg`` as a ``dg launch``
    subprocess. Raises SystemExit when the run fails.
    """
    label = ",".join(select) + (f" [{partition}]" if partition else "")
    print(f"==> {label}", flush=True)
    start = time.perf_counter()
    if launcher == "inprocess":
        ok, failure = run_in_process(select, partition), "failed"
    else:
        returncode = subprocess.run(dg_launch_command(select, partition), check=False).returncode
        ok, failure = returncode == 0, f"failed (exit {returncode})"
    seconds = time.perf_counter() - start
    if not ok:
        raise SystemExit(f"materializing {label} {failure}; see the run in the UI")
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
        choices=STAGES,
        default="inputs",
        help="skip the stages before this one (their partitions must exist)",
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="inprocess",
        help="run every Dagster run in this process (default) or as a `dg launch` subprocess",
    )
    args = parser.parse_args(argv)
    _dagster_home()
    profile = get_profile(args.profile)
    os.environ[PROFILE_ENV_VAR] = profile.name
    todo = STAGES[STAGES.index(args.from_stage) :]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    run = functools.partial(materialize, launcher=args.launcher)
    if "inputs" in todo:
        timings["inputs"] = run([store.PSF_LIBRARY, store.NOISE_POOL])
    if "simulate" in todo:
        timings["simulate"] = sum(
            run([store.SIMULATED_GALAXIES], key) for key in shard_keys(profile)
        )
    if "train" in todo:
        timings["train"] = sum(
            run([store.TRAINED_MODEL], dropout_key(rate))
            for rate in profile.calibration.dropout_rates
        )
    if "calibrate" in todo:
        timings["calibrate"] = run([store.CALIBRATED_DROPOUT_RATE])
    if "catalog" in todo:
        register_dataset(SIM_TEST)
        timings["catalog"] = run(
            [store.POSTERIOR_CATALOG, store.QUALITATIVE_FLAGS, store.DIAGNOSTIC_PLOTS], SIM_TEST
        )
    total = time.perf_counter() - start
    print(f"profile {profile.name}: pipeline finished in {total / 60:.1f} min")
    for stage, seconds in timings.items():
        print(f"  {stage:<10} {seconds:7.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
