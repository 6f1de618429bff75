"""What a published table column means: its unit, UCD and one-line description.

The catalog (:data:`gampen_ml.catalog.CATALOG_COLUMN_INFO`) and the flags
(:data:`gampen_ml.flags.FLAGS_COLUMN_INFO`) describe every column once with a
:class:`ColumnInfo`; the exports (:mod:`gampen_ml.export`), the Dagster column schemas and
``docs/catalog.md`` read them from there.

Units are VOUnit strings that astropy parses and that FITS (``TUNITn``), VOTable
(``unit=``) and ECSV keep: ``nJy``, ``arcsec``, ``deg`` and ``mag``. Magnitudes are AB;
``mag(AB)`` (``astropy.units.ABmag``) survives only ECSV (FITS drops it, VOTable calls it
invalid), so the unit is ``mag`` and the description and the file header say AB. UCDs are
IVOA UCD1+ words (``astropy.io.votable.ucd.check_ucd`` accepts each).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ColumnInfo:
    """Meaning of one table column.

    Attributes
    ----------
    description : str
        One line, as in ``docs/catalog.md``.
    unit : str or None
        VOUnit string (``"nJy"``, ``"arcsec"``, ``"deg"``, ``"mag"``); ``None`` for
        dimensionless numbers, identifiers, text and booleans.
    ucd : str or None
        IVOA UCD1+ (``"phot.flux.density;stat.mean"``).
    """

    description: str
    unit: str | None = None
    ucd: str | None = None

    def described(self) -> str:
        """The description with the unit in brackets, e.g. ``"total flux, posterior mean [nJy]"``."""
        return f"{self.description} [{self.unit}]" if self.unit else self.description
