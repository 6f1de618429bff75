"""Typed, frozen configuration profiles: every number of the paper lives here once.

The profiles share the same physics and priors (Ghosh et al. 2022, Table 1):

``paper``
    The published setup: 150,000 galaxies of 239x239 px at 0.168"/px (HSC g band),
    100 PSFs, 1000 sky objects, the VGG-16 of Table 3, SGD with the paper's
    hyper-parameters, 1000 Monte-Carlo dropout passes, dropout grid 0 ... 0.2.
``quick``
    A CPU-laptop profile: a few thousand galaxies and a narrower network so the
    whole pipeline finishes in about 15 minutes on 2 cores.
``paper-short``
    The ``paper`` images and network for a minutes-long run on one GPU
    (``benchmarks/paper_short_gpu.sh``).
``tiny``
    For tests: tens of galaxies, one short epoch, a handful of passes.

A profile is picked by name (``get_profile("quick")``), by the environment variable
``GAMPEN_PROFILE``, or by Dagster run config (see ``gampen_assets.resources``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_ENV_VAR = "GAMPEN_PROFILE"
DEFAULT_PROFILE = "quick"

#: Credible levels at which coverage is reported (paper §5: 1, 2 and 3 sigma).
CREDIBLE_LEVELS: tuple[float, float, float] = (0.6827, 0.9545, 0.9973)
#: The three predicted parameters, in the network's output order.
PARAMETERS: tuple[str, str, str] = ("bt", "re_arcsec", "flux_nJy")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


@dataclass(frozen=True)
class ImagingConfig:
    """Survey imaging the simulations mimic (HSC-Wide g band, paper §2)."""

    band: str = "g"
    pixel_scale_arcsec: float = 0.168
    stamp_size_px: int = 239


@dataclass(frozen=True)
class PriorConfig:
    """Simulation parameter ranges (paper Table 1 and §2); all uniform.

    Half-light radius limits are given both in arcsec and in kpc; the kpc limits are
    converted to arcsec at ``redshift`` with astropy's Planck18 cosmology and the
    tighter of the two bounds is used (see ``gampen_ml.sim.parameters``).
    """

    bulge_disk_fraction: float = 0.75
    disk_sersic_n: tuple[float, float] = (0.8, 1.2)
    bulge_sersic_n: tuple[float, float] = (3.5, 5.0)
    re_arcsec: tuple[float, float] = (0.1, 5.0)
    bulge_re_arcsec: tuple[float, float] = (0.1, 3.0)
    re_kpc: tuple[float, float] = (0.25, 11.5)
    bulge_re_kpc: tuple[float, float] = (0.25, 7.0)
    redshift: float = 0.125
    flux_nJy: tuple[float, float] = (1.0e3, 5.0e6)
    bt: tuple[float, float] = (0.0, 1.0)
    axis_ratio: tuple[float, float] = (0.25, 1.0)
    position_angle_deg: tuple[float, float] = (-90.0, 90.0)
    bulge_position_angle_offset_deg: float = 15.0
    #: Fraction of galaxies whose radii (disk or single component, bulge) and total flux are
    #: drawn log-uniformly over the same ranges instead of uniformly. Uniform flux puts 2 %
    #: of the galaxies fainter than 19 mag and uniform Re 8 % below 0.5"; a survey's galaxies
    #: are mostly faint and small, where a network trained on uniform draws extrapolates
    #: with confident, wrong posteriors (the ``loguniform`` variation of
    #: ``gampen validate --robustness``). 0 is the paper's Table 1.
    loguniform_fraction: float = 0.0


@dataclass(frozen=True)
class PSFConfig:
    """PSF library: synthetic HSC-like Moffat PSFs, or real PSF FITS from ``source_dir``."""

    n_psfs: int = 100
    fwhm_median_arcsec: float = 0.85
    #: Log-normal scatter of the seeing FWHM (natural-log sigma).
    fwhm_log_sigma: float = 0.15
    fwhm_range_arcsec: tuple[float, float] = (0.55, 1.3)
    moffat_beta: float = 3.5
    #: When set, each synthetic PSF's Moffat beta is drawn uniformly in this range instead
    #: (real seeing profiles differ in their wings; a network that saw one beta is biased
    #: on others).
    moffat_beta_range: tuple[float, float] | None = None
    #: Per-component r.m.s. of the PSF shear (g1, g2).
    ellipticity_rms: float = 0.02
    stamp_size_px: int = 43
    source_dir: str | None = None


@dataclass(frozen=True)
class NoiseConfig:
    """Sky-noise pool: synthetic sky, or real "sky object" cutouts from ``source_dir``.

    The default depth, ~2.3 nJy/pixel r.m.s., corresponds to the HSC-Wide g-band 5-sigma
    point-source depth of ~26.5 mag in a 1.5" aperture.
    """

    n_sky_objects: int = 1000
    sky_object_size_arcsec: float = 2.0
    sky_sigma_nJy: float = 2.3
    #: Use GalSim's shipped correlated-noise file (HST ACS) rescaled to ``sky_sigma_nJy``.
    correlated: bool = False
    source_dir: str | None = None
    #: Each simulated galaxy's noise is the pool's times a factor drawn log-uniformly in this
    #: range (survey depth varies from field to field; a network trained at one depth is
    #: biased at another). ``(1, 1)``: the pool's noise as it is (the paper).
    depth_scale_range: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class SimulationConfig:
    """How many galaxies, in how many shards, split how."""

    n_galaxies: int = 150_000
    n_shards: int = 30
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    priors: PriorConfig = field(default_factory=PriorConfig)


@dataclass(frozen=True)
class NetworkConfig:
    """GaMPEN network size; ``paper`` is exactly Table 3.

    ``width_multiplier`` scales every conv width of the VGG-16 and the STN
    localization net; ``fc_width`` is the hidden FC width (4096 in the paper);
    ``stn_output_px`` is the side of the image the STN hands to the VGG (239 in the
    paper); ``stn_localization_pool`` average-pools the image before the localization
    net (1 = none, as in the paper).
    """

    width_multiplier: float = 1.0
    fc_width: int = 4096
    stn_output_px: int = 239
    stn_localization_pool: int = 1
    #: The sampler reads a grid ``stn_supersample`` times finer than its output and
    #: average-pools it back: an area (anti-aliased) resampling when the output is much
    #: coarser than the input (1 = plain bilinear sampling, as in the paper).
    stn_supersample: int = 1
    #: Batch normalisation after every VGG convolution (as torchvision's ``vgg16_bn``). Not
    #: in Table 3 (``paper``: False); trained from scratch on a CPU budget it is what lets the
    #: small ``quick`` network learn in a few hundred steps. Eval mode at inference, so MC
    #: dropout stays the only source of epistemic spread.
    batch_norm: bool = False
    #: The STN's zoom factor is ``lo + (hi - lo) sigmoid(z)`` of the regressor output ``z``
    #: (initialised at ``s = 1``), not ``z`` itself. Not in the paper: unbounded, one bad
    #: step can push ``s`` to hundreds, the sampling grid leaves the frame, the crop is all
    #: zeros and no gradient brings it back (the network collapses to a constant predictor;
    #: seen in a ``quick`` training). ``None`` = unbounded (models saved before this field).
    stn_zoom_range: tuple[float, float] | None = (0.1, 1.25)
    #: Zoom factor of the STN at initialisation (1 = the identity, as in Jaderberg et al.);
    #: must lie inside ``stn_zoom_range``.
    stn_zoom_init: float = 1.0
    in_channels: int = 1
    n_outputs: int = 9


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation; the ``paper`` values are §5's (SGD, lr 5e-7, momentum 0.99, batch 16)."""

    optimizer: str = "sgd"
    learning_rate: float = 5e-7
    momentum: float = 0.99
    weight_decay: float = 1e-4
    batch_size: int = 16
    epochs: int = 40
    #: "constant" or "onecycle".
    lr_schedule: str = "constant"
    #: Clip the global gradient norm (None = no clipping, as in the paper). Training from
    #: scratch without batch norm needs it: the NLL with learned variances can kick the
    #: weights into a dead-ReLU state from which the model predicts a constant.
    grad_clip_norm: float | None = None
    #: Fraction of the optimizer steps during which the squared error of the predicted means
    #: (``gampen_ml.model.mean_squared_error``) is added to eq. 8; eq. 8 alone afterwards, so
    #: the variances are fit by the paper's loss. Eq. 8 scales each parameter's error by its
    #: predicted inverse variance: once Re and flux are sharp, the shared features get
    #: ~40x more gradient from them than from B/T, whose error stays large, and B/T is never
    #: learned (Seitzer et al. 2022 describe this failure of heteroscedastic losses). 0 = off
    #: (the paper).
    mean_warmup_fraction: float = 0.0
    #: Random flips and 90-degree rotations (preserve B/T, Re and flux).
    augment: bool = True


