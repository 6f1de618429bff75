"""labelled_set[domain] and finetuned_model[domain] through Dagster, with MLflow and lineage.

One module-scoped run on the tiny world: a registered, recalibrated champion; a domain of
tiny simulations 1.5 times brighter than labelled (239-px stamps); a labelled folder with a
bad FITS file and a bad row. Both assets and their checks are materialized once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dagster import DagsterInstance, materialize

from gampen_assets.assets.transfer_assets import TRANSFER_ASSETS, TRANSFER_CHECKS
from gampen_assets.partitions import add_declared_domains, domains
from gampen_assets.resources import GampenSettings
from gampen_ml.database import lineage_chain
from gampen_ml.io import partition_dir
from gampen_ml.registry import (
    RECALIBRATION_TAG,
    default_artifact_location,
    default_tracking_uri,
    log_training_run,
    model_version_info,
)
from gampen_ml.train import load_trained_model
from tests.browser_helpers import dagster_webserver, launch_chromium
from tests.gampen_ml.test_finetune import (
    TINY,
    recalibrate_champion,
    write_domain,
    write_labelled_folder,
)
from tests.reliability.conftest import copy_world, tiny_world  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DOMAIN = "tiny-bright"
RUN_CONFIG = {
    "ops": {
        "finetuned_model": {
            "config": {
                "freeze": "none",
                "lr_factor": 1.0,
                "max_epochs": 4,
                "patience": 2,
                "batch_size": 4,
            }  # fmt: skip
        }
    }
}


def register_champion(root, home) -> str:
    """Log the tiny champion to the embedded MLflow store; point calibration.json at it."""
    calib = partition_dir(root, "calibrated_dropout_rate")
    record = json.loads((calib / "calibration.json").read_text())
    model_dir = partition_dir(root, "trained_model", f"dropout-{record['chosen_dropout_rate']:g}")
    net, _, meta = load_trained_model(model_dir)
    x = np.zeros((1, 1, meta["image_px"], meta["image_px"]), dtype=np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).numpy()
    _, version = log_training_run(
        default_tracking_uri(home), model_dir, profile_dict=TINY.to_dict(),
        dropout_rate=record["chosen_dropout_rate"], history=[], data_version="tiny",
        input_example=x, output_example=y, artifact_location=default_artifact_location(home),
    )  # fmt: skip
    (calib / "calibration.json").write_text(json.dumps({**record, "model_version": version}))
    return version


@pytest.fixture(scope="module")
def transfer_run(tiny_world, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("transfer")
    root = copy_world(tiny_world, base / "storage")
    home = base / "home"
    home.mkdir()
    recalibrate_champion(root)
    base_version = register_champion(root, home)
    write_domain(home, DOMAIN, TINY.imaging.stamp_size_px)
    write_labelled_folder(root, home / "labelled" / DOMAIN, table="labels.parquet")
    mp = pytest.MonkeyPatch()
    mp.setenv("DAGSTER_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = GampenSettings(
        profile_name="tiny", storage_root=str(root), dagster_home=str(home), device="cpu"
    )
    # A persistent instance in ``home``, so the UI test can open what this run recorded.
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    instance = DagsterInstance.from_config(str(home))
    assert add_declared_domains(instance, home / "domains") == [DOMAIN]
    assert add_declared_domains(instance, home / "domains") == []  # idempotent
    result = materialize(
        [*TRANSFER_ASSETS, *TRANSFER_CHECKS],
        partition_key=DOMAIN,
        resources={"settings": settings},
        instance=instance,
        run_config=RUN_CONFIG,
        raise_on_error=False,
    )
    yield {
        "result": result,
        "root": root,
        "home": home,
        "settings": settings,
        "instance": instance,
        "base_version": base_version,
    }
    mp.undo()


def _metadata(result, asset):
    events = result.asset_materializations_for_node(asset)
    assert len(events) == 1, asset
    return {k: v.value for k, v in events[0].metadata.items()}


def test_both_assets_materialize_and_their_checks_pass(transfer_run):
    result = transfer_run["result"]
    assert result.success, [
        e.event_specific_data.error.message for e in result.all_events if e.is_step_failure
    ]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"labelled_set_valid": True, "finetuned_model_valid": True}

    labelled = _metadata(result, "labelled_set")
    assert labelled["files_quarantined"] == 1 and labelled["rows_rejected"] == 2
    assert labelled["n_galaxies"] == labelled["n_train"] + labelled["n_val"] + labelled["n_test"]
    assert (
        "bad.fits" in labelled["rejected"] and "bt = 1.7 is outside [0, 1]" in labelled["rejected"]
    )
    moved = transfer_run["home"] / "quarantine" / "labelled" / DOMAIN / "bad.fits"
    assert moved.is_file() and moved.with_name("bad.fits.reason.txt").is_file()

    tuned = _metadata(result, "finetuned_model")
    assert tuned["val_loss_after"] < tuned["val_loss_before"]
    assert tuned["model_name"] == f"gampen-tiny-{DOMAIN}" and tuned["recalibrated"] is True
    assert tuned["label_set_sha256"] == labelled["label_set_sha256"]
    assert tuned["base_model"] == f"gampen-tiny v{transfer_run['base_version']}"
    assert "data:image/png;base64," in tuned["loss_curve"]
    for p in ("bt", "re_arcsec", "flux_nJy"):
        assert 0.0 <= tuned[f"val_coverage_{p}_68"] <= 1.0
        assert tuned[f"test_sigma_{p}_champion"] > 0 and tuned[f"test_sigma_{p}_finetuned"] > 0
    calibration = json.loads(
        (partition_dir(transfer_run["root"], "finetuned_model", DOMAIN) / "calibration.json")
        .read_text()
    )  # fmt: skip
    lo, hi = calibration["training_domain"]["noise_sigma_range_nJy"]
    assert 0 < lo <= hi  # 239-px stamps: the frame is sky, its noise is measured


def test_registered_with_tags_and_champion_alias(transfer_run):
    tuned = _metadata(transfer_run["result"], "finetuned_model")
    uri = default_tracking_uri(transfer_run["home"])
    info = model_version_info(uri, f"gampen-tiny-{DOMAIN}", "champion")
    assert info["version"] == tuned["model_version"] == "1"
    assert "champion" in info["aliases"]
    tags = info["tags"]
    assert tags["gampen.base_model_version"] == transfer_run["base_version"]
    assert tags["gampen.base_model_name"] == "gampen-tiny"
    assert tags["gampen.label_set_sha256"] == tuned["label_set_sha256"]
    assert tags["gampen.domain"] == DOMAIN
    assert json.loads(tags[RECALIBRATION_TAG])["scale"]


def test_lineage_reaches_the_label_set_and_the_base_model(transfer_run):
    db = transfer_run["settings"].settings().database
    chain = lineage_chain(db, "finetuned_model", DOMAIN)
    start = [r for r in chain if r["depth"] == 0]
    assert start and start[0]["model_version"] == "1" and start[0]["mlflow_run_id"]
    upstream = {(r["asset"], r["partition"]) for r in chain if r["depth"] == 1}
    assert {("labelled_set", DOMAIN), ("trained_model", "dropout-0.05"),
            ("calibrated_dropout_rate", "all")} <= upstream  # fmt: skip
    labelled = next(r for r in chain if r["asset"] == "labelled_set")
    assert labelled["status"] == "success"


def test_an_undeclared_domain_fails_at_once_naming_the_declared_ones(transfer_run):
    instance = transfer_run["instance"]
    instance.add_dynamic_partitions(domains.name, ["nowhere"])
    result = materialize(
        [*TRANSFER_ASSETS],
        selection=["labelled_set"],
        partition_key="nowhere",
        resources={"settings": transfer_run["settings"]},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    messages = [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]
    assert any("no domain 'nowhere'" in m and DOMAIN in m for m in messages), messages


@pytest.mark.browser
def test_ui_shows_the_finetuned_partition_with_metrics_and_plot(
    transfer_run, chromium, screenshot_dir, tmp_path
):
    """The Dagster UI's partition page of ``finetuned_model[tiny-bright]``: its metadata
    (model, base model, val coverage, test residuals) and the loss-curve plot."""
    from playwright.sync_api import sync_playwright

    assert transfer_run["result"].success
    env = {"GAMPEN_PROFILE": "tiny", "GAMPEN_STORAGE": str(transfer_run["root"])}
    with (
        dagster_webserver(transfer_run["home"], env, tmp_path / "webserver.log") as url,
        sync_playwright() as pw,
    ):
        browser = launch_chromium(pw, chromium)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(
                f"{url}/assets/finetuned_model?view=partitions&partition={DOMAIN}",
                timeout=120_000,
            )
            page.get_by_text("val_loss_after").first.wait_for(timeout=120_000)
            page.wait_for_timeout(1500)  # images and tables finish rendering
            screenshot = screenshot_dir / "ui-finetuned-model.png"
            page.screenshot(path=str(screenshot), full_page=True)
            body = page.inner_text("body")
            for text in ("model_name", f"gampen-tiny-{DOMAIN}", "base_model", "val_coverage",
                         "test_residuals", "label_set_sha256", "loss_curve"):  # fmt: skip
                assert text in body, f"partition page lacks {text!r}"
            # Markdown metadata opens in a dialog: the loss curve is an inline PNG there.
            row = page.locator("tr", has_text="loss_curve").first
            row.get_by_text("[Show Markdown]").click()
            plot = page.locator('img[src^="data:image/png;base64,"]').first
            plot.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot_dir / "ui-finetuned-loss-curve.png"))
            assert plot.evaluate("img => img.complete && img.naturalWidth") > 100
        finally:
            browser.close()
