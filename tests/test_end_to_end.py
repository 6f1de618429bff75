"""The platform as a user runs it, end to end, on the tiny profile.

1. ``python -m gampen_assets.pipeline`` (what ``make pipeline`` runs) materializes every
   asset on a persistent instance in a temporary ``DAGSTER_HOME``.
2. With ``dagster-daemon`` running, a batch of FITS cutouts dropped into the inbox becomes a
   catalog partition, flags and plots without a human; the bad files (truncated, a header
   claiming 5 GB, a hidden partial upload) are quarantined with their reasons, a read-only
   file is catalogued, and the inbox goes on to serve the next batch.
3. The catalog answers SQL through the DuckDB shell and ``gampen sql``; ``gampen lineage``
   prints the chain back to the simulations.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from astropy.io import fits

REPO = Path(__file__).resolve().parents[1]
# The module fixture's pipeline may take up to 20 min, the daemon's catalog up to 15.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GAMPEN_PROFILE": "tiny",
        "OMP_NUM_THREADS": "1",
        "GAMPEN_INBOX_SETTLE_S": "3600",
    }
    for var in ("GAMPEN_STORAGE", "GAMPEN_DUCKDB", "GAMPEN_INBOX"):
        env.pop(var, None)
    result = subprocess.run(
        [sys.executable, "-m", "gampen_assets.pipeline"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pipeline finished" in result.stdout
    return home, env


def test_pipeline_materializes_every_asset(home):
    home, _ = home
    data = home / "data"
    for folder in (
        "psf_library/all/psfs.fits",
        "noise_pool/all",
        "simulated_galaxies/shard-000/images.npy",
        "simulated_galaxies/shard-001/labels.parquet",
        "trained_model/dropout-0/state_dict.pt",
        "trained_model/dropout-0.05/state_dict.pt",
        "calibrated_dropout_rate/all/calibration.json",
        "posterior_catalog/sim-test/catalog.parquet",
        "qualitative_flags/sim-test/flags.parquet",
        "diagnostic_plots/sim-test/index.md",
        "diagnostic_plots/sim-test/validation.md",
    ):
        assert (data / folder).exists(), folder
    calibration = json.loads((data / "calibrated_dropout_rate/all/calibration.json").read_text())
    assert calibration["model_version"] not in (None, "unregistered")
    assert (home / "mlflow.db").is_file() and (home / "gampen.duckdb").is_file()


def _write_batch(
    inbox: Path, images: np.ndarray, psf_fwhm: list[float | None], name: str = "night-001"
) -> Path:
    batch = inbox / name
    batch.mkdir(parents=True)
    for i, (image, fwhm) in enumerate(zip(images, psf_fwhm, strict=True)):
        hdu = fits.PrimaryHDU(np.asarray(image, dtype=">f4"))  # big-endian, as telescopes write
        hdu.header["PIXSCALE"] = 0.168
        if fwhm is not None:
            hdu.header["PSF_FWHM"] = fwhm
        hdu.writeto(batch / f"galaxy_{i}.fits")
    (batch / "truncated.fits").write_bytes((batch / "galaxy_0.fits").read_bytes()[:3000])
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 36_000,
                          "NAXIS2": 36_000})  # fmt: skip
    with gzip.open(batch / "bomb.fits.gz", "wb") as fh:  # claims 5.2 GB in a few kB
        fh.write(header.tostring().encode("ascii") + b"\0" * 2880)
    (batch / ".partial.fits").write_bytes(b"upload in progress")
    (batch / f"galaxy_{len(images) - 1}.fits").chmod(0o444)
    (batch / "_READY").touch()
    return batch


def test_inbox_batch_is_catalogued_by_the_daemon(home):
    home, env = home
    data = home / "data"
    images = np.load(data / "simulated_galaxies/shard-000/images.npy", mmap_mode="r")[:3]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-p", "3999"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        library = pl.read_parquet(data / "psf_library/all/psfs.parquet")["measured_fwhm_arcsec"]
        # galaxy_0 seen through a PSF far wider than the library's, galaxy_1 within, galaxy_2
        # without PSF information.
        psf_fwhm = [2.5 * library.max(), float(library.median()), None]
        _write_batch(home / "inbox", images, psf_fwhm)
        deadline = time.monotonic() + 900
        for name in ("night-001", "night-002"):
            plots = data / "diagnostic_plots" / name / "index.md"
            while not plots.exists() and time.monotonic() < deadline:
                assert daemon.poll() is None, "dagster dev exited"
                time.sleep(5)
            assert plots.exists(), f"the sensor-launched runs did not produce {name} in time"
            if name == "night-001":  # the inbox goes on serving the next batch
                _write_batch(home / "inbox", images[:1], [None], name="night-002")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)

    catalog = pl.read_parquet(data / "posterior_catalog/night-001/catalog.parquet")
    assert sorted(catalog["source_file"].to_list()) == [f"galaxy_{i}.fits" for i in range(3)]
    assert catalog["bt_true"].null_count() == 3
    flags = pl.read_parquet(data / "qualitative_flags/night-001/flags.parquet")
    assert flags.height == 3
    by_file = flags.join(catalog.select("galaxy_id", "source_file"), on="galaxy_id").sort(
        "source_file"
    )
    assert by_file["psf_outside_library"].to_list() == [True, False, False]
    fwhm_column = catalog.sort("source_file")["psf_fwhm_arcsec"].to_list()
    assert fwhm_column[1] == pytest.approx(psf_fwhm[1], rel=1e-12) and fwhm_column[2] is None
    quarantine = home / "quarantine" / "night-001"
    for name, reason in (("truncated.fits", "truncated"), ("bomb.fits.gz", "max_image_pixels"),
                         (".partial.fits", "reserved name")):  # fmt: skip
        assert (quarantine / name).is_file(), name
        assert reason in (quarantine / f"{name}.reason.txt").read_text(), name
    assert pl.read_parquet(data / "posterior_catalog/night-002/catalog.parquet").height == 1
    assert sorted(p.name for p in (home / "inbox").iterdir()) == ["_processing"]

    # One prediction path: `gampen predict` on the stored batch gives the inbox's rows, the
    # champion's registered version and its recalibration included.
    out = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "predict", str(data / "inbox_batches/night-001"),
         "--out", str(home / "predicted.parquet")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    predicted = pl.read_parquet(home / "predicted.parquet")
    assert predicted.equals(catalog), "gampen predict and the inbox disagree on the same files"
    calibration = json.loads((data / "calibrated_dropout_rate/all/calibration.json").read_text())
    assert predicted["model_version"].unique().to_list() == [str(calibration["model_version"])]
    assert predicted["recalibrated"].all() == calibration["recalibrated"]

    # SQL through the DuckDB shell the README shows, and through `gampen sql`.
    shell = subprocess.run(
        [str(Path(sys.executable).parent / "duckdb"), "-readonly", str(home / "gampen.duckdb"),
         "-csv", "-c", "select dataset, count(*) as n from posterior_catalog group by 1 order by 1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    assert "night-001,3" in shell.stdout
    out = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "sql", "select count(*) as n from flags"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lineage = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "lineage", "posterior_catalog",
         "--partition", "night-001", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert lineage.returncode == 0, lineage.stderr
    assets = {row["asset"] for row in json.loads(lineage.stdout)}
    assert {"posterior_catalog", "calibrated_dropout_rate", "trained_model"} <= assets
    assert {"simulated_galaxies", "psf_library", "noise_pool"} <= assets
