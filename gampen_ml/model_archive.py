"""One file that carries a trained model anywhere: the ``.gampen`` archive.

(Over 600 lines: writing, verifying, reading, importing and the model card of one file
format belong together.)

``gampen model export`` writes it (:func:`export_model`), ``gampen predict --model
NAME.gampen`` predicts with it without MLflow or a storage root
(:func:`gampen_ml.prediction.resolve_prediction_model` calls :func:`open_model_archive`), and
``gampen model import`` registers it as a new MLflow model version (:func:`import_model`).
The archive is a zip file:

=====================  ===================================================================
member                 content
=====================  ===================================================================
``manifest.json``      ``format``, ``format_version``, ``created_at``, ``code_version``
                       and ``files``: the byte size and SHA-256 of every other member
``state_dict.pt``      the weights, tensors only (read with ``torch.load(weights_only=True)``)
``model.json``         network config, dropout rate, image size, training profile and data
``label_scaler.json``  the label scaler of the training split
``history.json``       per-epoch training and validation loss
``calibration.json``   model name and version, chosen dropout rate, ``recalibration``
                       (``Recalibration.to_dict``), ``coverage`` (validation coverage rows)
``domain.json``        the flags' training domain (``TrainingDomain.to_dict``: PSF FWHM and
                       sky-noise ranges, priors) and the imaging of the training profile
``MODEL_CARD.md``      all of the above for people: data, size, metrics, coverage, use
=====================  ===================================================================

Reading checks the format version and every member's size and SHA-256 against the
manifest, and names the archive and the problem on any failure. The verified members are
unpacked into a folder named by the manifest's hash under the temporary directory: every
consumer of a model (``gampen_ml.train.load_trained_model``, the misspecification suite,
the MLflow import) reads a model folder, so one loader serves them all, and a
content-addressed folder is reused by repeated predictions instead of piling up copies.
The archive itself is verified on every open; so is the unpacked copy, which is replaced
when it no longer matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gampen_ml.config import PARAMETERS, ConfigError, Profile
from gampen_ml.io import atomic_file, file_sha256
from gampen_ml.prediction import PredictionModel, TrainingDomain, model_domain
from gampen_ml.store import (
    CALIBRATION_FILE,
    HISTORY_FILE,
    MODEL_JSON_FILE,
    SCALER_FILE,
    STATE_DICT_FILE,
    ModelInfo,
    Store,
)

#: File name suffix of a model archive.
ARCHIVE_SUFFIX = ".gampen"
#: ``manifest.json`` field ``format``.
ARCHIVE_FORMAT = "gampen-model-archive"
#: Newest ``format_version`` this code reads and the one it writes.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DOMAIN_FILE = "domain.json"
CARD_FILE = "MODEL_CARD.md"
#: Members listed in the manifest, in archive order.
MEMBERS = (
    STATE_DICT_FILE,
    MODEL_JSON_FILE,
    SCALER_FILE,
    HISTORY_FILE,
    CALIBRATION_FILE,
    DOMAIN_FILE,
    CARD_FILE,
)
_CHUNK_BYTES = 1 << 22


class ModelArchiveError(ValueError):
    """A model archive is unreadable, incomplete, altered or of a newer format."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"model archive {path}: {problem}")


def _quiet(line: str) -> None:
    """Default ``log`` callable: drop the line."""


# --- writing ------------------------------------------------------------------------------