@dataclass(frozen=True)
class InferenceConfig:
    """Monte-Carlo dropout inference."""

    #: MC passes per galaxy for catalogs (paper: 1000).
    n_passes: int = 1000
    #: MC passes per galaxy on the validation split while calibrating the dropout rate.
    n_passes_calibration: int = 1000
    #: Draws from each pass's N(mu_t, Sigma_t) (paper: 1). K > 1 samples the same mixture
    #: over dropout masks with K times the samples per network pass, which the 99.73 %
    #: HPD needs (the range of T draws covers only (T-1)/(T+1) of the mass).
    draws_per_pass: int = 1
    #: Galaxies per forward chunk; passes are batched galaxies x passes.
    galaxies_per_batch: int = 32
    #: Store the raw posterior samples beside the catalog (float16, compact).
    store_samples: bool = False
    #: Write ``samples.parquet`` beside each catalog: every galaxy's samples in physical
    #: units as float32 lists (DuckDB view ``posterior_samples``; size in docs/catalog.md).
    sample_table: bool = False


@dataclass(frozen=True)
class CalibrationConfig:
    """Dropout-rate grid and coverage targets (paper §5)."""

    dropout_rates: tuple[float, ...] = (0.0, 7e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.2)
    levels: tuple[float, ...] = CREDIBLE_LEVELS
    #: Fit a post-hoc spread recalibration on the validation split.
    recalibrate: bool = True
    #: Before the global fit, widen / narrow each parameter's posteriors (``bt``,
    #: ``re_arcsec``, ``flux_nJy``) by a factor that depends on the predicted mean of the
    #: parameter named here for it (``gampen_ml.calibrate.fit_spread_profile``); None: off.
    #: Default: B/T by its own predicted B/T, Re and flux by the predicted Re (the misfit of
    #: both follows the galaxy's size: unresolved ones are under-covered, large ones over).
    spread_drivers: tuple[str, str, str] | None = ("bt", "re_arcsec", "re_arcsec")
    #: A second mean shift fit after the first (which is over each parameter's own predicted
    #: mean), over the predicted mean named here per parameter; None: off. Default: B/T and
    #: Re by the predicted flux (faint, large galaxies' sizes are underestimated), flux by
    #: the predicted Re.
    second_shift_drivers: tuple[str, str, str] | None = ("flux_nJy", "flux_nJy", "re_arcsec")
    #: A second width profile fit after the first, over the predicted mean named here per
    #: parameter; None: off. With the first by size, a profile by the predicted flux makes
    #: the widths follow brightness too (faint galaxies' posteriors are too narrow where
    #: bright ones of the same size are too wide).
    second_spread_drivers: tuple[str, str, str] | None = ("flux_nJy", "flux_nJy", "flux_nJy")
    #: Largest tolerated |coverage - nominal| (fraction) on validation for the champion.
    coverage_tolerance: float = 0.03


