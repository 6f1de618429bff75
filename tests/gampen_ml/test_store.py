"""The storage layout has one owner: every path comes from ``gampen_ml.store.Store``."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from gampen_ml import store as layout
from gampen_ml.calibrate import Recalibration
from gampen_ml.config import get_profile
from gampen_ml.io import StorageError
from gampen_ml.settings import Settings
from gampen_ml.store import Calibration, ModelInfo, Store

REPO = Path(__file__).resolve().parents[2]


def test_paths_follow_the_layout(tmp_path):
    store = Store(tmp_path)
    tiny = get_profile("tiny")
    assert store.trained_model(0.01) == tmp_path / "trained_model" / "dropout-0.01"
    assert store.training_work(0.01) == tmp_path / "trained_model" / ".work-dropout-0.01"
    assert store.catalog_file("sim-test") == tmp_path / "posterior_catalog/sim-test/catalog.parquet"
    assert store.flags_file("b1") == tmp_path / "qualitative_flags/b1/flags.parquet"
    assert store.calibration() == tmp_path / "calibrated_dropout_rate" / "all"
    assert store.shards(tiny)[0] == tmp_path / "simulated_galaxies" / "shard-000"
    assert len(store.shards(tiny)) == tiny.simulation.n_shards
    assert store.batch_manifest("b1") == tmp_path / "inbox_batches/b1/_manifest.json"
    assert store.asset_dir(layout.POSTERIOR_CATALOG) == tmp_path / "posterior_catalog"
    assert store.labelled_set("d1") == tmp_path / "labelled_set" / "d1"
    with pytest.raises(StorageError, match="illegal"):
        store.catalog("../escape")


def test_store_of_accepts_a_store_or_a_folder(tmp_path):
    store = Store(tmp_path / "x" / ".." / "root")
    assert store.root == (tmp_path / "root").resolve()
    assert Store.of(store) is store
    assert Store.of(str(tmp_path / "root")) == store


def test_resource_and_cli_build_the_same_store(tmp_path, monkeypatch):
    from gampen_assets.resources import GampenSettings
    from gampen_ml.cli import _store, build_parser

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GAMPEN_STORAGE", raising=False)
    expected = Store(tmp_path / "home" / "data")
    assert Settings.resolve().store() == expected
    assert GampenSettings().store() == expected
    args = build_parser().parse_args(["validate", "--out", str(tmp_path / "v")])
    assert _store(args) == expected
    args = build_parser().parse_args(["validate", "--out", "v", "--root", str(tmp_path / "r")])
    assert _store(args) == Store(tmp_path / "r")


def test_publish_is_atomic(tmp_path):
    store = Store(tmp_path)
    target = store.catalog("sim-test")
    with pytest.raises(RuntimeError), store.publish(target) as tmp:
        (tmp / layout.CATALOG_FILE).write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    with store.publish(target) as tmp:
        (tmp / layout.CATALOG_FILE).write_text("whole")
    assert store.catalog_file("sim-test").read_text() == "whole"
    assert store.partition_keys(layout.POSTERIOR_CATALOG) == ["sim-test"]
    assert store.catalog_files() == {"sim-test": store.catalog_file("sim-test")}


def test_calibration_round_trip_and_errors(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(FileNotFoundError, match="calibrate the dropout rate first"):
        store.read_calibration()
    folder = store.calibration()
    folder.mkdir(parents=True)
    recal = Recalibration(scale=(1.5, 0.8, 1.1))
    record = Calibration(0.05, "gampen-tiny", "3", "run1", True, 120, recal)
    record.write(folder)
    layout.write_recalibration(folder, recal)
    assert json.loads((folder / layout.CALIBRATION_FILE).read_text()) == {
        "chosen_dropout_rate": 0.05,
        "model_name": "gampen-tiny",
        "model_version": "3",
        "mlflow_run_id": "run1",
        "recalibrated": True,
        "n_val_galaxies": 120,
    }
    back = store.read_calibration()
    assert back.record() == record.record() and back.recalibration.scale == (1.5, 0.8, 1.1)
    (folder / layout.RECALIBRATION_FILE).write_text(json.dumps({"scale": [1, -2, 1]}))
    with pytest.raises(ValueError, match=r"recalibration\.json: bad recalibration"):
        store.read_calibration()
    (folder / layout.RECALIBRATION_FILE).unlink()
    (folder / layout.CALIBRATION_FILE).write_text(json.dumps({"model_name": "x"}))
    with pytest.raises(ValueError, match=r"calibration\.json: bad calibration record"):
        store.read_calibration()


def test_model_info_defaults(tmp_path):
    assert ModelInfo.read(tmp_path) == ModelInfo()
    assert ModelInfo.read(tmp_path).name_or("tiny") == "gampen-tiny"
    ModelInfo("gampen-x", "7", "abc").write(tmp_path)
    assert json.loads((tmp_path / layout.REGISTRY_FILE).read_text()) == {
        "mlflow_run_id": "abc",
        "model_name": "gampen-x",
        "model_version": "7",
    }
    assert ModelInfo.read(tmp_path) == ModelInfo("gampen-x", "7", "abc")


def _string_constants(path: Path) -> list[str]:
    """String literals of a module, less ``__all__`` (Python names, not storage names)."""
    tree = ast.parse(path.read_text())
    exported = {
        id(node)
        for statement in tree.body
        if isinstance(statement, ast.Assign)
        and any(getattr(t, "id", None) == "__all__" for t in statement.targets)
        for node in ast.walk(statement.value)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in exported
    ]


# Modules that still spell the names; each is to move to the store.
NOT_YET_MIGRATED = {
    "misspecification.py",
    "bench_scale.py",
    "inbox_soak_demo.py",
    "transfer_study.py",
    "transfer_scratch.py",
}
#: The same words meaning something else: the DuckDB view is called like the asset it
#: reads; ``run_all`` names its benchmarks.
VIEW_NAMES = {("database.py", "posterior_catalog"), ("run_all.py", "sky_catalog")}
#: Storage values rather than names of folders or files (a dataset key, a version).
NOT_PATHS = {layout.SIM_TEST, layout.UNREGISTERED}


def test_storage_names_are_spelled_in_the_store_only():
    # Every asset folder and file name the store defines (its upper-case string constants).
    names = {
        value
        for name, value in vars(layout).items()
        if name.isupper() and isinstance(value, str) and value not in NOT_PATHS
    }
    assert {layout.CATALOG_FILE, layout.LABELLED_SET, layout.IMAGES_FILE} <= names
    offenders = {
        f"{path.relative_to(REPO)}: {value!r}"
        for package in ("gampen_ml", "gampen_assets", "benchmarks")
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name not in NOT_YET_MIGRATED and path != Path(layout.__file__)
        for value in _string_constants(path)
        if value in names and (path.name, value) not in VIEW_NAMES
    }
    assert not offenders, sorted(offenders)
