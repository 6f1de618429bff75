"""Training loop: checkpoints, exact resume after a kill, saved files, reload."""

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from gampen_ml.config import NetworkConfig, TrainingConfig, get_profile
from gampen_ml.io import save_npy
from gampen_ml.train import TrainingError, load_trained_model, train_model

PX = 48


def write_fake_shards(root, n_shards: int = 2, n: int = 24):
    """Shard folders (images.npy + labels.parquet) of blobs whose size and flux follow the labels."""
    dirs = []
    r2 = (np.arange(PX) - (PX - 1) / 2) ** 2
    r2 = r2[:, None] + r2[None, :]
    for s in range(n_shards):
        rng = np.random.default_rng(s)
        bt = rng.uniform(0, 1, n)
        bt[:3] = 0.0
        re = rng.uniform(0.5, 3.0, n)
        flux = rng.uniform(1e3, 1e5, n)
        sigma_px = re[:, None, None] / 0.168 / 1.18
        images = flux[:, None, None] * np.exp(-r2 / (2 * sigma_px**2)) / (2 * np.pi * sigma_px**2)
        images = (images + rng.normal(0, 2.3, images.shape)).astype(np.float32)
        folder = root / f"shard-{s:03d}"
        folder.mkdir(parents=True)
        save_npy(folder / "images.npy", images)
        split = np.array(["train"] * 16 + ["val"] * 4 + ["test"] * 4)[:n]
        pl.DataFrame(
            {"galaxy_id": s * 1000 + np.arange(n), "split": split, "bt": bt,
             "re_arcsec": re, "flux_nJy": flux}
        ).write_parquet(folder / "labels.parquet")  # fmt: skip
        dirs.append(folder)
    return dirs


def small_profile(epochs: int = 2, schedule: str = "onecycle"):
    return get_profile("tiny").replace(
        network=NetworkConfig(
            width_multiplier=0.0625, fc_width=16, stn_output_px=32, stn_localization_pool=1
        ),
        training=TrainingConfig(
            optimizer="adamw", learning_rate=1e-3, batch_size=8, epochs=epochs,
            lr_schedule=schedule, augment=True,
        ),
    )  # fmt: skip


class _Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    shards = write_fake_shards(tmp_path / "shards")
    profile = small_profile(epochs=2)

    full = train_model(profile, 0.1, shards, tmp_path / "full", device="cpu", progress=False)
    assert [h["epoch"] for h in full.history] == [1, 2]

    def kill_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise _Killed  # the checkpoint of epoch 1 is already on disk

    with pytest.raises(_Killed):
        train_model(profile, 0.1, shards, tmp_path / "resumed", device="cpu", progress=False,
                    log=kill_after_first_epoch)  # fmt: skip
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "state_dict.pt").exists()
    lines = []
    resumed = train_model(profile, 0.1, shards, tmp_path / "resumed", device="cpu",
                          progress=False, log=lines.append)  # fmt: skip
    assert lines[0].startswith("resumed from") and len(resumed.history) == 2
    a = torch.load(tmp_path / "full" / "state_dict.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "state_dict.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.final_val_loss == full.final_val_loss
    # A different dropout rate must not pick up this checkpoint.
    with pytest.raises(TrainingError, match="dropout_rate"):
        train_model(profile, 0.2, shards, tmp_path / "resumed", device="cpu", progress=False)


def test_saved_files_and_reload(tmp_path):
    shards = write_fake_shards(tmp_path / "shards")
    profile = small_profile(epochs=1, schedule="constant")
    result = train_model(profile, 0.05, shards, tmp_path / "model", device="cpu", progress=False)
    h = result.history[0]
    assert set(h) >= {"train_loss", "val_loss", "lr", "seconds", "images_per_s"}
    assert np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"])
    assert h["lr"] == pytest.approx(1e-3) and h["images_per_s"] > 0
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["dropout_rate"] == 0.05 and meta["image_px"] == PX and meta["n_train"] == 32
    assert meta["data_version"] == result.data_version and len(result.data_version) == 16
    assert json.loads((tmp_path / "model" / "history.json").read_text()) == result.history

    model, scaler, meta2 = load_trained_model(tmp_path / "model")
    assert meta2 == meta and not model.training
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 14
    # The reloaded model reproduces the reported validation loss: the NLL of one MC-dropout
    # pass (batch norm eval, dropout on, masks from the fixed validation seed), not of the
    # network with dropout off.
    from gampen_ml.data.datasets import ShardImages, iterate_batches
    from gampen_ml.infer import set_mc_dropout_mode
    from gampen_ml.model import gaussian_nll
    from gampen_ml.train import VALIDATION_DROPOUT_SEED, evaluate_loss

    val = ShardImages(shards, "val")
    reported = evaluate_loss(model, val, scaler, 8, torch.device("cpu"))
    assert reported == pytest.approx(result.final_val_loss, rel=1e-5)
    (x, y), *rest = iterate_batches(val, scaler, 8, order=np.arange(len(val)))
    assert not rest
    x = x.contiguous(memory_format=torch.channels_last)
    for m in model.modules():  # a rate at which a pass visibly differs from dropout off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    reported = evaluate_loss(model, val, scaler, 8, torch.device("cpu"))
    with torch.no_grad():
        set_mc_dropout_mode(model)
        torch.manual_seed(VALIDATION_DROPOUT_SEED)
        mc_pass = float(gaussian_nll(model(x), y))
        model.eval()
        dropout_off = float(gaussian_nll(model(x), y))
    assert reported == pytest.approx(mc_pass, rel=1e-6)
    assert abs(reported - dropout_off) > 1e-3
    assert evaluate_loss(model, val, scaler, 8, torch.device("cpu")) == reported  # same masks
    # The scaler was fitted on the training split only.
    train_bt = ShardImages(shards, "train").physical_labels()[:, 0]
    assert scaler.bt_low == pytest.approx(train_bt[train_bt > 0].min() / 2)
    assert model.stn.zoom_range == tuple(profile.network.stn_zoom_range)

    # A model saved before the zoom was bounded (no stn_zoom_range in model.json) loads with
    # the unbounded zoom its weights were fit with.
    legacy = dict(meta)
    legacy["network"] = {k: v for k, v in meta["network"].items() if k != "stn_zoom_range"}
    (tmp_path / "model" / "model.json").write_text(json.dumps(legacy))
    with torch.no_grad():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["stn.regressor.3.weight"].zero_()  # s = the bias, whatever the image
        state["stn.regressor.3.bias"].fill_(0.7)
    torch.save(state, tmp_path / "model" / "state_dict.pt")
    old_model, _, _ = load_trained_model(tmp_path / "model")
    assert old_model.stn.zoom_range is None
    images = torch.randn(2, 1, PX, PX)
    torch.testing.assert_close(old_model.stn(images)[1], torch.full((2,), 0.7))


def test_training_reduces_the_loss(tmp_path):
    shards = write_fake_shards(tmp_path / "shards", n_shards=2)
    profile = small_profile(epochs=25, schedule="constant")
    # Gradient clipping, as every real profile trains: without it this 32-image problem can
    # sit at the prior for all 25 epochs on some CPUs (the run depends on the float kernels).
    profile = profile.replace(training=dataclasses.replace(profile.training, grad_clip_norm=1.0))
    result = train_model(profile, 0.0, shards, tmp_path / "m", device="cpu", progress=False)
    losses = [h["train_loss"] for h in result.history]
    # Batches of 8 make the per-epoch NLL spiky: judge the best of the last five epochs.
    assert min(losses[-5:]) < losses[0] - 0.2, losses
