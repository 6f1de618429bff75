"""MLflow logging, registration, champion alias and model resolution in a temporary store."""

import numpy as np
import polars as pl
import pytest
import torch

from gampen_ml.config import NetworkConfig, TrainingConfig, get_profile
from gampen_ml.io import save_npy
from gampen_ml.registry import (
    RegistryError,
    default_artifact_location,
    default_tracking_uri,
    model_version_info,
    registered_model_name,
    resolve_model,
    set_champion,
)
from gampen_ml.train import load_trained_model, train_model

PX = 48


def _write_shard(folder, seed: int, n: int = 20):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    save_npy(folder / "images.npy", rng.normal(size=(n, PX, PX)).astype(np.float32))
    bt = rng.uniform(0, 1, n)
    bt[0] = 0.0
    pl.DataFrame(
        {
            "split": ["train"] * 12 + ["val"] * 8,
            "bt": bt,
            "re_arcsec": rng.uniform(0.5, 3, n),
            "flux_nJy": rng.uniform(1e3, 1e5, n),
        }
    ).write_parquet(folder / "labels.parquet")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store per module (first SQLite initialisation takes seconds)."""
    home = tmp_path_factory.mktemp("dagster_home")
    shards = [_write_shard(home / "shards" / "shard-000", 0)]
    profile = get_profile("tiny").replace(
        network=NetworkConfig(
            width_multiplier=0.0625, fc_width=16, stn_output_px=32, stn_localization_pool=1
        ),
        training=TrainingConfig(optimizer="adamw", learning_rate=1e-3, batch_size=8, epochs=2),
    )
    uri = default_tracking_uri(home)
    results = {
        rate: train_model(
            profile,
            rate,
            shards,
            home / f"model-{rate:g}",
            device="cpu",
            progress=False,
            mlflow_tracking_uri=uri,
            mlflow_artifact_location=default_artifact_location(home),
        )
        for rate in (0.0, 0.05)
    }
    return home, uri, profile, results


def test_runs_are_logged_and_versions_registered(store):
    home, uri, profile, results = store
    from mlflow import MlflowClient

    assert uri == f"sqlite:///{home.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    name = registered_model_name(profile.name)
    assert name == "gampen-tiny"
    assert {r.model_version for r in results.values()} == {"1", "2"}
    run = client.get_run(results[0.05].mlflow_run_id)
    assert run.data.params["dropout_rate"] == "0.05"
    assert run.data.params["training.batch_size"] == "8"
    assert run.data.params["data_version"] == results[0.05].data_version
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(results[0.05].final_val_loss)
    files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {
        "model/state_dict.pt",
        "model/model.json",
        "model/label_scaler.json",
        "model/MLmodel",
    } <= files
    info = model_version_info(uri, name, results[0.05].model_version)
    assert info["tags"]["dropout_rate"] == "0.05" and info["run_id"] == run.info.run_id
    # Artifacts land in the embedded artifact folder, not in ./mlruns.
    assert str(home.resolve() / "mlartifacts") in info["source"]


def test_signature_describes_the_image_input(store):
    _, uri, _, results = store
    from mlflow.models import Model

    path = resolve_model(uri, "gampen-tiny", results[0.0].model_version)
    signature = Model.load(path / "MLmodel").signature
    spec = signature.inputs.to_dict()[0]
    assert list(spec["tensor-spec"]["shape"]) == [-1, 1, PX, PX]
    assert spec["tensor-spec"]["dtype"] == "float32"


def test_champion_alias_and_resolve(store, tmp_path):
    home, uri, _, results = store
    set_champion(uri, "gampen-tiny", results[0.05].model_version)
    local = resolve_model(uri, "gampen-tiny", "champion", dst_dir=tmp_path / "dl")
    model, scaler, meta = load_trained_model(local)
    assert meta["dropout_rate"] == 0.05
    original = torch.load(home / "model-0.05" / "state_dict.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])
    # Moving the alias.
    set_champion(uri, "gampen-tiny", results[0.0].model_version)
    assert (
        model_version_info(uri, "gampen-tiny", "champion")["version"] == results[0.0].model_version
    )


def test_champion_carries_its_recalibration(store, tmp_path):
    """The registry alone resolves the champion with its calibration, the others without."""
    from gampen_ml.calibrate import Recalibration
    from gampen_ml.stages import resolve_prediction_model

    home, uri, profile, results = store
    recal = Recalibration(scale=(1.1, 0.55, 0.43), exponent=(0.9, 1.5, 1.0))
    set_champion(uri, "gampen-tiny", results[0.05].model_version, recalibration=recal.to_dict())
    empty_root = tmp_path / "no-local-storage"
    champion = resolve_prediction_model(profile, empty_root, tracking_uri=uri)
    assert champion.model_version == str(results[0.05].model_version)
    assert champion.recalibration.scale == recal.scale
    assert champion.recalibration.exponent == recal.exponent
    assert champion.dropout_rate == 0.05
    warnings = []
    other = resolve_prediction_model(
        profile, empty_root, str(results[0.0].model_version), tracking_uri=uri,
        log=warnings.append,
    )  # fmt: skip
    assert other.recalibration is None and other.dropout_rate == 0.0
    assert warnings and "not recalibrated" in warnings[0]


def test_clear_errors(store, tmp_path):
    _, uri, _, _ = store
    with pytest.raises(RegistryError, match="no alias 'nope'"):
        resolve_model(uri, "gampen-tiny", "nope")
    with pytest.raises(RegistryError, match="no version 99"):
        resolve_model(uri, "gampen-tiny", 99)
    with pytest.raises(RegistryError, match="does not exist"):
        resolve_model(f"sqlite:///{tmp_path}/missing/dir/mlflow.db", "gampen-tiny")
    with pytest.raises(RegistryError, match="unreachable"):
        resolve_model("http://127.0.0.1:9", "gampen-tiny")
    with pytest.raises(RegistryError, match="tracking URI"):
        set_champion("", "gampen-tiny", 1)
