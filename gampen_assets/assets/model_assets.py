"""Models: one GaMPEN network per dropout rate, and the calibrated choice among them."""

import json

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
)

from gampen_assets.assets._common import AssetRun, fail_fast_on_bad_input, gampen_asset
from gampen_assets.assets._metadata import coverage_metadata, folder_version, md_table
from gampen_assets.assets.data_assets import shard_partitions
from gampen_assets.resources import GampenSettings, load_time_profile
from gampen_ml import plots, stages
from gampen_ml.config import dropout_from_key, dropout_key, shard_keys
from gampen_ml.store import (
    CALIBRATED_DROPOUT_RATE,
    MODEL_JSON_FILE,
    SIMULATED_GALAXIES,
    TRAINED_MODEL,
)

#: One partition per dropout rate of the calibration grid (paper §5).
dropout_partitions = StaticPartitionsDefinition(
    [dropout_key(rate) for rate in load_time_profile().calibration.dropout_rates]
)

GROUP = "model"

#: Kubernetes: a model step asks for one GPU (read by dagster-k8s's k8s_job_executor and
#: run launcher; ignored by the local multiprocess executor).
GPU_K8S_TAGS = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        },
    }
}


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"pytorch", "mlflow"},
    partitions_def=dropout_partitions,
    deps=[AssetDep(SIMULATED_GALAXIES, partition_mapping=AllPartitionMapping())],
    pool="gpu",
    op_tags=GPU_K8S_TAGS,
    description=(
        "GaMPEN (STN + VGG-16, dropout before every conv and FC layer, full-covariance "
        "Gaussian NLL) trained with one dropout rate on the train split of every shard, "
        "validated on val. Resumable from checkpoint.pt; logged and registered in MLflow."
    ),
)
def trained_model(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile, store = settings.profile(), run.store
    key = context.partition_key
    with fail_fast_on_bad_input():
        allowed = [dropout_key(r) for r in profile.calibration.dropout_rates]
        settings.require_partition(key, allowed, "dropout rate")
    rate = dropout_from_key(key)
    shard_dirs = store.shards(profile)
    out = store.trained_model(rate)
    device = settings.torch_device()
    context.log.info(
        f"training dropout {rate:g} on {len(shard_dirs)} shards, device {device}, "
        f"{profile.training.epochs} epochs"
    )
    # Resumes from the checkpoint of a killed run; the model is published atomically.
    with fail_fast_on_bad_input():
        result = stages.train_and_publish(
            profile,
            rate,
            store,
            device=device,
            log=context.log.info,
            mlflow_tracking_uri=settings.tracking_uri(),
            mlflow_artifact_location=settings.artifact_location(),
        )
    version = folder_version(out)
    history = result.history
    meta_file = out / MODEL_JSON_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    metadata = {
        "dropout_rate": float(rate),
        "epochs": float(len(history)),
        "final_train_loss": float(result.final_train_loss),
        "final_val_loss": float(result.final_val_loss),
        "images_per_s": float(history[-1]["images_per_s"]) if history else float("nan"),
        "device": str(device),
        "mlflow_run_id": result.mlflow_run_id or "",
        "model_version": str(result.model_version or ""),
        "training_data_version": result.data_version,
        "n_train": float(meta.get("n_train", float("nan"))),
        "n_val": float(meta.get("n_val", float("nan"))),
        "image_px": int(meta.get("image_px", 0)),
        "path": MetadataValue.path(str(out)),
        "loss_curve": MetadataValue.md(
            plots.png_markdown(plots.loss_curve(history), title="loss curve")
        ),
    }
    return run.result(
        TRAINED_MODEL,
        version,
        metadata,
        partition=key,
        upstream=[run.upstream(SIMULATED_GALAXIES, s) for s in shard_keys(profile)],
        input_paths=shard_dirs,
        row_count=len(history),
        mlflow_run_id=result.mlflow_run_id,
        model_version=str(result.model_version) if result.model_version else None,
    )


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"pytorch", "mlflow"},
    deps=[
        AssetDep(TRAINED_MODEL, partition_mapping=AllPartitionMapping()),
        AssetDep(SIMULATED_GALAXIES, partition_mapping=AllPartitionMapping()),
    ],
    pool="gpu",
    op_tags=GPU_K8S_TAGS,
    description=(
        "MC-dropout inference on the validation split for every dropout partition; HPD "
        "coverage at 68.27/95.45/99.73 %; the rate closest to nominal wins and becomes the "
        "MLflow alias 'champion'. Optional spread recalibration fit on validation only. "
        "Files: coverage.parquet, calibration.json (+ recalibration.json)."
    ),
)
def calibrated_dropout_rate(
    context: AssetExecutionContext, settings: GampenSettings
) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile, store = settings.profile(), run.store
    rates = profile.calibration.dropout_rates
    keys = [dropout_key(r) for r in rates]
    model_dirs = [store.trained_model(r) for r in rates]
    out = store.calibration()
    device = settings.torch_device()
    context.log.info(
        f"calibrating {len(keys)} dropout rates on the val split of "
        f"{profile.simulation.n_shards} shards "
        f"({profile.inference.n_passes_calibration} passes, device {device})"
    )
    # Publishes coverage.parquet, calibration.json (+ recalibration.json), then moves the
    # MLflow alias 'champion' to the chosen model's registered version.
    with fail_fast_on_bad_input():
        result = stages.calibrate_and_publish(
            profile,
            store,
            device=device,
            log=context.log.info,
            mlflow_tracking_uri=settings.tracking_uri(),
        )
    calibration = store.read_calibration()
    model_name, model_version = calibration.model_name, calibration.model_version
    context.log.info(f"champion: dropout {result.chosen_rate:g} = {model_name} v{model_version}")
    version = folder_version(out)
    table = result.coverage
    chosen = table.filter(pl.col("dropout_rate") == result.chosen_rate)
    final = chosen.filter(pl.col("recalibrated") == (result.recalibration is not None))
    metadata = {
        "chosen_dropout_rate": float(result.chosen_rate),
        "model_name": model_name,
        "model_version": model_version,
        "recalibrated": result.recalibration is not None,
        "n_val_galaxies": float(result.n_galaxies),
        "max_abs_coverage_error": float((final["coverage"] - final["level"]).abs().max()),
        **coverage_metadata("coverage", final.iter_rows(named=True)),
        "coverage_table": md_table(
            table.sort("dropout_rate", "recalibrated", "parameter", "level").to_dicts()
        ),
        "coverage_vs_dropout": MetadataValue.md(
            plots.png_markdown(
                plots.coverage_vs_dropout(
                    table.filter(~pl.col("recalibrated")), chosen_dropout=result.chosen_rate
                ),
                title="coverage vs dropout",
            )
        ),
        "path": MetadataValue.path(str(out)),
    }
    if result.recalibration is not None:
        metadata["recalibration_scale"] = MetadataValue.json(result.recalibration.to_dict())
    return run.result(
        CALIBRATED_DROPOUT_RATE,
        version,
        metadata,
        upstream=[run.upstream(TRAINED_MODEL, k) for k in keys]
        + [run.upstream(SIMULATED_GALAXIES, s) for s in shard_keys(profile)],
        input_paths=model_dirs,
        row_count=table.height,
        model_version=model_version,
    )


__all__ = ["calibrated_dropout_rate", "dropout_partitions", "shard_partitions", "trained_model"]
