"""Fixtures of the asset tests: a temporary Dagster home that the process's environment names."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    """``tmp_path`` as ``$DAGSTER_HOME``, with the storage root ``storage/`` and the lineage
    database ``gampen.duckdb`` in it (``$GAMPEN_STORAGE``, ``$GAMPEN_DUCKDB``)."""
    monkeypatch.setenv("GAMPEN_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "gampen.duckdb"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    return tmp_path
