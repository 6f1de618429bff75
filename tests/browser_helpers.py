"""Browser tests' rules (used by the ``chromium`` and ``screenshot_dir`` fixtures of
``tests/conftest.py``): no silent skip under CI, no screenshot in the working tree."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest


def running_in_ci(env: Mapping[str, str] = os.environ) -> bool:
    """``$CI`` is ``true`` (``.ci/run`` and most CI runners set it)."""
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_chromium(path: str | None = None) -> str:
    """``path`` (default: ``chromium`` on the PATH); when there is none, skip the test on a
    developer machine but FAIL it under ``CI=true``: a CI that could not install the
    browser must not report the UI as tested."""
    path = path or shutil.which("chromium")
    if path is None:
        message = "Debian chromium is not installed (apt-get install chromium)"
        if running_in_ci():
            pytest.fail(f"{message}; CI=true, so a browser test may not skip")
        pytest.skip(message)
    return path


def screenshot_folder(tmp_path: Path, env: Mapping[str, str] = os.environ) -> Path:
    """``$GAMPEN_SCREENSHOT_DIR`` (created) when set, else ``tmp_path``."""
    folder = env.get("GAMPEN_SCREENSHOT_DIR")
    if not folder:
        return tmp_path
    path = Path(folder).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
