"""What a materialization reports to Dagster: its data version and its metadata entries.

Markdown tables for the UI, and coverage per parameter and credible level as metadata keys
(``coverage_bt_68``).
"""

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import MetadataValue

from gampen_ml.io import folder_sha256


def folder_version(folder: Path) -> str:
    """Data version of a written partition: SHA-256 over its files, first 16 hex digits."""
    return folder_sha256(folder)[:16]


def md_table(rows: Sequence[Mapping[str, object]], float_format: str = "{:.4g}") -> MetadataValue:
    """A list of dicts (same keys) as a Markdown table for the Dagster UI."""
    if not rows:
        return MetadataValue.md("_(empty)_")
    columns = list(rows[0])

    def cell(value: object) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return str(value)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return MetadataValue.md("\n".join(lines))


def level_suffix(level: float) -> str:
    """Metadata key suffix of a credible level: ``0.6827 -> "68"``, ``0.9973 -> "99"``."""
    from gampen_ml.posterior import level_tag

    return level_tag(level).removeprefix("hpd")


def coverage_metadata(prefix: str, rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """One metadata entry per coverage-table row: ``{prefix}_{parameter}_{level}`` -> coverage.

    ``rows`` have the keys ``parameter``, ``level`` and ``coverage``
    (``gampen_ml.calibrate.coverage_table``); e.g. ``coverage_bt_68 -> 0.69``.
    """
    return {
        f"{prefix}_{row['parameter']}_{level_suffix(row['level'])}": float(row["coverage"])
        for row in rows
    }
