"""The inbox under a realistic drop, while ``dagster dev`` runs (``docs/operations.md``).

A batch of 2,000 cutouts (one read-only) plus a gzipped FITS header claiming a 36000² image
(5.2 GB) is handed over atomically to the inbox of a copy of ``dagster_home`` (quick
champion, simulations hard-linked), then a 5-cutout batch after it. Prints the times and
checks that every good galaxy is catalogued once, the bomb is quarantined with its reason,
and the inbox keeps serving::

    .venv/bin/python benchmarks/inbox_soak_demo.py   # after make pipeline; ~20 min on 2 cores
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import polars as pl
from astropy.io import fits

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "dagster_home"
HOME = Path("/tmp/gampen-inbox-demo/home")


def copy_home() -> None:
    if HOME.exists():
        shutil.rmtree(HOME)
    (HOME / "data").mkdir(parents=True)
    for name in ("dagster.yaml", "mlflow.db", "gampen.duckdb"):
        shutil.copy(SOURCE / name, HOME / name)
    for folder in (SOURCE / "data").iterdir():
        if folder.name == "simulated_galaxies":  # 1.5 GB: hard links, same filesystem
            subprocess.run(["cp", "-al", str(folder), str(HOME / "data" / folder.name)], check=True)
        else:
            shutil.copytree(folder, HOME / "data" / folder.name)


def stage_batch(name: str, n: int) -> Path:
    """Write ``n`` cutouts into the hidden ``inbox/.name`` (renamed into place later)."""
    images = np.load(SOURCE / "data/simulated_galaxies/shard-000/images.npy", mmap_mode="r")
    stage = HOME / "inbox" / f".{name}"
    stage.mkdir(parents=True)
    for i in range(n):
        image = np.asarray(images[i % len(images)], dtype=np.float32)
        fits.PrimaryHDU(image).writeto(stage / f"g{i:04d}.fits")
    (stage / "_READY").touch()
    return stage


def wait_for(path: Path, daemon: subprocess.Popen, timeout_s: float) -> float:
    start = time.time()
    while not path.exists():
        assert daemon.poll() is None, "dagster dev exited"
        assert time.time() - start < timeout_s, f"{path} not made in {timeout_s} s"
        time.sleep(5)
    return time.time() - start


def main() -> None:
    copy_home()
    env = {**os.environ, "DAGSTER_HOME": str(HOME), "GAMPEN_PROFILE": "quick",
           "GAMPEN_INBOX_SETTLE_S": "3600"}  # fmt: skip
    for var in ("GAMPEN_STORAGE", "GAMPEN_DUCKDB", "GAMPEN_INBOX"):
        env.pop(var, None)
    big = stage_batch("night-big", 2000)
    (big / "g0007.fits").chmod(0o444)
    header = fits.Header(
        {"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 36000, "NAXIS2": 36000}
    )
    with gzip.open(big / "bomb.fits.gz", "wb") as fh:
        fh.write(header.tostring().encode("ascii") + b"\0" * 2880)
    log = open(HOME.parent / "dagster.log", "w")
    daemon = subprocess.Popen(
        [str(REPO / ".venv/bin/dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-p", "3998"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(20)
        os.rename(big, HOME / "inbox" / "night-big")  # the atomic hand-over
        data = HOME / "data"
        seconds = wait_for(data / "diagnostic_plots/night-big/index.md", daemon, 2400)
        print(f"night-big catalogued, flagged and plotted {seconds:.0f} s after the drop")
        small = stage_batch("night-next", 5)
        os.rename(small, HOME / "inbox" / "night-next")
        seconds = wait_for(data / "diagnostic_plots/night-next/index.md", daemon, 900)
        print(f"the next batch was served {seconds:.0f} s after its drop")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        log.close()
    catalog = pl.read_parquet(data / "posterior_catalog/night-big/catalog.parquet")
    assert catalog.height == 2000 == catalog["source_file"].n_unique()
    assert "g0007.fits" in set(catalog["source_file"])  # the read-only file
    reason = (HOME / "quarantine/night-big/bomb.fits.gz.reason.txt").read_text()
    assert "max_image_pixels" in reason
    assert pl.read_parquet(data / "posterior_catalog/night-next/catalog.parquet").height == 5
    assert [p.name for p in (HOME / "inbox").iterdir()] == ["_processing"]
    print("2,000 rows, each file once; bomb quarantined:", reason.splitlines()[-1])


if __name__ == "__main__":
    main()
