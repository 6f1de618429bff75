"""The Definitions object loads, holds every asset/check/sensor/schedule, and validates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, Definitions

from gampen_assets.definitions import defs

REPO = Path(__file__).resolve().parents[2]
ASSETS = {
    "psf_library",
    "noise_pool",
    "simulated_galaxies",
    "trained_model",
    "calibrated_dropout_rate",
    "posterior_catalog",
    "robustness_report",
    "qualitative_flags",
    "diagnostic_plots",
    "sky_catalog",
    "labelled_set",
    "finetuned_model",
}


def test_validate_loadable():
    Definitions.validate_loadable(defs)


def test_every_asset_group_owner_description_and_code_version():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == ASSETS
    groups = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.code_version, key
        assert node.owners == ["team:gampen"], key
        groups[key.to_user_string()] = node.group_name
    assert groups["psf_library"] == groups["simulated_galaxies"] == "inputs"
    assert groups["trained_model"] == groups["calibrated_dropout_rate"] == "model"
    assert groups["posterior_catalog"] == groups["diagnostic_plots"] == "catalog"
    assert groups["sky_catalog"] == "catalog"
    assert groups["robustness_report"] == "validation"


def test_pools_and_partitions():
    graph = defs.resolve_asset_graph()
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    for name in ("trained_model", "calibrated_dropout_rate", "posterior_catalog"):
        assert pools[name] == {"gpu"}, name
    assert pools["qualitative_flags"] == {"duckdb"}
    shards = graph.get(AssetKey("simulated_galaxies")).partitions_def
    assert shards.get_partition_keys()[0] == "shard-000"
    dropout = graph.get(AssetKey("trained_model")).partitions_def
    assert "dropout-0" in dropout.get_partition_keys()
    assert graph.get(AssetKey("posterior_catalog")).partitions_def.name == "datasets"


def test_every_stage_has_a_check_and_upstream_checks_block():
    checks = {
        key.asset_key.to_user_string(): key for key in defs.resolve_asset_graph().asset_check_keys
    }
    assert set(checks) == ASSETS
    blocking = {
        spec.asset_key.to_user_string()
        for c in defs.asset_checks or []
        for spec in c.check_specs
        if spec.blocking
    }
    # Everything that has a downstream must stop it on failure.
    assert (
        ASSETS - {"qualitative_flags", "diagnostic_plots", "robustness_report", "sky_catalog"}
        <= blocking
    )


def test_sensors_schedules_jobs():
    assert {s.name for s in defs.sensors} == {
        "inbox_sensor",
        "lineage_failure_sensor",
        "sky_catalog_automation",
    }
    assert {s.name for s in defs.schedules} == {"reprocess_schedule"}
    for job in ("inputs_job", "simulation_job", "training_job", "calibration_job", "catalog_job"):
        assert defs.resolve_job_def(job) is not None


@pytest.mark.slow
def test_dagster_cli_validates(tmp_path):
    """`dagster definitions validate` as a user runs it, with the tiny profile."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path),
        "GAMPEN_PROFILE": "tiny",
        "GAMPEN_STORAGE": str(tmp_path / "storage"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "gampen_assets.definitions",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
