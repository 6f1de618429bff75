"""Which model makes a catalog, with which calibration, and the one prediction path.

A :class:`PredictionModel` is a trained network together with *its* calibration (the
recalibration fit for it on validation) and *its* training domain (:class:`TrainingDomain`,
what the out-of-domain flags compare against). It comes from :func:`champion_model` (the
model ``calibrated_dropout_rate`` chose), :func:`finetuned_model` (a survey domain's) or
:func:`resolve_prediction_model` (any reference a user gives: champion, ``.gampen``
archive, model folder, MLflow version or alias). Every catalog of the platform
(``sim-test``, inbox batches, ``gampen predict``, fine-tuning's test scores, the shift
suite) is then made by :func:`predict_catalog`, so catalogs differ only in their inputs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from gampen_ml.calibrate import Recalibration
from gampen_ml.config import PriorConfig, Profile, derive_seed
from gampen_ml.store import (
    CALIBRATION_FILE,
    MODEL_JSON_FILE,
    POSTERIOR_CATALOG,
    UNREGISTERED,
    ModelInfo,
    Store,
)

if TYPE_CHECKING:
    from gampen_ml.config import ImagingConfig
    from gampen_ml.domains import Domain


def _quiet(line: str) -> None:
    """Default ``log`` callable: drop the line."""


@dataclass(frozen=True)
class TrainingDomain:
    """What a model's training images spanned: the ranges the out-of-domain flags compare against.

    Attributes
    ----------
    psf_fwhm_range_arcsec : (float, float) or None
        FWHM range of the training PSF library (``psf_outside_library``); None: unknown.
    noise_sigma_range_nJy : (float, float) or None
        Sky noise of the training images (``out_of_domain``'s noise criterion); None: unknown.
    priors : PriorConfig
        The simulation priors (``out_of_domain``'s flux and Re criteria).
    pixel_scale_arcsec : float or None
        Pixel scale of the training images (``out_of_domain``'s pixel-scale criterion);
        None: the profile's.
    """

    psf_fwhm_range_arcsec: tuple[float, float] | None
    noise_sigma_range_nJy: tuple[float, float] | None
    priors: PriorConfig
    pixel_scale_arcsec: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-able dict (ranges as lists or null)."""
        return {
            "psf_fwhm_range_arcsec": _pair(self.psf_fwhm_range_arcsec),
            "noise_sigma_range_nJy": _pair(self.noise_sigma_range_nJy),
            "priors": dataclasses.asdict(self.priors),
            "pixel_scale_arcsec": self.pixel_scale_arcsec,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainingDomain:
        """Inverse of :meth:`to_dict`; unknown prior fields are an error naming them."""
        fields = {f.name for f in dataclasses.fields(PriorConfig)}
        unknown = sorted(set(data["priors"]) - fields)
        if unknown:
            raise ValueError(f"TrainingDomain.from_dict: unknown prior fields {unknown}")
        priors = {k: tuple(v) if isinstance(v, list) else v for k, v in data["priors"].items()}
        # An archive's domain.json written before the field carries the training imaging.
        scale = data.get("pixel_scale_arcsec", data.get("imaging", {}).get("pixel_scale_arcsec"))
        return cls(
            psf_fwhm_range_arcsec=_pair(data.get("psf_fwhm_range_arcsec")),
            noise_sigma_range_nJy=_pair(data.get("noise_sigma_range_nJy")),
            priors=PriorConfig(**priors),
            pixel_scale_arcsec=None if scale is None else float(scale),
        )


def _pair(value) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def training_domain(
    profile: Profile, root: Store | Path
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """What the training images were made of, for the flags: PSF FWHM and sky-noise ranges.

    The FWHM range of the stored PSF library (:func:`gampen_ml.sim.psf.library_fwhm_range`)
    and the noise pool's sky noise measured as the catalog measures a cutout's
    (:func:`gampen_ml.flags.pool_noise_sigma`) times the profile's
    ``noise.depth_scale_range``; None for what is not stored.
    """
    from gampen_ml.flags import pool_noise_sigma
    from gampen_ml.sim import noise, psf

    store = Store.of(root)
    fwhm_range = (
        psf.library_fwhm_range(store.psf_library()) if store.psf_table().is_file() else None
    )
    noise_dir = store.noise_pool()
    sigma_range = None
    if (noise_dir / noise.NOISE_JSON_FILE).is_file():
        sigma = pool_noise_sigma(noise.read_noise_pool(noise_dir))
        lo, hi = profile.noise.depth_scale_range
        sigma_range = (sigma * lo, sigma * hi)
    return fwhm_range, sigma_range


@dataclass(frozen=True)
class PredictionModel:
    """A model ready to predict, with the calibration that belongs to it.

    Attributes
    ----------
    model_dir : Path
        ``trained_model`` folder (``gampen_ml.train.load_trained_model``).
    model_name, model_version : str
        Registered MLflow name and version (``"unregistered"`` without a registry).
    dropout_rate : float
        The model's dropout rate.
    recalibration : Recalibration or None
        The validation-fit recalibration of *this* model: set only when the model is the
        one ``calibrated_dropout_rate`` chose (a recalibration fit for another model's
        posteriors would be wrong for it).
    domain : TrainingDomain or None
        The model's own training domain (a ``.gampen`` archive carries it); None: the
        storage root's (:func:`model_domain`).
    finetuned_for : str or None
        The survey domain this model was fine-tuned for (``finetuned_model/<domain>/``,
        :func:`finetuned_model`); None for the champion and other base models.
    """

    model_dir: Path
    model_name: str
    model_version: str
    dropout_rate: float
    recalibration: Recalibration | None
    domain: TrainingDomain | None = None
    finetuned_for: str | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the posteriors will be recalibrated."""
        return self.recalibration is not None

    @property
    def image_px(self) -> int:
        """Side of the images the network takes (``model.json``)."""
        return int(json.loads((Path(self.model_dir) / MODEL_JSON_FILE).read_text())["image_px"])


def model_domain(
    profile: Profile, root: Store | Path, model: PredictionModel | None = None
) -> TrainingDomain:
    """The training domain the flags of ``model``'s catalogs compare against.

    A model that carries its own (one read from a ``.gampen`` archive) brings it; otherwise
    :func:`training_domain` of the storage root and the profile's priors.
    """
    if model is not None and model.domain is not None:
        return model.domain
    fwhm_range, sigma = training_domain(profile, root)
    return TrainingDomain(
        fwhm_range, sigma, profile.simulation.priors, profile.imaging.pixel_scale_arcsec
    )


def finetuned_model(profile: Profile, root: Store | Path, domain: str) -> PredictionModel | None:
    """The fine-tuned model of survey ``domain`` (``<root>/finetuned_model/<domain>/``), if any.

    The partition holds a ``trained_model``'s files plus ``calibration.json``
    (``model_name``, ``model_version``, ``dropout_rate``, ``recalibration``, optional
    ``training_domain`` = :meth:`TrainingDomain.to_dict`). Without ``training_domain`` its
    flags compare against no PSF or noise range (the model saw the domain's galaxies, not
    the simulations' range) and against the profile's priors.

    Returns
    -------
    PredictionModel or None
        None when the domain has no published fine-tuned model.
    """
    folder = Store.of(root).finetuned_model(domain)
    path = folder / CALIBRATION_FILE
    if not (path.is_file() and (folder / MODEL_JSON_FILE).is_file()):
        return None
    calibration = json.loads(path.read_text())
    recal = calibration.get("recalibration")
    trained_on = calibration.get("training_domain")
    return PredictionModel(
        model_dir=folder,
        model_name=str(calibration["model_name"]),
        model_version=str(calibration["model_version"]),
        dropout_rate=float(calibration["dropout_rate"]),
        recalibration=Recalibration.from_dict(recal) if recal else None,
        domain=(
            TrainingDomain.from_dict(trained_on)
            if trained_on
            else TrainingDomain(None, None, profile.simulation.priors)
        ),
        finetuned_for=domain,
    )


def champion_model(profile: Profile, root: Store | Path) -> PredictionModel:
    """The calibrated champion: the model ``calibrated_dropout_rate`` chose, with its recalibration.

    Raises
    ------
    FileNotFoundError
        Before calibration (no ``calibration.json``).
    """
    store = Store.of(root)
    calibration = store.read_calibration()
    return PredictionModel(
        model_dir=store.trained_model(calibration.chosen_dropout_rate),
        model_name=calibration.model_name,
        model_version=calibration.model_version,
        dropout_rate=calibration.chosen_dropout_rate,
        recalibration=calibration.recalibration,
    )


def resolve_prediction_model(
    profile: Profile,
    root: Store | Path,
    model: str | None = None,
    *,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = _quiet,
    domain: str | None = None,
) -> PredictionModel:
    """The model a catalog is made with, and *its* calibration, from one reference.

    Parameters
    ----------
    profile, root
        Profile and storage root (the champion is read from ``calibrated_dropout_rate``).
    model : str, optional
        ``None`` or ``"champion"``: the calibrated champion of ``root`` (without a local
        calibration: the registry's ``champion`` alias). A ``.gampen`` archive
        (:mod:`gampen_ml.model_archive`): its model, name, version, recalibration and
        training domain, with neither ``root`` nor MLflow. A ``trained_model`` folder, an
        MLflow version number or alias (needs ``tracking_uri``): that model, recalibrated
        when it is the champion (same folder or registered version) or when its registered
        version carries a recalibration tag (``gampen_ml.registry.RECALIBRATION_TAG``).
    tracking_uri : str, optional
        MLflow tracking URI for versions and aliases.
    log : callable(str)
        Receives a warning when the model is used without recalibration, and which model
        a ``domain`` gets.
    domain : str, optional
        Survey domain of the cutouts: with ``model`` None or ``"champion"``, the domain's
        fine-tuned model (:func:`finetuned_model`) when it exists, else the champion (and
        ``log`` says so). An explicit ``model`` is used as given.
    """
    from gampen_ml.train import load_trained_model

    store = Store.of(root)
    if domain is not None and model in (None, "champion"):
        tuned = finetuned_model(profile, store, domain)
        if tuned is not None:
            log(f"domain {domain}: its fine-tuned model {tuned.model_name} v{tuned.model_version}")
            return tuned
        log(
            f"domain {domain}: no fine-tuned model at "
            f"{store.finetuned_model(domain)}; the champion is used"
        )
    if model is not None and (str(model).endswith(".gampen") or Path(model).is_file()):
        from gampen_ml.model_archive import open_model_archive

        return open_model_archive(model).prediction_model(profile, log=log)
    try:
        champion = champion_model(profile, store)
    except FileNotFoundError:
        if not tracking_uri:
            raise
        champion = None  # no local calibration: the registry's champion alias decides
    if model in (None, "champion") and champion is not None:
        return champion
    model = model or "champion"
    recal = None
    if Path(model).is_dir():
        model_dir = Path(model)
        info = ModelInfo.read(model_dir)
        name = info.name_or(profile.name)
        version = info.model_version or UNREGISTERED
        same = champion is not None and (
            model_dir.resolve() == champion.model_dir.resolve()
            or (version != UNREGISTERED and version == champion.model_version)
        )
    else:
        if not tracking_uri:
            raise FileNotFoundError(
                f"model {model!r} is neither a trained_model folder nor resolvable without an "
                "MLflow tracking URI"
            )
        from gampen_ml.registry import (
            RECALIBRATION_TAG,
            model_version_info,
            registered_model_name,
            resolve_model,
        )

        name = registered_model_name(profile.name)
        info = model_version_info(tracking_uri, name, model)
        version = info["version"]
        same = champion is not None and version == champion.model_version
        model_dir = champion.model_dir if same else resolve_model(tracking_uri, name, version)
        if RECALIBRATION_TAG in info["tags"]:
            recal = Recalibration.from_dict(json.loads(info["tags"][RECALIBRATION_TAG]))
    if same:
        return champion
    _, _, meta = load_trained_model(model_dir, "cpu")
    if recal is None:
        log(
            f"model {model} ({name} v{version}) has no calibration of its own (not the "
            "calibrated champion): its posteriors are not recalibrated"
        )
    return PredictionModel(
        model_dir=model_dir,
        model_name=name,
        model_version=version,
        dropout_rate=float(meta.get("dropout_rate", 0.0)),
        recalibration=recal,
    )


def cutout_seed(profile: Profile) -> int:
    """MC seed of every catalog of real cutouts (inbox batches and ``gampen predict``).

    One seed for all, so the same files give the same rows whichever way they came in.
    """
    return derive_seed(profile.seed, POSTERIOR_CATALOG, "cutouts")


def cutout_imaging(
    profile: Profile, model: PredictionModel, domain: Domain | None = None
) -> ImagingConfig:
    """How to read real cutouts for ``model``: the profile's imaging, or with a survey
    domain its pixel scale and the model's own image size (cutouts are cropped / zero-padded
    about their centre to the network's input, never resampled)."""
    if domain is None:
        return profile.imaging
    return dataclasses.replace(domain.imaging(profile.imaging), stamp_size_px=model.image_px)


def predict_catalog(
    profile: Profile,
    model: PredictionModel,
    images,
    meta: pl.DataFrame,
    *,
    dataset: str,
    seed: int,
    truths: pl.DataFrame | None = None,
    n_passes: int | None = None,
    store_samples: bool = False,
    sample_table: bool = False,
    out_dir: Path | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    domain: str | None = None,
) -> pl.DataFrame:
    """The one prediction path: posterior catalog of ``images`` with ``model`` and its calibration.

    Every catalog of the platform (``sim-test``, inbox batches, ``gampen predict``) is made
    here, so they differ only in their inputs. ``images`` is ``(N, S, S)`` float32 (any
    sliceable, e.g. :class:`gampen_ml.data.datasets.SplitImages`); ``meta`` has ``N`` rows
    with ``galaxy_id``; ``domain`` is the survey domain the images were read as (the
    ``domain`` column).
    """
    from gampen_ml.catalog import catalog_from_images
    from gampen_ml.train import load_trained_model

    net, scaler, _ = load_trained_model(model.model_dir, device)
    inference = profile.inference
    return catalog_from_images(
        net,
        scaler,
        images,
        meta,
        n_passes=n_passes or inference.n_passes,
        draws_per_pass=inference.draws_per_pass,
        seed=seed,
        recalibration=model.recalibration,
        store_samples=store_samples,
        sample_table=sample_table,
        out_dir=out_dir,
        progress=progress,
        truths=truths,
        dataset=dataset,
        model_name=model.model_name,
        model_version=model.model_version,
        dropout_rate=model.dropout_rate,
        galaxies_per_batch=inference.galaxies_per_batch,
        flags=profile.flags,
        device=device,
        domain=domain,
    )
