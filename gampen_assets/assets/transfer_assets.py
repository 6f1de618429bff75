"""Transfer learning to a survey domain: its labelled set and its fine-tuned model.

Both assets are partitioned by ``domains`` (:data:`gampen_assets.partitions.domains`), a
dynamic partitioning whose keys are the names of the domains declared in
``<dagster_home>/domains/<name>.toml``. The flow in the UI needs no sensor: declare the
domain, put its labelled cutouts and labels table in ``<dagster_home>/labelled/<name>/``,
then *Materialize* ``labelled_set`` and ``finetuned_model`` (the ``transfer_job``), adding
the partition ``<name>`` in the dialog the first time (``docs/transfer.md``). A key without
a domain file fails at once, listing the declared domains.
"""

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
)

from gampen_assets.assets._common import (
    AssetRun,
    fail_fast_on_bad_input,
    gampen_asset,
    partition_check,
)
from gampen_assets.assets._metadata import coverage_metadata, folder_version, md_table
from gampen_assets.assets.model_assets import GPU_K8S_TAGS
from gampen_assets.partitions import domains
from gampen_assets.resources import GampenSettings
from gampen_ml import finetune, labelled, plots
from gampen_ml.config import PARAMETERS
from gampen_ml.domains import find_domain
from gampen_ml.store import (
    CALIBRATED_DROPOUT_RATE,
    CALIBRATION_FILE,
    FINETUNED_MODEL,
    IMAGES_FILE,
    LABELLED_SET,
    LABELS_FILE,
    TRAINED_MODEL,
)

GROUP = "transfer"


class FinetuneRunConfig(Config):
    """Run configuration of ``finetuned_model`` (:class:`gampen_ml.finetune.FinetuneConfig`)."""

    #: ``convolutions`` (STN + convolutions frozen, the head trains), ``stn``, or ``none``.
    freeze: str = "convolutions"
    #: Learning rate = lr_factor x the profile's; None: 1 for ``convolutions``, else 0.1.
    lr_factor: float | None = None
    max_epochs: int = 30
    #: Epochs without a lower validation loss before stopping.
    patience: int = 5
    min_delta: float = 0.0
    #: None: the profile's batch size.
    batch_size: int | None = None
    grad_clip_norm: float | None = 1.0

    def finetune_config(self) -> finetune.FinetuneConfig:
        """The science-side configuration (``ConfigError`` on a bad value)."""
        return finetune.FinetuneConfig(**self.model_dump())


