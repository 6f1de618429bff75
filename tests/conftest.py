"""Shared test fixtures: the tiny profile, a temporary storage root, few threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser_helpers import require_chromium, screenshot_folder

# Two cores on CI: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture
def tiny_profile():
    from gampen_ml.config import get_profile

    return get_profile("tiny")


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    root = tmp_path / "storage"
    root.mkdir()
    monkeypatch.setenv("GAMPEN_STORAGE", str(root))
    return root


@pytest.fixture
def chromium() -> str:
    """Path of Debian's ``chromium`` for browser tests: skips without it, but FAILS under
    ``CI=true`` (:func:`tests.browser_helpers.require_chromium`)."""
    return require_chromium()


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """Where browser tests save screenshots: ``$GAMPEN_SCREENSHOT_DIR`` when set (e.g.
    ``GAMPEN_SCREENSHOT_DIR=docs`` to refresh the pictures in the docs), else the test's
    temporary folder, so a test run never changes tracked files."""
    return screenshot_folder(tmp_path)
