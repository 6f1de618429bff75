"""One corrupt partition file: reported by name, the other partitions stay queryable and
lineage is still written (views of the catalog database, ``gampen_ml.database``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from gampen_ml.database import (
    LineageRow,
    UnreadablePartitionWarning,
    ensure_schema,
    query,
    record_lineage,
)


def write_catalog(root: Path, dataset: str, n: int) -> Path:
    folder = root / "posterior_catalog" / dataset
    folder.mkdir(parents=True)
    path = folder / "catalog.parquet"
    pl.DataFrame({"galaxy_id": list(range(n)), "dataset": [dataset] * n}).write_parquet(path)
    return path


@pytest.fixture
def storage(tmp_path) -> tuple[Path, Path, Path]:
    """(db, root, corrupt file): catalogs a (2 rows) and c (3 rows), b truncated."""
    root = tmp_path / "storage"
    write_catalog(root, "a", 2)
    bad = write_catalog(root, "b", 5)
    bad.write_bytes(bad.read_bytes()[:40])  # a copy cut short: no Parquet footer
    write_catalog(root, "c", 3)
    flags = root / "qualitative_flags" / "a"
    flags.mkdir(parents=True)
    pl.DataFrame({"galaxy_id": [0, 1], "dataset": ["a", "a"]}).write_parquet(
        flags / "flags.parquet"
    )
    return tmp_path / "gampen.duckdb", root, bad


COUNTS = "SELECT dataset, count(*) AS n FROM posterior_catalog GROUP BY 1 ORDER BY 1"


def test_views_leave_out_the_corrupt_file_and_name_it(storage):
    db, root, bad = storage
    with pytest.warns(UnreadablePartitionWarning, match=rf"{bad}.*posterior_catalog") as caught:
        ensure_schema(db, root)
    assert len(caught) == 1
    assert query(db, COUNTS) == [{"dataset": "a", "n": 2}, {"dataset": "c", "n": 3}]
    assert query(db, "SELECT count(*) AS n FROM flags") == [{"n": 2}]
    # A reader's fresh TEMP views do the same, and report through its log.
    lines: list[str] = []
    rows = query(db, COUNTS, storage_root=root, log=lines.append)
    assert rows == [{"dataset": "a", "n": 2}, {"dataset": "c", "n": 3}]
    assert len(lines) == 1 and str(bad) in lines[0] and "unreadable" in lines[0]


def test_lineage_of_another_asset_is_written_and_the_file_reported(storage):
    db, root, bad = storage
    lines: list[str] = []
    row = LineageRow("qualitative_flags", "c", "flags-v1", row_count=3)
    lineage_id = record_lineage(db, row, storage_root=root, log=lines.append)
    (written,) = query(db, "SELECT lineage_id, asset, partition, status FROM lineage")
    assert written == {
        "lineage_id": lineage_id,
        "asset": "qualitative_flags",
        "partition": "c",
        "status": "success",
    }
    assert [line.split(":")[0] for line in lines] == [str(bad)]
    # The refresh that came with the lineage write made views over the readable files.
    assert query(db, COUNTS) == [{"dataset": "a", "n": 2}, {"dataset": "c", "n": 3}]
    # Once the partition is rewritten, the next write brings it back into the view.
    bad.unlink()
    bad.parent.rmdir()
    write_catalog(root, "b", 5)
    lines.clear()
    record_lineage(db, LineageRow("posterior_catalog", "b", "cat-v2"), root, log=lines.append)
    assert lines == []
    assert [r["n"] for r in query(db, COUNTS)] == [2, 5, 3]
    # With every file readable the view reads a glob again: a new partition shows at once.
    write_catalog(root, "d", 1)
    assert [r["dataset"] for r in query(db, COUNTS)] == ["a", "b", "c", "d"]


def test_catalog_asset_lineage_logs_the_corrupt_file(storage, monkeypatch):
    """Through Dagster: ``record_materialization`` writes the row and logs the file name."""
    from dagster import build_asset_context

    from gampen_assets.lineage import record_materialization
    from gampen_assets.resources import GampenSettings

    db, root, bad = storage
    for var in ("DAGSTER_HOME", "GAMPEN_STORAGE", "GAMPEN_DUCKDB"):
        monkeypatch.delenv(var, raising=False)
    settings = GampenSettings(storage_root=str(root), database=str(db))
    warnings: list[str] = []
    with build_asset_context(resources={"settings": settings}) as context:
        monkeypatch.setattr(context.log, "warning", warnings.append)
        record_materialization(
            context,
            asset="posterior_catalog",
            partition="c",
            data_version="cat-v1",
            upstream=[],
            input_paths=[],
            row_count=3,
            started_at=datetime.now(UTC),
        )
    assert query(db, "SELECT asset, partition FROM lineage") == [
        {"asset": "posterior_catalog", "partition": "c"}
    ]
    assert len(warnings) == 1 and str(bad) in warnings[0]
