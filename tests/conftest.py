"""Shared test fixtures: the tiny profile, a temporary storage root, few threads."""

from __future__ import annotations

import os

import pytest

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
