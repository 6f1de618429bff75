"""The files the study scripts share: the marker of a finished render and the results pair."""

from __future__ import annotations

import json
from pathlib import Path


def rendered(marker: Path, n: int, seed: int, remedy: str) -> bool:
    """Whether ``marker`` records a finished render of ``n`` galaxies from ``seed``.

    False when there is no marker. Raises SystemExit, naming the marker's folder and
    ``remedy``, when the marker records a render of another ``(n, seed)``.
    """
    if not marker.is_file():
        return False
    known = json.loads(marker.read_text())
    if (known["n"], known["seed"]) != (n, seed):
        raise SystemExit(
            f"{marker.parent} holds n={known['n']}, seed={known['seed']}, "
            f"not n={n}, seed={seed}: {remedy}"
        )
    return True


def mark_rendered(marker: Path, n: int, seed: int) -> None:
    """Record in ``marker`` that the render of ``n`` galaxies from ``seed`` is finished."""
    marker.write_text(json.dumps({"n": n, "seed": seed}))


def write_results(out: Path, stem: str, result: dict, table_md: str) -> None:
    """Write ``<stem>.json`` (``result``) and ``<stem>.md`` (``table_md``) to ``out``, and
    print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table_md)
    print(table_md)
