"""The storage layout: every folder and file name under the storage root, in one place.

Every asset partition lives in its own folder, ``<root>/<asset>/<partition>/`` (``all``
for an unpartitioned asset), written atomically (:meth:`Store.publish`). :class:`Store`
answers "where is X" for every asset, partition and file; nothing else in the platform
joins a folder or file name by hand. The asset names below are also the Dagster asset
keys, and the dropout rate <-> partition key conversion is
:func:`gampen_ml.config.dropout_key` / :func:`~gampen_ml.config.dropout_from_key`.

What a later stage reads back comes as a typed record: :class:`Calibration`
(``calibrated_dropout_rate/all/``) and :class:`ModelInfo` (a model's ``registry.json``).
The Dagster resource (``GampenSettings.store()``) and the ``gampen`` command build their
store from the same :class:`gampen_ml.settings.Settings` (:meth:`Settings.store`).

Files owned by a format module stay named there: the PSF library's
(:mod:`gampen_ml.sim.psf`), the noise pool's (:mod:`gampen_ml.sim.noise`), the
fine-tuned model's extras (:mod:`gampen_ml.finetune`), the sky catalog's
(:mod:`gampen_ml.sky_catalog`) and the reports' (:mod:`gampen_ml.robustness`,
:mod:`gampen_ml.validate`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gampen_ml.config import Profile, dropout_key, shard_keys
from gampen_ml.io import atomic_partition_dir, partition_dir

if TYPE_CHECKING:
    import polars as pl

    from gampen_ml.calibrate import Recalibration

# --- assets: folder names under the root, and Dagster asset keys ---------------------
PSF_LIBRARY = "psf_library"
NOISE_POOL = "noise_pool"
SIMULATED_GALAXIES = "simulated_galaxies"
TRAINED_MODEL = "trained_model"
CALIBRATED_DROPOUT_RATE = "calibrated_dropout_rate"
POSTERIOR_CATALOG = "posterior_catalog"
QUALITATIVE_FLAGS = "qualitative_flags"
DIAGNOSTIC_PLOTS = "diagnostic_plots"
ROBUSTNESS_REPORT = "robustness_report"
SKY_CATALOG = "sky_catalog"
LABELLED_SET = "labelled_set"
FINETUNED_MODEL = "finetuned_model"
#: Not an asset: the accepted files of each inbox batch (:mod:`gampen_ml.inbox`), read by
#: ``posterior_catalog``.
INBOX_BATCHES = "inbox_batches"

#: Dataset key (``posterior_catalog`` partition) of the simulated test split; every other
#: dataset key is an inbox batch.
SIM_TEST = "sim-test"
#: Version of a model that no MLflow registry numbered.
UNREGISTERED = "unregistered"

# --- files -----------------------------------------------------------------------------
#: ``simulated_galaxies/<shard>/``: ``(N, S, S)`` float32 images and their labels.
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.parquet"
#: ``trained_model/<dropout-R>/`` (and ``finetuned_model/<domain>/``).
STATE_DICT_FILE = "state_dict.pt"
MODEL_JSON_FILE = "model.json"
SCALER_FILE = "label_scaler.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
#: Beside each published model: its MLflow run id, registered name and version.
REGISTRY_FILE = "registry.json"
#: ``calibrated_dropout_rate/all/`` (``calibration.json`` also in ``finetuned_model``).
CALIBRATION_FILE = "calibration.json"
RECALIBRATION_FILE = "recalibration.json"
COVERAGE_FILE = "coverage.parquet"
#: ``posterior_catalog/<dataset>/``.
CATALOG_FILE = "catalog.parquet"
SAMPLES_FILE = "samples.npy"
SAMPLE_TABLE_FILE = "samples.parquet"
#: ``qualitative_flags/<dataset>/``.
FLAGS_FILE = "flags.parquet"
#: ``diagnostic_plots/<dataset>/``: the list of figures.
PLOTS_INDEX_FILE = "index.md"
#: ``inbox_batches/<batch>/``: what the ingestion accepted and quarantined.
BATCH_MANIFEST_FILE = "_manifest.json"


@dataclass(frozen=True)
class ModelInfo:
    """A published model's ``registry.json``: where MLflow knows it from.

    Attributes
    ----------
    model_name : str or None
        Registered MLflow model name; None when the file does not name one.
    model_version : str or None
        Registered version; None when the model was not registered.
    mlflow_run_id : str or None
        The MLflow run that logged it.
    """

    model_name: str | None = None
    model_version: str | None = None
    mlflow_run_id: str | None = None

    @classmethod
    def read(cls, model_dir: Path | str) -> ModelInfo:
        """``<model_dir>/registry.json``; all None when the file is absent."""
        path = Path(model_dir) / REGISTRY_FILE
        data = json.loads(path.read_text()) if path.is_file() else {}
        version = data.get("model_version")
        return cls(
            model_name=data.get("model_name"),
            model_version=None if version in (None, "") else str(version),
            mlflow_run_id=data.get("mlflow_run_id"),
        )

    def write(self, model_dir: Path | str) -> Path:
        """Write ``<model_dir>/registry.json``; return its path."""
        path = Path(model_dir) / REGISTRY_FILE
        record = {
            "mlflow_run_id": self.mlflow_run_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path

    def name_or(self, profile_name: str) -> str:
        """The registered name, else the profile's (:func:`gampen_ml.registry.registered_model_name`)."""
        from gampen_ml.registry import registered_model_name

        return self.model_name or registered_model_name(profile_name)