def export_model(
    profile: Profile,
    root: Store | Path,
    model: PredictionModel,
    out: Path | str,
    *,
    log: Callable[[str], None] = _quiet,
) -> Path:
    """Write ``model`` with its calibration, training domain and model card to ``out``.

    Parameters
    ----------
    profile : Profile
        The profile the model was trained with (checked against ``model.json``); gives the
        priors and imaging of the training domain.
    root : path
        Storage root: the champion's ``calibrated_dropout_rate`` (coverage, MLflow run) and
        the PSF library and noise pool measured for the domain
        (:func:`gampen_ml.prediction.model_domain`; a model read from an archive brings both).
    model : PredictionModel
        From :func:`gampen_ml.prediction.resolve_prediction_model`.
    out : path
        The archive, ``NAME.gampen``; written atomically.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    if out.suffix != ARCHIVE_SUFFIX:
        raise ValueError(f"{out}: a model archive's name ends in {ARCHIVE_SUFFIX}")
    model_dir = Path(model.model_dir)
    meta = json.loads((model_dir / MODEL_JSON_FILE).read_text())
    if meta.get("profile") != profile.name:
        raise ConfigError(
            f"{model_dir / MODEL_JSON_FILE}: the model was trained with profile "
            f"{meta.get('profile')!r}, not {profile.name!r}: pass --profile {meta.get('profile')}"
        )
    history_file = model_dir / HISTORY_FILE
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    calibration = _calibration_record(profile, root, model)
    domain = model_domain(profile, root, model)
    if domain.psf_fwhm_range_arcsec is None or domain.noise_sigma_range_nJy is None:
        log(
            f"no PSF library or noise pool under {root}: the archive's training domain lacks "
            "them, so psf_outside_library / the noise criterion of out_of_domain stay off"
        )
    domain_record = {
        **domain.to_dict(),
        "profile": profile.name,
        "imaging": dataclasses.asdict(profile.imaging),
    }
    created_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    from gampen_ml.catalog import code_version

    card = render_model_card(
        meta,
        history,
        calibration,
        domain_record,
        n_parameters=_parameter_count(model_dir / STATE_DICT_FILE),
        state_dict_bytes=(model_dir / STATE_DICT_FILE).stat().st_size,
        created_at=created_at,
        code_version=code_version(),
    )
    texts = {
        MODEL_JSON_FILE: (model_dir / MODEL_JSON_FILE).read_bytes(),
        SCALER_FILE: (model_dir / SCALER_FILE).read_bytes(),
        HISTORY_FILE: _json_bytes(history),
        CALIBRATION_FILE: _json_bytes(calibration),
        DOMAIN_FILE: _json_bytes(domain_record),
        CARD_FILE: card.encode(),
    }
    files = {
        STATE_DICT_FILE: {
            "bytes": (model_dir / STATE_DICT_FILE).stat().st_size,
            "sha256": file_sha256(model_dir / STATE_DICT_FILE),
        },
        **{
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in texts.items()
        },
    }
    manifest = {
        "format": ARCHIVE_FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": created_at,
        "code_version": code_version(),
        "files": {name: files[name] for name in MEMBERS},
    }
    with atomic_file(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST_FILE, _json_bytes(manifest))
        # Stored, not deflated: float weights hardly compress.
        zf.write(model_dir / STATE_DICT_FILE, STATE_DICT_FILE, zipfile.ZIP_STORED)
        for name, data in texts.items():
            zf.writestr(name, data)
    return out


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _calibration_record(profile: Profile, root: Store | Path, model: PredictionModel) -> dict:
    """``calibration.json`` of the archive: identity, chosen rate, recalibration, coverage.

    The champion of ``root`` brings its validation coverage (``coverage.parquet``, rows of
    its dropout rate) and the record of ``calibrated_dropout_rate``; a model read from an
    archive brings the record it came with; any other model has no coverage.
    """
    import polars as pl

    record = {
        "model_name": model.model_name,
        "model_version": model.model_version,
        "mlflow_run_id": ModelInfo.read(model.model_dir).mlflow_run_id,
        "chosen_dropout_rate": model.dropout_rate,
        "recalibrated": model.calibrated,
        "recalibration": model.recalibration.to_dict() if model.calibrated else None,
        "n_val_galaxies": None,
        "coverage": [],
    }
    carried = Path(model.model_dir) / CALIBRATION_FILE
    if carried.is_file():  # a model unpacked from an archive: keep what it came with
        previous = json.loads(carried.read_text())
        return (
            record
            | {k: previous.get(k) for k in ("mlflow_run_id", "n_val_galaxies")}
            | {"coverage": previous.get("coverage") or []}
        )
    store = Store.of(root)
    try:
        stored = store.read_calibration()
    except FileNotFoundError:
        return record
    if Path(model.model_dir).resolve() != store.trained_model(stored.chosen_dropout_rate):
        return record
    table = store.read_coverage()
    coverage = (
        []
        if table is None
        else table.filter(pl.col("dropout_rate") == model.dropout_rate).to_dicts()
    )
    return record | {
        "mlflow_run_id": stored.mlflow_run_id,
        "n_val_galaxies": stored.n_val_galaxies,
        "coverage": coverage,
    }


def _parameter_count(state_dict_file: Path) -> int:
    """Trainable-size count: elements of the floating-point tensors of a state dict."""
    import torch

    state = torch.load(state_dict_file, map_location="cpu", weights_only=True)
    return int(sum(t.numel() for t in state.values() if torch.is_floating_point(t)))


def render_model_card(
    meta: dict,
    history: list[dict],
    calibration: dict,
    domain: dict,
    *,
    n_parameters: int,
    state_dict_bytes: int,
    created_at: str,
    code_version: str,
) -> str:
    """``MODEL_CARD.md``: the model, its training data, metrics, coverage, use and limits.

    Rendered from the archive's other members (``model.json``, ``history.json``,
    ``calibration.json``, ``domain.json``), so the card cannot disagree with them.
    """
    name, version = calibration["model_name"], calibration["model_version"]
    imaging, priors = domain["imaging"], domain["priors"]
    px, scale = meta["image_px"], imaging["pixel_scale_arcsec"]
    network, training = meta["network"], meta["training"]
    fwhm, sigma = domain["psf_fwhm_range_arcsec"], domain["noise_sigma_range_nJy"]
    unknown = "unknown (not stored where the model was exported)"
    lines = [
        f"# Model card: {name} v{version}",
        "",
        "GaMPEN (Galaxy Morphology Posterior Estimation Network, Ghosh et al. 2022): a "
        "Bayesian CNN whose Monte-Carlo-dropout posteriors give the bulge-to-total flux "
        "ratio B/T, the half-light radius Re (arcsec) and the total flux (nJy) of the "
        f"galaxy at the centre of a cutout. Exported {created_at} by gampen_ml {code_version}.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| registered name, version | {name}, {version} |",
        f"| MLflow run | {calibration.get('mlflow_run_id') or '—'} |",
        f"| dropout rate | {meta['dropout_rate']:g} |",
        f"| parameters | {n_parameters:,} ({state_dict_bytes / 1e6:.1f} MB of weights) |",
        f"| input | {px} × {px} px at {scale:g}″/px, {imaging['band']} band, nJy per pixel |",
        f"| network | width × {network['width_multiplier']:g}, FC width {network['fc_width']}, "
        f"STN crop {network['stn_output_px']} px, batch norm "
        f"{'yes' if network.get('batch_norm') else 'no'} |",
        "",
        "## Training data",
        "",
        f"Simulated galaxies of profile `{meta['profile']}` (data version "
        f"`{meta.get('data_version')}`, shards {', '.join(meta.get('shards', []))}): "
        f"{meta.get('n_train')} training and {meta.get('n_val')} validation galaxies, "
        "Sérsic disks and bulges drawn from these priors, convolved with the PSF library and "
        "placed in the sky-noise pool:",
        "",
        "| quantity | training range |",
        "|---|---|",
        f"| B/T | {priors['bt'][0]:g} – {priors['bt'][1]:g} |",
        f"| Re | {priors['re_arcsec'][0]:g} – {priors['re_arcsec'][1]:g}″ and "
        f"{priors['re_kpc'][0]:g} – {priors['re_kpc'][1]:g} kpc at z = {priors['redshift']:g} |",
        f"| flux | {priors['flux_nJy'][0]:.3g} – {priors['flux_nJy'][1]:.3g} nJy |",
        "| PSF FWHM (library) | "
        + (f"{fwhm[0]:.3f} – {fwhm[1]:.3f}″ |" if fwhm else f"{unknown} |"),
        "| sky noise σ per pixel | "
        + (f"{sigma[0]:.3g} – {sigma[1]:.3g} nJy |" if sigma else f"{unknown} |"),
        "",
        "## Training",
        "",
    ]
    if history:
        best = min(history, key=lambda h: h["val_loss"])
        last = history[-1]
        lines.append(
            f"{len(history)} epoch(s), {training['optimizer']} at learning rate "
            f"{training['learning_rate']:g}, batch {training['batch_size']}, "
            f"{sum(h.get('seconds', 0.0) for h in history):.0f} s. Final train loss "
            f"{last['train_loss']:.4f}, validation loss {last['val_loss']:.4f} (Gaussian "
            f"negative log-likelihood of the scaled labels, one MC-dropout pass); best "
            f"validation loss {best['val_loss']:.4f} at epoch {best['epoch']}."
        )
    else:
        lines.append("No training history was recorded with this model.")
    lines += ["", "## Calibration", ""]
    recal = calibration.get("recalibration")
    lines.append(
        f"Dropout rate {calibration['chosen_dropout_rate']:g}; posteriors "
        + (
            "recalibrated on the validation split (spread factors "
            + ", ".join(f"{p} × {s:.3g}" for p, s in zip(PARAMETERS, recal["scale"], strict=True))
            + ")."
            if recal
            else "NOT recalibrated (raw MC dropout)."
        )
    )
    coverage = calibration.get("coverage") or []
    if coverage:
        cells: dict[tuple[str, float], dict[bool, float]] = {}
        for row in coverage:
            cells.setdefault((row["parameter"], row["level"]), {})[row["recalibrated"]] = row[
                "coverage"
            ]
        lines += [
            "",
            f"HPD coverage on {calibration.get('n_val_galaxies') or 'the'} validation galaxies:",
            "",
            "| parameter | credible level | raw | recalibrated |",
            "|---|---|---|---|",
        ]
        order = {p: i for i, p in enumerate(PARAMETERS)}
        for (parameter, level), by in sorted(
            cells.items(), key=lambda c: (order[c[0][0]], c[0][1])
        ):
            values = [f"{by[k]:.3f}" if k in by else "—" for k in (False, True)]
            lines.append(f"| {parameter} | {level:.4f} | {values[0]} | {values[1]} |")
    else:
        lines += ["", "No validation coverage was recorded with this model."]
    lines += [
        "",
        "## Intended use",
        "",
        f"Posteriors of B/T, Re and flux for single galaxies centred in {px} × {px} px "
        f"cutouts at {scale:g}″/px in nJy per pixel, imaged like the training data (PSF and "
        "sky noise in the ranges above): `gampen predict CUTOUTS --model THIS.gampen --out "
        "catalog.parquet [--flags flags.parquet]`. Read the `out_of_domain`, "
        "`psf_outside_library` and `unreliable` flags before trusting a row.",
        "",
        "## Limitations",
        "",
        "- Trained on simulated Sérsic bulge + disk galaxies: knots, bars, spiral arms, "
        "neighbours, real PSF wings and correlated noise were never seen, and coverage on "
        "them is not guaranteed (`docs/validation.md`).",
        "- Coverage was measured and recalibrated on simulated validation galaxies; on "
        "real galaxies it is unmeasured.",
        "- Values outside the training ranges above are extrapolations and are flagged "
        "`out_of_domain`.",
    ]
    return "\n".join(lines) + "\n"


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArchive:
    """A verified, unpacked model archive.

    Attributes
    ----------
    path : Path
        The archive.
    model_dir : Path
        The unpacked members: a model folder for ``gampen_ml.train.load_trained_model``.
    manifest, meta, calibration : dict
        ``manifest.json``, ``model.json``, ``calibration.json``.
    domain : TrainingDomain
        From ``domain.json``.
    """

    path: Path
    model_dir: Path
    manifest: dict
    meta: dict
    calibration: dict
    domain: TrainingDomain

    def prediction_model(
        self, profile: Profile, log: Callable[[str], None] = _quiet
    ) -> PredictionModel:
        """The :class:`PredictionModel` of the archive: its name, version, recalibration, domain.

        Raises :class:`ModelArchiveError` when ``profile`` makes cutouts of another size
        than the model takes.
        """
        from gampen_ml.calibrate import Recalibration

        px, trained = self.meta["image_px"], self.meta.get("profile")
        if px != profile.imaging.stamp_size_px:
            raise ModelArchiveError(
                self.path,
                f"{MODEL_JSON_FILE}: the model takes {px} px cutouts but profile "
                f"{profile.name!r} makes {profile.imaging.stamp_size_px} px ones: pass "
                f"--profile {trained}",
            )
        if trained != profile.name:
            log(
                f"{self.path.name} was trained with profile {trained!r}; predicting with "
                f"profile {profile.name!r} (its MC passes and seeds)"
            )
        recal = self.calibration.get("recalibration")
        name, version = self.calibration["model_name"], str(self.calibration["model_version"])
        if not recal:
            log(f"{self.path.name} ({name} v{version}) carries no recalibration: not recalibrated")
        return PredictionModel(
            model_dir=self.model_dir,
            model_name=name,
            model_version=version,
            dropout_rate=float(self.meta["dropout_rate"]),
            recalibration=Recalibration.from_dict(recal) if recal else None,
            domain=self.domain,
        )


def cache_dir() -> Path:
    """Where archives are unpacked: ``<tmp>/gampen-models-<uid>/<manifest hash>/``."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"gampen-models-{uid}"


