"""Bad configuration fails before any work, naming the setting; unreachable services say
what to set; transient failures are retried, permanent ones are not."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO, TINY, child_env
from dagster import DagsterInstance, RetryPolicy, materialize

import gampen_ml.config as config
from gampen_assets.assets.data_assets import noise_pool, psf_library
from gampen_assets.resources import GampenSettings
from gampen_ml import stages
from gampen_ml.config import CalibrationConfig, ConfigError, NoiseConfig, PSFConfig
from gampen_ml.registry import RegistryError, resolve_model


@pytest.mark.parametrize("rates", [(), (0.0, 1.0), (-0.1,), (0.05, 0.05)])
def test_bad_dropout_grid_names_the_setting(rates):
    with pytest.raises(ConfigError, match=r"calibration\.dropout_rates"):
        TINY.replace(calibration=CalibrationConfig(dropout_rates=rates))


@pytest.mark.parametrize("section", ["psf", "noise"])
def test_missing_psf_or_noise_folder_names_the_setting(section, tmp_path):
    cls = PSFConfig if section == "psf" else NoiseConfig
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.source_dir = .*missing"):
        TINY.replace(**{section: cls(source_dir=str(tmp_path / "missing"))})


@pytest.mark.parametrize("section", ["psf", "noise"])
def test_empty_psf_or_noise_folder_fails_before_writing(section, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    profile = TINY.replace(
        **{section: dataclasses.replace(getattr(TINY, section), source_dir=str(empty))}
    )
    build = stages.build_psf_library if section == "psf" else stages.build_noise_pool
    with pytest.raises(ValueError, match=str(empty)):
        build(profile, tmp_path / "out" / "all")
    assert not (tmp_path / "out").exists()


def _settings(tmp_path, **kw):
    return {"settings": GampenSettings(storage_root=str(tmp_path / "s"),
                                       dagster_home=str(tmp_path), device="cpu", **kw)}  # fmt: skip


def _retries(result):
    return [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_unknown_profile_fails_the_run_without_retry_or_output(tmp_path, monkeypatch):
    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "g.duckdb"))
    # Same retry count, no delay: the test measures whether a retry happens, not its wait.
    monkeypatch.setattr(psf_library.op, "_retry_policy", RetryPolicy(max_retries=3, delay=0))
    result = materialize([psf_library], resources=_settings(tmp_path, profile_name="huge"),
                         instance=DagsterInstance.ephemeral(), raise_on_error=False)  # fmt: skip
    assert not result.success
    assert not (tmp_path / "s").exists()
    assert _retries(result) == []
    assert "unknown profile 'huge'" in result.failure_data_for_node("psf_library").error.message
    assert not (tmp_path / "s").exists() and not (tmp_path / "g.duckdb").exists()


def test_permanent_input_error_is_not_retried(tmp_path, monkeypatch):
    empty = tmp_path / "sky"
    empty.mkdir()
    bad = TINY.replace(noise=dataclasses.replace(TINY.noise, source_dir=str(empty)))
    monkeypatch.setitem(
        config.PROFILES, "tiny-badsky", dataclasses.replace(bad, name="tiny-badsky")
    )
    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "g.duckdb"))
    result = materialize([noise_pool], resources=_settings(tmp_path, profile_name="tiny-badsky"),
                         instance=DagsterInstance.ephemeral(), raise_on_error=False)  # fmt: skip
    assert not result.success
    assert str(empty) in result.failure_data_for_node("noise_pool").error.message
    assert _retries(result) == []
    assert not (tmp_path / "s" / "noise_pool").exists()


@pytest.mark.slow
def test_transient_error_is_retried_then_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "g.duckdb"))
    real = stages.build_psf_library
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk briefly unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "build_psf_library", flaky)
    result = materialize([psf_library], resources=_settings(tmp_path, profile_name="tiny"),
                         instance=DagsterInstance.ephemeral())  # fmt: skip
    assert result.success and len(calls) == 2 and len(_retries(result)) == 1
    assert (tmp_path / "s" / "psf_library" / "all" / "psfs.fits").is_file()


def test_unreachable_tracking_server_says_what_to_set(tmp_path):
    with pytest.raises(RegistryError, match=r"(?s)127\.0\.0\.1:9 is unreachable.*tracking URI"):
        resolve_model("http://127.0.0.1:9", "gampen-tiny")
    out = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "predict", str(tmp_path), "--out",
         str(tmp_path / "c.parquet"), "--profile", "tiny", "--tracking-uri", "http://127.0.0.1:9"],
        cwd=REPO, env=child_env(DAGSTER_HOME=str(tmp_path)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unreachable" in out.stderr and "tracking URI" in out.stderr
    assert not (tmp_path / "c.parquet").exists()


def test_registry_without_the_model_says_what_to_do(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RegistryError, match=r"has no alias 'champion'.*calibration"):
        resolve_model(uri, "gampen-tiny", "champion")
    with pytest.raises(RegistryError, match=r"folder .*nowhere does not exist"):
        resolve_model(f"sqlite:///{tmp_path / 'nowhere' / 'm.db'}", "gampen-tiny")


def test_catalog_of_a_missing_batch_fails_without_retry(world, tmp_path, monkeypatch):
    from gampen_assets.assets.prediction_assets import posterior_catalog
    from gampen_assets.partitions import datasets

    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "g.duckdb"))
    monkeypatch.setattr(posterior_catalog.op, "_retry_policy", RetryPolicy(max_retries=3, delay=0))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(datasets.name, ["gone"])
    resources = {"settings": GampenSettings(storage_root=str(world), dagster_home=str(tmp_path),
                                            profile_name="tiny", device="cpu")}  # fmt: skip
    result = materialize([posterior_catalog], partition_key="gone", resources=resources,
                         instance=instance, raise_on_error=False)  # fmt: skip
    assert not result.success
    message = result.failure_data_for_node("posterior_catalog").error.message
    assert "inbox_batches/gone: no such file or folder" in message
    assert _retries(result) == []
    assert not (world / "posterior_catalog" / "gone").exists()
