"""MLflow tracking and model registry for trained GaMPEN models.

Everything goes through an explicit tracking URI (never MLflow's global state). The
embedded default is a SQLite store plus a local artifact folder under ``$DAGSTER_HOME``
(:func:`default_tracking_uri`, :func:`default_artifact_location`); pass a server URI
(``http://mlflow:5000``) to use a real MLflow server instead.

What is stored per training run (DESIGN §7): ``mlflow.pytorch.log_model`` would export a
``torch.export`` graph with dropout frozen, useless for Monte-Carlo dropout. So the run's
``model/`` artifact folder holds what MC dropout needs -- ``state_dict.pt``, ``model.json``
(network config), ``label_scaler.json`` -- plus an ``MLmodel`` file carrying the input
signature. A version of the registered model ``gampen-<profile>`` points at that folder and
is tagged with its ``dropout_rate``; the calibrated winner gets the alias ``champion`` and
its recalibration as the tag :data:`RECALIBRATION_TAG`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gampen_ml.config import dropout_key
from gampen_ml.store import HISTORY_FILE, MODEL_JSON_FILE, SCALER_FILE, STATE_DICT_FILE

#: Files of a trained model folder that are logged as the ``model`` artifact.
MODEL_FILES = (STATE_DICT_FILE, MODEL_JSON_FILE, SCALER_FILE, HISTORY_FILE)
MODEL_ARTIFACT_PATH = "model"
CHAMPION_ALIAS = "champion"
DEFAULT_EXPERIMENT = "gampen"
#: Where users set the tracking URI (named in error messages).
TRACKING_URI_HINT = (
    "set the tracking URI explicitly (gampen_ml.registry.default_tracking_uri(dagster_home) "
    "for the embedded SQLite store, or an http(s):// MLflow server URI)"
)


class RegistryError(RuntimeError):
    """The MLflow store is unreachable, or a model / version / alias is missing."""


def default_tracking_uri(dagster_home: Path | str) -> str:
    """Embedded store: ``sqlite:///<abs dagster_home>/mlflow.db``."""
    return f"sqlite:///{Path(dagster_home).resolve() / 'mlflow.db'}"


def default_artifact_location(dagster_home: Path | str) -> str:
    """Embedded artifact folder ``<abs dagster_home>/mlartifacts`` as a ``file://`` URI."""
    return (Path(dagster_home).resolve() / "mlartifacts").as_uri()


def registered_model_name(profile_name: str) -> str:
    """Registered model name of a profile: ``gampen-<profile>``."""
    return f"gampen-{profile_name}"