def open_model_archive(path: Path | str) -> ModelArchive:
    """Verify a ``.gampen`` archive and unpack it (see the module docstring).

    Raises
    ------
    FileNotFoundError
        No such file.
    ModelArchiveError
        Not a zip (truncated or corrupt), no or a bad manifest, a newer format version, a
        missing member, a member whose size or SHA-256 differs from the manifest, or a
        member that does not parse; the message names the archive and the member.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model archive {path} does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ModelArchiveError(
            path, f"not a readable zip archive (truncated or corrupt): {exc}"
        ) from exc
    except OSError as exc:
        raise ModelArchiveError(path, f"cannot be opened: {exc}") from exc
    with zf:
        raw = _read_member(zf, path, MANIFEST_FILE)
        manifest = _check_manifest(path, raw)
        folder = cache_dir() / hashlib.sha256(raw).hexdigest()[:16]
        if folder.is_dir() and _folder_matches(folder, manifest):
            _copy_members(zf, path, manifest, None)  # verify the archive all the same
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
            try:
                _copy_members(zf, path, manifest, tmp)
                (tmp / MANIFEST_FILE).write_bytes(raw)
                if folder.is_dir() and not _folder_matches(folder, manifest):
                    shutil.rmtree(folder)  # an altered copy
                with contextlib.suppress(OSError):  # else a concurrent reader placed it first
                    tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    parsed = {}
    for name in (MODEL_JSON_FILE, CALIBRATION_FILE, DOMAIN_FILE):
        try:
            parsed[name] = json.loads((folder / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelArchiveError(path, f"member {name} is not JSON: {exc}") from exc
    required = {
        MODEL_JSON_FILE: ("profile", "dropout_rate", "image_px"),
        CALIBRATION_FILE: ("model_name", "model_version"),
    }
    for name, keys in required.items():
        missing = [k for k in keys if not isinstance(parsed[name], dict) or k not in parsed[name]]
        if missing:
            raise ModelArchiveError(path, f"member {name} lacks field(s) {missing}")
    try:
        domain = TrainingDomain.from_dict(parsed[DOMAIN_FILE])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelArchiveError(path, f"member {DOMAIN_FILE}: bad field {exc}") from exc
    return ModelArchive(
        path=path,
        model_dir=folder,
        manifest=manifest,
        meta=parsed[MODEL_JSON_FILE],
        calibration=parsed[CALIBRATION_FILE],
        domain=domain,
    )


def _read_member(zf: zipfile.ZipFile, path: Path, name: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise ModelArchiveError(path, f"has no {name}: not a GaMPEN model archive") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ModelArchiveError(path, f"member {name} cannot be read (corrupt): {exc}") from exc


def _check_manifest(path: Path, raw: bytes) -> dict:
    """Parse ``manifest.json``; check the format, its version and the file entries."""
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelArchiveError(path, f"{MANIFEST_FILE} is not JSON: {exc}") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != ARCHIVE_FORMAT:
        raise ModelArchiveError(
            path, f"{MANIFEST_FILE}: field format is {fmt!r}, expected {ARCHIVE_FORMAT!r}"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelArchiveError(
            path, f"{MANIFEST_FILE}: field format_version is {version!r}, expected an integer >= 1"
        )
    if version > FORMAT_VERSION:
        raise ModelArchiveError(
            path,
            f"format version {version} is newer than this gampen_ml reads (up to "
            f"{FORMAT_VERSION}): upgrade gampen_ml (the archive was written by "
            f"{manifest.get('code_version')})",
        )
    files = manifest.get("files")
    for name in MEMBERS:
        entry = files.get(name) if isinstance(files, dict) else None
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        ):
            raise ModelArchiveError(
                path, f"{MANIFEST_FILE}: no size and sha256 listed for member {name}"
            )
    return manifest


def _copy_members(zf: zipfile.ZipFile, path: Path, manifest: dict, dst: Path | None) -> None:
    """Stream every member through SHA-256 (into ``dst`` when given); raise on a mismatch."""
    for name in MEMBERS:
        entry = manifest["files"][name]
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise ModelArchiveError(
                path, f"member {name} is missing (the manifest lists it)"
            ) from None
        if info.file_size != entry["bytes"]:
            raise ModelArchiveError(
                path,
                f"member {name} is {info.file_size} bytes, the manifest says {entry['bytes']}",
            )
        digest = hashlib.sha256()
        try:
            with (
                zf.open(info) as src,
                open(dst / name, "wb") if dst is not None else contextlib.nullcontext() as out,
            ):
                for chunk in iter(lambda: src.read(_CHUNK_BYTES), b""):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ModelArchiveError(
                path, f"member {name} cannot be read (corrupt archive): {exc}"
            ) from exc
        if digest.hexdigest() != entry["sha256"]:
            raise ModelArchiveError(
                path,
                f"member {name}: SHA-256 {digest.hexdigest()[:16]}… differs from the "
                f"manifest's {entry['sha256'][:16]}…: the file was altered or damaged",
            )


def _folder_matches(folder: Path, manifest: dict) -> bool:
    """Whether an unpacked folder holds exactly the manifest's members."""
    for name in MEMBERS:
        entry, file = manifest["files"][name], folder / name
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            return False
        if file_sha256(file) != entry["sha256"]:
            return False
    return True


