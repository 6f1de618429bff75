"""One settings object: every path follows flags over environment over defaults, and no
other module reads the storage environment variables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gampen_ml.config import ConfigError
from gampen_ml.settings import Settings

REPO = Path(__file__).resolve().parents[2]
#: The variables only ``gampen_ml/settings.py`` may read.
STORAGE_VARIABLES = {"DAGSTER_HOME", "GAMPEN_STORAGE", "GAMPEN_DUCKDB", "MLFLOW_TRACKING_URI"}
#: Modules still reading them, each with the reason it is tolerated.
KNOWN_READERS = {
    # `make pipeline` insists that DAGSTER_HOME is set (absolute) before it starts
    # `dagster asset materialize` subprocesses: Dagster's own instance variable.
    "gampen_assets/pipeline.py",
}


def test_every_path_follows_flags_then_environment_then_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Nothing set: everything under ./dagster_home, the embedded MLflow store.
    bare = Settings.resolve(env={})
    home = tmp_path / "dagster_home"
    assert bare.profile_name == "quick"
    assert bare.dagster_home == home
    assert bare.storage_root == home / "data"
    assert bare.database == home / "gampen.duckdb"
    assert bare.mlflow_tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert bare.mlflow_artifact_location == (home / "mlartifacts").as_uri()
    assert (bare.inbox, bare.quarantine) == (home / "inbox", home / "quarantine")
    assert bare.inbox_settle_s == 300.0

    # DAGSTER_HOME alone moves every derived path (a relative one is made absolute).
    derived = Settings.resolve(env={"DAGSTER_HOME": "h", "GAMPEN_STORAGE": ""})
    h = tmp_path / "h"
    assert (derived.dagster_home, derived.storage_root, derived.database) == (
        h,
        h / "data",
        h / "gampen.duckdb",
    )
    assert derived.mlflow_tracking_uri == f"sqlite:///{h / 'mlflow.db'}"
    assert (derived.inbox, derived.quarantine) == (h / "inbox", h / "quarantine")

    # Each variable sets its own path; a tracking server leaves artifacts to the server.
    env = {
        "GAMPEN_PROFILE": "tiny",
        "DAGSTER_HOME": str(tmp_path / "e-home"),
        "GAMPEN_STORAGE": str(tmp_path / "e-root"),
        "GAMPEN_DUCKDB": str(tmp_path / "e.duckdb"),
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "GAMPEN_INBOX": str(tmp_path / "e-inbox"),
        "GAMPEN_INBOX_SETTLE_S": "0",
    }
    from_env = Settings.resolve(env=env)
    assert from_env == Settings(
        profile_name="tiny",
        dagster_home=tmp_path / "e-home",
        storage_root=tmp_path / "e-root",
        database=tmp_path / "e.duckdb",
        mlflow_tracking_uri="http://mlflow:5000",
        mlflow_artifact_location=None,
        inbox=tmp_path / "e-inbox",
        quarantine=tmp_path / "e-home" / "quarantine",
        inbox_settle_s=0.0,
        domains=tmp_path / "e-home" / "domains",
        labelled=tmp_path / "e-home" / "labelled",
    )
    assert from_env.profile().name == "tiny"

    # Explicit values (resource fields, CLI flags) beat the environment.
    flags = Settings.resolve(
        profile="paper",
        storage_root="f-root",
        dagster_home=tmp_path / "f-home",
        database="f.duckdb",
        mlflow_tracking_uri="sqlite:///f.db",
        inbox="f-inbox",
        env=env,
    )
    assert flags.profile_name == "paper"
    assert flags.dagster_home == tmp_path / "f-home"
    assert flags.storage_root == tmp_path / "f-root"
    assert flags.database == tmp_path / "f.duckdb"
    assert flags.mlflow_tracking_uri == "sqlite:///f.db"
    assert flags.inbox == tmp_path / "f-inbox"
    assert flags.quarantine == tmp_path / "f-home" / "quarantine"

    # An explicit home moves the paths no variable or flag sets; empty strings are unset.
    home_only = Settings.resolve(dagster_home="g", storage_root="", env={"GAMPEN_STORAGE": "s"})
    assert home_only.database == tmp_path / "g" / "gampen.duckdb"
    assert home_only.storage_root == tmp_path / "s"

    # The process environment is the default source.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "p-home"))
    monkeypatch.delenv("GAMPEN_DUCKDB", raising=False)
    assert Settings.resolve().database == tmp_path / "p-home" / "gampen.duckdb"


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_bad_settle_time_names_the_variable(value):
    with pytest.raises(ConfigError, match=rf"GAMPEN_INBOX_SETTLE_S.*{value!r}"):
        Settings.resolve(env={"GAMPEN_INBOX_SETTLE_S": value})


def _storage_variable_reads(path: Path) -> list[str]:
    """Places in ``path`` that name a storage variable as a string (how it must be read:
    ``os.environ["X"]``, ``os.environ.get("X")``, ``os.getenv("X")``, ``X_ENV_VAR = "X"``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.value}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in STORAGE_VARIABLES
    ]


def test_only_the_settings_module_reads_the_storage_environment():
    modules = sorted(
        p
        for folder in ("gampen_ml", "gampen_assets", "deploy")
        for p in (REPO / folder).rglob("*.py")
        if p != REPO / "gampen_ml" / "settings.py"
    )
    assert len(modules) > 20
    reads = [
        hit
        for p in modules
        if p.relative_to(REPO).as_posix() not in KNOWN_READERS
        for hit in _storage_variable_reads(p)
    ]
    assert reads == [], "read these through gampen_ml.settings.Settings.resolve:\n" + "\n".join(
        reads
    )
    # The scan finds a read where there is one.
    assert _storage_variable_reads(REPO / "gampen_ml" / "settings.py")
