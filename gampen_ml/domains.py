"""Survey domains: how another survey's cutouts differ from the simulations and how to read them.

A *domain* is a survey / band / redshift-bin whose galaxies get their own fine-tuned
model (Ghosh et al. 2023 fine-tuned one model per HSC band). It is declared once, in a
TOML file ``<dagster_home>/domains/<name>.toml`` (:attr:`Settings.domains`)::

    name = "decals-r"
    description = "DECaLS DR9 r band, Legacy Surveys cutout service"
    pixel_scale_arcsec = 0.262
    stamp_size_px = 239          # cutouts are cropped / zero-padded to this
    flux_unit = "nanomaggy"      # "nJy" (the platform's unit) or "nanomaggy"

    [image]                      # which HDU is the image (default: platform rule)
    keywords = { IMAGETYP = "image", BAND = "r" }

    [weight]                     # optional inverse-variance HDU
    keywords = { IMAGETYP = "invvar", BAND = "r" }

    [psf]                        # optional: where the PSF image comes from
    file = "psf_{suffix}.fits"   # {stem} = cutout stem; {suffix} = stem after the first "_"
    keywords = { BAND = "r" }

The domain's name is its partition key everywhere (labelled set, fine-tuned model,
catalogs). The simulations themselves are not a domain: a batch without one is read with
the profile's own imaging and predicted by the champion.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import astropy.units as u

from gampen_ml.config import ConfigError, ImagingConfig

#: Allowed domain names: lower-case, usable as a partition key and a file name.
DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: Flux units a domain may declare, each converted to the platform's nJy on read.
FLUX_UNITS = {"nJy": u.nJy, "nanomaggy": 3631e-9 * u.Jy}


@dataclass(frozen=True)
class HduSelector:
    """Pick one HDU of a FITS file: by ``EXTNAME``, by index, or by header keywords.

    ``keywords`` match when every key's header value equals the given value (strings
    compared case-insensitively, stripped). Exactly one HDU must match.
    """

    name: str | None = None
    index: int | None = None
    keywords: Mapping[str, str | int | float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> HduSelector:
        unknown = set(data) - {"name", "index", "keywords"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        selector = cls(
            name=data.get("name"), index=data.get("index"), keywords=dict(data.get("keywords", {}))
        )
        if selector.name is None and selector.index is None and not selector.keywords:
            raise ConfigError(f"{where}: give name, index or keywords")
        return selector


@dataclass(frozen=True)
class PsfSource:
    """Where a cutout's PSF image is: an HDU of the cutout itself or of a sibling file."""

    #: File name pattern relative to the cutout's folder (``{stem}``, ``{suffix}``);
    #: ``None`` = the cutout file itself.
    file: str | None = None
    hdu: HduSelector = field(default_factory=lambda: HduSelector(name="PSF"))


@dataclass(frozen=True)
class Domain:
    """One survey domain (see the module docstring for its TOML form)."""

    name: str
    pixel_scale_arcsec: float
    stamp_size_px: int
    flux_unit: str = "nJy"
    description: str = ""
    image: HduSelector | None = None
    weight: HduSelector | None = None
    psf: PsfSource | None = None

    def __post_init__(self) -> None:
        if not DOMAIN_NAME.match(self.name):
            raise ConfigError(
                f"domain name {self.name!r} must match {DOMAIN_NAME.pattern} "
                "(it is a partition key and a file name)"
            )
        if not self.pixel_scale_arcsec > 0:
            raise ConfigError(f"domain {self.name}: pixel_scale_arcsec must be > 0")
        if self.stamp_size_px < 16:
            raise ConfigError(f"domain {self.name}: stamp_size_px must be >= 16")
        if self.flux_unit not in FLUX_UNITS:
            raise ConfigError(
                f"domain {self.name}: flux_unit {self.flux_unit!r} is not one of {sorted(FLUX_UNITS)}"
            )

    @property
    def flux_to_njy(self) -> float:
        """Factor that turns the domain's pixel values into nJy."""
        return float((1 * FLUX_UNITS[self.flux_unit]).to_value(u.nJy))

    def imaging(self, base: ImagingConfig) -> ImagingConfig:
        """The profile's imaging with this domain's pixel scale and stamp size."""
        return replace(
            base, pixel_scale_arcsec=self.pixel_scale_arcsec, stamp_size_px=self.stamp_size_px
        )

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> Domain:
        known = {
            "name", "description", "pixel_scale_arcsec", "stamp_size_px", "flux_unit",
            "image", "weight", "psf",
        }  # fmt: skip
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        for key in ("name", "pixel_scale_arcsec", "stamp_size_px"):
            if key not in data:
                raise ConfigError(f"{where}: missing {key!r}")
        psf = None
        if "psf" in data:
            psf_data = dict(data["psf"])
            file = psf_data.pop("file", None)
            psf = PsfSource(
                file=file,
                hdu=HduSelector.from_dict(psf_data, f"{where} [psf]")
                if psf_data
                else PsfSource().hdu,
            )
        return cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            pixel_scale_arcsec=float(data["pixel_scale_arcsec"]),
            stamp_size_px=int(data["stamp_size_px"]),
            flux_unit=str(data.get("flux_unit", "nJy")),
            image=HduSelector.from_dict(data["image"], f"{where} [image]") if "image" in data else None,
            weight=HduSelector.from_dict(data["weight"], f"{where} [weight]") if "weight" in data else None,
            psf=psf,
        )  # fmt: skip


def load_domain(path: Path | str) -> Domain:
    """Read one domain TOML file; :class:`ConfigError` names the file and the problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable domain file ({exc})") from exc
    domain = Domain.from_dict(data, str(path))
    if path.stem != domain.name:
        raise ConfigError(f"{path}: the file must be named {domain.name}.toml (its domain name)")
    return domain


def list_domains(folder: Path | str) -> list[Domain]:
    """Every domain declared in ``folder`` (``*.toml``), sorted by name; none if absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [load_domain(p) for p in sorted(folder.glob("*.toml"))]


def find_domain(folder: Path | str, name: str) -> Domain:
    """The domain called ``name`` in ``folder``; the error lists the declared ones."""
    path = Path(folder) / f"{name}.toml"
    if not DOMAIN_NAME.match(name) or not path.is_file():
        known = ", ".join(d.name for d in list_domains(folder)) or "none"
        raise ConfigError(f"no domain {name!r} in {folder} (declared: {known})")
    return load_domain(path)