# --- MLflow -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportResult:
    """The registered model version an archive became."""

    model_name: str
    model_version: str
    run_id: str


def import_model(
    path: Path | str,
    tracking_uri: str,
    *,
    name: str | None = None,
    alias: str | None = None,
    artifact_location: str | None = None,
) -> ImportResult:
    """Register a ``.gampen`` archive as a new version in the MLflow store at ``tracking_uri``.

    The run holds what ``gampen_ml.registry.log_training_run`` logs for a trained model
    (params, per-epoch metrics, the ``model/`` artifact with its ``MLmodel`` signature),
    plus the archive's validation coverage as metrics ``val_coverage[_recalibrated].<p>.<level>``;
    the version carries the recalibration tag (``gampen_ml.registry.RECALIBRATION_TAG``)
    and ``gampen.archive.*`` tags (the archive's SHA-256 and the name and version it was
    exported as). ``name`` defaults to the archive's model name (``gampen-<profile>``, the
    name ``gampen predict --model <version>`` looks up); ``alias`` (e.g. ``champion``) is
    pointed at the new version.
    """
    import numpy as np
    import torch

    from gampen_ml.registry import RECALIBRATION_TAG, log_training_run, set_champion
    from gampen_ml.train import load_trained_model

    archive = open_model_archive(path)
    net, _, meta = load_trained_model(archive.model_dir, "cpu")
    x = np.zeros((2, 1, meta["image_px"], meta["image_px"]), np.float32)
    with torch.inference_mode():
        y = net(torch.from_numpy(x)).float().numpy()
    calibration = archive.calibration
    name = name or calibration["model_name"]
    tags = {
        "gampen.archive.sha256": file_sha256(archive.path),
        "gampen.archive.model": f"{calibration['model_name']} v{calibration['model_version']}",
    }
    if calibration.get("recalibration"):
        tags[RECALIBRATION_TAG] = json.dumps(calibration["recalibration"])
    metrics = {
        f"val_coverage{'_recalibrated' if row['recalibrated'] else ''}."
        f"{row['parameter']}.{row['level']:.4f}": row["coverage"]
        for row in calibration.get("coverage") or []
    }
    run_id, version = log_training_run(
        tracking_uri,
        archive.model_dir,
        profile_dict={k: meta[k] for k in ("network", "training", "seed")}
        | {"name": meta["profile"]},
        dropout_rate=float(meta["dropout_rate"]),
        history=json.loads((archive.model_dir / HISTORY_FILE).read_text()),
        data_version=str(meta.get("data_version", "")),
        input_example=x,
        output_example=y,
        artifact_location=artifact_location,
        model_name=name,
        version_tags=tags,
        metrics=metrics,
    )
    if alias:
        set_champion(tracking_uri, name, version, alias=alias)
    return ImportResult(name, str(version), run_id)
