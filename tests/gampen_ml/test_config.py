"""Profiles: the paper's numbers, validation of bad settings, seeds."""

import dataclasses

import pytest

from gampen_ml.config import (
    CREDIBLE_LEVELS,
    PROFILES,
    CalibrationConfig,
    ConfigError,
    PriorConfig,
    PSFConfig,
    derive_seed,
    dropout_from_key,
    dropout_key,
    get_profile,
    shard_keys,
)


def test_paper_profile_holds_the_published_numbers():
    p = get_profile("paper")
    assert p.simulation.n_galaxies == 150_000
    assert p.simulation.split_fractions == (0.70, 0.15, 0.15)
    assert p.imaging.stamp_size_px == 239
    assert p.imaging.pixel_scale_arcsec == pytest.approx(0.168)
    assert p.psf.n_psfs == 100 and p.noise.n_sky_objects == 1000
    assert (p.training.learning_rate, p.training.momentum, p.training.batch_size) == (
        5e-7,
        0.99,
        16,
    )
    assert p.training.weight_decay == 1e-4 and p.training.epochs == 40
    assert p.inference.n_passes == 1000
    assert 7e-4 in p.calibration.dropout_rates
    assert min(p.calibration.dropout_rates) == 0.0 and max(p.calibration.dropout_rates) == 0.2
    assert p.network.width_multiplier == 1.0 and p.network.fc_width == 4096
    assert CREDIBLE_LEVELS == (0.6827, 0.9545, 0.9973)


def test_all_profiles_share_the_physics():
    """Same Table-1 ranges and imaging; only the share of log-uniform draws may differ."""
    paper = get_profile("paper")
    assert paper.simulation.priors.loguniform_fraction == 0.0  # the paper's uniform draws
    for profile in PROFILES.values():
        ranges = dataclasses.replace(profile.simulation.priors, loguniform_fraction=0.0)
        assert ranges == paper.simulation.priors
        assert profile.imaging == paper.imaging


def test_a_log_uniform_fraction_outside_0_1_is_rejected():
    priors = dataclasses.replace(PriorConfig(), loguniform_fraction=1.5)
    with pytest.raises(ConfigError, match="loguniform_fraction"):
        get_profile("tiny").replace(
            simulation=dataclasses.replace(get_profile("tiny").simulation, priors=priors)
        )


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("GAMPEN_PROFILE", "tiny")
    assert get_profile().name == "tiny"


def test_unknown_profile_names_the_setting(monkeypatch):
    monkeypatch.setenv("GAMPEN_PROFILE", "fast")
    with pytest.raises(ConfigError, match="GAMPEN_PROFILE"):
        get_profile()
    with pytest.raises(ConfigError, match="'huge'"):
        get_profile("huge")


@pytest.mark.parametrize("rates", [(), (0.1, 1.0), (-0.1,), (0.1, 0.1)])
def test_bad_dropout_grid_is_rejected_before_any_work(rates):
    with pytest.raises(ConfigError, match="dropout_rates"):
        get_profile("tiny").replace(calibration=CalibrationConfig(dropout_rates=rates))


def test_bad_flag_estimate_and_stn_zoom_range_are_rejected():
    from gampen_ml.config import FlagConfig, NetworkConfig

    tiny = get_profile("tiny")
    with pytest.raises(ConfigError, match="bt_estimate"):
        tiny.replace(flags=FlagConfig(bt_estimate="max"))
    for bad in (0.5, 1.2):
        with pytest.raises(ConfigError, match="bt_min_probability"):
            tiny.replace(flags=FlagConfig(bt_estimate="probability", bt_min_probability=bad))
    with pytest.raises(ConfigError, match="stn_zoom_range"):
        tiny.replace(network=NetworkConfig(stn_zoom_range=(0.5, 0.9)))
    with pytest.raises(ConfigError, match="stn_zoom_init"):
        tiny.replace(network=NetworkConfig(stn_zoom_init=1.3))
    assert get_profile("quick").flags.bt_estimate == "probability"
    assert get_profile("paper").flags.bt_estimate == "mode"  # the paper's labels


def test_missing_psf_folder_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="source_dir"):
        get_profile("tiny").replace(psf=PSFConfig(source_dir=str(tmp_path / "nope")))


def test_seeds_are_stable_and_distinct():
    assert derive_seed(1, "simulated_galaxies", "shard-000") == derive_seed(
        1, "simulated_galaxies", "shard-000"
    )
    seeds = {derive_seed(1, a, p) for a in ("x", "y") for p in ("0", "1")}
    assert len(seeds) == 4
    assert 0 <= derive_seed(2, "x") < 2**63


def test_partition_keys_round_trip():
    assert shard_keys(get_profile("quick"))[:2] == ["shard-000", "shard-001"]
    for rate in get_profile("paper").calibration.dropout_rates:
        assert dropout_from_key(dropout_key(rate)) == rate
