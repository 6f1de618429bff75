"""Browser tests' rules (used by the ``chromium`` and ``screenshot_dir`` fixtures of
``tests/conftest.py``): no silent skip under CI, no screenshot in the working tree; and the
start and stop of the web servers they open."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(
    url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float
) -> None:
    """Poll ``url`` until it answers 200; fail with the tail of ``log`` when ``proc`` exits
    or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    pytest.fail(f"{what} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL what is left at the deadline."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def dagster_webserver(
    home: Path, env: Mapping[str, str], log: Path, timeout_s: float = 240.0
) -> Iterator[str]:
    """Run ``dagster-webserver -m gampen_assets.definitions`` on a free local port with
    ``DAGSTER_HOME=home`` and ``env`` added; yield its base URL; stop its process group."""
    repo = Path(__file__).resolve().parents[1]
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                *("-m", "gampen_assets.definitions", "-h", "127.0.0.1", "-p", str(port)),
            ],
            cwd=repo,
            env={**os.environ, **env, "DAGSTER_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(f"{url}/server_info", proc, log, "dagster-webserver", timeout_s)
        yield url
    finally:
        stop_group(proc, timeout_s=30.0)


def launch_chromium(pw, chromium: str):
    """Headless Debian chromium through Playwright, never a downloaded browser."""
    return pw.chromium.launch(
        executable_path=chromium,
        headless=True,
        args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"],
    )