#: Values of ``FlagConfig.bt_estimate``.
BT_ESTIMATES = ("mode", "mean", "median", "probability")


@dataclass(frozen=True)
class InputLimits:
    """Largest real input accepted, checked from the FITS headers before any pixel is read.

    Sizes are decompressed (a ``.fits.gz`` or tile-compressed file counts at its
    uncompressed size), so a small file claiming a huge image is refused without
    allocating it. Over-limit files are rejected (quarantined in the inbox) with the limit
    named. The defaults keep one file's pixels well inside a worker's memory.
    """

    #: Pixels of one image plane (NAXIS1 x NAXIS2); cutouts are cropped to the stamp.
    max_image_pixels: int = 4096 * 4096
    #: Planes of one cube (NAXIS3).
    max_planes: int = 20_000
    #: Bytes of one file's HDU data, decompressed.
    max_file_bytes: int = 4 * 2**30
    #: Bytes of one inbox batch's files, decompressed; later files (sorted order) beyond it
    #: are rejected.
    max_batch_bytes: int = 64 * 2**30


@dataclass(frozen=True)
class FlagConfig:
    """Qualitative flags (paper §6.4 and §7)."""

    bulge_dominated_min_bt: float = 0.85
    disk_dominated_max_bt: float = 0.10
    #: What the bulge-/disk-dominated labels read: a posterior summary of B/T compared with
    #: the thresholds above, ``mode`` (the paper's "predicted value"), ``mean`` or
    #: ``median``; or ``probability``: the posterior probability of the class (catalog
    #: columns ``bt_prob_bulge`` / ``bt_prob_disk``) must reach ``bt_min_probability``. For a
    #: narrow posterior the summaries agree; a posterior broad in logit(B/T) is U-shaped in
    #: B/T and its mode sits at 0 or 1, which labels every galaxy. With calibrated posteriors
    #: a probability label is right about as often as its probability says (``quick``: mode
    #: 45 % precise, mean 84 %, probability >= 0.95: 99 %; docs/validation.md).
    bt_estimate: str = "mode"
    #: Smallest class probability that earns a B/T label when ``bt_estimate="probability"``.
    bt_min_probability: float = 0.95
    small_max_re_arcsec: float = 1.0
    #: ``out_of_domain`` (``gampen_ml.flags.out_of_domain_reasons``): nothing detected when
    #: the central detection peak is below this many noise sigmas ...
    min_peak_snr: float = 5.0
    #: ... the stamp's total flux exceeds this factor x the prior's largest flux ...
    flux_range_factor: float = 2.0
    #: ... the sky noise differs from the training noise by more than this factor ...
    noise_sigma_factor: float = 2.0
    #: ... or the predicted Re / flux lies this fraction beyond the prior's limits.
    prior_margin: float = 0.5
    #: A galaxy is "asymmetric" (outside the point-symmetric training set) when its image
    #: asymmetry (``gampen_ml.flags.image_asymmetry``) exceeds this; only when the catalog
    #: carries an ``asymmetry`` column.
    max_asymmetry: float = 0.01
    #: ... plus this over the peak S/N (catalog column ``image_peak_snr``, when present): the
    #: noise-corrected asymmetry of a faint galaxy is biased up by about 1 / peak S/N (its
    #: detection aperture follows the noise), so a fixed threshold flags most symmetric
    #: galaxies fainter than ~21 mag; at 3 / S/N, 0.15 % of the simulated test split.
    asymmetry_snr_allowance: float = 3.0
    #: A galaxy is "psf_outside_library" when its cutout's PSF FWHM (catalog column
    #: ``psf_fwhm_arcsec``, from the FITS file) lies more than this fraction outside the
    #: FWHM range of the PSF library the model was trained with.
    psf_fwhm_tolerance: float = 0.05
    #: ``out_of_domain`` "consistent with a point source": the cutout's adaptive-moment size
    #: (``image_sigma_px``) is within this fraction of its PSF's (from ``psf_fwhm_arcsec``),
    #: i.e. the object is unresolved (a star, or nothing like the training galaxies).
    point_source_tolerance: float = 0.06


