"""The one resource every GaMPEN asset uses: which profile, where the data lives, which device.

``GampenSettings`` carries no state; it resolves names to things (a :class:`Profile`, a
storage root, an MLflow tracking URI, a torch device string). Static partitions (shards,
dropout rates) are fixed when the definitions load, from :func:`load_time_profile`; an
asset therefore checks that its partition key belongs to the profile it runs with.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource, Failure
from pydantic import Field

from gampen_ml.config import (
    DEFAULT_PROFILE,
    PROFILE_ENV_VAR,
    ConfigError,
    Profile,
    default_storage_root,
    get_profile,
)


def load_time_profile() -> Profile:
    """The profile that sizes the static partitions: ``$GAMPEN_PROFILE``, else ``quick``."""
    return get_profile(None)


def default_dagster_home() -> Path:
    """``$DAGSTER_HOME`` if set, else ``./dagster_home`` (absolute)."""
    home = os.environ.get("DAGSTER_HOME")
    return Path(home).resolve() if home else (Path.cwd() / "dagster_home").resolve()


class GampenSettings(ConfigurableResource):
    """Profile, storage root, MLflow tracking URI and device for every asset.

    Empty strings mean "use the default", resolved when the run starts, so that one
    ``Definitions`` object serves any machine: the profile from ``$GAMPEN_PROFILE`` (else
    ``quick``), the storage root from ``gampen_ml.config.default_storage_root()``, the
    MLflow store as SQLite under ``dagster_home`` and the device ``auto`` (CUDA when
    present, else CPU).
    """

    profile_name: str = Field(
        default="",
        description=f"Profile name (paper, quick, tiny); empty: ${PROFILE_ENV_VAR} else {DEFAULT_PROFILE}.",
    )
    storage_root: str = Field(
        default="",
        description="Root folder of every asset partition; empty: $GAMPEN_STORAGE, else $DAGSTER_HOME/data.",
    )
    dagster_home: str = Field(
        default="",
        description="Folder holding gampen.duckdb and the embedded MLflow store; empty: $DAGSTER_HOME.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        description="MLflow tracking/registry URI; empty: sqlite:///<dagster_home>/mlflow.db.",
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

    def root(self) -> Path:
        """Absolute storage root."""
        return Path(self.storage_root).resolve() if self.storage_root else default_storage_root()

    def home(self) -> Path:
        """Absolute folder for gampen.duckdb and the embedded MLflow store."""
        return Path(self.dagster_home).resolve() if self.dagster_home else default_dagster_home()

    def tracking_uri(self) -> str:
        """MLflow tracking URI: the configured one, else SQLite under :meth:`home`."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        from gampen_ml.registry import default_tracking_uri

        return default_tracking_uri(self.home())

    def artifact_location(self) -> str | None:
        """Artifact root for new MLflow experiments: under :meth:`home` for the embedded store."""
        if self.mlflow_tracking_uri:
            return None
        from gampen_ml.registry import default_artifact_location

        return default_artifact_location(self.home())

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
