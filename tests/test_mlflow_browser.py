"""The model registry as a person sees it: ``make mlflow`` shows the champion and its metrics.

Registers a tiny GaMPEN in a temporary embedded store through the training code's own
registry calls (``log_training_run``, ``set_champion``), starts ``make mlflow`` on it on a
free port, and follows the registered model -> its version -> the source run in headless
Debian Chromium (Playwright): the model name, the ``champion`` alias, the run's model
artifacts and its ``val_loss`` metric must show. The registered model's page is saved as
``mlflow-registry.png`` in the test's temporary folder, or in ``$GAMPEN_SCREENSHOT_DIR``.

Without ``chromium`` the test is skipped, except under ``CI=true`` where it fails (the
``chromium`` fixture of ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.browser_helpers import free_port, stop_group, wait_for_server

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
#: Exactly representable, so the UI prints it as is.
VAL_LOSS = 0.8125

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _register_tiny_champion(home: Path) -> tuple[str, str]:
    """Log and register a tiny model in ``<home>/mlflow.db`` as training does; alias it champion.

    Returns the registered model name and the run name.
    """
    import torch

    from gampen_ml.config import get_profile
    from gampen_ml.data.transforms import LabelScaler
    from gampen_ml.model import GaMPEN
    from gampen_ml.registry import (
        default_artifact_location,
        default_tracking_uri,
        log_training_run,
        registered_model_name,
        set_champion,
    )

    tiny = get_profile("tiny")
    model_dir = home / "model"
    model_dir.mkdir(parents=True)
    stamp = tiny.imaging.stamp_size_px
    net = GaMPEN(tiny.network, 0.05, stamp).eval()
    torch.save(net.state_dict(), model_dir / "state_dict.pt")
    LabelScaler.fit(np.array([[0.2, 1.0, 1e5], [0.5, 2.0, 1e6], [0.0, 0.5, 3e4]])).save(
        model_dir / "label_scaler.json"
    )
    (model_dir / "model.json").write_text(json.dumps({"profile": tiny.name, "dropout_rate": 0.05}))
    history = [
        {"epoch": 1, "train_loss": 1.5, "val_loss": VAL_LOSS, "lr": 1e-3, "seconds": 2.0,
         "images_per_s": 12.0}
    ]  # fmt: skip
    (model_dir / "history.json").write_text(json.dumps(history))
    x = np.zeros((1, 1, stamp, stamp), np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).numpy()
    uri = default_tracking_uri(home)
    _, version = log_training_run(
        uri, model_dir, profile_dict=tiny.to_dict(), dropout_rate=0.05, history=history,
        data_version="test", input_example=x, output_example=y,
        artifact_location=default_artifact_location(home),
    )  # fmt: skip
    name = registered_model_name(tiny.name)
    set_champion(uri, name, version)
    return name, f"{tiny.name}-dropout-0.05"


@pytest.fixture
def mlflow_ui(tmp_path):
    """``make mlflow`` on a temporary embedded store holding a tiny champion."""
    home = tmp_path / "dagster_home"
    name, run_name = _register_tiny_champion(home)
    port = free_port()
    log = tmp_path / "mlflow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            # -o: never reinstall the venv from a test, whatever the timestamps say.
            ["make", "-o", ".venv/installed", "mlflow", f"DAGSTER_HOME={home}",
             f"MLFLOW_PORT={port}"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_server(
            f"http://127.0.0.1:{port}/health", proc, log, "make mlflow", STARTUP_TIMEOUT_S
        )
        yield f"http://127.0.0.1:{port}", name, run_name
    finally:
        stop_group(proc, STOP_TIMEOUT_S)


def test_registry_shows_champion_and_metrics(chromium, screenshot_dir, mlflow_ui):
    base, name, run_name = mlflow_ui
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/#/models/{name}", timeout=120_000)
            # The registered model's page: its name and the versions table with the alias.
            page.get_by_text("@ champion").first.wait_for(timeout=120_000)
            assert page.get_by_text(name, exact=True).count()
            screenshot = screenshot_dir / "mlflow-registry.png"
            page.screenshot(path=str(screenshot))
            assert screenshot.stat().st_size > 10_000
            page.get_by_role("link", name="Version 1").first.click()
            # The version page names its source run; the link opens the run's artifacts.
            page.get_by_role("link", name=run_name).first.click()
            page.get_by_text("state_dict.pt").first.wait_for(timeout=60_000)
            # The run's overview (the same URL without the artifact path).
            page.goto(page.url.split("/artifacts")[0], timeout=60_000)
            # The run's Metrics table: a row "val_loss | 0.8125".
            metric = page.get_by_role("row").filter(has_text="val_loss").first
            metric.wait_for(timeout=60_000)
            assert metric.inner_text().split() == ["val_loss", str(VAL_LOSS)]
        finally:
            browser.close()
