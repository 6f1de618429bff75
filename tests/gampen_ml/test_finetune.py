"""Transfer learning on the tiny profile: labelled set -> fine-tune -> recalibrate -> catalog.

The target domain is the tiny simulations with every image 1.5 times brighter than its
label says (a flux-calibration mismatch the champion never saw) and cropped to 224 px (a
stamp size other than the model's): the champion is measurably wrong there and the
fine-tuned model must do better on the domain's validation split.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from astropy.io import fits

from gampen_ml import stages
from gampen_ml.calibrate import Recalibration
from gampen_ml.config import NetworkConfig, get_profile
from gampen_ml.data.datasets import ShardImages
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.domains import Domain
from gampen_ml.finetune import (
    FinetuneConfig,
    calibrate_on_split,
    finetune_and_publish,
    fit_to_model,
    freeze_layers,
    labelled_split,
    set_finetune_mode,
    trainable_parameters,
)
from gampen_ml.fits_input import fit_to_stamp
from gampen_ml.io import file_sha256, partition_dir
from gampen_ml.labelled import (
    LABEL_ERRORS_FILE,
    MIN_LABEL_ERROR_ROWS,
    LabelledSetError,
    hash_split,
    label_set_sha256,
    load_labelled_set,
    publish_labelled_set,
)
from gampen_ml.model import GaMPEN, gaussian_nll
from gampen_ml.train import load_trained_model
from tests.reliability.conftest import copy_world, tiny_world  # noqa: F401

TINY = get_profile("tiny")
FLUX_FACTOR = 1.5
#: The champion's recalibration (hand-written): the fine-tuned model must refit its own.
CHAMPION_RECAL = Recalibration(scale=(1.3, 1.1, 1.2), exponent=(1.0, 1.0, 1.0))


def write_labelled_folder(
    root: Path, folder: Path, *, table: str = "labels.csv", bad_file: bool = True,
    bad_row: bool = True,
) -> pl.DataFrame:  # fmt: skip
    """A labelled folder made of every tiny simulation, ``FLUX_FACTOR`` times brighter.

    ``g<NNN>.fits`` hold one galaxy each; the last two galaxies share ``cube.fits``
    (planes 0 and 1, labelled with ``hdu``); ``extra.fits`` is a good cutout without a row.
    With ``bad_file``, ``bad.fits`` is not FITS (and has a row); with ``bad_row``, the row of
    ``g003.fits`` says B/T = 1.7. Even rows give the simulation's split, odd rows none (hash).
    Returns the table as written.
    """
    data = ShardImages(stages.shard_dirs(TINY, root), None)
    images = data.images(np.arange(len(data))) * np.float32(FLUX_FACTOR)
    labels = data.labels
    folder.mkdir(parents=True)
    header = fits.Header({"PIXSCALE": TINY.imaging.pixel_scale_arcsec})
    n = len(data)
    rows = []
    for i in range(n):
        file, hdu = (f"g{i:03d}.fits", None) if i < n - 2 else ("cube.fits", i - (n - 2))
        if hdu is None:
            fits.PrimaryHDU(images[i], header=header).writeto(folder / file)
        rows.append(
            {
                "file": file,
                "hdu": hdu,
                "bt": labels["bt"][i],
                "re_arcsec": labels["re_arcsec"][i],
                "flux_nJy": labels["flux_nJy"][i],
                "bt_sigma": 0.05,
                "split": labels["split"][i] if i % 2 == 0 else None,
            }
        )
    fits.PrimaryHDU(images[n - 2 :], header=header).writeto(folder / "cube.fits")
    fits.PrimaryHDU(images[0], header=header).writeto(folder / "extra.fits")
    if bad_row:
        rows[3]["bt"] = 1.7
    if bad_file:
        (folder / "bad.fits").write_bytes(b"this is not a FITS file\n" * 10)
        rows.append({**rows[5], "file": "bad.fits", "hdu": None})
    out = pl.DataFrame(rows, schema_overrides={"hdu": pl.Int64, "split": pl.String})
    if table.endswith(".csv"):
        out.write_csv(folder / table)
    else:
        out.write_parquet(folder / table)
    return out


def write_domain(home: Path, name: str, stamp_size_px: int) -> Domain:
    """Declare a domain at the tiny profile's pixel scale in ``<home>/domains/``."""
    (home / "domains").mkdir(parents=True, exist_ok=True)
    (home / "domains" / f"{name}.toml").write_text(
        f'name = "{name}"\npixel_scale_arcsec = {TINY.imaging.pixel_scale_arcsec}\n'
        f"stamp_size_px = {stamp_size_px}\n"
    )
    from gampen_ml.domains import find_domain

    return find_domain(home / "domains", name)


