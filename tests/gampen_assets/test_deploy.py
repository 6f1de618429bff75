"""Scale-out configuration: the k8s and Dask definitions load, their configs validate against
Dagster's schemas, GPU requests reach the ops, and a step really runs on a Dask cluster."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, Definitions, execute_job, reconstructable
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster._core.test_utils import instance_for_test
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import get_user_defined_k8s_config

REPO = Path(__file__).resolve().parents[2]
GPU_ASSETS = ("trained_model", "calibrated_dropout_rate", "posterior_catalog")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"deploy_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


def _yaml(name: str) -> dict:
    return yaml.safe_load((REPO / "deploy" / name).read_text())


def test_k8s_definitions_and_gpu_tags():
    defs = _load(REPO / "deploy" / "k8s" / "definitions.py")
    Definitions.validate_loadable(defs)
    for job_name in ("training_job", "catalog_job"):
        job = defs.resolve_job_def(job_name)
        assert job.executor_def.name == "k8s"
    node_tags = {
        node.name: node.definition.tags
        for job_name in ("training_job", "calibration_job", "catalog_job", "simulation_job")
        for node in defs.resolve_job_def(job_name).graph.nodes
    }
    for name in GPU_ASSETS:
        k8s = get_user_defined_k8s_config(node_tags[name])
        assert k8s.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert k8s.container_config["resources"]["requests"]["nvidia.com/gpu"] == "1", name
        assert k8s.pod_spec_config["tolerations"][0]["key"] == "nvidia.com/gpu"
    # CPU stages ask for no GPU.
    assert "dagster-k8s/config" not in node_tags["simulated_galaxies"]


def test_k8s_run_config_validates():
    defs = _load(REPO / "deploy" / "k8s" / "definitions.py")
    from dagster import validate_run_config

    config = _yaml("k8s/run_config.yaml")
    validated = validate_run_config(defs.resolve_job_def("catalog_job"), config)
    execution = validated["execution"]["k8s"]
    assert execution["step_k8s_config"]["container_config"]["volume_mounts"][0]["mount_path"] == (
        "/data/gampen"
    )
    assert validated["resources"]["settings"]["config"]["profile_name"] == "paper"


def test_k8s_instance_config_validates(monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused")
    config = _yaml("k8s/dagster.yaml")
    result = process_config(dagster_instance_config_schema(), config)
    assert result.success, result.errors
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    launcher_result = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert launcher_result.success, launcher_result.errors
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_local_instance_config_validates():
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    result = process_config(dagster_instance_config_schema(), config)
    assert result.success, result.errors
    assert config["telemetry"]["enabled"] is False
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_dask_run_config_validates():
    defs = _load(REPO / "deploy" / "dask" / "definitions.py")
    from dagster import validate_run_config

    job = defs.resolve_job_def("inputs_job")
    assert job.executor_def.name == "dask"
    validated = validate_run_config(job, _yaml("dask/run_config.yaml"))
    assert validated["execution"]["dask"]["cluster"]["existing"]["address"].startswith("tcp://")


def dask_inputs_job():
    """Module-level (reconstructable) job: inputs_job of the Dask deployment definitions."""
    return _load(REPO / "deploy" / "dask" / "definitions.py").resolve_job_def("inputs_job")


@pytest.mark.slow
def test_psf_library_runs_on_a_local_dask_cluster(tmp_path, monkeypatch, tiny_profile):
    storage = tmp_path / "storage"
    monkeypatch.setenv("GAMPEN_STORAGE", str(storage))
    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "gampen.duckdb"))
    monkeypatch.setenv("GAMPEN_PROFILE", "tiny")
    run_config = {
        "execution": {
            "config": {
                "cluster": {"local": {"processes": False, "n_workers": 1, "threads_per_worker": 1}}
            }
        },
        "resources": {
            "settings": {"config": {"profile_name": "tiny", "storage_root": str(storage)}}
        },
    }
    (tmp_path / "dagster_home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        assert isinstance(instance, DagsterInstance) and instance.is_persistent
        with execute_job(
            reconstructable(dask_inputs_job),
            instance=instance,
            run_config=run_config,
            asset_selection=[AssetKey("psf_library")],
        ) as result:
            assert result.success
            run = instance.get_run_by_id(result.run_id)
            assert run.job_name == "inputs_job"
            assert "local" in run.run_config["execution"]["config"]["cluster"]
            (materialization,) = result.asset_materializations_for_node("psf_library")
            assert materialization.metadata["n_psfs"].value == float(tiny_profile.psf.n_psfs)
    assert (storage / "psf_library" / "all" / "psfs.fits").is_file()
