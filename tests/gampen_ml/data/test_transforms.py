"""LabelScaler (custom logit with 0/1 snapping, logs, standard scaler) and arsinh images."""

import json

import numpy as np
import pytest
import torch

from gampen_ml.data.transforms import LabelScaler, LabelScalerError, arsinh_image


def _labels(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bt = rng.uniform(0.02, 0.97, n)
    bt[:20] = 0.0  # single-component disks
    bt[20:35] = 1.0  # single-component bulges
    re = rng.uniform(0.1, 5.0, n)
    flux = rng.uniform(1e3, 5e6, n)
    return np.stack([bt, re, flux], axis=1)


def test_limits_are_half_the_extreme_gaps():
    labels = _labels()
    scaler = LabelScaler.fit(labels)
    inside = labels[(labels[:, 0] > 0) & (labels[:, 0] < 1), 0]
    assert scaler.bt_low == pytest.approx(inside.min() / 2)
    assert scaler.bt_high == pytest.approx(1 - (1 - inside.max()) / 2)


def test_transform_is_standardized_logit_and_logs():
    labels = _labels()
    scaler = LabelScaler.fit(labels)
    z = scaler.transform(labels)
    assert z.dtype == np.float32 and z.shape == labels.shape
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-5)
    # Undo the scaler by hand: column 1 is log Re, column 0 the logit with 0 -> bt_low.
    log_re = z[:, 1] * scaler.std[1] + scaler.mean[1]
    np.testing.assert_allclose(log_re, np.log(labels[:, 1]), rtol=1e-5)
    logit_zero = z[0, 0] * scaler.std[0] + scaler.mean[0]
    assert logit_zero == pytest.approx(np.log(scaler.bt_low / (1 - scaler.bt_low)), rel=1e-5)


def test_round_trip_is_exact_and_snaps_to_zero_and_one():
    labels = _labels()
    scaler = LabelScaler.fit(labels)
    back = scaler.inverse(scaler.transform(labels).astype(np.float64))
    assert np.array_equal(back[:20, 0], np.zeros(20))
    assert np.array_equal(back[20:35, 0], np.ones(15))
    np.testing.assert_allclose(back, labels, rtol=2e-6)  # float32 scaled space
    # Predictions beyond the limits snap; just inside they do not.
    z_low = (np.log(scaler.bt_low / (1 - scaler.bt_low)) - scaler.mean[0]) / scaler.std[0]
    pred = np.zeros((4, 3))
    pred[:, 0] = [z_low - 5, z_low - 1e-6, z_low + 1e-3, 40.0]
    bt = scaler.inverse(pred)[:, 0]
    assert bt[0] == 0.0 and bt[1] == 0.0 and 0.0 < bt[2] < 1.0 and bt[3] == 1.0


def test_inverse_accepts_sample_cubes():
    scaler = LabelScaler.fit(_labels())
    samples = np.random.default_rng(1).normal(size=(5, 7, 3))
    out = scaler.inverse(samples)
    assert out.shape == (5, 7, 3)
    np.testing.assert_allclose(out[2, 3], scaler.inverse(samples[2, 3][None])[0])


def test_save_load_and_bad_files(tmp_path):
    scaler = LabelScaler.fit(_labels())
    path = tmp_path / "label_scaler.json"
    scaler.save(path)
    assert LabelScaler.load(path) == scaler
    data = json.loads(path.read_text())
    data["format"] = "something-else"
    path.write_text(json.dumps(data))
    with pytest.raises(LabelScalerError, match="format"):
        LabelScaler.load(path)


def test_fit_rejects_out_of_range_labels():
    labels = _labels()
    labels[3, 1] = -1.0
    with pytest.raises(LabelScalerError, match="re_arcsec"):
        LabelScaler.fit(labels)
    with pytest.raises(LabelScalerError, match="strictly in"):
        LabelScaler.fit(np.array([[0.0, 1.0, 10.0], [1.0, 2.0, 20.0]]))


def test_arsinh_image_numpy_and_torch():
    x = np.array([-1e4, -1.0, 0.0, 0.5, 1e6], dtype=np.float32)
    y = arsinh_image(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.arcsinh(x.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(arsinh_image(torch.from_numpy(x)).numpy(), y, rtol=1e-6)
    np.testing.assert_allclose(arsinh_image(x, softening_nJy=2.0), np.arcsinh(x / 2.0), rtol=1e-6)
