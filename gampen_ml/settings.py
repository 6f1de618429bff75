"""Where the platform keeps things: the one place that reads the storage environment.

:meth:`Settings.resolve` turns explicit values (a Dagster resource's fields, CLI flags)
and the environment into absolute paths and URIs. Every part of the platform asks it:
``gampen_assets.resources.GampenSettings`` builds it from its fields, the ``gampen``
command from its flags, lineage from the resource. No other module reads these
variables.

Precedence, per setting: the explicit value, else its environment variable, else the
default derived from the resolved Dagster home.

========================  =========================  ==========================================
setting                   environment variable       default
========================  =========================  ==========================================
``profile_name``          ``GAMPEN_PROFILE``         ``quick``
``dagster_home``          ``DAGSTER_HOME``           ``./dagster_home``
``storage_root``          ``GAMPEN_STORAGE``         ``<dagster_home>/data``
``database``              ``GAMPEN_DUCKDB``          ``<dagster_home>/gampen.duckdb``
``mlflow_tracking_uri``   ``MLFLOW_TRACKING_URI``    ``sqlite:///<dagster_home>/mlflow.db``
``inbox``                 ``GAMPEN_INBOX``           ``<dagster_home>/inbox``
``quarantine``            (none)                     ``<dagster_home>/quarantine``
``inbox_settle_s``        ``GAMPEN_INBOX_SETTLE_S``  ``300``
``domains``               (none)                     ``<dagster_home>/domains`` (``<name>.toml``)
``labelled``              (none)                     ``<dagster_home>/labelled`` (``<domain>/``)
========================  =========================  ==========================================

``mlflow_artifact_location`` is ``<dagster_home>/mlartifacts`` (a ``file://`` URI) for the
embedded store and ``None`` when a tracking URI is given (the server decides).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gampen_ml.config import DEFAULT_PROFILE, PROFILE_ENV_VAR, ConfigError, Profile, get_profile

if TYPE_CHECKING:
    from gampen_ml.store import Store

DAGSTER_HOME_ENV_VAR = "DAGSTER_HOME"
STORAGE_ENV_VAR = "GAMPEN_STORAGE"
DATABASE_ENV_VAR = "GAMPEN_DUCKDB"
TRACKING_URI_ENV_VAR = "MLFLOW_TRACKING_URI"
INBOX_ENV_VAR = "GAMPEN_INBOX"
SETTLE_ENV_VAR = "GAMPEN_INBOX_SETTLE_S"
#: Seconds without a change after which an inbox batch without ``_READY`` is complete.
DEFAULT_SETTLE_S = 300.0
#: File name of the lineage and catalog database in the Dagster home.
DATABASE_FILE = "gampen.duckdb"


@dataclass(frozen=True)
class Settings:
    """Resolved storage configuration: absolute paths and URIs (see the module table).

    Build it with :meth:`resolve`; the fields are final values, never empty.
    """

    profile_name: str
    dagster_home: Path
    storage_root: Path
    database: Path
    mlflow_tracking_uri: str
    #: ``file://`` URI of the embedded artifact folder, ``None`` with a tracking server.
    mlflow_artifact_location: str | None
    inbox: Path
    quarantine: Path
    inbox_settle_s: float
    #: Survey domain definitions, one ``<name>.toml`` each (:mod:`gampen_ml.domains`).
    domains: Path
    #: Fitter-labelled galaxies to fine-tune on, one folder per domain.
    labelled: Path

    @classmethod
    def resolve(
        cls,
        profile: str | None = None,
        storage_root: Path | str | None = None,
        dagster_home: Path | str | None = None,
        database: Path | str | None = None,
        mlflow_tracking_uri: str | None = None,
        inbox: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Resolve every setting: explicit value, else environment variable, else default.

        Parameters
        ----------
        profile, storage_root, dagster_home, database, mlflow_tracking_uri, inbox
            Explicit values; ``None`` or ``""`` means "not given". Relative paths are
            resolved against the current directory.
        env : mapping, optional
            The environment to read (default ``os.environ``); empty values count as unset.

        Raises
        ------
        ConfigError
            If ``$GAMPEN_INBOX_SETTLE_S`` is not a non-negative number.
        """
        env = os.environ if env is None else env

        def pick(explicit, variable: str) -> str | None:
            if explicit not in (None, ""):
                return str(explicit)
            return env.get(variable) or None

        home_text = pick(dagster_home, DAGSTER_HOME_ENV_VAR)
        home = Path(home_text).resolve() if home_text else (Path.cwd() / "dagster_home").resolve()

        def path(explicit, variable: str, default: Path) -> Path:
            text = pick(explicit, variable)
            return Path(text).resolve() if text else default

        uri = pick(mlflow_tracking_uri, TRACKING_URI_ENV_VAR)
        from gampen_ml.registry import default_artifact_location, default_tracking_uri

        return cls(
            profile_name=pick(profile, PROFILE_ENV_VAR) or DEFAULT_PROFILE,
            dagster_home=home,
            storage_root=path(storage_root, STORAGE_ENV_VAR, home / "data"),
            database=path(database, DATABASE_ENV_VAR, home / DATABASE_FILE),
            mlflow_tracking_uri=uri or default_tracking_uri(home),
            mlflow_artifact_location=None if uri else default_artifact_location(home),
            inbox=path(inbox, INBOX_ENV_VAR, home / "inbox"),
            quarantine=home / "quarantine",
            inbox_settle_s=_settle_seconds(env.get(SETTLE_ENV_VAR)),
            domains=home / "domains",
            labelled=home / "labelled",
        )

    def store(self) -> Store:
        """The :class:`~gampen_ml.store.Store` at :attr:`storage_root` (the storage layout)."""
        from gampen_ml.store import Store

        return Store(self.storage_root)

    def profile(self) -> Profile:
        """The :class:`~gampen_ml.config.Profile` named by :attr:`profile_name`.

        Raises
        ------
        ConfigError
            If no profile has that name.
        """
        return get_profile(self.profile_name)


def _settle_seconds(text: str | None) -> float:
    if not text:
        return DEFAULT_SETTLE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ConfigError(
            f"${SETTLE_ENV_VAR} must be a non-negative number of seconds, got {text!r}"
        )
    return value


def instance_home(env: Mapping[str, str] | None = None) -> Path:
    """The Dagster instance folder as Dagster itself reads it: ``$DAGSTER_HOME``, absolute.

    :meth:`Settings.resolve` falls back to ``./dagster_home``; a Dagster instance does not
    (it would silently use a temporary one), so a launcher of persistent runs asks this.

    Raises
    ------
    ConfigError
        If the variable is unset or not an absolute path.
    """
    text = (os.environ if env is None else env).get(DAGSTER_HOME_ENV_VAR) or ""
    if not Path(text).is_absolute():
        raise ConfigError(
            f"{DAGSTER_HOME_ENV_VAR} must be set to an absolute path, e.g. "
            f"export {DAGSTER_HOME_ENV_VAR}=$(pwd)/dagster_home (got {text!r})"
        )
    return Path(text)
