"""Errors raised on bad input files of the simulation stage."""

from __future__ import annotations

from pathlib import Path


class InputFileError(ValueError):
    """An input file (PSF or sky-object FITS) is unusable.

    Parameters
    ----------
    path : path-like
        The offending file.
    problem : str
        What is wrong with it, with the field and value where there is one.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
