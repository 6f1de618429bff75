"""The test suite's own safety nets: a missing browser cannot pass CI, screenshots stay out
of the working tree, every test has a time limit."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.browser_helpers import require_chromium, screenshot_folder

REPO = Path(__file__).resolve().parents[1]


def run_browser_test_without_chromium(tmp_path: Path, **extra: str):
    """``pytest tests/test_ui_browser.py`` with a PATH that has no ``chromium``."""
    empty_path = tmp_path / "bin"
    empty_path.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PATH")}
    env.update(PATH=str(empty_path), OMP_NUM_THREADS="1", **extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/test_ui_browser.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_missing_chromium_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    # The browser test, run as CI runs it, on a machine without chromium: it fails.
    in_ci = run_browser_test_without_chromium(tmp_path, CI="true")
    assert in_ci.returncode == 1, in_ci.stdout
    assert "1 error" in in_ci.stdout  # the `chromium` fixture fails before the webserver starts
    assert "CI=true, so a browser test may not skip" in in_ci.stdout
    # The rule itself: fail under CI, skip elsewhere.
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        require_chromium()
    assert require_chromium("/usr/bin/chromium") == "/usr/bin/chromium"


def test_screenshots_go_to_the_temporary_folder_unless_asked(tmp_path):
    assert screenshot_folder(tmp_path / "t", env={}) == tmp_path / "t"
    asked = screenshot_folder(tmp_path / "t", env={"GAMPEN_SCREENSHOT_DIR": str(tmp_path / "s")})
    assert asked == tmp_path / "s" and asked.is_dir()


def test_every_test_has_a_time_limit_and_ci_sets_ci():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]
    assert 0 < int(options["ini_options"]["timeout"]) <= 1800
    script = (REPO / ".ci" / "run").read_text().splitlines()
    assert script.index("export CI=true") < script.index("make test")