@dataclass(frozen=True)
class Profile:
    """One complete, self-consistent configuration of the platform."""

    name: str
    seed: int = 20220401
    imaging: ImagingConfig = field(default_factory=ImagingConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    flags: FlagConfig = field(default_factory=FlagConfig)
    limits: InputLimits = field(default_factory=InputLimits)

    def __post_init__(self) -> None:
        validate_profile(self)

    def replace(self, **sections: object) -> Profile:
        """Return a copy with whole sections replaced (``profile.replace(psf=...)``)."""
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict:
        """Plain nested dict (for MLflow params, JSON and Dagster metadata)."""
        return dataclasses.asdict(self)


def validate_profile(profile: Profile) -> None:
    """Raise :class:`ConfigError` naming the first invalid setting of ``profile``."""
    rates = profile.calibration.dropout_rates
    if not rates:
        raise ConfigError(f"profile {profile.name!r}: calibration.dropout_rates is empty")
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise ConfigError(
            f"profile {profile.name!r}: calibration.dropout_rates must lie in [0, 1), got {bad}"
        )
    if len(set(rates)) != len(rates):
        raise ConfigError(f"profile {profile.name!r}: calibration.dropout_rates has duplicates")
    if profile.flags.bt_estimate not in BT_ESTIMATES:
        raise ConfigError(
            f"profile {profile.name!r}: flags.bt_estimate must be one of {BT_ESTIMATES}, "
            f"got {profile.flags.bt_estimate!r}"
        )
    if not 0.5 < profile.flags.bt_min_probability <= 1.0:
        raise ConfigError(
            f"profile {profile.name!r}: flags.bt_min_probability must lie in (0.5, 1], "
            f"got {profile.flags.bt_min_probability}"
        )
    depth = profile.noise.depth_scale_range
    if not (len(depth) == 2 and 0 < depth[0] <= depth[1]):
        raise ConfigError(
            f"profile {profile.name!r}: noise.depth_scale_range must be (lo, hi) with "
            f"0 < lo <= hi, got {depth}"
        )
    beta = profile.psf.moffat_beta_range
    if beta is not None and not (len(beta) == 2 and 1 < beta[0] <= beta[1]):
        raise ConfigError(
            f"profile {profile.name!r}: psf.moffat_beta_range must be (lo, hi) with "
            f"1 < lo <= hi, got {beta}"
        )
    zoom = profile.network.stn_zoom_range
    if zoom is not None and not (len(zoom) == 2 and 0 < zoom[0] < 1 < zoom[1]):
        raise ConfigError(
            f"profile {profile.name!r}: network.stn_zoom_range must be (lo, hi) with "
            f"0 < lo < 1 < hi, got {zoom}"
        )
    init = profile.network.stn_zoom_init
    if not (init > 0 and (zoom is None or zoom[0] < init < zoom[1])):
        raise ConfigError(
            f"profile {profile.name!r}: network.stn_zoom_init {init} must be positive and "
            f"inside stn_zoom_range {zoom}"
        )
    log_fraction = profile.simulation.priors.loguniform_fraction
    if not 0.0 <= log_fraction <= 1.0:
        raise ConfigError(
            f"profile {profile.name!r}: simulation.priors.loguniform_fraction must lie in [0, 1], "
            f"got {log_fraction}"
        )
    fractions = profile.simulation.split_fractions
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ConfigError(
            f"profile {profile.name!r}: simulation.split_fractions must be positive and sum to 1, "
            f"got {fractions}"
        )
    if (
        profile.simulation.n_shards < 1
        or profile.simulation.n_galaxies < profile.simulation.n_shards
    ):
        raise ConfigError(
            f"profile {profile.name!r}: need 1 <= simulation.n_shards <= simulation.n_galaxies"
        )
    if profile.imaging.stamp_size_px < 16:
        raise ConfigError(f"profile {profile.name!r}: imaging.stamp_size_px must be >= 16")
    for name in ("source_dir",):
        for section in (profile.psf, profile.noise):
            path = getattr(section, name)
            if path is not None and not Path(path).is_dir():
                raise ConfigError(
                    f"profile {profile.name!r}: {type(section).__name__}.{name} = {path!r} "
                    "is not an existing folder"
                )
    if profile.inference.n_passes < 2 or profile.inference.n_passes_calibration < 2:
        raise ConfigError(f"profile {profile.name!r}: inference needs at least 2 MC passes")
    if profile.inference.draws_per_pass < 1:
        raise ConfigError(f"profile {profile.name!r}: inference.draws_per_pass must be >= 1")
    if not 0.0 <= profile.training.mean_warmup_fraction <= 1.0:
        raise ConfigError(
            f"profile {profile.name!r}: training.mean_warmup_fraction must lie in [0, 1], "
            f"got {profile.training.mean_warmup_fraction}"
        )
    if profile.training.optimizer not in ("sgd", "adamw"):
        raise ConfigError(
            f"profile {profile.name!r}: training.optimizer must be 'sgd' or 'adamw', "
            f"got {profile.training.optimizer!r}"
        )


PAPER = Profile(name="paper")

QUICK = Profile(
    name="quick",
    # Seeing profiles and survey depth vary: beta and the noise level are randomised so that
    # the posteriors hold on other PSF families and +-25 % sky noise (gampen validate
    # --robustness; docs/validation.md).
    psf=PSFConfig(n_psfs=50, moffat_beta_range=(2.5, 4.5)),
    noise=NoiseConfig(n_sky_objects=200, depth_scale_range=(0.7, 1.4)),
    # 2,800 training galaxies; 2,000 each for validation and test: the binomial noise of the
    # recalibration fit plus that of the test coverage is ~1.5 points at 68.27 % (with 1,000
    # each, ~2.2: a 3-point miss on 6-38 % of random splits, docs/validation.md).
    simulation=SimulationConfig(
        n_galaxies=6800,
        n_shards=4,
        split_fractions=(7 / 17, 5 / 17, 5 / 17),
        priors=PriorConfig(loguniform_fraction=0.3),
    ),
    network=NetworkConfig(
        width_multiplier=0.125,
        fc_width=256,
        stn_output_px=64,
        stn_localization_pool=4,
        stn_supersample=4,
        batch_norm=True,
    ),
    training=TrainingConfig(
        optimizer="adamw",
        learning_rate=2e-3,
        momentum=0.9,
        weight_decay=1e-4,
        batch_size=64,
        epochs=14,
        lr_schedule="onecycle",
        grad_clip_norm=1.0,
        mean_warmup_fraction=0.65,
    ),
    inference=InferenceConfig(
        n_passes=100,
        n_passes_calibration=50,
        draws_per_pass=10,
        galaxies_per_batch=64,
        # ~9.4 kB per galaxy (docs/catalog.md): ~19 MB for the 2,000 sim-test galaxies.
        sample_table=True,
    ),
    # Two candidates: each costs a training and a validation pass on the 15-minute budget;
    # 0.01 was the least sharp once recalibrated (docs/validation.md) and never chosen.
    calibration=CalibrationConfig(dropout_rates=(0.0, 0.05)),
    # Its B/T posteriors are broad: label where the class has posterior probability >= 0.95
    # (FlagConfig.bt_estimate; the mode would label every galaxy).
    flags=FlagConfig(bt_estimate="probability"),
)

TINY = Profile(
    name="tiny",
    psf=PSFConfig(n_psfs=4),
    noise=NoiseConfig(n_sky_objects=8),
    simulation=SimulationConfig(n_galaxies=48, n_shards=2),
    network=NetworkConfig(
        width_multiplier=0.0625, fc_width=32, stn_output_px=32, stn_localization_pool=4
    ),
    training=TrainingConfig(
        optimizer="adamw", learning_rate=1e-3, batch_size=16, epochs=1, lr_schedule="constant"
    ),
    inference=InferenceConfig(n_passes=16, n_passes_calibration=16, galaxies_per_batch=8),
    calibration=CalibrationConfig(dropout_rates=(0.0, 0.05)),
)

#: The paper's images, PSF and noise libraries and Table-3 network, shortened to minutes on
#: one GPU (``benchmarks/paper_short_gpu.sh``): 9,000 galaxies, two dropout rates, fewer MC
#: passes (x5 draws each). Training is the `quick` recipe (batch norm after each convolution,
#: AdamW one-cycle, gradient clipping, mean warm-up), since the paper's SGD at lr 5e-7
#: fine-tuned ImageNet weights we cannot download. At full width it converged in only one
#: of three H200 runs (``docs/validation.md``): a lower peak learning rate is the next thing
#: to try before trusting this profile's accuracy.
PAPER_SHORT = Profile(
    name="paper-short",
    simulation=SimulationConfig(n_galaxies=9000, n_shards=3),
    network=NetworkConfig(batch_norm=True),
    training=dataclasses.replace(QUICK.training, learning_rate=1e-3, epochs=16),
    inference=InferenceConfig(
        n_passes=300, n_passes_calibration=100, draws_per_pass=5, galaxies_per_batch=64
    ),
    calibration=CalibrationConfig(dropout_rates=(0.0, 0.01)),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (PAPER, PAPER_SHORT, QUICK, TINY)}


def get_profile(name: str | None = None) -> Profile:
    """Return the profile ``name``, else ``$GAMPEN_PROFILE``, else ``quick``.

    Raises
    ------
    ConfigError
        If the name is not a known profile.
    """
    source = "argument" if name else PROFILE_ENV_VAR
    name = name or os.environ.get(PROFILE_ENV_VAR) or DEFAULT_PROFILE
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown profile {name!r} (from {source}); choose one of {sorted(PROFILES)}"
        ) from None