@gampen_asset(
    GROUP,
    name=LABELLED_SET,
    code_version="1",
    kinds={"parquet"},
    partitions_def=domains,
    description=(
        "A survey domain's fitter-labelled galaxies: <dagster_home>/labelled/<domain>/ (FITS "
        "cutouts + labels.parquet or labels.csv: file, hdu, bt, re_arcsec, flux_nJy, optional "
        "*_sigma and split) read with the domain's definition and validated like the inbox. "
        "Bad files are quarantined with reasons, bad rows left out with reasons; missing "
        "splits come from a hash of the file name (70/15/15). Stores images.npy (nJy), "
        "labels.parquet and manifest.json with the set's SHA-256."
    ),
)
def labelled_set(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile, resolved = settings.profile(), settings.settings()
    key = context.partition_key
    out = run.store.labelled_set(key)
    with fail_fast_on_bad_input():
        domain = find_domain(resolved.domains, key)
        source = resolved.labelled / domain.name
        result = labelled.publish_labelled_set(
            profile,
            domain,
            source,
            out,
            resolved.quarantine / labelled.QUARANTINE_FOLDER,
            log=context.log.info,
        )
    manifest = result.manifest
    version = folder_version(out)
    rejected = [{"file": f, "reason": r} for f, r in manifest["files_quarantined"].items()] + [
        {"file": r["file"], "reason": r["reason"]} for r in manifest["rows_rejected"]
    ]
    metadata = {
        "domain": key,
        "n_galaxies": float(result.n_galaxies),
        **{f"n_{split}": float(n) for split, n in result.split_counts.items()},
        "split_from_hash": float(manifest["split_from_hash"]),
        "files_in": float(manifest["files_in"]),
        "files_quarantined": float(len(manifest["files_quarantined"])),
        "rows_rejected": float(len(manifest["rows_rejected"])),
        "unlabelled_files": float(len(manifest["unlabelled_files"])),
        "label_errors_rows": float((manifest.get("label_errors") or {}).get("n_rows", 0)),
        "label_set_sha256": result.label_set_sha256,
        "rejected": md_table(rejected),
        "quarantine": MetadataValue.path(
            str(resolved.quarantine / labelled.QUARANTINE_FOLDER / key)
        ),
        "path": MetadataValue.path(str(out)),
    }
    return run.result(
        LABELLED_SET,
        version,
        metadata,
        partition=key,
        input_paths=[source, resolved.domains / f"{key}.toml"],
        row_count=result.n_galaxies,
    )


@gampen_asset(
    GROUP,
    name=FINETUNED_MODEL,
    code_version="1",
    kinds={"pytorch", "mlflow"},
    partitions_def=domains,
    deps=[AssetDep(LABELLED_SET), AssetDep(CALIBRATED_DROPOUT_RATE)],
    pool="gpu",
    op_tags=GPU_K8S_TAGS,
    description=(
        "The champion fine-tuned on a domain's labelled set (freezing per run config: STN + "
        "convolutions by default), early-stopped on its val split, its posteriors "
        "recalibrated there with the champion's method. Registered in MLflow as "
        "gampen-<profile>-<domain> (alias champion) with tags gampen.base_model_version, "
        "gampen.label_set_sha256, gampen.domain. Metadata: val loss before/after, val "
        "coverage, test-split residuals against the champion."
    ),
)
def finetuned_model(
    context: AssetExecutionContext, config: FinetuneRunConfig, settings: GampenSettings
) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile, resolved, store = settings.profile(), settings.settings(), run.store
    key = context.partition_key
    out = store.finetuned_model(key)
    with fail_fast_on_bad_input():
        find_domain(resolved.domains, key)
        result = finetune.finetune_and_publish(
            profile,
            store,
            key,
            config=config.finetune_config(),
            device=settings.torch_device(),
            log=context.log.info,
            mlflow_tracking_uri=resolved.mlflow_tracking_uri,
            mlflow_artifact_location=resolved.mlflow_artifact_location,
        )
    calibration, metrics, training = result.calibration, result.metrics, result.training
    version = folder_version(out)
    coverage = coverage_metadata("val_coverage", metrics["val_coverage"])
    test_sigma = {
        f"test_sigma_{r['parameter']}_{r['model']}": float(r["sigma"]) for r in result.test_summary
    }
    metadata = {
        "domain": key,
        "model_name": calibration["model_name"],
        "model_version": str(calibration["model_version"]),
        "base_model": f"{calibration['base_model_name']} v{calibration['base_model_version']}",
        "label_set_sha256": result.label_set_sha256,
        "freeze": metrics["freeze"],
        "learning_rate": float(metrics["learning_rate"]),
        "trainable_parameters": float(metrics["trainable_parameters"]),
        "val_loss_before": float(training.val_loss_before),
        "val_loss_after": float(training.val_loss_after),
        "best_epoch": float(training.best_epoch),
        "epochs_run": float(len(training.history)),
        "n_train": float(training.n_train),
        "n_val": float(training.n_val),
        "n_test": float(metrics["n_test"]),
        "recalibrated": result.recalibration is not None,
        # Injected galaxies whose measured label errors the val coverage was deconvolved
        # from (0: coverage against the labels as given).
        "label_errors_rows": float((calibration.get("label_errors") or {}).get("n_rows", 0)),
        **coverage,
        **test_sigma,
        "test_residuals": md_table(result.test_summary),
        "val_coverage": md_table(metrics["val_coverage"]),
        "loss_curve": MetadataValue.md(
            plots.png_markdown(out / finetune.LOSS_CURVE_FILE, max_px=700, title="loss curve")
        ),
        "mlflow_run_id": result.mlflow_run_id or "",
        "path": MetadataValue.path(str(out)),
    }
    base_model = store.trained_model(float(calibration["dropout_rate"]))
    return run.result(
        FINETUNED_MODEL,
        version,
        metadata,
        partition=key,
        upstream=[
            run.upstream(LABELLED_SET, key),
            run.upstream(CALIBRATED_DROPOUT_RATE),
            run.upstream(TRAINED_MODEL, base_model.name),
        ],
        input_paths=[store.labelled_set(key), base_model],
        row_count=training.n_train,
        mlflow_run_id=result.mlflow_run_id,
        model_version=result.model_version,
    )


def check_labelled_set(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``labelled_set_valid`` for partition ``key``, callable without Dagster."""
    from gampen_ml.io import load_npy_mmap

    folder = settings.store().labelled_set(key)
    images = load_npy_mmap(folder / IMAGES_FILE)
    labels = pl.read_parquet(folder / LABELS_FILE)
    manifest = labelled.read_manifest(folder)
    problems: list[str] = []
    if images.ndim != 3 or images.dtype != np.float32 or len(images) != labels.height:
        problems.append(f"images {images.dtype} {images.shape} for {labels.height} label rows")
    elif not np.isfinite(images).all():
        problems.append("images hold NaN/inf pixels")
    values = labels.select(PARAMETERS).to_numpy()
    if not np.isfinite(values).all():
        problems.append("non-finite labels")
    if ((labels["bt"] < 0) | (labels["bt"] > 1)).any() or (values[:, 1:] <= 0).any():
        problems.append("labels outside their ranges")
    counts = {s: int((labels["split"] == s).sum()) for s in ("train", "val", "test")}
    if not (counts["train"] and counts["val"]):
        problems.append(f"fine-tuning needs train and val galaxies, has {counts}")
    if labelled.label_set_sha256(folder) != manifest["label_set_sha256"]:
        problems.append("content differs from the manifest's SHA-256")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "n_galaxies": float(labels.height),
            **{f"n_{s}": float(n) for s, n in counts.items()},
            "problems": "; ".join(problems) or "none",
        },
    )


def check_finetuned_model(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``finetuned_model_valid`` for partition ``key``, callable without Dagster."""
    import json

    from gampen_ml.train import load_trained_model

    folder = settings.store().finetuned_model(key)
    problems: list[str] = []
    try:
        load_trained_model(folder)
    except Exception as exc:  # any failure to load is the finding
        problems.append(f"model does not load: {exc}")
    calibration = json.loads((folder / CALIBRATION_FILE).read_text())
    required = ("model_name", "model_version", "dropout_rate", "recalibration", "base_model_name",
                "base_model_version", "label_set_sha256", "domain", "coverage")  # fmt: skip
    missing = [k for k in required if k not in calibration]
    if missing:
        problems.append(f"calibration.json lacks {missing}")
    if calibration.get("domain") != key:
        problems.append(f"calibration.json is for domain {calibration.get('domain')!r}")
    metrics = json.loads((folder / finetune.METRICS_FILE).read_text())
    if not metrics["val_loss_after"] <= metrics["val_loss_before"]:
        problems.append("validation loss rose (early stopping keeps the best epoch)")
    bad = [r for r in calibration.get("coverage", []) if not 0.0 <= r["coverage"] <= 1.0]
    if bad:
        problems.append(f"{len(bad)} coverage values outside [0, 1]")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "val_loss_before": float(metrics["val_loss_before"]),
            "val_loss_after": float(metrics["val_loss_after"]),
            "problems": "; ".join(problems) or "none",
        },
    )


labelled_set_valid = partition_check(
    check_labelled_set,
    name="labelled_set_valid",
    asset=labelled_set,
    blocking=True,
    description="Images finite and aligned with the labels; labels in range; train and val "
    "galaxies present; content matches the manifest's SHA-256",
)
finetuned_model_valid = partition_check(
    check_finetuned_model,
    name="finetuned_model_valid",
    asset=finetuned_model,
    blocking=True,
    description="Model loads; calibration.json complete and for this domain; validation "
    "loss not above the champion's; coverages in [0, 1]",
)


TRANSFER_ASSETS = [labelled_set, finetuned_model]
TRANSFER_CHECKS = [labelled_set_valid, finetuned_model_valid]

__all__ = [
    "TRANSFER_ASSETS",
    "TRANSFER_CHECKS",
    "FinetuneRunConfig",
    "finetuned_model",
    "labelled_set",
]
