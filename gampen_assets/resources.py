"""The one resource every GaMPEN asset uses: which profile, where the data lives, which device.

``GampenSettings`` carries no state; it resolves names to things (a :class:`Profile`, a
:class:`~gampen_ml.store.Store` over the storage root, an MLflow tracking URI, a torch
device string) through
:class:`gampen_ml.settings.Settings`, the one reader of the storage environment, so a run,
the CLI and lineage agree on every path. Static partitions (shards,
dropout rates) are fixed when the definitions load, from :func:`load_time_profile`; an
asset therefore checks that its partition key belongs to the profile it runs with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, Failure
from pydantic import Field

from gampen_ml.config import (
    DEFAULT_PROFILE,
    PROFILE_ENV_VAR,
    ConfigError,
    Profile,
    get_profile,
)
from gampen_ml.settings import Settings
from gampen_ml.store import Store


def load_time_profile() -> Profile:
    """The profile that sizes the static partitions: ``$GAMPEN_PROFILE``, else ``quick``."""
    return get_profile(None)


def _resolved_when_empty(description: str) -> Any:
    """A setting whose empty default is resolved when the run starts (:class:`GampenSettings`)."""
    return Field(default="", description=description)


class GampenSettings(ConfigurableResource):
    """Profile, storage root, MLflow tracking URI and device for every asset.

    Empty strings mean "use the default", resolved when the run starts by
    :meth:`gampen_ml.settings.Settings.resolve` (explicit field, else its environment
    variable, else derived from the Dagster home), so that one ``Definitions`` object
    serves any machine; the device ``auto`` is CUDA when present, else CPU.
    """

    profile_name: str = _resolved_when_empty(
        f"Profile name (paper, quick, tiny); empty: ${PROFILE_ENV_VAR} else {DEFAULT_PROFILE}."
    )
    storage_root: str = _resolved_when_empty(
        "Root folder of every asset partition; empty: $GAMPEN_STORAGE, else $DAGSTER_HOME/data."
    )
    dagster_home: str = _resolved_when_empty(
        "Folder holding gampen.duckdb and the embedded MLflow store; empty: $DAGSTER_HOME."
    )
    database: str = _resolved_when_empty(
        "Lineage/catalog DuckDB file; empty: $GAMPEN_DUCKDB, else <dagster_home>/gampen.duckdb."
    )
    mlflow_tracking_uri: str = _resolved_when_empty(
        "MLflow tracking/registry URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<dagster_home>/mlflow.db."
    )
    device: str = Field(
        default="auto", description="Torch device: auto (CUDA when present), cpu, cuda, cuda:1 ..."
    )

    def profile(self) -> Profile:
        """The :class:`Profile` named by ``profile_name`` (or the environment default).

        A bad profile cannot succeed on a retry: it fails the step without retries.
        """
        try:
            return get_profile(self.profile_name or None)
        except ConfigError as exc:
            raise Failure(description=f"ConfigError: {exc}", allow_retries=False) from exc

    def settings(self) -> Settings:
        """These fields over the environment, resolved (:meth:`Settings.resolve`)."""
        return Settings.resolve(
            profile=self.profile_name,
            storage_root=self.storage_root,
            dagster_home=self.dagster_home,
            database=self.database,
            mlflow_tracking_uri=self.mlflow_tracking_uri,
        )

    def store(self) -> Store:
        """The storage layout under the resolved root (:meth:`Settings.store`), as the CLI
        builds it from the same settings."""
        return self.settings().store()

    def root(self) -> Path:
        """Absolute storage root."""
        return self.settings().storage_root

    def home(self) -> Path:
        """Absolute folder for gampen.duckdb and the embedded MLflow store."""
        return self.settings().dagster_home

    def database_path(self) -> Path:
        """Absolute path of the lineage/catalog DuckDB file."""
        return self.settings().database

    def tracking_uri(self) -> str:
        """MLflow tracking URI: the configured one, else ``$MLFLOW_TRACKING_URI``, else SQLite
        under :meth:`home`."""
        return self.settings().mlflow_tracking_uri

    def artifact_location(self) -> str | None:
        """Artifact root for new MLflow experiments: under :meth:`home` for the embedded store."""
        return self.settings().mlflow_artifact_location

    def torch_device(self) -> str:
        """``cuda`` when ``device`` is ``auto`` and a GPU is visible, else ``cpu``; else as set."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def require_partition(self, key: str, allowed: list[str], what: str) -> None:
        """Raise :class:`ConfigError` when ``key`` is not one of this profile's ``allowed`` keys.

        Static partitions are sized by :func:`load_time_profile`; a run configured with a
        different profile may ask for a key that profile does not have.
        """
        if key not in allowed:
            raise ConfigError(
                f"partition {key!r} is not a {what} of profile {self.profile().name!r} "
                f"(has {allowed}); set {PROFILE_ENV_VAR} before loading the definitions"
            )
