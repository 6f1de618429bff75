"""Fine-tune the champion on a domain's labelled set, recalibrate it there, publish, register.

(Over 600 lines: one procedure read top to bottom -- config, data view, freezing, the
training loop, recalibration, scoring, publication -- whose steps the list below numbers.)

A network trained on simulations meets a survey's galaxies with another PSF, noise and
pixel scale; a few hundred to a few thousand fitter-labelled galaxies of that survey
(:mod:`gampen_ml.labelled`) adapt it. Read :func:`finetune_and_publish` top to bottom:

1. **Start from the champion** (:func:`gampen_ml.prediction.champion_model`): its weights, its
   dropout rate and its label scaler, which stays (the network's output space is the
   champion's, so its heads are reused as they are).
2. **Freeze** (:class:`FinetuneConfig` ``freeze``; :data:`FREEZE_CHOICES`):
   ``convolutions`` (default) freezes the STN and every convolution, batch-norm running
   statistics included, and trains the three fully connected layers: with a few hundred
   labels the heads are what can be fit without forgetting what the simulations taught.
   ``stn`` freezes only the STN; ``none`` trains every layer, at a tenth of the profile's
   learning rate by default. Dropout stays on everywhere while training (the posteriors
   are Monte-Carlo dropout ones).
3. **Train** on the ``train`` split with the training loop's pieces (:mod:`gampen_ml.train`:
   the optimizer, the batch iterator with augmentation, eq. 8's loss, gradient clipping),
   one epoch at a time, scoring each on the ``val`` split exactly as training does
   (:func:`gampen_ml.train.evaluate_loss`: one seeded MC-dropout pass). **Early stopping**:
   the weights of the best validation epoch are kept, the champion's own weights (epoch 0)
   included, and training stops after ``patience`` epochs without improvement.
4. **Recalibrate** on the same ``val`` split with the champion's method: the dropout rate
   is the champion's, and when the champion is recalibrated its recalibration is refit
   (:func:`gampen_ml.calibrate.recalibrate_on_validation`: mean shift, tail exponent, spread factor and
   error floor on the physical coverage), never copied; against the labels deconvolved from
   the labeller's measured errors when the set has them (**Label noise** below).
5. **Score** the ``test`` split with the fine-tuned model and with the champion (same MC
   seed): residual sigma, 68th percentile of |residual| and coverage per parameter.
6. **Publish** ``<root>/finetuned_model/<domain>/`` atomically: the files of a
   ``trained_model`` partition (``state_dict.pt``, ``model.json``, ``label_scaler.json``,
   ``history.json``; :func:`gampen_ml.train.load_trained_model` reads it) plus
   ``calibration.json`` (:func:`gampen_ml.prediction.finetuned_model` reads it back as a
   :class:`~gampen_ml.prediction.PredictionModel`; its ``training_domain`` is the labelled
   train split's PSF and noise range, :func:`labelled_training_domain`),
   ``coverage.parquet``, ``metrics.json``, ``registry.json`` and ``loss_curve.png``; with a
   tracking URI the model is registered
   as ``gampen-<profile>-<domain>`` (:func:`gampen_ml.registry.domain_model_name`) with
   tags :data:`BASE_NAME_TAG`, :data:`BASE_VERSION_TAG`, :data:`LABEL_SET_TAG`,
   :data:`DOMAIN_TAG`, and gets the alias ``champion`` once the files are in place.

**Stamp size.** A network's input size is fixed (its STN localisation head). The fine-tuned
model keeps the champion's ``image_px``: a labelled set stored at another stamp size is
centre-cropped or zero-padded to it for training (:func:`fit_to_model`, the platform's
crop/pad rule), as prediction reads a domain's cutouts straight to the model's size
(:func:`gampen_ml.prediction.cutout_imaging`). Re-initialising the shape-dependent layers instead would
throw away trained weights, and fails outright for small stamps (the localisation
convolutions need at least 41 px after pooling).

**Label noise.** The labeller's per-galaxy uncertainties (``*_sigma``) are stored with the
labelled set but not used: the loss trains on the labels as given, so the posterior learns
their scatter, label noise included, and a profile fitter's own widths are far too small to
describe its error (they cover a few per cent of the truths on the transfer study's domain).
What is used, when the labelled set has one, is the labeller's *measured* error
distribution: a table of its errors on injected galaxies
(:data:`gampen_ml.labelled.LABEL_ERRORS_FILE`). The recalibration then compares each val
label with the posterior convolved with those errors (:class:`gampen_ml.calibrate.LabelNoise`:
every draw gets the error row of an injected galaxy whose truth is near it), so the intervals it fits describe the
truth rather than truth plus label noise; they are applied to the plain posterior. Without
such a table the validation coverage is measured against the labels themselves, and the
intervals come out as wide as the label noise demands.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from gampen_ml.calibrate import (
    Recalibration,
    coverage_table,
    recalibrate_on_validation,
    validation_samples,
)
from gampen_ml.config import PARAMETERS, ConfigError, NetworkConfig, Profile, derive_seed
from gampen_ml.data.datasets import ShardImages, epoch_order, iterate_batches, prefetch
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.labelled import (
    LabelledSetError,
    label_errors_record,
    label_set_sha256,
    read_label_errors,
    read_manifest,
)
from gampen_ml.model import GaMPEN, gaussian_nll
from gampen_ml.store import (
    CALIBRATION_FILE,
    COVERAGE_FILE,
    FINETUNED_MODEL,
    LABELLED_SET,
    UNREGISTERED,
    ModelInfo,
    Store,
)

#: The two assets of transfer learning (:mod:`gampen_ml.store`), by their older names.
LABELLED_ASSET, FINETUNED_ASSET = LABELLED_SET, FINETUNED_MODEL
#: What each ``FinetuneConfig.freeze`` choice keeps fixed.
FREEZE_CHOICES: dict[str, str] = {
    "convolutions": "STN and every convolution frozen (batch-norm statistics too); "
    "the fully connected head trains",
    "stn": "STN frozen; every convolution and the head train",
    "none": "every layer trains",
}
#: Where each ``FinetuneConfig.init`` choice starts the weights.
INIT_CHOICES: dict[str, str] = {
    "base": "the champion's trained weights",
    "random": "the champion's architecture and label scaler, weights freshly initialised "
    "(seeded) as the profile's training initialises them",
}
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"
#: Model-version tags of a fine-tuned model in MLflow.
BASE_NAME_TAG = "gampen.base_model_name"
BASE_VERSION_TAG = "gampen.base_model_version"
LABEL_SET_TAG = "gampen.label_set_sha256"
DOMAIN_TAG = "gampen.domain"
FREEZE_TAG = "gampen.freeze"
LABEL_NOISE_TAG = "gampen.label_errors_sha256"


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune (the Dagster asset's run config mirrors it).

    Attributes
    ----------
    freeze : str
        One of :data:`FREEZE_CHOICES`.
    lr_factor : float or None
        Learning rate = ``lr_factor`` x the profile's ``training.learning_rate``; None:
        1 when only the head trains (``convolutions``), 0.1 otherwise.
    max_epochs : int
        Upper bound on the epochs over the ``train`` split.
    patience : int
        Stop after this many epochs without a validation loss below the best so far
        minus ``min_delta``.
    min_delta : float
        Smallest decrease of the validation loss that counts as an improvement.
    batch_size : int or None
        None: the profile's.
    grad_clip_norm : float or None
        Clip the global gradient norm of the trained parameters (None: no clipping).
    init : str
        One of :data:`INIT_CHOICES`. ``random`` trains from scratch: it needs ``freeze``
        ``none``, its default learning rate is the profile's, and the untrained weights are
        no early-stopping candidate (epoch 0).
    """

    freeze: str = "convolutions"
    lr_factor: float | None = None
    max_epochs: int = 30
    patience: int = 5
    min_delta: float = 0.0
    batch_size: int | None = None
    grad_clip_norm: float | None = 1.0
    init: str = "base"

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_CHOICES:
            raise ConfigError(
                f"finetune freeze {self.freeze!r} is not one of {sorted(FREEZE_CHOICES)}"
            )
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"finetune init {self.init!r} is not one of {sorted(INIT_CHOICES)}")
        if self.init == "random" and self.freeze != "none":
            raise ConfigError(
                f"finetune init 'random' trains every layer: freeze must be 'none', not "
                f"{self.freeze!r}"
            )
        if self.lr_factor is not None and not self.lr_factor > 0:
            raise ConfigError(f"finetune lr_factor must be > 0, got {self.lr_factor}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ConfigError(
                f"finetune max_epochs and patience must be >= 1, got {self.max_epochs}, "
                f"{self.patience}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"finetune batch_size must be >= 1, got {self.batch_size}")

    def learning_rate(self, profile: Profile) -> float:
        """The learning rate of this fine-tuning under ``profile``."""
        factor = self.lr_factor
        if factor is None:
            factor = 1.0 if self.freeze == "convolutions" or self.init == "random" else 0.1
        return factor * profile.training.learning_rate


def fit_to_model(images: np.ndarray, image_px: int) -> np.ndarray:
    """``(N, S, S)`` images centre-cropped or zero-padded to the model's ``image_px``.

    Returned unchanged when ``S == image_px``; otherwise
    :func:`gampen_ml.fits_input.fit_to_stamp` (the crop/pad rule of every cutout).
    """
    if images.shape[-1] == image_px and images.shape[-2] == image_px:
        return images
    from gampen_ml.fits_input import fit_to_stamp

    return fit_to_stamp(np.asarray(images), image_px)


class ModelSizedImages:
    """A :class:`~gampen_ml.data.datasets.ShardImages` whose images come out ``image_px`` square.

    Has what the batch iterator and :func:`gampen_ml.train.evaluate_loss` use (``len``,
    ``labels``, ``image_px``, ``physical_labels()``, ``images(index)``).
    """

    def __init__(self, data: ShardImages, image_px: int) -> None:
        self.data = data
        self.labels = data.labels
        self.image_px = int(image_px)
        # The array attributes inference looks at (as ``gampen_ml.stages.SplitImages``).
        self.shape = (len(data), self.image_px, self.image_px)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.data)

    def physical_labels(self) -> np.ndarray:
        """``(N, 3)`` float64 ``[bt, re_arcsec, flux_nJy]``."""
        return self.data.physical_labels()

    def images(self, index: np.ndarray) -> np.ndarray:
        """``(len(index), image_px, image_px)`` float32 nJy per pixel."""
        return fit_to_model(self.data.images(index), self.image_px)

    def __getitem__(self, item: slice) -> np.ndarray:
        """Slices of the whole split, for :func:`gampen_ml.catalog.catalog_from_images`."""
        if not isinstance(item, slice):
            raise TypeError(f"ModelSizedImages supports slices only, got {type(item).__name__}")
        return self.images(np.arange(len(self))[item])


