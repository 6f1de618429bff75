"""GaMPEN definitions on a Dask cluster: every step is a Dask task.

Use on an HPC site with a Dask scheduler (SLURM/PBS through dask-jobqueue, or an existing
``dask-scheduler``); the run config picks the cluster (``deploy/dask/run_config.yaml``).
Without executor config a ``distributed.LocalCluster`` is started on this machine. Dask
workers need the same storage root (shared filesystem) and a persistent Dagster instance
(``DAGSTER_HOME`` on the shared filesystem).

Paths are set in the ``settings`` resource of the run config (``run_config.yaml``): the
steps' data, their lineage rows and the failure sensor's rows for the run all follow it
(``gampen_ml.settings``: a field beats its environment variable, which beats the default
under ``dagster_home``). The daemon's inbox sensor and reprocess schedule run outside any
run: give the daemon the same ``DAGSTER_HOME`` and ``GAMPEN_STORAGE``.
"""

from dagster_dask import dask_executor

from gampen_assets.definitions import build_definitions

defs = build_definitions(executor=dask_executor)