def recalibrate_champion(root: Path) -> None:
    """Give the tiny world's champion a recalibration (so the fine-tune must refit one)."""
    calib = partition_dir(root, "calibrated_dropout_rate")
    (calib / "recalibration.json").write_text(json.dumps(CHAMPION_RECAL.to_dict()))
    record = json.loads((calib / "calibration.json").read_text())
    (calib / "calibration.json").write_text(json.dumps({**record, "recalibrated": True}))


@pytest.fixture(scope="module")
def domain_world(tiny_world, tmp_path_factory):  # noqa: F811
    """Storage root with a recalibrated champion, a 224-px domain and its labelled folder."""
    base = tmp_path_factory.mktemp("finetune")
    root = copy_world(tiny_world, base / "storage")
    recalibrate_champion(root)
    home = base / "home"
    domain = write_domain(home, "tiny-bright", 224)
    table = write_labelled_folder(root, home / "labelled" / domain.name)
    return root, home, domain, table


@pytest.fixture(scope="module")
def published_set(domain_world):
    root, home, domain, _ = domain_world
    result = publish_labelled_set(
        TINY,
        domain,
        home / "labelled" / domain.name,
        partition_dir(root, "labelled_set", domain.name),
        home / "quarantine" / "labelled",
    )
    return result


def test_labelled_set_keeps_good_rows_quarantines_bad_files_names_bad_rows(
    domain_world, published_set
):
    root, home, domain, table = domain_world
    manifest = published_set.manifest
    n_sims = len(ShardImages(stages.shard_dirs(TINY, root), None))
    # Every simulation but the bad row's galaxy; bad.fits quarantined with its reason.
    assert published_set.n_galaxies == n_sims - 1
    assert list(manifest["files_quarantined"]) == ["bad.fits"]
    moved = home / "quarantine" / "labelled" / domain.name / "bad.fits"
    assert moved.is_file() and not (home / "labelled" / domain.name / "bad.fits").exists()
    assert "not a readable FITS file" in moved.with_name("bad.fits.reason.txt").read_text()
    reasons = {r["row"]: r["reason"] for r in manifest["rows_rejected"]}
    assert "labels.csv row 4: bt = 1.7 is outside [0, 1]" in reasons[4]
    assert "bad.fits was rejected" in reasons[len(table)]
    assert manifest["unlabelled_files"] == ["extra.fits"]

    stored = partition_dir(root, "labelled_set", domain.name)
    images = np.load(stored / "images.npy")
    labels = pl.read_parquet(stored / "labels.parquet")
    assert images.shape == (n_sims - 1, 224, 224) and images.dtype == np.float32
    # Pixels: the simulation times the flux factor, centre-cropped to the domain's stamp.
    sims = ShardImages(stages.shard_dirs(TINY, root), None)
    g5 = labels.filter(pl.col("file") == "g005.fits")
    expected = fit_to_stamp(sims.images(np.array([5])) * np.float32(FLUX_FACTOR), 224)[0]
    np.testing.assert_array_equal(images[g5["galaxy_id"][0]], expected)
    assert g5["flux_nJy"][0] == sims.labels["flux_nJy"][5]  # labels are not scaled
    cube = labels.filter(pl.col("file") == "cube.fits").sort("hdu")
    assert cube["hdu"].to_list() == [0, 1]
    np.testing.assert_array_equal(
        images[cube["galaxy_id"][1]],
        fit_to_stamp(sims.images(np.array([n_sims - 1])) * np.float32(FLUX_FACTOR), 224)[0],
    )
    # Splits: as given where the table has one, else from the hash of the file name.
    hashed = labels.filter(pl.col("split_source") == "hash")
    assert hashed.height > 0 and labels.filter(pl.col("split_source") == "table").height > 0
    assert hashed["split"].to_list() == [hash_split(f) for f in hashed["file"]]
    assert sum(manifest["splits"].values()) == labels.height
    assert (
        manifest["label_set_sha256"] == label_set_sha256(stored) == published_set.label_set_sha256
    )


