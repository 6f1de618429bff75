"""The Dagster UI as a person sees it: the asset graph shows every GaMPEN asset.

Starts ``dagster-webserver`` on a free local port with a temporary ``DAGSTER_HOME`` (a copy of
``dagster_home/dagster.yaml``), opens the global asset graph in headless Debian Chromium
through Playwright, and saves a screenshot ``ui-asset-graph.png`` in the test's temporary
folder, or in ``$GAMPEN_SCREENSHOT_DIR`` when set: ``GAMPEN_SCREENSHOT_DIR=docs
.venv/bin/python -m pytest tests/test_ui_browser.py`` refreshes ``docs/ui-asset-graph.png``.

Without ``chromium`` the test is skipped, except under ``CI=true`` where it fails (the
``chromium`` fixture of ``tests/conftest.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.browser_helpers import dagster_webserver, launch_chromium
from tests.gampen_assets.test_definitions import ASSETS

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("inputs", "model", "catalog", "validation", "transfer")
STARTUP_TIMEOUT_S = 240.0

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def webserver(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {
        "GAMPEN_PROFILE": "tiny",
        "GAMPEN_STORAGE": str(tmp_path / "storage"),
        "GAMPEN_INBOX": str(tmp_path / "inbox"),
    }
    with dagster_webserver(home, env, tmp_path / "webserver.log", STARTUP_TIMEOUT_S) as url:
        yield url


def test_asset_graph_shows_every_asset(chromium, screenshot_dir, webserver):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw, chromium)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            # Global asset lineage with the stage groups expanded.
            expanded = ",".join(f"global@global:{g}" for g in GROUPS)
            page.goto(f"{webserver}/asset-groups?expanded={quote(expanded)}", timeout=120_000)
            graph = page.locator("svg foreignObject")
            graph.get_by_text("psf_library", exact=True).wait_for(timeout=120_000)
            # Long names are middle-truncated in the graph nodes ("calibrated_d…_rate").
            in_graph = [n for n in sorted(ASSETS) if graph.get_by_text(n, exact=True).count()]
            assert len(in_graph) >= 8, f"graph nodes show only {in_graph}"
            page.wait_for_timeout(1500)  # let the layout settle before the screenshot
            screenshot = screenshot_dir / "ui-asset-graph.png"
            page.screenshot(path=str(screenshot))
            assert screenshot.stat().st_size > 10_000
            # The sidebar tree lists every asset under its group by full name.
            for group in GROUPS:
                page.get_by_text(group, exact=True).first.click()
                page.keyboard.press("ArrowRight")
            for name in sorted(ASSETS):
                page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            body = page.inner_text("body")
            missing = [name for name in sorted(ASSETS) if name not in body]
            assert not missing, f"asset graph page lacks {missing}"
        finally:
            browser.close()