def derive_seed(profile_seed: int, asset: str, partition: str = "") -> int:
    """A 63-bit seed derived from (profile seed, asset, partition).

    Rerunning a partition therefore draws the same numbers, while different assets and
    partitions draw independent streams.
    """
    digest = hashlib.sha256(f"{profile_seed}/{asset}/{partition}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def default_storage_root() -> Path:
    """Storage root from the environment alone: ``gampen_ml.settings.Settings.resolve()``.

    ``$GAMPEN_STORAGE``, else ``$DAGSTER_HOME/data``, else ``./dagster_home/data``.
    """
    from gampen_ml.settings import Settings

    return Settings.resolve().storage_root


def shard_keys(profile: Profile) -> list[str]:
    """Static partition keys of ``simulated_galaxies``: ``shard-000`` ..."""
    return [f"shard-{i:03d}" for i in range(profile.simulation.n_shards)]


def dropout_key(rate: float) -> str:
    """Partition key of a dropout rate, e.g. ``0.0007`` -> ``"dropout-0.0007"``."""
    return f"dropout-{rate:g}"


def dropout_from_key(key: str) -> float:
    """Inverse of :func:`dropout_key`."""
    if not key.startswith("dropout-"):
        raise ConfigError(f"not a dropout partition key: {key!r}")
    return float(key.removeprefix("dropout-"))
