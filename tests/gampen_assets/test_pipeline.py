"""``make pipeline``'s launcher: runs in process (or as ``dg launch``) on a persistent instance."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from gampen_assets import pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh persistent instance (the repo's dagster.yaml) and the tiny profile."""
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("GAMPEN_PROFILE", "tiny")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("GAMPEN_STORAGE", "GAMPEN_DUCKDB", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _runs(home: Path):
    with DagsterInstance.from_config(str(home)) as instance:
        return [(r.status, r.tags.get("dagster/partition")) for r in instance.get_runs()]


def test_dg_launch_command_keeps_the_in_process_executor():
    cmd = pipeline.dg_launch_command(["posterior_catalog", "qualitative_flags"], "sim-test")
    assert Path(cmd[0]).name == "dg" and cmd[1] == "launch"
    assert cmd[cmd.index("--assets") + 1] == "posterior_catalog,qualitative_flags"
    assert cmd[cmd.index("-m") + 1] == "gampen_assets.definitions"
    assert '"in_process"' in cmd[cmd.index("--config-json") + 1]
    assert cmd[-2:] == ["--partition", "sim-test"]
    assert "--partition" not in pipeline.dg_launch_command(["psf_library"])


def test_in_process_runs_are_recorded_on_the_instance_and_failures_exit(home):
    seconds = pipeline.materialize(["psf_library", "noise_pool"])
    assert seconds > 0
    data = home / "data"
    assert (data / "psf_library/all/psfs.fits").is_file()
    assert (data / "noise_pool/all/noise_pixels.npy").is_file()
    assert _runs(home) == [(DagsterRunStatus.SUCCESS, None)]
    # No trained models to calibrate: the run fails (not retried), the pipeline stops naming it.
    with pytest.raises(SystemExit, match="calibrated_dropout_rate failed"):
        pipeline.materialize(["calibrated_dropout_rate"])
    assert _runs(home)[0] == (DagsterRunStatus.FAILURE, None)


@pytest.mark.slow
def test_dg_launcher_runs_a_subprocess(home):
    pipeline.materialize(["psf_library"], launcher="dg")
    assert (home / "data/psf_library/all/psfs.fits").is_file()
    assert _runs(home) == [(DagsterRunStatus.SUCCESS, None)]


def test_pipeline_needs_an_absolute_dagster_home(monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", "relative/home")
    with pytest.raises(SystemExit, match="absolute"):
        pipeline.main(["--profile", "tiny"])
