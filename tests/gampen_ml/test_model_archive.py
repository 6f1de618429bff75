"""The ``.gampen`` model archive: export, predict without MLflow or storage, import, damage.

Everything runs through ``gampen_ml.cli.main`` as a user types it, on the tiny trained world
of the reliability suite with a recalibrated champion and its validation coverage.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from astropy.io import fits

from gampen_ml import stages
from gampen_ml.calibrate import Recalibration, coverage_table
from gampen_ml.cli import main
from gampen_ml.io import partition_dir
from gampen_ml.model_archive import (
    CALIBRATION_FILE,
    CARD_FILE,
    DOMAIN_FILE,
    MANIFEST_FILE,
    ModelArchiveError,
    open_model_archive,
)
from gampen_ml.posterior import summarize
from tests.catalog_helpers import posterior_draws
from tests.reliability.conftest import RATE, TINY, copy_world, tiny_world  # noqa: F401

RECAL = Recalibration(
    scale=(1.2, 0.6, 0.5),
    exponent=(1.0, 1.3, 1.0),
    error_before=(0.1, 0.2, 0.1),
    error_after=(0.01, 0.02, 0.01),
)
#: Cutout 2 has a PSF far wider than the library's, cutout 3 over ten times the sky noise.
WIDE_PSF, NOISY = 2, 3


@pytest.fixture(scope="module")
def champion_world(tiny_world, tmp_path_factory):  # noqa: F811
    """The tiny world with a recalibrated champion, its coverage table, and FITS cutouts."""
    root = copy_world(tiny_world, tmp_path_factory.mktemp("archive") / "storage")
    calib = partition_dir(root, "calibrated_dropout_rate")
    (calib / "recalibration.json").write_text(json.dumps(RECAL.to_dict()))
    record = json.loads((calib / "calibration.json").read_text())
    (calib / "calibration.json").write_text(
        json.dumps({**record, "recalibrated": True, "n_val_galaxies": 8})
    )
    rng = np.random.default_rng(1)
    samples = posterior_draws(rng, 8, 40, flux_mu=9, flux_sigma=0.3)
    truths = pl.DataFrame({"bt": rng.uniform(0, 1, 8), "re_arcsec": rng.lognormal(0, 0.3, 8),
                           "flux_nJy": rng.lognormal(9, 0.3, 8)})  # fmt: skip
    summary = summarize(samples)
    pl.concat(
        [
            coverage_table(summary, truths, dropout_rate=0.0),
            coverage_table(summary, truths, dropout_rate=RATE),
            coverage_table(summary, truths, dropout_rate=RATE, recalibrated=True),
        ]
    ).write_parquet(calib / "coverage.parquet")

    images, _, _ = stages.split_inputs(stages.shard_dirs(TINY, root), "test")
    cutouts = root.parent / "cutouts"
    cutouts.mkdir()
    for i in range(4):
        image = np.asarray(images[i : i + 1][0], dtype=np.float64)
        if i == NOISY:
            image = image + np.random.default_rng(i).normal(0, 30.0, image.shape)
        hdu = fits.PrimaryHDU(image.astype(np.float32))
        hdu.header["PIXSCALE"] = TINY.imaging.pixel_scale_arcsec
        hdu.header["PSF_FWHM"] = 2.5 if i == WIDE_PSF else 0.8
        hdu.writeto(cutouts / f"g{i}.fits")
    return root, cutouts


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh Dagster home (its embedded MLflow store) and no storage root in the way."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("GAMPEN_STORAGE", raising=False)
    monkeypatch.setenv("GAMPEN_PROFILE", "tiny")
    return home


@pytest.fixture(scope="module")
def archive(champion_world, tmp_path_factory):
    root, _ = champion_world
    out = tmp_path_factory.mktemp("export") / "tiny-champion.gampen"
    assert (
        main(["model", "export", "--profile", "tiny", "--root", str(root), "--out", str(out)]) == 0
    )
    yield out
    shutil.rmtree(open_model_archive(out).model_dir)  # its unpacked copy under the temp dir


def test_archive_predicts_the_champions_rows_without_mlflow_or_storage(
    champion_world, archive, home, tmp_path, capsys
):
    root, cutouts = champion_world
    assert main(["predict", str(cutouts), "--root", str(root), "--out", str(tmp_path / "c.parquet"),
                 "--flags", str(tmp_path / "c_flags.parquet")]) == 0  # fmt: skip
    empty = tmp_path / "empty-root"
    empty.mkdir()
    # No storage root and an unreachable MLflow server: the archive alone must do.
    assert main(["predict", str(cutouts), "--model", str(archive), "--root", str(empty),
                 "--tracking-uri", "http://127.0.0.1:9", "--out", str(tmp_path / "a.parquet"),
                 "--flags", str(tmp_path / "a_flags.parquet")]) == 0  # fmt: skip
    assert "gampen-tiny vunregistered (recalibrated)" in capsys.readouterr().out
    champion = pl.read_parquet(tmp_path / "c.parquet")
    archived = pl.read_parquet(tmp_path / "a.parquet")
    assert archived.height == 4 and archived.equals(champion)
    assert archived["recalibrated"].all() and set(archived["model_name"]) == {"gampen-tiny"}

    # Same flags, computed from the archive's domain.json with no PSF library or noise pool.
    flags = pl.read_parquet(tmp_path / "a_flags.parquet")
    assert flags.equals(pl.read_parquet(tmp_path / "c_flags.parquet"))
    by_file = dict(zip(archived["source_file"], flags["psf_outside_library"], strict=True))
    assert by_file == {"g0.fits": False, "g1.fits": False, "g2.fits": True, "g3.fits": False}
    reasons = dict(zip(archived["source_file"], flags["ood_reason"], strict=True))
    assert "sky noise" in (reasons["g3.fits"] or "") and not reasons["g0.fits"]
    no_domain = stages.catalog_flags(archived, TINY, empty)
    assert "psf_outside_library" not in no_domain.columns


def test_archive_members_describe_the_champion(champion_world, archive, home, tmp_path, capsys):
    root, _ = champion_world
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read(MANIFEST_FILE))
        calibration = json.loads(zf.read(CALIBRATION_FILE))
        domain = json.loads(zf.read(DOMAIN_FILE))
        card = zf.read(CARD_FILE).decode()
    assert manifest["format"] == "gampen-model-archive" and manifest["format_version"] == 1
    assert set(manifest["files"]) == {"state_dict.pt", "model.json", "label_scaler.json",
                                      "history.json", CALIBRATION_FILE, DOMAIN_FILE, CARD_FILE}  # fmt: skip
    assert Recalibration.from_dict(calibration["recalibration"]) == RECAL
    assert calibration["chosen_dropout_rate"] == RATE and calibration["n_val_galaxies"] == 8
    rows = pl.DataFrame(calibration["coverage"])
    assert rows.height == 18 and set(rows["dropout_rate"]) == {RATE}  # its rate only
    stored = stages.model_domain(TINY, root)
    assert domain["psf_fwhm_range_arcsec"] == list(stored.psf_fwhm_range_arcsec)
    assert domain["noise_sigma_range_nJy"] == list(stored.noise_sigma_range_nJy)
    assert domain["imaging"]["stamp_size_px"] == 239
    first = rows.filter(pl.col("recalibrated") & (pl.col("parameter") == "bt")).sort("level")
    assert "| bt | 0.6827 | " in card and f"{first['coverage'][0]:.3f} |" in card
    assert "# Model card: gampen-tiny vunregistered" in card and "re_arcsec × 0.6" in card
    assert f"{stored.psf_fwhm_range_arcsec[0]:.3f}" in card

    # Exported again from the archive alone, it keeps its calibration and domain.
    again = tmp_path / "again.gampen"
    assert main(["model", "export", "--model", str(archive), "--root", str(tmp_path),
                 "--out", str(again)]) == 0  # fmt: skip
    with zipfile.ZipFile(again) as zf:
        assert json.loads(zf.read(CALIBRATION_FILE)) == calibration
        assert json.loads(zf.read(DOMAIN_FILE)) == domain
    assert main(["model", "export", "--root", str(root), "--out", str(tmp_path / "m.zip")]) == 2
    assert "m.zip: a model archive's name ends in .gampen" in capsys.readouterr().err


@pytest.mark.slow  # a fresh MLflow store: ~10 s
def test_import_round_trip_gives_the_same_catalog(champion_world, archive, home, tmp_path, capsys):
    from gampen_ml.registry import RECALIBRATION_TAG, default_tracking_uri, model_version_info

    _, cutouts = champion_world
    empty = tmp_path / "empty-root"
    empty.mkdir()
    assert main(["model", "import", str(archive), "--alias", "champion"]) == 0
    assert "registered as gampen-tiny version 1, alias 'champion'" in capsys.readouterr().out
    info = model_version_info(default_tracking_uri(home), "gampen-tiny", "1")
    assert Recalibration.from_dict(json.loads(info["tags"][RECALIBRATION_TAG])) == RECAL
    assert info["tags"]["gampen.archive.model"] == "gampen-tiny vunregistered"
    assert "champion" in info["aliases"]

    for model, name in ((["--model", str(archive)], "a"), (["--model", "1"], "v1"), ([], "alias")):
        assert main(["predict", str(cutouts), *model, "--root", str(empty),
                     "--out", str(tmp_path / f"{name}.parquet")]) == 0  # fmt: skip
    archived = pl.read_parquet(tmp_path / "a.parquet")
    for name in ("v1", "alias"):
        imported = pl.read_parquet(tmp_path / f"{name}.parquet")
        # The registry gave it a new version number; every other value is the archive's.
        assert set(imported["model_version"]) == {"1"}
        assert imported.drop("model_version").equals(archived.drop("model_version"))
        assert imported["recalibrated"].all()


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a zip, passing each ``(name, bytes)`` through ``change`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dst


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_damaged_archives_fail_naming_the_file_and_the_problem(archive, tmp_path, home, capsys):
    raw = archive.read_bytes()
    with zipfile.ZipFile(archive) as zf:
        weights = zf.read("state_dict.pt")
    flipped = tmp_path / "flipped.gampen"  # one byte of the stored weights, inside the zip
    flipped.write_bytes(_flip(raw, raw.find(weights) + len(weights) // 2))
    with pytest.raises(
        ModelArchiveError, match=r"flipped\.gampen: member state_dict\.pt .*corrupt"
    ):
        open_model_archive(flipped)

    altered = _rewrite(archive, tmp_path / "altered.gampen",
                       lambda n, d: _flip(d, len(d) // 2) if n == "state_dict.pt" else d)  # fmt: skip
    with pytest.raises(ModelArchiveError, match=r"member state_dict\.pt: SHA-256 .* differs"):
        open_model_archive(altered)

    missing = _rewrite(archive, tmp_path / "missing.gampen",
                       lambda n, d: None if n == "label_scaler.json" else d)  # fmt: skip
    with pytest.raises(ModelArchiveError, match=r"member label_scaler\.json is missing"):
        open_model_archive(missing)

    def newer(name: str, data: bytes) -> bytes:
        if name != MANIFEST_FILE:
            return data
        return json.dumps({**json.loads(data), "format_version": 2}).encode()

    with pytest.raises(ModelArchiveError, match="format version 2 is newer than this gampen_ml"):
        open_model_archive(_rewrite(archive, tmp_path / "newer.gampen", newer))

    truncated = tmp_path / "truncated.gampen"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FileNotFoundError, match="nowhere.gampen does not exist"):
        open_model_archive(tmp_path / "nowhere.gampen")
    predict = ["predict", str(tmp_path), "--model", str(truncated), "--out", str(tmp_path / "x")]
    for command in (predict, ["model", "import", str(truncated)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert (
            f"model archive {truncated}: not a readable zip archive (truncated or corrupt)" in err
        )
    assert not (home / "mlflow.db").exists()  # refused before MLflow was touched


def test_an_altered_unpacked_copy_is_replaced(archive):
    model_dir = open_model_archive(archive).model_dir
    weights = model_dir / "state_dict.pt"
    good = weights.read_bytes()
    weights.write_bytes(_flip(good, len(good) // 2))
    again = open_model_archive(archive)
    assert again.model_dir == model_dir and weights.read_bytes() == good
    shutil.rmtree(model_dir)
    assert open_model_archive(archive).model_dir.joinpath("model.json").is_file()