def labelled_split(
    labelled_dir: Path | str, split: str, image_px: int
) -> tuple[ModelSizedImages, pl.DataFrame, pl.DataFrame]:
    """Images (sized for the model), catalog meta and labels of one split of a labelled set.

    Returns
    -------
    (images, meta, truths)
        ``images`` is sliceable ``(N, image_px, image_px)`` float32; ``meta`` has
        ``galaxy_id``, ``source_file``, ``hdu``, ``ra_deg``, ``dec_deg``,
        ``psf_fwhm_arcsec``; ``truths`` has ``bt``, ``re_arcsec``, ``flux_nJy`` (the labels).
    """
    data = ShardImages([labelled_dir], split)
    meta = data.labels.select(
        "galaxy_id",
        pl.col("file").alias("source_file"),
        "hdu",
        "ra_deg",
        "dec_deg",
        "psf_fwhm_arcsec",
    )
    return ModelSizedImages(data, image_px), meta, data.labels.select(PARAMETERS)


def labelled_training_domain(profile: Profile, labelled_dir: Path | str, image_px: int):
    """What the fine-tuned model was trained on, for its catalogs' out-of-domain flags.

    A :class:`~gampen_ml.prediction.TrainingDomain`: the PSF FWHM range of the labelled
    ``train`` cutouts (None when none carries a PSF) and their sky-noise range measured as a
    catalog measures it (:func:`gampen_ml.flags.image_statistics` on the images as the model
    sees them), with the profile's priors.
    """
    from gampen_ml.flags import image_statistics
    from gampen_ml.stages import TrainingDomain

    images, meta, _ = labelled_split(labelled_dir, "train", image_px)
    fwhm = meta["psf_fwhm_arcsec"].drop_nulls()
    sigma = image_statistics(images)["noise_sigma_nJy"].drop_nans().drop_nulls()
    manifest = read_manifest(labelled_dir)
    return TrainingDomain(
        pixel_scale_arcsec=float(manifest["pixel_scale_arcsec"]),
        psf_fwhm_range_arcsec=(float(fwhm.min()), float(fwhm.max())) if len(fwhm) else None,
        noise_sigma_range_nJy=(
            (float(sigma.min()), float(sigma.max())) if len(sigma) and sigma.max() > 0 else None
        ),
        priors=profile.simulation.priors,
    )