def test_hash_split_is_stable_and_about_70_15_15():
    splits = [hash_split(f"survey/g{i:05d}.fits") for i in range(6000)]
    assert splits == [hash_split(f"survey/g{i:05d}.fits") for i in range(6000)]
    fractions = [splits.count(s) / len(splits) for s in ("train", "val", "test")]
    np.testing.assert_allclose(fractions, [0.70, 0.15, 0.15], atol=0.02)


def test_labels_table_errors_name_the_file_and_problem(tmp_path):
    domain = Domain(name="small", pixel_scale_arcsec=0.168, stamp_size_px=32)
    folder = tmp_path / "small"
    folder.mkdir()
    with pytest.raises(LabelledSetError, match="no labels table"):
        load_labelled_set(folder, domain, TINY)
    pl.DataFrame({"file": ["a.fits"], "bt": [0.5], "flux_nJy": [1e4]}).write_csv(
        folder / "labels.csv"
    )
    with pytest.raises(LabelledSetError, match=r"labels.csv: missing column\(s\) \['re_arcsec'\]"):
        load_labelled_set(folder, domain, TINY)
    (folder / "labels.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(LabelledSetError, match="both labels.parquet and labels.csv"):
        load_labelled_set(folder, domain, TINY)
    (folder / "labels.csv").unlink()
    with pytest.raises(LabelledSetError, match="labels.parquet: cannot read the labels table"):
        load_labelled_set(folder, domain, TINY)


def test_bad_rows_are_left_out_with_every_reason(tmp_path):
    domain = Domain(name="small", pixel_scale_arcsec=0.168, stamp_size_px=32, flux_unit="nanomaggy")
    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.fits", "b.fits"):
        fits.PrimaryHDU(rng.normal(1.0, 0.1, (32, 32)).astype(np.float32)).writeto(folder / name)
    (folder / "labels.csv").write_text(
        "file,hdu,bt,re_arcsec,flux_nJy,re_sigma,split\n"
        "a.fits,,0.5,1.0,1e4,0.1,train\n"
        "b.fits,2,0.5,1.0,1e4,,val\n"  # a 2-D file has no hdu 2
        "c.fits,,0.5,1.0,1e4,,\n"  # unknown file
        "a.fits,,0.2,-1,inf,0,foo\n"  # bad values, and a duplicate of row 1
    )
    data = load_labelled_set(folder, domain, TINY)
    reasons = {r.row: r.reason for r in data.row_rejections}
    assert set(reasons) == {1, 2, 3, 4}
    assert "labels.csv row 2: file b.fits has no cutout at hdu 2 (has hdu [0])" in reasons[2]
    assert "unknown file 'c.fits'" in reasons[3]
    for text in ("re_arcsec = -1 is not positive", "flux_nJy = inf is not finite",
                 "re_sigma = 0 is not positive", "split 'foo' is not one of",
                 "duplicate of row(s) 1"):  # fmt: skip
        assert text in reasons[4]
    assert "duplicate of row(s) 4" in reasons[1]
    # Both files are named by rows (rejected ones): not "unlabelled".
    assert data.labels.height == 0 and data.unlabelled_files == []
    # Nanomaggies become nJy (1 nmgy = 3631 nJy) on read.
    np.testing.assert_allclose(data.batch.images.mean(), 3631.0, rtol=0.01)


def test_frozen_convolutions_keep_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    cfg = NetworkConfig(width_multiplier=0.0625, fc_width=16, stn_output_px=32, batch_norm=True)
    model = GaMPEN(cfg, 0.1, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze_layers(model, "convolutions")
    assert trainable_parameters(model) == sum(p.numel() for p in model.classifier.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    set_finetune_mode(model, frozen)
    for _ in range(2):
        loss = gaussian_nll(model(torch.randn(4, 1, 64, 64)), torch.randn(4, 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.startswith("classifier.") and key.endswith("weight"):
            assert not same, key
        elif not key.startswith("classifier."):
            assert same, key  # convolutions, STN and the BN running statistics
    assert any(m.training for m in model.classifier.modules())


def test_finetune_beats_the_champion_and_publishes_a_calibrated_model(domain_world, published_set):
    root, home, domain, _ = domain_world
    config = FinetuneConfig(freeze="none", lr_factor=1.0, max_epochs=4, patience=2, batch_size=4)
    result = finetune_and_publish(TINY, root, domain.name, config=config, device="cpu")
    training = result.training
    assert training.val_loss_after < training.val_loss_before - 0.05, training
    assert 1 <= training.best_epoch <= len(training.history) <= 4

    folder = partition_dir(root, "finetuned_model", domain.name)
    champion = stages.champion_model(TINY, root)
    net, scaler, meta = load_trained_model(folder)
    _, base_scaler, base_meta = load_trained_model(champion.model_dir)
    assert meta["image_px"] == base_meta["image_px"] == 239  # 224-px stamps padded to it
    assert scaler.to_dict() == base_scaler.to_dict()
    assert isinstance(scaler, LabelScaler) and meta["domain"] == domain.name

    calibration = json.loads((folder / "calibration.json").read_text())
    for key in ("model_name", "model_version", "dropout_rate", "recalibration",
                "base_model_name", "base_model_version", "label_set_sha256", "domain",
                "coverage"):  # fmt: skip
        assert key in calibration
    assert calibration["model_name"] == "gampen-tiny-tiny-bright"
    assert calibration["model_version"] == "unregistered"  # no MLflow here
    assert calibration["label_set_sha256"] == published_set.label_set_sha256
    # Refit on the domain's val split with the champion's method, not copied from it.
    recal = Recalibration.from_dict(calibration["recalibration"])
    assert recal.scale != CHAMPION_RECAL.scale and recal.shift_knots != ((), (), ())
    levels = {(r["parameter"], r["level"], r["recalibrated"]) for r in calibration["coverage"]}
    assert len(levels) == 18 and all(0 <= r["coverage"] <= 1 for r in calibration["coverage"])
    # The sky noise is measured on the frame of the images as the model sees them: zero
    # padding here, so no noise range (the 239-px domain of the asset test has one).
    assert calibration["training_domain"]["noise_sigma_range_nJy"] is None
    assert calibration["training_domain"]["psf_fwhm_range_arcsec"] is None
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {r["model"] for r in metrics["test"]} == {"champion", "finetuned"}
    # No label-error table in this set: coverage against the labels as given.
    assert calibration["label_errors"] is None and metrics["label_errors"] is None
    assert (folder / "loss_curve.png").stat().st_size > 1000

    # The test split through the one prediction path, with the published model.
    model = stages.finetuned_model(TINY, root, domain.name)
    assert model.recalibration == recal and model.model_name == calibration["model_name"]
    images, meta_rows, truths = labelled_split(
        partition_dir(root, "labelled_set", domain.name), "test", meta["image_px"]
    )
    catalog = stages.predict_catalog(
        TINY, model, images, meta_rows, dataset=f"{domain.name}-test", seed=1, truths=truths
    )
    assert catalog.height == len(images) == metrics["n_test"] > 0
    assert catalog["model_name"].unique().to_list() == ["gampen-tiny-tiny-bright"]
    assert catalog["recalibrated"].all() and catalog["source_file"].str.ends_with(".fits").all()
    np.testing.assert_array_equal(catalog["bt_true"].to_numpy(), truths["bt"].to_numpy())


def test_fit_to_model_pads_small_stamps_and_keeps_right_sized_ones():
    small = np.ones((2, 96, 96), dtype=np.float32)
    padded = fit_to_model(small, 239)
    assert padded.shape == (2, 239, 239) and padded.sum() == small.sum()
    same = np.zeros((1, 239, 239), dtype=np.float32)
    assert fit_to_model(same, 239) is same


def write_label_errors(folder: Path, n: int = MIN_LABEL_ERROR_ROWS) -> pl.DataFrame:
    """A label-error table of ``n`` injected galaxies in ``folder`` (large, seeded errors)."""
    rng = np.random.default_rng(0)
    table = pl.DataFrame(
        {
            "file": [f"injected/g{i:03d}.fits" for i in range(n)],
            "bt_error": rng.normal(0.0, 0.1, n),
            "re_rel_error": np.clip(rng.normal(0.0, 0.3, n), -0.6, None),
            "flux_rel_error": np.clip(rng.normal(0.0, 0.3, n), -0.6, None),
            "bt_true": rng.uniform(0.0, 1.0, n),
            "re_arcsec_true": rng.uniform(0.3, 3.0, n),
            "flux_nJy_true": 10 ** rng.uniform(3.0, 5.0, n),
        }
    )
    table.write_parquet(folder / LABEL_ERRORS_FILE)
    return table


def test_label_error_table_is_stored_with_the_set_and_pinned_by_its_hash(domain_world, tmp_path):
    root, _, domain, _ = domain_world
    source = tmp_path / "labelled"
    write_labelled_folder(root, source, bad_file=False, bad_row=False)
    write_label_errors(source)
    out = tmp_path / "set"
    result = publish_labelled_set(TINY, domain, source, out, tmp_path / "quarantine")
    stored = out / LABEL_ERRORS_FILE
    assert stored.read_bytes() == (source / LABEL_ERRORS_FILE).read_bytes()
    assert result.manifest["label_errors"] == {
        "file": LABEL_ERRORS_FILE,
        "n_rows": MIN_LABEL_ERROR_ROWS,
        "sha256": file_sha256(stored),
    }
    assert "_label_errors.parquet" not in result.manifest["files_accepted"]  # not a cutout
    with_table = label_set_sha256(out)
    stored.unlink()
    # Without the table the hash is the one a set has always had; with it, another.
    text = f"labels.parquet:{file_sha256(out / 'labels.parquet')}\n"
    text += f"images.npy:{file_sha256(out / 'images.npy')}"
    assert label_set_sha256(out) == hashlib.sha256(text.encode()).hexdigest() != with_table
    # A bad table fails the run, naming it, before anything is stored.
    pl.DataFrame({"bt_error": [0.0]}).write_parquet(source / LABEL_ERRORS_FILE)
    with pytest.raises(LabelledSetError, match=r"_label_errors.parquet: missing column\(s\)"):
        publish_labelled_set(TINY, domain, source, tmp_path / "set2", tmp_path / "quarantine")
    assert not (tmp_path / "set2").exists()


def test_calibrate_on_split_deconvolves_a_sets_label_errors(domain_world, published_set, tmp_path):
    root, _, domain, _ = domain_world
    stored = partition_dir(root, "labelled_set", domain.name)
    noisy = tmp_path / "noisy"
    shutil.copytree(stored, noisy)
    write_label_errors(noisy)
    model_dir = stages.champion_model(TINY, root).model_dir
    kwargs = {"split": "val", "dataset": "tiny-val", "seed": 5, "recalibrate": True}
    plain, plain_coverage = calibrate_on_split(TINY, model_dir, stored, device="cpu", **kwargs)
    deconvolved, coverage = calibrate_on_split(TINY, model_dir, noisy, device="cpu", **kwargs)
    # Same model, samples and labels: only the label errors differ, and they change the fit
    # and the measured coverage, raw included; the error draws are seeded.
    assert deconvolved != plain
    raw = coverage.filter(~pl.col("recalibrated"))["coverage"].to_numpy()
    plain_raw = plain_coverage.filter(~pl.col("recalibrated"))["coverage"].to_numpy()
    assert not np.array_equal(raw, plain_raw)
    assert coverage.height == plain_coverage.height == 18
    again, again_coverage = calibrate_on_split(TINY, model_dir, noisy, device="cpu", **kwargs)
    assert again == deconvolved and again_coverage.equals(coverage)
