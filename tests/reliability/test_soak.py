"""Soak: 30 inbox batches (10 % bad files, names reused) through the sensor and the real tiny
model; every good galaxy is catalogued exactly once, every bad file is in quarantine."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY
from dagster import build_sensor_context, instance_for_test
from fits_cases import BAD, galaxy, write_fits

from gampen_assets.sensors import inbox_sensor
from gampen_ml import stages
from gampen_ml.database import LineageRow, query, record_lineage
from tests.inbox_helpers import ingest_requested

pytestmark = pytest.mark.slow
N_WAVES, BATCHES_PER_WAVE, FILES_PER_BATCH = 3, 10, 3


def test_thirty_batches_lose_nothing(world, tmp_path, monkeypatch):
    home, inbox, db = tmp_path / "home", tmp_path / "inbox", tmp_path / "g.duckdb"
    inbox.mkdir()
    for key, value in {"GAMPEN_INBOX": inbox, "GAMPEN_PROFILE": "tiny", "GAMPEN_STORAGE": world,
                       "GAMPEN_INBOX_SETTLE_S": 0}.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))
    rng = np.random.default_rng(7)
    n_files = N_WAVES * BATCHES_PER_WAVE * FILES_PER_BATCH
    bad_slots = set(rng.choice(n_files, size=n_files // 10, replace=False).tolist())
    expected_good, expected_bad = set(), {}
    cursor, slot = None, 0
    with instance_for_test() as instance:
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        for wave in range(N_WAVES):
            for b in range(BATCHES_PER_WAVE):
                name = f"night-{b}"  # the same names every wave: keys get -2, -3
                key = name if wave == 0 else f"{name}-{wave + 1}"
                for f in range(FILES_PER_BATCH):
                    file = f"{'abc'[f]}.fits"
                    if slot in bad_slots:
                        case = BAD[slot % (len(BAD) - 1)]  # any bad FITS case
                        (inbox / name).mkdir(parents=True, exist_ok=True)
                        case.write(inbox / name / file)
                        expected_bad[(key, file)] = case.expect
                    else:
                        write_fits(inbox / name / file, galaxy(slot))
                        expected_good.add((key, file))
                    slot += 1
                (inbox / name / "_READY").touch()
            result = inbox_sensor(build_sensor_context(instance=instance, cursor=cursor))
            cursor = result.cursor
            if result.dynamic_partitions_requests:
                for request in result.dynamic_partitions_requests:
                    instance.add_dynamic_partitions(request.partitions_def_name,
                                                    list(request.partition_keys))  # fmt: skip
            ingest_requested(result, inbox, world, home / "quarantine")
            for request in result.run_requests:
                # What the requested run does: the catalog asset with the real tiny model.
                catalog = stages.catalog_and_publish(TINY, world, request.partition_key,
                                                     device="cpu")  # fmt: skip
                record_lineage(db, LineageRow("posterior_catalog", request.partition_key, "v",
                                              row_count=catalog.height), storage_root=world)  # fmt: skip
            assert [p.name for p in inbox.iterdir()] == ["_processing"]
            assert list((inbox / "_processing").iterdir()) == []
    rows = query(db, "SELECT dataset, source_file, count(*) AS n FROM posterior_catalog "
                 "GROUP BY ALL")  # fmt: skip
    assert {r["n"] for r in rows} == {1}
    catalogued = {(r["dataset"], r["source_file"]) for r in rows}
    assert catalogued == expected_good
    quarantine = home / "quarantine"
    for (key, file), expect in expected_bad.items():
        assert (quarantine / key / file).exists(), (key, file)
        assert expect in (quarantine / key / f"{file}.reason.txt").read_text()
    quarantined = {(p.parent.name, p.name) for p in quarantine.glob("*/*.fits")}
    assert quarantined == set(expected_bad)
    assert len(catalogued) + len(quarantined) == n_files
