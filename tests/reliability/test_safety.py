"""Safety: SQL only with parameters, no path escapes the storage root, no pickle loading."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RATE, REPO, TINY, child_env
from dagster import build_sensor_context, instance_for_test
from fits_cases import galaxy, write_fits

from gampen_assets.sensors import STORED_BATCHES, inbox_sensor, sanitize_batch_name
from gampen_ml import database as db_api
from gampen_ml import stages
from gampen_ml.config import dropout_key
from gampen_ml.fits_input import CutoutError, Rejection, quarantine
from gampen_ml.io import StorageError, load_npy_mmap, partition_dir
from tests.inbox_helpers import ingest_requested, watch_inbox

SOURCES = sorted((REPO / "gampen_ml").rglob("*.py")) + sorted(
    (REPO / "gampen_assets").rglob("*.py")
)
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|FROM|WHERE|VALUES)\b")
#: Every value formatted into SQL text, by file and source expression: placeholders,
#: view names of a fixed dict, and a storage path with quotes doubled. Anything new fails.
ALLOWED_SQL_INTERPOLATIONS = {
    ("gampen_ml/database.py", "', '.join('?' * len(values))"),
    ("gampen_ml/database.py", "view"),
    # "VIEW" or "TEMP VIEW", chosen by the code.
    ("gampen_ml/database.py", "kind"),
    # Paths of the storage root as quoted SQL literals ('' escaping, database._sql_string):
    # DuckDB cannot bind parameters in CREATE VIEW.
    ("gampen_ml/database.py", "_sql_string(glob)"),
    ("gampen_ml/database.py", "listed"),
    ("gampen_ml/database.py", "columns"),
    ("gampen_ml/database.py", "c.split(' ', 1)[1]"),
    ("gampen_ml/database.py", "c.split(' ', 1)[0]"),
    # A constant SQL fragment (the recursive lineage step both lineage walks share).
    ("gampen_ml/database.py", "_UPSTREAM_STEP_SQL"),
}


def _trees():
    for path in SOURCES:
        yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), str(path))


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_sql_text_never_formats_values_in():
    found = set()
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if SQL_WORDS.search(text):
                    for v in node.values:
                        if isinstance(v, ast.FormattedValue):
                            found.add((rel, ast.unparse(v.value)))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                base = node.func.value
                if node.func.attr == "format" and isinstance(base, ast.Constant):
                    assert not SQL_WORDS.search(str(base.value)), (rel, node.lineno)
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and isinstance(side.value, str):
                        assert not SQL_WORDS.search(side.value), (rel, node.lineno)
    assert found <= ALLOWED_SQL_INTERPOLATIONS, found - ALLOWED_SQL_INTERPOLATIONS


def test_no_pickle_loading_anywhere_in_the_source():
    problems = []
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                for name in names:
                    if name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle",
                                              "joblib", "shelve", "marshal"):  # fmt: skip
                        problems.append((rel, node.lineno, f"imports {name}"))
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append((rel, node.lineno, "torch.load without weights_only=True"))
            if name in ("np.load", "numpy.load"):
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and not value.value):
                    problems.append((rel, node.lineno, "np.load(allow_pickle=...)"))
            if name.endswith(("read_pickle", "pytorch.load_model", "pyfunc.load_model")):
                problems.append((rel, node.lineno, name))
    assert problems == []


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_bearing_model_checkpoint_and_array_are_refused(tiny_world, tmp_path):
    import torch

    from gampen_ml.data.datasets import ShardImages
    from gampen_ml.train import load_trained_model, train_model

    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    shutil.copytree(tiny_world / "trained_model" / dropout_key(RATE), model)
    torch.save({"weights": Payload(marker)}, model / "state_dict.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_trained_model(model)
    # A pickle-bearing checkpoint is refused on resume.
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"epoch": 1, "evil": Payload(marker)}, work / "checkpoint.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        train_model(TINY, RATE, stages.shard_dirs(TINY, tiny_world), work, device="cpu",
                    progress=False)  # fmt: skip
    # An object array (pickled) in place of a shard's images.
    shard = tmp_path / "shard-000"
    shutil.copytree(tiny_world / "simulated_galaxies" / "shard-000", shard)
    np.save(shard / "images.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(StorageError, match="images.npy"):
        load_npy_mmap(shard / "images.npy")
    with pytest.raises(Exception, match="(?i)pickle"):
        ShardImages([shard], "train").images(np.arange(2))
    # ... and through the command line.
    write_fits(tmp_path / "dummy.fits", galaxy(1))
    out = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "predict", str(tmp_path), "--model", str(model),
         "--out", str(tmp_path / "c.parquet"), "--profile", "tiny"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and re.search("(?i)weights.only|unpickl", out.stderr)
    assert not (tmp_path / "c.parquet").exists()
    assert not marker.exists()


MALICIOUS = "x'); DROP TABLE lineage; --"


def test_malicious_dataset_names_are_stored_verbatim_and_drop_nothing(tmp_path):
    db = tmp_path / "g.duckdb"
    root = tmp_path / "it's a root"  # a quote in the storage path itself
    catalog_dir = root / "posterior_catalog" / "d"
    catalog_dir.mkdir(parents=True)
    import polars as pl

    pl.DataFrame({"galaxy_id": [0, 1], "dataset": [MALICIOUS, MALICIOUS]}).write_parquet(
        catalog_dir / "catalog.parquet"
    )
    db_api.ensure_schema(db, root)
    db_api.record_lineage(db, db_api.LineageRow("simulated_galaxies", MALICIOUS, "v1"))
    db_api.record_lineage(db, db_api.LineageRow("posterior_catalog", MALICIOUS, "v2",
                                  upstream=[("simulated_galaxies", MALICIOUS, "v1")]),
                   storage_root=root)  # fmt: skip
    chain = db_api.lineage_chain(db, "posterior_catalog", MALICIOUS)
    assert [(r["asset"], r["partition"]) for r in chain] == [
        ("posterior_catalog", MALICIOUS),
        ("simulated_galaxies", MALICIOUS),
    ]
    provenance = db_api.catalog_row_provenance(db, MALICIOUS, 1)
    assert {r["asset"] for r in provenance} == {"posterior_catalog", "simulated_galaxies"}
    assert db_api.query(db, "SELECT count(*) AS n FROM lineage")[0]["n"] == 2
    assert db_api.query(db, "SELECT count(*) AS n FROM posterior_catalog")[0]["n"] == 2
    # `gampen sql` opens the database read-only: a destructive statement is refused.
    out = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "sql", "DROP TABLE lineage", "--db", str(db),
         "--root", str(root)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "read-only" in out.stderr.lower()
    assert db_api.query(db, "SELECT count(*) AS n FROM lineage")[0]["n"] == 2


@pytest.mark.parametrize("name", ["../x", "..", "a/../../b", "/etc", "x\x00y", ""])
def test_partition_names_cannot_escape_the_storage_root(name, tmp_path):
    with pytest.raises(StorageError):
        partition_dir(tmp_path, "posterior_catalog", name) if name else partition_dir(
            tmp_path, name, "p"
        )
    with pytest.raises(CutoutError):
        quarantine([Rejection("a.fits", "bad")], tmp_path, tmp_path / "q", batch_name=name or "/")


@pytest.mark.parametrize("raw", ["../x", "..", "a..b", "...", "x/../../y", "..\\..\\w"])
def test_batch_keys_are_single_safe_components(raw):
    key = sanitize_batch_name(raw)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key) and ".." not in key


def test_catalog_of_a_traversing_dataset_key_writes_nothing_outside(tiny_world, tmp_path):
    root = tmp_path / "storage"
    shutil.copytree(tiny_world, root)
    (root / STORED_BATCHES).mkdir()
    write_fits(root / "x" / "a.fits", galaxy(1))  # what "../x" would reach
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises((StorageError, CutoutError)):
        stages.catalog_and_publish(TINY, root, "../x", device="cpu")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_catalog_of_a_traversing_dataset_key_reads_nothing_outside(tiny_world, tmp_path):
    root = tmp_path / "storage"
    shutil.copytree(tiny_world, root)
    (root / STORED_BATCHES).mkdir()
    write_fits(root / "x" / "a.fits", galaxy(1))
    import gampen_ml.fits_input as fits_input

    read = []
    real = fits_input.load_cutouts
    fits_input.load_cutouts = lambda path, imaging: read.append(path) or real(path, imaging)
    try:
        with pytest.raises((StorageError, CutoutError)):
            stages.catalog_and_publish(TINY, root, "../x", device="cpu")
    finally:
        fits_input.load_cutouts = real
    assert read == []


def test_inbox_symlinks_and_header_names_never_lead_outside(tmp_path, monkeypatch, storage_root):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    secret = tmp_path / "secret"
    write_fits(secret / "s.fits", galaxy(3))
    inbox.mkdir()
    (inbox / "linked").symlink_to(secret, target_is_directory=True)  # a symlinked batch
    (inbox / "linked._READY").touch()
    batch = inbox / "ok"
    write_fits(batch / "a.fits", galaxy(1), {"FILENAME": "../../../evil.fits", "OBJECT": "../x"})
    (batch / "l.fits").symlink_to(secret / "s.fits")
    (batch / "_READY").touch()
    watch_inbox(monkeypatch, inbox)
    with instance_for_test() as instance:
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        result = inbox_sensor(build_sensor_context(instance=instance))
        ingest_requested(result, inbox, storage_root, home / "quarantine")
    assert [r.partition_key for r in result.run_requests] == ["ok"]
    assert (secret / "s.fits").is_file() and (inbox / "linked").is_symlink()  # untouched
    stored = storage_root / STORED_BATCHES / "ok"
    assert sorted(p.name for p in stored.iterdir()) == ["_manifest.json", "a.fits"]
    assert "symbolic links" in json.loads((stored / "_manifest.json").read_text())[
        "files_quarantined"]["l.fits"]  # fmt: skip
    assert not list(tmp_path.rglob("evil.fits"))
    everything = [p.resolve() for p in (storage_root, home) for p in p.rglob("*")]
    assert all(str(p).startswith(str(tmp_path)) for p in everything)
