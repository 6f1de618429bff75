"""What the catalog run of each inbox request does first, without Dagster: ingest the batch."""

from __future__ import annotations

from pathlib import Path

from gampen_ml.config import get_profile
from gampen_ml.inbox import PROCESSING, IngestResult, ingest_claimed


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