def freeze_layers(model: GaMPEN, freeze: str) -> list[nn.Module]:
    """Stop the gradients of the parts ``freeze`` names; return those parts.

    Frozen parts must also be put back in eval mode after each ``model.train()``
    (:func:`set_finetune_mode`), so that their batch-norm statistics stay the champion's.
    """
    if freeze not in FREEZE_CHOICES:
        raise ConfigError(f"finetune freeze {freeze!r} is not one of {sorted(FREEZE_CHOICES)}")
    frozen = {
        "convolutions": [model.stn, model.first_conv, model.features],
        "stn": [model.stn],
        "none": [],
    }[freeze]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return frozen


def set_finetune_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Training mode (dropout on, batch norm learning) except the frozen parts' batch norm."""
    model.train()
    for module in frozen:
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class FinetuneTraining:
    """What :func:`finetune_model` did."""

    history: list[dict]
    val_loss_before: float
    val_loss_after: float
    best_epoch: int
    n_train: int
    n_val: int
    trainable_parameters: int
    learning_rate: float


def finetune_model(
    profile: Profile,
    base_model_dir: Path | str,
    labelled_dir: Path | str,
    out_dir: Path | str,
    config: FinetuneConfig,
    *,
    seed: int,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = lambda line: None,
    extra_meta: dict | None = None,
) -> FinetuneTraining:
    """Fine-tune a trained model on a labelled set; write the best weights as a model folder.

    Parameters
    ----------
    profile : Profile
        Supplies ``training`` (optimizer, learning rate, batch size, augmentation).
    base_model_dir : path
        The champion's ``trained_model`` folder.
    labelled_dir : path
        A stored labelled set (``labelled_set/<domain>``) with ``train`` and ``val`` rows.
    out_dir : path
        Receives ``state_dict.pt``, ``model.json``, ``label_scaler.json`` (the base's),
        ``history.json`` (per epoch ``train_loss``, ``val_loss``, ``lr``, ``seconds``,
        ``images_per_s``).
    config : FinetuneConfig
        Freezing, learning rate, early stopping.
    seed : int
        Seeds the epoch order, augmentation and dropout masks.
    device : str or torch.device, optional
        Default: CUDA when present, else CPU.
    log : callable(str)
        One line per epoch.
    extra_meta : dict, optional
        Merged into ``model.json``.

    Raises
    ------
    LabelledSetError
        When the labelled set has no ``train`` or no ``val`` rows.
    """
    from gampen_ml.train import (
        HISTORY_FILE,
        MODEL_JSON_FILE,
        SCALER_FILE,
        STATE_DICT_FILE,
        evaluate_loss,
        load_trained_model,
        make_optimizer,
    )

    out_dir, labelled_dir = Path(out_dir), Path(labelled_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, scaler, base_meta = load_trained_model(base_model_dir, device)
    image_px = int(base_meta["image_px"])
    if config.init == "random":
        # As gampen_ml.train initialises a network: seed, then construct.
        torch.manual_seed(seed)
        network = NetworkConfig(**base_meta["network"])
        model = GaMPEN(network, float(base_meta["dropout_rate"]), image_px).to(device)
    train_set = ModelSizedImages(ShardImages([labelled_dir], "train"), image_px)
    val_set = ModelSizedImages(ShardImages([labelled_dir], "val"), image_px)
    if len(train_set) == 0 or len(val_set) == 0:
        raise LabelledSetError(
            labelled_dir,
            f"fine-tuning needs train and val rows, got {len(train_set)} train and "
            f"{len(val_set)} val (set the split column of the labels table)",
        )
    batch_size = config.batch_size or profile.training.batch_size
    lr = config.learning_rate(profile)
    model = model.to(memory_format=torch.channels_last)
    frozen = freeze_layers(model, config.freeze)
    optimizer = make_optimizer(model, dataclasses.replace(profile.training, learning_rate=lr))
    trained = [p for p in model.parameters() if p.requires_grad]

    def val_loss() -> float:
        return evaluate_loss(model, val_set, scaler, batch_size, device)

    before = val_loss()
    # A random initialisation is no candidate: the first epoch always replaces it.
    best_loss = before if config.init == "base" else math.inf
    best_epoch = 0
    best_state = copy.deepcopy(model.state_dict())
    log(
        f"fine-tuning {trainable_parameters(model):,} parameters (init {config.init}, freeze "
        f"{config.freeze}, lr {lr:.3g}) on {len(train_set)} train / {len(val_set)} val "
        f"galaxies; val loss at epoch 0 {before:.4f}"
    )
    history: list[dict] = []
    stale = 0
    for epoch in range(config.max_epochs):
        started = time.perf_counter()
        train_loss = _train_epoch(
            model, train_set, scaler, optimizer, frozen, trained, profile, config,
            batch_size=batch_size, seed=seed, epoch=epoch, device=device,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            raise RuntimeError(
                f"fine-tuning diverged: train_loss = {train_loss} in epoch {epoch + 1}; "
                "lower the learning rate (lr_factor)"
            )
        loss = val_loss()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": loss,
                "lr": lr,
                "seconds": seconds,
                "images_per_s": len(train_set) / seconds,
            }
        )
        improved = loss < best_loss - config.min_delta
        if improved:
            best_loss, best_epoch, stale = loss, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        log(
            f"epoch {epoch + 1}/{config.max_epochs}: train_loss {train_loss:.4f} val_loss "
            f"{loss:.4f}{' (best)' if improved else ''} ({seconds:.1f} s)"
        )
        if stale >= config.patience:
            log(f"early stop: no improvement in {stale} epochs; best epoch {best_epoch}")
            break
    model.load_state_dict(best_state)
    if best_epoch == 0:
        log("no epoch beat the champion on the val split: its weights are kept")

    meta = {
        **base_meta,
        **(extra_meta or {}),
        "seed": seed,
        "n_train": len(train_set),
        "n_val": len(val_set),
        "epochs_trained": len(history),
        "best_epoch": best_epoch,
        "finetune": {**dataclasses.asdict(config), "learning_rate": lr},
        "base_data_version": base_meta.get("data_version"),
    }
    torch.save(model.state_dict(), out_dir / STATE_DICT_FILE)
    scaler.save(out_dir / SCALER_FILE)
    (out_dir / MODEL_JSON_FILE).write_text(json.dumps(meta, indent=2))
    (out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    return FinetuneTraining(
        history=history,
        val_loss_before=before,
        val_loss_after=best_loss,
        best_epoch=best_epoch,
        n_train=len(train_set),
        n_val=len(val_set),
        trainable_parameters=trainable_parameters(model),
        learning_rate=lr,
    )


def _train_epoch(
    model: GaMPEN,
    train_set: ModelSizedImages,
    scaler: LabelScaler,
    optimizer: torch.optim.Optimizer,
    frozen: list[nn.Module],
    trained: list[nn.Parameter],
    profile: Profile,
    config: FinetuneConfig,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
) -> float:
    """One epoch of eq. 8 on the train split, as ``gampen_ml.train`` runs one; mean NLL."""
    # Every random stream is a pure function of (seed, epoch), as in training.
    torch.manual_seed(derive_seed(seed, "epoch", str(epoch)))
    order = epoch_order(len(train_set), seed, epoch)
    augment_rng = np.random.default_rng([seed, epoch]) if profile.training.augment else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    set_finetune_mode(model, frozen)
    loss_sum, n_seen = 0.0, 0
    batches = iterate_batches(train_set, scaler, batch_size, order=order, augment_rng=augment_rng)
    for x, y in prefetch(batches):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast:
            out = model(x)
        loss = gaussian_nll(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(trained, config.grad_clip_norm)
        optimizer.step()
        loss_sum += float(loss.detach()) * len(x)
        n_seen += len(x)
    return loss_sum / max(n_seen, 1)


def calibrate_on_split(
    profile: Profile,
    model_dir: Path,
    labelled_dir: Path,
    *,
    split: str,
    dataset: str,
    seed: int,
    recalibrate: bool,
    device: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[Recalibration | None, pl.DataFrame]:
    """Validation coverage of a model on one labelled split and, if asked, its recalibration.

    The champion's method (:func:`gampen_ml.calibrate.choose_dropout_rate`): MC-dropout
    samples in memory (:func:`gampen_ml.calibrate.validation_samples`), the raw HPD
    coverage, then :func:`gampen_ml.calibrate.recalibrate_on_validation` fit on these
    galaxies only.

    When ``labelled_dir`` holds a label-error table
    (:data:`gampen_ml.labelled.LABEL_ERRORS_FILE`), every coverage, raw and recalibrated, is
    that of the labels by the posterior convolved with the label errors
    (:class:`gampen_ml.calibrate.LabelNoise`, seeded from ``seed``): an estimate of the
    coverage of the truth; the recalibration is fit to it and applies to the plain posterior.

    Returns
    -------
    (recalibration, coverage)
        ``coverage`` holds the raw rows and, when recalibrated, the recalibrated ones
        (``gampen_ml.calibrate.COVERAGE_TABLE_SCHEMA``).
    """
    from gampen_ml.calibrate import LabelNoise
    from gampen_ml.posterior import summarize
    from gampen_ml.train import load_trained_model

    net, scaler, meta = load_trained_model(model_dir, device)
    rate = float(meta["dropout_rate"])
    errors = read_label_errors(labelled_dir)
    label_noise = (
        None if errors is None else LabelNoise.from_table(errors, derive_seed(seed, "label_noise"))
    )
    images, ids, truths = labelled_split(labelled_dir, split, int(meta["image_px"]))
    levels = profile.calibration.levels
    catalog, samples = validation_samples(
        profile, net, scaler, images, ids, truths,
        dropout_rate=rate, seed=seed, dataset=dataset, device=device,
    )  # fmt: skip
    if label_noise is None:
        raw = coverage_table(catalog, None, levels, dropout_rate=rate, split=split)
    else:
        log(
            f"{split} coverage against the labels deconvolved from {len(errors)} measured "
            "label errors"
        )
        noised = summarize(label_noise.add_all(scaler.inverse(samples)))
        raw = coverage_table(noised, truths, levels, dropout_rate=rate, split=split)
    if not recalibrate:
        return None, raw
    if len(images) < 100:
        log(
            f"recalibration fit on only {len(images)} {split} galaxies: its coverage is "
            "uncertain by several points; label more galaxies"
        )
    recalibration, recalibrated = recalibrate_on_validation(
        samples,
        scaler,
        truths,
        raw,
        levels,
        rate,
        log,
        spread_drivers=profile.calibration.spread_drivers,
        label_noise=label_noise,
        second_spread_drivers=profile.calibration.second_spread_drivers,
        second_shift_drivers=profile.calibration.second_shift_drivers,
    )
    return recalibration, pl.concat([raw, recalibrated])


def residual_summary(catalog: pl.DataFrame, model: str) -> list[dict]:
    """Accuracy and coverage of a catalog with truths (here: the labels), per parameter.

    One dict per parameter: ``model``, ``parameter``, ``n``, ``sigma`` (std of mode - label),
    ``p68_abs_residual`` (68th percentile of |mode - label|), ``median_bias`` and
    ``coverage_68`` / ``_95`` / ``_99`` (fractions; :mod:`gampen_ml.metrics`).
    """
    from gampen_ml.metrics import LEVEL_TAGS, covered, residuals

    rows = []
    for p in PARAMETERS:
        residual = residuals(catalog, p)
        rows.append(
            {
                "model": model,
                "parameter": p,
                "n": catalog.height,
                "sigma": float(np.nanstd(residual)),
                "p68_abs_residual": float(np.nanpercentile(np.abs(residual), 68)),
                "median_bias": float(np.nanmedian(residual)),
                **{
                    f"coverage_{tag}": float(covered(catalog, p, level).mean())
                    for level, tag in LEVEL_TAGS.items()
                },
            }
        )
    return rows


def domain_catalog(
    profile: Profile,
    model,
    labelled_dir: Path,
    split: str,
    *,
    seed: int,
    domain: str,
    device: str | None = None,
) -> pl.DataFrame:
    """Catalog of one labelled split (the labels as truths) through ``prediction.predict_catalog``.

    ``model`` is a :class:`~gampen_ml.prediction.PredictionModel`; the images are sized for it
    (:func:`fit_to_model`); the dataset is ``<domain>-<split>``.
    """
    from gampen_ml.stages import predict_catalog

    images, ids, truths = labelled_split(labelled_dir, split, model.image_px)
    return predict_catalog(
        profile, model, images, ids, dataset=f"{domain}-{split}", seed=seed, truths=truths,
        device=device, domain=domain,
    )  # fmt: skip


@dataclass
class FinetuneResult:
    """What :func:`finetune_and_publish` published."""

    model_dir: Path
    domain: str
    training: FinetuneTraining
    recalibration: Recalibration | None
    coverage: pl.DataFrame
    test_summary: list[dict]
    calibration: dict
    label_set_sha256: str
    mlflow_run_id: str | None = None
    model_version: str | None = None
    metrics: dict = field(default_factory=dict)


def finetune_and_publish(
    profile: Profile,
    root: Store | Path,
    domain: str,
    *,
    config: FinetuneConfig | None = None,
    device: str | None = None,
    log: Callable[[str], None] = lambda line: None,
    mlflow_tracking_uri: str | None = None,
    mlflow_artifact_location: str | None = None,
) -> FinetuneResult:
    """Fine-tune the champion on ``labelled_set/<domain>``, recalibrate, score, publish, register.

    Parameters
    ----------
    profile, root
        Profile and the store or storage root (the champion is
        ``calibrated_dropout_rate``'s choice).
    domain : str
        Domain name = partition key.
    config : FinetuneConfig, optional
        Default :class:`FinetuneConfig`.
    device : str, optional
        Torch device (default CUDA when present).
    log : callable(str)
        Progress lines.
    mlflow_tracking_uri, mlflow_artifact_location : str, optional
        Register as ``gampen-<profile>-<domain>`` and set its alias ``champion``.

    Returns
    -------
    FinetuneResult
    """
    from gampen_ml import plots
    from gampen_ml.registry import domain_model_name
    from gampen_ml.stages import PredictionModel, champion_model

    config = config or FinetuneConfig()
    base = champion_model(profile, root)
    store = Store.of(root)
    labelled_dir = store.labelled_set(domain)
    manifest = read_manifest(labelled_dir)
    sha = label_set_sha256(labelled_dir)
    if sha != manifest.get("label_set_sha256"):
        raise LabelledSetError(
            labelled_dir,
            f"content SHA-256 {sha[:16]} differs from its manifest's "
            f"{str(manifest.get('label_set_sha256'))[:16]}: materialize labelled_set again",
        )
    seed = derive_seed(profile.seed, FINETUNED_MODEL, domain)
    name = domain_model_name(profile.name, domain)
    out = store.finetuned_model(domain)
    log(f"{domain}: fine-tuning {base.model_name} v{base.model_version} on label set {sha[:16]}")
    with store.publish(out) as tmp:
        training = finetune_model(
            profile,
            base.model_dir,
            labelled_dir,
            tmp,
            config,
            seed=seed,
            device=device,
            log=log,
            extra_meta={
                "domain": domain,
                "data_version": sha[:16],
                "base_model_name": base.model_name,
                "base_model_version": base.model_version,
                "label_set_sha256": sha,
            },
        )
        recalibration, coverage = calibrate_on_split(
            profile,
            tmp,
            labelled_dir,
            split="val",
            dataset=f"{domain}-val",
            seed=derive_seed(seed, "val"),
            recalibrate=base.recalibration is not None,
            device=device,
            log=log,
        )
        coverage.write_parquet(tmp / COVERAGE_FILE)
        # The labeller's measured errors the val coverage was deconvolved from (None: none).
        label_errors = label_errors_record(labelled_dir)
        candidate = PredictionModel(tmp, name, UNREGISTERED, base.dropout_rate, recalibration)
        test_summary = []
        n_test = int(manifest["splits"].get("test", 0))
        if n_test:
            test_seed = derive_seed(seed, "test")
            for label, model in (("champion", base), ("finetuned", candidate)):
                catalog = domain_catalog(
                    profile, model, labelled_dir, "test", seed=test_seed, domain=domain,
                    device=device,
                )  # fmt: skip
                test_summary += residual_summary(catalog, label)
        final = coverage.filter(pl.col("recalibrated") == (recalibration is not None))
        metrics = {
            "val_loss_before": training.val_loss_before,
            "val_loss_after": training.val_loss_after,
            "best_epoch": training.best_epoch,
            "epochs_run": len(training.history),
            "n_train": training.n_train,
            "n_val": training.n_val,
            "n_test": n_test,
            "learning_rate": training.learning_rate,
            "freeze": config.freeze,
            "trainable_parameters": training.trainable_parameters,
            "val_coverage": final.to_dicts(),
            "test": test_summary,
            "label_errors": label_errors,
        }
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        curve = [{"epoch": 0, "val_loss": training.val_loss_before}, *training.history]
        plots.save_figure(plots.loss_curve(curve), tmp / LOSS_CURVE_FILE)

        run_id, version = None, None
        if mlflow_tracking_uri:
            run_id, version = _register(
                profile, tmp, labelled_dir, name, base, domain, sha, config, training, final,
                mlflow_tracking_uri, mlflow_artifact_location,
            )  # fmt: skip
            log(f"MLflow run {run_id}: {name} v{version}")
        calibration = {
            "model_name": name,
            "model_version": version or UNREGISTERED,
            "mlflow_run_id": run_id,
            "dropout_rate": base.dropout_rate,
            "recalibration": recalibration.to_dict() if recalibration is not None else None,
            "base_model_name": base.model_name,
            "base_model_version": base.model_version,
            "label_set_sha256": sha,
            "domain": domain,
            "freeze": config.freeze,
            "n_val_galaxies": training.n_val,
            "coverage": coverage.to_dicts(),
            "label_errors": label_errors,
            "training_domain": labelled_training_domain(
                profile, labelled_dir, candidate.image_px
            ).to_dict(),
        }
        (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
        ModelInfo(model_name=name, model_version=version, mlflow_run_id=run_id).write(tmp)
    if mlflow_tracking_uri and version:
        from gampen_ml.registry import set_champion

        set_champion(
            mlflow_tracking_uri,
            name,
            version,
            recalibration=calibration["recalibration"],
        )
        log(f"champion of {domain}: {name} v{version}")
    return FinetuneResult(
        model_dir=out,
        domain=domain,
        training=training,
        recalibration=recalibration,
        coverage=coverage,
        test_summary=test_summary,
        calibration=calibration,
        label_set_sha256=sha,
        mlflow_run_id=run_id,
        model_version=version,
        metrics=metrics,
    )


def _register(
    profile: Profile,
    model_dir: Path,
    labelled_dir: Path,
    name: str,
    base,
    domain: str,
    sha: str,
    config: FinetuneConfig,
    training: FinetuneTraining,
    coverage: pl.DataFrame,
    tracking_uri: str,
    artifact_location: str | None,
) -> tuple[str, str | None]:
    """Log the fine-tuned model as an MLflow run and register it under ``name``."""
    from gampen_ml.registry import log_training_run
    from gampen_ml.train import load_trained_model

    label_errors = label_errors_record(labelled_dir)
    net, scaler, meta = load_trained_model(model_dir, "cpu")
    images, _, _ = labelled_split(labelled_dir, "val", int(meta["image_px"]))
    # A small input batch and its outputs: the signature stored in the MLmodel file.
    x, _ = next(iterate_batches(images, scaler, 2, order=np.arange(min(2, len(images)))))
    with torch.no_grad():
        y = net(x).float().numpy()
    metrics = {
        "val_loss_before": training.val_loss_before,
        "val_loss_after": training.val_loss_after,
        **{
            f"val_coverage{'_recalibrated' if r['recalibrated'] else ''}."
            f"{r['parameter']}.{r['level']:.4f}": r["coverage"]
            for r in coverage.iter_rows(named=True)
        },
    }
    return log_training_run(
        tracking_uri,
        model_dir,
        profile_dict=profile.to_dict(),
        dropout_rate=base.dropout_rate,
        history=training.history,
        data_version=sha[:16],
        input_example=x.numpy(),
        output_example=y,
        artifact_location=artifact_location,
        model_name=name,
        version_tags={
            BASE_NAME_TAG: base.model_name,
            BASE_VERSION_TAG: str(base.model_version),
            LABEL_SET_TAG: sha,
            DOMAIN_TAG: domain,
            FREEZE_TAG: config.freeze,
            **({LABEL_NOISE_TAG: label_errors["sha256"]} if label_errors else {}),
        },
        metrics=metrics,
    )
