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
the profile's own imaging and predicted by the champion. ``docs/domains/decals-r.toml`` is
a committed example (``docs/domains/README.md``); :mod:`gampen_ml.fits_input` reads files
with a domain (``domain=``), an inbox batch declares its domain in a ``batch.toml``
(:mod:`gampen_ml.inbox`) and ``gampen predict --domain NAME`` names one.

Selectors pick among the HDUs holding image data; every given criterion must hold
(``keywords``: header values equal, strings compared case-insensitively and stripped), and
exactly one HDU must match. A PSF ``file`` is a plain file name beside the cutout using
only ``{stem}`` / ``{suffix}``; the PSF is taken at the domain's pixel scale.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import astropy.units as u
from astropy.io import fits

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
        """Read ``{name, index, keywords}``; :class:`ConfigError` names ``where`` and the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table (name, index or keywords)")
        unknown = set(data) - {"name", "index", "keywords"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        name, index, keywords = data.get("name"), data.get("index"), data.get("keywords", {})
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}: name must be a string, got {name!r}")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ConfigError(f"{where}: index must be an integer, got {index!r}")
        if index is not None and index < 0:
            raise ConfigError(f"{where}: index must be >= 0, got {index}")
        if not isinstance(keywords, Mapping) or not all(
            isinstance(v, str | int | float) for v in keywords.values()
        ):
            raise ConfigError(f"{where}: keywords must be a table of header values")
        selector = cls(name=name, index=index, keywords=dict(keywords))
        if selector.name is None and selector.index is None and not selector.keywords:
            raise ConfigError(f"{where}: give name, index or keywords")
        return selector

    def describe(self) -> str:
        """The selector as a reader would write it: ``keywords IMAGETYP='image', BAND='r'``."""
        parts = []
        if self.index is not None:
            parts.append(f"index {self.index}")
        if self.name is not None:
            parts.append(f"EXTNAME {self.name!r}")
        if self.keywords:
            parts.append("keywords " + ", ".join(f"{k}={v!r}" for k, v in self.keywords.items()))
        return " and ".join(parts)

    def matches(self, index: int, header: fits.Header) -> bool:
        """Whether the HDU at ``index`` with ``header`` satisfies every given criterion."""
        if self.index is not None and index != self.index:
            return False
        if self.name is not None and str(header.get("EXTNAME", "")).strip().upper() != (
            self.name.strip().upper()
        ):
            return False
        return all(_header_equal(header.get(key), value) for key, value in self.keywords.items())

    def select(self, hdul: fits.HDUList) -> int:
        """Index of the one image HDU of ``hdul`` this selector picks.

        Only HDUs holding image data are candidates (an empty primary HDU whose header
        repeats the survey's keywords is not an image).

        Raises
        ------
        HduSelectionError
            When no HDU or more than one matches; the message lists the candidates.
        """
        images = [
            i
            for i, hdu in enumerate(hdul)
            if isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)
            and hdu.header.get("NAXIS", 0) > 0
        ]
        found = [i for i in images if self.matches(i, hdul[i].header)]
        if len(found) == 1:
            return found[0]
        shown = list(self.keywords) or ["EXTNAME"]
        candidates = "; ".join(
            f"HDU {i} " + " ".join(f"{k}={str(hdul[i].header.get(k)).strip()!r}" for k in shown)
            for i in images
        )
        head = "no image HDU matches" if not found else f"HDUs {found} all match"
        raise HduSelectionError(f"{head} {self.describe()} (image HDUs: {candidates or 'none'})")


class HduSelectionError(LookupError):
    """No HDU, or more than one, matches an :class:`HduSelector`."""


def _header_equal(found, expected) -> bool:
    if found is None:
        return False
    if isinstance(expected, str) or isinstance(found, str):
        return str(found).strip().lower() == str(expected).strip().lower()
    return float(found) == float(expected)


@dataclass(frozen=True)
class PsfSource:
    """Where a cutout's PSF image is: an HDU of the cutout itself or of a sibling file."""

    #: File name pattern relative to the cutout's folder (``{stem}``, ``{suffix}``);
    #: ``None`` = the cutout file itself.
    file: str | None = None
    hdu: HduSelector = field(default_factory=lambda: HduSelector(name="PSF"))

    def path_for(self, cutout: Path | str) -> Path:
        """The PSF file of ``cutout``: the cutout itself, or its sibling named by ``file``.

        ``{stem}`` is the cutout's name without its FITS suffix (``.fits``, ``.fits.gz``...);
        ``{suffix}`` is the stem after its first ``_`` (``cutout_59.1_-30.5`` -> ``59.1_-30.5``,
        the Legacy Surveys' ``cutout_<ra>_<dec>.fits`` / ``psf_<ra>_<dec>.fits`` pairs).
        """
        cutout = Path(cutout)
        if self.file is None:
            return cutout
        stem = fits_stem(cutout.name)
        suffix = stem.split("_", 1)[1] if "_" in stem else stem
        return cutout.with_name(self.file.format(stem=stem, suffix=suffix))


def fits_stem(name: str) -> str:
    """``name`` without its FITS suffix (the longest of ``fits_input.FITS_SUFFIXES``)."""
    from gampen_ml.fits_input import FITS_SUFFIXES

    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _check_psf_pattern(pattern: object, where: str) -> str:
    """A PSF ``file`` pattern: a plain file name using only ``{stem}`` / ``{suffix}``."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: file must be a file name pattern, got {pattern!r}")
    try:
        example = pattern.format(stem="a_b", suffix="b")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{where}: file {pattern!r} may use only {{stem}} and {{suffix}} ({exc!r})"
        ) from exc
    if "/" in example or "\\" in example or example in (".", ".."):
        raise ConfigError(f"{where}: file {pattern!r} must name a file beside the cutout")
    return pattern


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
            if not isinstance(data["psf"], Mapping):
                raise ConfigError(f"{where} [psf]: expected a table (file, name, index, keywords)")
            psf_data = dict(data["psf"])
            file = psf_data.pop("file", None)
            if file is not None:
                file = _check_psf_pattern(file, f"{where} [psf]")
            psf = PsfSource(
                file=file,
                hdu=HduSelector.from_dict(psf_data, f"{where} [psf]")
                if psf_data
                else PsfSource().hdu,
            )
        for key, kind in (("pixel_scale_arcsec", (int, float)), ("stamp_size_px", (int,))):
            if isinstance(data[key], bool) or not isinstance(data[key], kind):
                raise ConfigError(f"{where}: {key} must be a number, got {data[key]!r}")
        for key in ("name", "description", "flux_unit"):
            if key in data and not isinstance(data[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {data[key]!r}")
        try:
            return cls(
                name=data["name"],
                description=data.get("description", ""),
                pixel_scale_arcsec=float(data["pixel_scale_arcsec"]),
                stamp_size_px=int(data["stamp_size_px"]),
                flux_unit=data.get("flux_unit", "nJy"),
                image=HduSelector.from_dict(data["image"], f"{where} [image]") if "image" in data else None,
                weight=HduSelector.from_dict(data["weight"], f"{where} [weight]") if "weight" in data else None,
                psf=psf,
            )  # fmt: skip
        except ConfigError as exc:
            if str(exc).startswith(where):
                raise
            raise ConfigError(f"{where}: {exc}") from exc


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
        raise ConfigError(
            f"no domain {name!r}: {path} does not exist (declared in {folder}: {known})"
        )
    return load_domain(path)
