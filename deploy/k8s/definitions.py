"""GaMPEN definitions for Kubernetes: every step runs as its own Kubernetes Job.

Point the user-code deployment of the Dagster Helm chart at this file
(``dagster api grpc --python-file deploy/k8s/definitions.py``, see ``values.yaml``). The
assets, checks, sensors and schedules are those of ``gampen_assets.definitions``; only the
executor differs. GPU steps (``trained_model``, ``calibrated_dropout_rate``,
``posterior_catalog``) carry the op tag ``dagster-k8s/config`` that requests
``nvidia.com/gpu: 1``; the pool ``gpu`` still limits how many hold a GPU at once (set its
limit to the number of GPUs of the node pool: ``dagster instance concurrency set gpu N``).
"""

from dagster_k8s import k8s_job_executor

from gampen_assets.definitions import build_definitions

defs = build_definitions(executor=k8s_job_executor)