def domain_model_name(profile_name: str, domain: str) -> str:
    """Registered model name of a domain's fine-tuned model: ``gampen-<profile>-<domain>``."""
    return f"{registered_model_name(profile_name)}-{domain}"


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    if not tracking_uri:
        raise RegistryError(f"no MLflow tracking URI given: {TRACKING_URI_HINT}")
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise RegistryError(
                f"MLflow tracking URI {tracking_uri}: folder {db.parent} does not exist; "
                f"create it or {TRACKING_URI_HINT}"
            )
    elif tracking_uri.startswith(("http://", "https://")):
        # MLflow's own client retries for minutes; probe once with a short timeout.
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5).close()
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryError(
                f"MLflow tracking server {tracking_uri} is unreachable ({exc}); start it or "
                f"{TRACKING_URI_HINT}"
            ) from exc
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _flatten(prefix: str, value, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = str(value)


def log_training_run(
    tracking_uri: str,
    model_dir: Path | str,
    *,
    profile_dict: dict,
    dropout_rate: float,
    history: Sequence[dict],
    data_version: str,
    input_example: np.ndarray,
    output_example: np.ndarray,
    artifact_location: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    register: bool = True,
    model_name: str | None = None,
    version_tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
) -> tuple[str, str | None]:
    """Log one trained model as an MLflow run and register it as a model version.

    Parameters
    ----------
    tracking_uri : str
        MLflow tracking (and registry) URI.
    model_dir : path
        Folder with the files of :data:`MODEL_FILES` (written by ``train.train_model``).
    profile_dict : dict
        ``Profile.to_dict()``; logged as flattened params (``training.learning_rate`` ...).
    dropout_rate : float
        Logged as a param and as the model version tag ``dropout_rate``.
    history : sequence of dict
        Per-epoch ``train_loss``, ``val_loss``, ``lr``, ``seconds``, ``images_per_s``;
        logged as metrics with ``step`` = epoch.
    data_version : str
        Version of the training shards; param and tag.
    input_example, output_example : numpy.ndarray
        A small ``(n, 1, S, S)`` float32 input batch and its ``(n, 9)`` outputs; they define
        the input/output signature stored in the ``MLmodel`` file.
    artifact_location : str, optional
        Artifact root of a new experiment (the embedded default keeps it beside the DB).
    experiment : str
        Experiment name.
    register : bool
        Also create a version of ``gampen-<profile>``.
    model_name : str, optional
        Register under this name instead of ``gampen-<profile>``.
    version_tags : dict, optional
        More tags of the model version (e.g. :data:`RECALIBRATION_TAG`).
    metrics : dict, optional
        Single-valued metrics logged at step 0 (e.g. an imported model's validation coverage).

    Returns
    -------
    (run_id, model_version)
        ``model_version`` is ``None`` when ``register`` is false.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.models import Model, infer_signature

    client = _client(tracking_uri)
    model_dir = Path(model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise RegistryError(f"{model_dir}: missing model files {missing}")
    profile_name = profile_dict["name"]
    experiment_id = _experiment_id(client, experiment, artifact_location)
    run = client.create_run(
        experiment_id,
        run_name=f"{profile_name}-{dropout_key(dropout_rate)}",
        tags={"profile": profile_name, "dropout_rate": f"{dropout_rate:g}"},
    )
    run_id = run.info.run_id
    try:
        params: dict[str, str] = {}
        _flatten("", {k: profile_dict[k] for k in ("network", "training")}, params)
        params |= {
            "profile": profile_name,
            "seed": str(profile_dict["seed"]),
            "dropout_rate": f"{dropout_rate:g}",
            "data_version": data_version,
        }
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(entry[key]), now, int(entry["epoch"]))
            for entry in history
            for key in ("train_loss", "val_loss", "lr", "seconds", "images_per_s")
            if key in entry and math.isfinite(float(entry[key]))
        ] + [
            Metric(key, float(value), now, 0)
            for key, value in (metrics or {}).items()
            if math.isfinite(float(value))
        ]
        client.log_batch(
            run_id,
            metrics=metrics,
            params=[Param(k, v[:6000]) for k, v in params.items()],
            tags=[RunTag("data_version", data_version)],
        )
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / MODEL_ARTIFACT_PATH
            staged.mkdir()
            for name in MODEL_FILES:
                shutil.copy2(model_dir / name, staged / name)
            signature = infer_signature(input_example, output_example)
            Model(artifact_path=MODEL_ARTIFACT_PATH, run_id=run_id, signature=signature).save(
                staged / "MLmodel"
            )
            client.log_artifacts(run_id, str(staged), MODEL_ARTIFACT_PATH)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if not register:
        return run_id, None
    name = model_name or registered_model_name(profile_name)
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(
            exc.error_code
        ):
            raise
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}",
        run_id=run_id,
        tags={
            "dropout_rate": f"{dropout_rate:g}",
            "data_version": data_version,
            **(version_tags or {}),
        },
    )
    return run_id, str(version.version)


#: Model-version tag holding the JSON of the recalibration fit for that version
#: (``gampen_ml.calibrate.Recalibration.to_dict``), so a registered model carries its calibration.
RECALIBRATION_TAG = "gampen.recalibration"


def set_champion(
    tracking_uri: str,
    name: str,
    version: str | int,
    recalibration: dict | None = None,
    *,
    alias: str = CHAMPION_ALIAS,
) -> None:
    """Point the alias ``champion`` (or ``alias``) of registered model ``name`` at ``version``.

    ``recalibration`` (a ``Recalibration.to_dict()``) is stored on that version as the tag
    :data:`RECALIBRATION_TAG`, so resolving the version from the registry alone gives the
    calibrated posteriors.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
        if recalibration is not None:
            client.set_model_version_tag(
                name, str(version), RECALIBRATION_TAG, json.dumps(recalibration)
            )
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"cannot set alias {alias!r} of model {name!r} to version {version} in "
            f"{tracking_uri}: {exc.message}; train and register that model first"
        ) from exc


def get_model_version(tracking_uri: str, name: str, alias_or_version: str | int):
    """The ``ModelVersion`` of ``name`` for an alias (``"champion"``) or a version number."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    key = str(alias_or_version)
    try:
        if key.isdigit():
            return client.get_model_version(name, key)
        return client.get_model_version_by_alias(name, key)
    except MlflowException as exc:
        what = f"version {key}" if key.isdigit() else f"alias {key!r}"
        raise RegistryError(
            f"registered model {name!r} has no {what} in {tracking_uri} ({exc.message}); "
            "train the dropout partitions and run the calibration (which sets "
            f"{CHAMPION_ALIAS!r}), or pass an existing version number"
        ) from exc


def resolve_model(
    tracking_uri: str,
    name: str,
    alias_or_version: str | int = CHAMPION_ALIAS,
    dst_dir: Path | str | None = None,
) -> Path:
    """Download a registered model version and return the local model folder.

    The folder holds ``state_dict.pt``, ``model.json`` and ``label_scaler.json``: load it
    with ``gampen_ml.train.load_trained_model``. For a local artifact store the files are
    copied into ``dst_dir`` (a new temporary folder when omitted).
    """
    import mlflow.artifacts

    version = get_model_version(tracking_uri, name, alias_or_version)
    dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="gampen-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(dst), tracking_uri=tracking_uri
    )
    local = Path(local)
    if not (local / MODEL_JSON_FILE).is_file():
        raise RegistryError(
            f"model {name!r} version {version.version}: artifact {version.source} has no "
            "model.json (not a GaMPEN model folder)"
        )
    return local


def model_version_info(tracking_uri: str, name: str, alias_or_version: str | int) -> dict:
    """Plain dict of a model version: version, run_id, source, tags, aliases."""
    version = get_model_version(tracking_uri, name, alias_or_version)
    return json.loads(
        json.dumps(
            {
                "name": name,
                "version": str(version.version),
                "run_id": version.run_id,
                "source": version.source,
                "tags": dict(version.tags),
                "aliases": list(getattr(version, "aliases", []) or []),
            }
        )
    )
