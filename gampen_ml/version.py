"""The version of the running code, recorded with everything it writes.

One function, :func:`code_version`, for every record: catalog rows (``code_version``
column, ``CODEVER`` in exports), lineage rows (``gampen_assets.lineage``) and model
archives (``manifest.json``), so the same code is named the same way everywhere.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import gampen_ml


@functools.cache
def code_version() -> str:
    """``gampen_ml.__version__``, plus ``+g<commit>`` when the source is a git checkout.

    Returns
    -------
    str
        ``"0.1.0+g1a2b3c4"`` in a checkout (``git rev-parse --short HEAD`` of the package's
        folder; the PEP 440 local-version form setuptools-scm uses), ``"0.1.0"`` in an
        installed copy or where git is missing. Computed once per process.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(gampen_ml.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{gampen_ml.__version__}+g{commit}" if commit else gampen_ml.__version__
