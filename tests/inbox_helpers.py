"""The inbox sensor's environment, and what the catalog run of each inbox request does first,
without Dagster: ingest the batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from gampen_ml.config import get_profile
from gampen_ml.inbox import PROCESSING, IngestResult, ingest_claimed


def watch_inbox(monkeypatch: pytest.MonkeyPatch, inbox: Path, settle_s: float = 0) -> None:
    """Point the inbox sensor of the tiny profile at ``inbox``: ``$GAMPEN_INBOX``,
    ``$GAMPEN_PROFILE`` and ``$GAMPEN_INBOX_SETTLE_S``, the seconds a batch must rest
    before it is taken (``settle_s``)."""
    monkeypatch.setenv("GAMPEN_INBOX", str(inbox))
    monkeypatch.setenv("GAMPEN_PROFILE", "tiny")
    monkeypatch.setenv("GAMPEN_INBOX_SETTLE_S", str(settle_s))


def ingest_requested(
    result, inbox: Path, storage_root: Path, quarantine_root: Path, profile: str = "tiny"
) -> dict[str, IngestResult]:
    """Ingest the claimed batch of every run request of a sensor ``result``."""
    done = {}
    for request in result.run_requests:
        key = request.partition_key
        claimed = inbox / PROCESSING / key
        if claimed.is_dir():
            done[key] = ingest_claimed(
                claimed, key, get_profile(profile), storage_root, quarantine_root
            )
    return done
