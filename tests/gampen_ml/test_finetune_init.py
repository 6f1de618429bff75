"""``FinetuneConfig(init="random")``: the base's architecture and scaler, fresh weights, trained.

A hand-made base model (the tiny network, deliberately zeroed weights so that "different
from the base" cannot happen by chance) and a tiny labelled set of round Gaussian galaxies
whose flux and size follow their labels; no simulation or pipeline is run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gampen_ml.config import ConfigError, get_profile
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.finetune import FinetuneConfig, finetune_model
from gampen_ml.model import GaMPEN
from gampen_ml.train import MODEL_FORMAT, load_trained_model

TINY = get_profile("tiny")
IMAGE_PX = 239  # the smallest stamp the STN's localisation head takes at the tiny widths
N_TRAIN, N_VAL = 24, 8


def write_base(folder: Path, scaler: LabelScaler) -> None:
    """A loadable ``trained_model`` folder of the tiny network with every weight zero."""
    torch.manual_seed(0)
    model = GaMPEN(TINY.network, 0.0, IMAGE_PX)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "state_dict.pt")
    scaler.save(folder / "label_scaler.json")
    meta = {
        "format": MODEL_FORMAT,
        "profile": TINY.name,
        "dropout_rate": 0.0,
        "image_px": IMAGE_PX,
        "network": {**TINY.network.__dict__},
    }
    (folder / "model.json").write_text(json.dumps(meta))


def write_labelled(folder: Path) -> np.ndarray:
    """``images.npy`` + ``labels.parquet`` of round Gaussians; returns the labels."""
    rng = np.random.default_rng(3)
    n = N_TRAIN + N_VAL
    labels = np.column_stack(
        [rng.uniform(0, 1, n), rng.uniform(0.3, 1.5, n), rng.uniform(1e4, 1e5, n)]
    )
    y, x = np.mgrid[:IMAGE_PX, :IMAGE_PX] - IMAGE_PX // 2
    r2 = (x**2 + y**2)[None]
    sigma_px = labels[:, 1, None, None] / TINY.imaging.pixel_scale_arcsec / 1.18
    images = labels[:, 2, None, None] * np.exp(-r2 / (2 * sigma_px**2)) / (2 * np.pi * sigma_px**2)
    images += rng.normal(0, 5.0, images.shape)
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images.astype(np.float32))
    pl.DataFrame(
        {
            "galaxy_id": np.arange(n),
            "bt": labels[:, 0],
            "re_arcsec": labels[:, 1],
            "flux_nJy": labels[:, 2],
            "split": ["train"] * N_TRAIN + ["val"] * N_VAL,
        }
    ).write_parquet(folder / "labels.parquet")
    return labels


def test_random_init_needs_every_layer_trained_and_a_known_choice():
    with pytest.raises(ConfigError, match="freeze must be 'none'"):
        FinetuneConfig(init="random")
    with pytest.raises(ConfigError, match="init 'scratch' is not one of"):
        FinetuneConfig(init="scratch", freeze="none")
    config = FinetuneConfig(init="random", freeze="none")
    assert config.learning_rate(TINY) == TINY.training.learning_rate
    assert FinetuneConfig(freeze="none").learning_rate(TINY) == pytest.approx(
        0.1 * TINY.training.learning_rate
    )


def test_random_init_starts_from_fresh_weights_and_trains(tmp_path):
    torch.set_num_threads(1)
    labels = write_labelled(tmp_path / "labelled")
    scaler = LabelScaler.fit(labels[:N_TRAIN])
    write_base(tmp_path / "base", scaler)
    config = FinetuneConfig(init="random", freeze="none", max_epochs=4, patience=4, batch_size=8)
    lines: list[str] = []
    result = finetune_model(
        TINY, tmp_path / "base", tmp_path / "labelled", tmp_path / "out", config,
        seed=11, device="cpu", log=lines.append,
    )  # fmt: skip

    base, _, _ = load_trained_model(tmp_path / "base")
    net, out_scaler, meta = load_trained_model(tmp_path / "out")
    # Every weight matrix but the STN's last layer (zero-initialised: identity transform).
    weights = [
        k
        for k, v in base.state_dict().items()
        if v.is_floating_point() and v.ndim > 1 and not k.startswith("stn.regressor.3")
    ]
    assert weights and all(
        torch.count_nonzero(net.state_dict()[k]) > 0.9 * net.state_dict()[k].numel()
        for k in weights
    ), "some weight matrix is still the base's zeros"
    assert out_scaler.to_dict() == scaler.to_dict()
    assert meta["finetune"]["init"] == "random" and meta["image_px"] == IMAGE_PX
    assert "init random" in lines[0]

    history = result.history
    assert len(history) == 4 and result.best_epoch >= 1  # epoch 0 is never the choice
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    # The kept weights are the best *trained* epoch's, even if the random start scored better.
    assert result.val_loss_after == min(h["val_loss"] for h in history), result
