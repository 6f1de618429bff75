"""The one ``Definitions`` object of the GaMPEN platform.

Loaded by ``dagster dev`` / ``dagster-webserver`` through ``workspace.yaml`` and by
``dagster asset materialize -m gampen_assets.definitions``. Static partitions (shards,
dropout rates) follow ``$GAMPEN_PROFILE`` (default ``quick``) at load time.

Scale-out deployments reuse :func:`build_definitions` with another executor: see
``deploy/k8s/definitions.py`` (one Kubernetes Job per step, GPU requests from the
``dagster-k8s/config`` op tags) and ``deploy/dask/definitions.py`` (a Dask cluster).
"""

from __future__ import annotations

from dagster import AssetSelection, Definitions, ExecutorDefinition, define_asset_job

from gampen_assets.assets import ALL_ASSETS
from gampen_assets.assets.sky_catalog_assets import (
    SKY_CATALOG_CHECKS,
    sky_catalog_automation_sensor,
)
from gampen_assets.assets.transfer_assets import TRANSFER_ASSETS, TRANSFER_CHECKS
from gampen_assets.checks import ALL_CHECKS
from gampen_assets.lineage import lineage_failure_sensor
from gampen_assets.resources import GampenSettings
from gampen_assets.schedules import reprocess_schedule
from gampen_assets.sensors import CATALOG_ASSETS, inbox_sensor
from gampen_ml import store

# A job holds one partitioning, so the pipeline is one job per partitioning; `make pipeline`
# (gampen_assets.pipeline) runs them in order. The transfer job (one ``domains`` partition)
# is not part of the pipeline.
JOB_ASSETS_AND_DESCRIPTIONS = {
    "inputs_job": (
        [store.PSF_LIBRARY, store.NOISE_POOL],
        "PSF library and sky-noise pool (unpartitioned).",
    ),
    "simulation_job": ([store.SIMULATED_GALAXIES], "Simulate one shard per partition."),
    "training_job": (
        [store.TRAINED_MODEL],
        "Train one GaMPEN per dropout-rate partition (pool gpu).",
    ),
    "calibration_job": (
        [store.CALIBRATED_DROPOUT_RATE],
        "Pick the dropout rate whose validation coverage is closest to nominal.",
    ),
    "catalog_job": (
        CATALOG_ASSETS,
        "Posterior catalog, flags and plots of one dataset partition.",
    ),
    "transfer_job": (
        [store.LABELLED_SET, store.FINETUNED_MODEL],
        "A survey domain's labelled set, then the champion fine-tuned on it (one "
        "domains partition; not part of the pipeline).",
    ),
}

JOBS = [
    define_asset_job(name, selection=AssetSelection.assets(*assets), description=description)
    for name, (assets, description) in JOB_ASSETS_AND_DESCRIPTIONS.items()
]


def build_definitions(executor: ExecutorDefinition | None = None) -> Definitions:
    """All assets, checks, resources, sensors, schedules and jobs; ``executor`` for every job.

    Parameters
    ----------
    executor : ExecutorDefinition, optional
        Default: Dagster's multiprocess executor (one process per step, local machine).
    """
    return Definitions(
        assets=[*ALL_ASSETS, *TRANSFER_ASSETS],
        asset_checks=[*ALL_CHECKS, *SKY_CATALOG_CHECKS, *TRANSFER_CHECKS],
        resources={"settings": GampenSettings()},
        sensors=[inbox_sensor, lineage_failure_sensor, sky_catalog_automation_sensor],
        schedules=[reprocess_schedule],
        jobs=JOBS,
        executor=executor,
    )


defs = build_definitions()
