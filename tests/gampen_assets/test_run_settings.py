"""A run configured only through its ``settings`` resource (as ``deploy/dask`` does) writes
its data, lineage rows and failure rows where that resource says, whatever the
environment of the process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, asset, instance_for_test, materialize

from gampen_assets.assets.data_assets import psf_library
from gampen_assets.lineage import launched_settings
from gampen_assets.resources import GampenSettings
from gampen_ml.database import query
from tests.lineage_helpers import sense_run_failure

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The process environment points at another home; the runs below must not use it."""
    other = tmp_path / "env-home"
    monkeypatch.setenv("DAGSTER_HOME", str(other))
    for var in ("GAMPEN_STORAGE", "GAMPEN_DUCKDB", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return other


def test_resource_alone_decides_data_and_lineage_paths(tmp_path, elsewhere):
    root, home = tmp_path / "shared" / "data", tmp_path / "shared"
    settings = GampenSettings(
        profile_name="tiny", storage_root=str(root), dagster_home=str(home), device="cpu"
    )
    assert settings.database_path() == home / "gampen.duckdb"
    assert settings.tracking_uri() == f"sqlite:///{home / 'mlflow.db'}"
    result = materialize(
        [psf_library], resources={"settings": settings}, instance=DagsterInstance.ephemeral()
    )
    assert result.success
    assert (root / "psf_library" / "all" / "psfs.fits").is_file()
    rows = query(home / "gampen.duckdb", "SELECT asset, partition, status FROM lineage")
    assert rows == [{"asset": "psf_library", "partition": "all", "status": "success"}]
    assert not elsewhere.exists()


def test_failure_rows_go_to_the_failed_runs_database(tmp_path, elsewhere):
    @asset
    def broken_asset(settings: GampenSettings) -> None:
        raise RuntimeError("boom")

    home = tmp_path / "run-home"
    run_config = {"resources": {"settings": {"config": {"dagster_home": str(home)}}}}
    with instance_for_test() as instance:
        result = materialize(
            [broken_asset],
            resources={"settings": GampenSettings()},
            run_config=run_config,
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        sense_run_failure(result, instance)
    rows = query(home / "gampen.duckdb", "SELECT asset, status, run_id FROM lineage")
    assert rows == [{"asset": "broken_asset", "status": "failure", "run_id": result.run_id}]
    assert not elsewhere.exists()


def test_dask_run_config_sets_every_path(elsewhere):
    config = yaml.safe_load((REPO / "deploy" / "dask" / "run_config.yaml").read_text())
    settings = launched_settings(config)
    assert settings.storage_root == Path("/shared/gampen")
    assert settings.database == Path("/shared/gampen/gampen.duckdb")
    assert settings.mlflow_tracking_uri == "sqlite:////shared/gampen/mlflow.db"