@dataclass(frozen=True)
class Calibration:
    """What ``calibrated_dropout_rate`` chose: ``calibration.json`` + ``recalibration.json``.

    Attributes
    ----------
    chosen_dropout_rate : float
        The champion's dropout rate.
    model_name, model_version : str
        The champion's registered name and version (:data:`UNREGISTERED` without MLflow).
    mlflow_run_id : str or None
        The MLflow run that trained it.
    recalibrated : bool
        Whether a recalibration was fit (then :attr:`recalibration` is set).
    n_val_galaxies : int
        Validation galaxies the choice was made on.
    recalibration : Recalibration or None
        The validation-fit recalibration of the champion.
    """

    chosen_dropout_rate: float
    model_name: str
    model_version: str
    mlflow_run_id: str | None
    recalibrated: bool
    n_val_galaxies: int
    recalibration: Recalibration | None = None

    def record(self) -> dict:
        """The ``calibration.json`` content (the recalibration has its own file)."""
        return {
            "chosen_dropout_rate": self.chosen_dropout_rate,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "mlflow_run_id": self.mlflow_run_id,
            "recalibrated": self.recalibrated,
            "n_val_galaxies": self.n_val_galaxies,
        }

    def write(self, folder: Path | str) -> Path:
        """Write ``<folder>/calibration.json`` (:meth:`record`); return its path.

        ``recalibration.json`` is written with the coverage table, before the choice is
        recorded (:func:`write_recalibration`).
        """
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(self.record(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path | str) -> Calibration:
        """Read the files of a ``calibrated_dropout_rate`` partition.

        Raises
        ------
        FileNotFoundError
            If ``calibration.json`` is missing (the dropout rate was never calibrated).
        ValueError
            If a field is missing or of the wrong kind (the message names the file).
        """
        from gampen_ml.calibrate import Recalibration

        folder = Path(folder)
        path = folder / CALIBRATION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: calibrate the dropout rate first")
        recalibration = None
        recal = folder / RECALIBRATION_FILE
        if recal.is_file():
            try:
                recalibration = Recalibration.from_dict(json.loads(recal.read_text()))
            except ValueError as exc:
                raise ValueError(f"{recal}: bad recalibration ({exc})") from exc
        try:
            data = json.loads(path.read_text())
            return cls(
                chosen_dropout_rate=float(data["chosen_dropout_rate"]),
                model_name=str(data["model_name"]),
                model_version=str(data["model_version"]),
                mlflow_run_id=data.get("mlflow_run_id"),
                recalibrated=bool(data.get("recalibrated")),
                n_val_galaxies=int(data.get("n_val_galaxies") or 0),
                recalibration=recalibration,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad calibration record ({exc!r})") from exc


def write_recalibration(folder: Path | str, recalibration: Recalibration) -> Path:
    """Write ``<folder>/recalibration.json`` (:meth:`Recalibration.to_dict`); return its path."""
    path = Path(folder) / RECALIBRATION_FILE
    path.write_text(json.dumps(recalibration.to_dict(), indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Store:
    """The storage root and every path under it.

    Build it from settings (:meth:`gampen_ml.settings.Settings.store`) or, where a
    function takes a root, with :meth:`of`. Folders are returned whether they exist or
    not; readers say which file is missing.

    Attributes
    ----------
    root : Path
        Absolute storage root.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @classmethod
    def of(cls, where: Store | Path | str) -> Store:
        """``where`` itself when it is a store, else the store rooted at that folder."""
        return where if isinstance(where, Store) else cls(Path(where))

    # --- generic ----------------------------------------------------------------------
    def partition(self, asset: str, key: str | None = None) -> Path:
        """Folder of one asset partition (:func:`gampen_ml.io.partition_dir`)."""
        return partition_dir(self.root, asset, key)

    def asset_dir(self, asset: str) -> Path:
        """``<root>/<asset>``: the folder holding every partition of ``asset``."""
        return self.partition(asset).parent

    def partition_keys(self, asset: str) -> list[str]:
        """Keys of the partitions of ``asset`` present (folder names, temporaries left out)."""
        base = self.asset_dir(asset)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    @staticmethod
    @contextlib.contextmanager
    def publish(folder: Path | str) -> Iterator[Path]:
        """Write a partition: yields a temporary folder renamed onto ``folder`` on success
        (:func:`gampen_ml.io.atomic_partition_dir`)."""
        with atomic_partition_dir(folder) as tmp:
            yield tmp

    # --- inputs -----------------------------------------------------------------------
    def psf_library(self) -> Path:
        """``psf_library/all``."""
        return self.partition(PSF_LIBRARY)

    def psf_table(self) -> Path:
        """The PSF library's property table (:data:`gampen_ml.sim.psf.PSF_TABLE_FILE`)."""
        from gampen_ml.sim.psf import PSF_TABLE_FILE

        return self.psf_library() / PSF_TABLE_FILE

    def noise_pool(self) -> Path:
        """``noise_pool/all``."""
        return self.partition(NOISE_POOL)

    def shard(self, key: str) -> Path:
        """``simulated_galaxies/<shard key>``."""
        return self.partition(SIMULATED_GALAXIES, key)

    def shards(self, profile: Profile, keys: Sequence[str] | None = None) -> list[Path]:
        """Folders of the ``simulated_galaxies`` shards ``keys`` (default: all of ``profile``)."""
        return [self.shard(key) for key in (shard_keys(profile) if keys is None else keys)]

    def shard_labels(self, key: str) -> Path:
        """``labels.parquet`` of one shard."""
        return self.shard(key) / LABELS_FILE

    def inbox_batch(self, key: str) -> Path:
        """``inbox_batches/<batch>``: an ingested batch's accepted files."""
        return self.partition(INBOX_BATCHES, key)

    def batch_manifest(self, key: str) -> Path:
        """``_manifest.json`` of an ingested inbox batch."""
        return self.inbox_batch(key) / BATCH_MANIFEST_FILE

    # --- models -----------------------------------------------------------------------
    def trained_model(self, rate: float) -> Path:
        """``trained_model/dropout-<rate>`` (:func:`gampen_ml.config.dropout_key`)."""
        return self.partition(TRAINED_MODEL, dropout_key(rate))

    def training_work(self, rate: float) -> Path:
        """Hidden work folder beside ``trained_model/dropout-<rate>``: a killed training
        resumes from its checkpoint there."""
        return self.trained_model(rate).parent / f".work-{dropout_key(rate)}"

    def history(self, rate: float) -> Path:
        """``history.json`` (loss per epoch) of the model of dropout ``rate``."""
        return self.trained_model(rate) / HISTORY_FILE

    def calibration(self) -> Path:
        """``calibrated_dropout_rate/all``."""
        return self.partition(CALIBRATED_DROPOUT_RATE)

    def coverage_file(self) -> Path:
        """The validation coverage table of every dropout rate."""
        return self.calibration() / COVERAGE_FILE

    def read_calibration(self) -> Calibration:
        """The champion's :class:`Calibration` (raises ``FileNotFoundError`` before one)."""
        return Calibration.read(self.calibration())

    def read_coverage(self) -> pl.DataFrame | None:
        """The validation coverage table (``coverage.parquet``); None before calibration."""
        import polars as pl

        path = self.coverage_file()
        return pl.read_parquet(path) if path.is_file() else None

    def labelled_set(self, domain: str) -> Path:
        """``labelled_set/<domain>``."""
        return self.partition(LABELLED_SET, domain)

    def finetuned_model(self, domain: str) -> Path:
        """``finetuned_model/<domain>``."""
        return self.partition(FINETUNED_MODEL, domain)

    # --- datasets ---------------------------------------------------------------------
    def catalog(self, dataset: str) -> Path:
        """``posterior_catalog/<dataset>``."""
        return self.partition(POSTERIOR_CATALOG, dataset)

    def catalog_file(self, dataset: str) -> Path:
        """``catalog.parquet`` of a dataset."""
        return self.catalog(dataset) / CATALOG_FILE

    def catalog_files(self) -> dict[str, Path]:
        """Dataset key -> ``catalog.parquet`` of every published ``posterior_catalog``
        partition, sorted by key (hidden temporaries left out)."""
        files = {key: self.catalog_file(key) for key in self.partition_keys(POSTERIOR_CATALOG)}
        return {key: path for key, path in files.items() if path.is_file()}

    def samples_file(self, dataset: str) -> Path:
        """``samples.npy`` of a dataset (scaled-space posterior samples, when stored)."""
        return self.catalog(dataset) / SAMPLES_FILE

    def flags(self, dataset: str) -> Path:
        """``qualitative_flags/<dataset>``."""
        return self.partition(QUALITATIVE_FLAGS, dataset)

    def flags_file(self, dataset: str) -> Path:
        """``flags.parquet`` of a dataset."""
        return self.flags(dataset) / FLAGS_FILE

    def plots(self, dataset: str) -> Path:
        """``diagnostic_plots/<dataset>``."""
        return self.partition(DIAGNOSTIC_PLOTS, dataset)

    def robustness_report(self) -> Path:
        """``robustness_report/all``."""
        return self.partition(ROBUSTNESS_REPORT)

    def sky_catalog(self) -> Path:
        """``sky_catalog/all``."""
        return self.partition(SKY_CATALOG)
