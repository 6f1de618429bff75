"""Train one GaMPEN model (one dropout rate) on simulated shards; checkpoint, resume, log.

Read :func:`train_model` top to bottom: configuration, data, model, optimizer, resume, the
epoch loop (train, validate, checkpoint), final files, MLflow. Device and precision are
explicit: on CUDA the forward pass runs under bf16 autocast with channels-last tensors;
launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel, each
rank taking an interleaved share of every epoch's permutation.

Files written into ``out_dir``::

    checkpoint.pt      model + optimizer + scheduler + history after every epoch (resume)
    state_dict.pt      final weights (load with torch.load(weights_only=True))
    model.json         network config, dropout rate, image size, profile, data version
    label_scaler.json  the LabelScaler fitted on the training split
    history.json       per-epoch train_loss, val_loss, lr, seconds, images_per_s
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gampen_ml.config import NetworkConfig, Profile, TrainingConfig, derive_seed, dropout_key
from gampen_ml.data.datasets import (
    IMAGES_FILE,
    LABELS_FILE,
    ShardImages,
    epoch_order,
    iterate_batches,
    prefetch,
)
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.infer import set_mc_dropout_mode
from gampen_ml.io import StorageError, atomic_file, file_sha256
from gampen_ml.model import GaMPEN, gaussian_nll, mean_squared_error
from gampen_ml.store import (  # noqa: F401 (the model folder's files, re-exported)
    CHECKPOINT_FILE,
    HISTORY_FILE,
    MODEL_JSON_FILE,
    SCALER_FILE,
    STATE_DICT_FILE,
    TRAINED_MODEL,
)

MODEL_FORMAT = "gampen-model/1"
#: Seeds the dropout masks of the validation pass (plus the rank), the same every epoch.
VALIDATION_DROPOUT_SEED = 20220419


class TrainingError(RuntimeError):
    """Training diverged or a checkpoint does not belong to this run."""


@dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    model_dir: Path
    history: list[dict] = field(default_factory=list)
    final_train_loss: float = math.nan
    final_val_loss: float = math.nan
    mlflow_run_id: str | None = None
    model_version: str | None = None
    data_version: str = ""


def shards_data_version(shard_dirs: Sequence[Path | str]) -> str:
    """Short hash identifying the training data: shard names, label-file hashes, image sizes.

    The labels table carries every galaxy's seed and parameters, so its hash plus the image
    file size identifies the shard without reading gigabytes of pixels.
    """
    digest = hashlib.sha256()
    for folder in sorted(Path(d) for d in shard_dirs):
        digest.update(folder.name.encode())
        digest.update(file_sha256(folder / LABELS_FILE).encode())
        digest.update(str((folder / IMAGES_FILE).stat().st_size).encode())
    return digest.hexdigest()[:16]


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; L2 strength ``weight_decay`` (paper: lambda = 1e-4)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant learning rate, or one-cycle with peak ``learning_rate`` over all steps."""
    if cfg.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.learning_rate, total_steps=max(1, cfg.epochs * steps_per_epoch)
        )
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise TrainingError(
        f"training.lr_schedule must be 'constant' or 'onecycle', got {cfg.lr_schedule!r}"
    )


@contextlib.contextmanager
def _distributed(device: str | torch.device | None):
    """Yield ``(device, rank, world_size)``; set up / tear down DDP under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), 0, 1
        return
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield (
            (torch.device("cuda", local_rank) if cuda else torch.device("cpu")),
            dist.get_rank(),
            world_size,
        )
    finally:
        dist.destroy_process_group()


def _all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def train_model(
    profile: Profile,
    dropout_rate: float,
    shard_dirs: Sequence[Path | str],
    out_dir: Path | str,
    *,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_artifact_location: str | None = None,
) -> TrainResult:
    """Train GaMPEN with one dropout rate on the ``train`` split, validating on ``val``.

    Parameters
    ----------
    profile : Profile
        Supplies ``network``, ``training`` and ``seed``.
    dropout_rate : float
        Rate of every dropout layer.
    shard_dirs : sequence of path
        ``simulated_galaxies`` shard folders (``images.npy`` + ``labels.parquet``).
    out_dir : path
        Model folder; must stay at the same place across a kill and a resume.
    device : str or torch.device, optional
        Default: CUDA when present, else CPU.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` if it exists (and matches this run).
    progress : bool
        Show a tqdm bar per epoch.
    log : callable, optional
        Receives one line per epoch (e.g. Dagster's ``context.log.info``). Called after the
        epoch's checkpoint is on disk.
    mlflow_tracking_uri : str, optional
        If given, log the run and register a model version (``gampen_ml.registry``).
    mlflow_artifact_location : str, optional
        Artifact root for a newly created MLflow experiment.

    Returns
    -------
    TrainResult
    """
    cfg = profile.training
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda line: None)
    seed = derive_seed(profile.seed, TRAINED_MODEL, dropout_key(dropout_rate))

    with _distributed(device) as (device, rank, world_size):
        is_master = rank == 0
        cuda = device.type == "cuda"
        # channels-last pays on CUDA tensor cores and on oneDNN CPU convolutions alike.
        memory_format = torch.channels_last
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        )

        # ---- data: memory-mapped shards; the label scaler sees the training split only
        train_set = ShardImages(shard_dirs, "train")
        val_set = ShardImages(shard_dirs, "val")
        if len(train_set) == 0 or len(val_set) == 0:
            raise TrainingError(
                f"need train and val rows in {[str(d) for d in shard_dirs]}: got "
                f"{len(train_set)} train, {len(val_set)} val"
            )
        scaler = LabelScaler.fit(train_set.physical_labels())
        data_version = shards_data_version(shard_dirs)
        per_rank = (len(train_set) - len(train_set) % world_size) // world_size
        steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
        warmup_steps = round(cfg.mean_warmup_fraction * cfg.epochs * steps_per_epoch)

        # ---- model and optimizer (same initial weights on every rank: same seed)
        torch.manual_seed(seed)
        model = GaMPEN(profile.network, dropout_rate, train_set.image_px)
        model = model.to(device=device, memory_format=memory_format)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
        meta = {
            "format": MODEL_FORMAT,
            "profile": profile.name,
            "dropout_rate": float(dropout_rate),
            "image_px": train_set.image_px,
            "network": dataclasses.asdict(profile.network),
            "training": dataclasses.asdict(profile.training),
            "seed": seed,
            "data_version": data_version,
            "shards": sorted(Path(d).name for d in shard_dirs),
            "n_train": len(train_set),
            "n_val": len(val_set),
        }

        # ---- resume
        start_epoch, history = 0, []
        checkpoint_path = out_dir / CHECKPOINT_FILE
        if resume and checkpoint_path.is_file():
            ckpt = torch.load(checkpoint_path, map_location=device, weights_only=True)
            for key in ("profile", "dropout_rate", "data_version", "network", "training"):
                if ckpt["meta"].get(key) != meta[key]:
                    raise TrainingError(
                        f"{checkpoint_path}: field {key} is {ckpt['meta'].get(key)!r} but this "
                        f"run has {meta[key]!r}; delete the checkpoint or pass resume=False"
                    )
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
            log(f"resumed from {checkpoint_path} after epoch {start_epoch}")
        train_net: nn.Module = model
        if world_size > 1:
            train_net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if cuda else None
            )

        # ---- epochs
        for epoch in range(start_epoch, cfg.epochs):
            # Every random stream is a pure function of (seed, epoch, rank): a resumed run
            # draws exactly what an uninterrupted one would have.
            torch.manual_seed(derive_seed(seed, "epoch", f"{epoch}/{rank}"))
            order = epoch_order(len(train_set), seed, epoch)
            augment_rng = np.random.default_rng([seed, epoch, rank]) if cfg.augment else None
            train_net.train()
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            n_seen = 0
            bar = _progress_bar(progress and is_master, steps_per_epoch, epoch, cfg.epochs)
            # The next batches are gathered, augmented and scaled in a background thread
            # while this one trains (same batches, same augmentation draws).
            batches = iterate_batches(
                train_set,
                scaler,
                cfg.batch_size,
                order=order,
                augment_rng=augment_rng,
                rank=rank,
                world_size=world_size,
            )
            for step, (x, y) in enumerate(prefetch(batches)):
                x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                y = y.to(device, non_blocking=True)
                with autocast:
                    out = train_net(x)
                nll = gaussian_nll(out, y)
                loss = nll
                if epoch * steps_per_epoch + step < warmup_steps:
                    loss = nll + mean_squared_error(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                loss_sum += nll.detach() * len(x)
                n_seen += len(x)
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{nll.item():.4f}")
            if bar is not None:
                bar.close()
            totals = _all_reduce_sum(
                torch.stack(
                    [loss_sum, torch.tensor(float(n_seen), device=device, dtype=torch.float64)]
                ),
                world_size,
            )
            train_loss = float(totals[0] / totals[1])
            seconds = time.perf_counter() - started
            if not math.isfinite(train_loss):
                raise TrainingError(
                    f"training diverged: train_loss = {train_loss} in epoch {epoch + 1} "
                    f"(profile {profile.name}, dropout {dropout_rate:g}); lower "
                    "training.learning_rate"
                )
            val_loss = evaluate_loss(
                model, val_set, scaler, cfg.batch_size, device, rank=rank, world_size=world_size
            )
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "seconds": seconds,
                    "images_per_s": float(totals[1]) / seconds,
                }
            )
            if is_master:
                _save_torch(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                        "meta": meta,
                    },
                    checkpoint_path,
                )
            h = history[-1]
            log(
                f"epoch {h['epoch']}/{cfg.epochs}: train_loss {h['train_loss']:.4f} "
                f"val_loss {h['val_loss']:.4f} lr {h['lr']:.3g} "
                f"{h['images_per_s']:.0f} images/s ({h['seconds']:.1f} s)"
            )

        # ---- final files (the checkpoint stays: rerunning with resume=True is a no-op)
        result = TrainResult(model_dir=out_dir, history=history, data_version=data_version)
        if history:
            result.final_train_loss = history[-1]["train_loss"]
            result.final_val_loss = history[-1]["val_loss"]
        if not is_master:
            return result
        meta["epochs_trained"] = len(history)
        _save_torch(model.state_dict(), out_dir / STATE_DICT_FILE)
        scaler.save(out_dir / SCALER_FILE)
        _write_json(meta, out_dir / MODEL_JSON_FILE)
        _write_json(history, out_dir / HISTORY_FILE)

        if mlflow_tracking_uri:
            from gampen_ml.registry import log_training_run

            x_example, _ = next(
                iterate_batches(val_set, scaler, 2, order=np.arange(min(2, len(val_set))))
            )
            model.eval()
            with torch.no_grad():
                y_example = model(x_example.to(device)).float().cpu().numpy()
            result.mlflow_run_id, result.model_version = log_training_run(
                mlflow_tracking_uri,
                out_dir,
                profile_dict=profile.to_dict(),
                dropout_rate=dropout_rate,
                history=history,
                data_version=data_version,
                input_example=x_example.numpy(),
                output_example=y_example,
                artifact_location=mlflow_artifact_location,
            )
            log(f"MLflow run {result.mlflow_run_id}, model version {result.model_version}")
        return result


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: ShardImages,
    scaler: LabelScaler,
    batch_size: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean NLL over ``dataset`` of one Monte-Carlo pass; summed across ranks.

    The model is evaluated as MC-dropout inference runs it (:func:`gampen_ml.infer.
    set_mc_dropout_mode`: batch norm in eval mode, dropout on), with the dropout masks drawn
    from a fixed seed so that epochs compare. With dropout off, a model trained with dropout
    before batch-normalized convolutions is not the model the catalog uses: the running
    statistics were gathered with dropout on, and that mismatch alone made a `quick`
    dropout-0.05 model's validation NLL climb to +11 while its MC-pass NLL was -2.7.
    """
    set_mc_dropout_mode(model)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    order = np.arange(len(dataset))
    if world_size > 1:
        order = order[rank::world_size]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(VALIDATION_DROPOUT_SEED + rank)
        for x, y in prefetch(iterate_batches(dataset, scaler, batch_size, order=order)):
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(x)
            loss_sum += gaussian_nll(out, y.to(device)) * len(x)
    totals = _all_reduce_sum(
        torch.stack(
            [loss_sum, torch.tensor(float(len(order)), device=device, dtype=torch.float64)]
        ),
        world_size,
    )
    return float(totals[0] / totals[1])


def load_trained_model(
    model_dir: Path | str, device: str | torch.device | None = None
) -> tuple[GaMPEN, LabelScaler, dict]:
    """Rebuild a trained GaMPEN from its folder (weights loaded with ``weights_only=True``).

    Returns
    -------
    (model, scaler, meta)
        ``model`` in eval mode on ``device`` (default CPU); ``meta`` is ``model.json``.
    """
    model_dir = Path(model_dir)
    for name in (MODEL_JSON_FILE, STATE_DICT_FILE, SCALER_FILE):
        if not (model_dir / name).is_file():
            raise StorageError(f"trained model folder {model_dir} lacks {name}")
    meta = json.loads((model_dir / MODEL_JSON_FILE).read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise StorageError(
            f"{model_dir / MODEL_JSON_FILE}: field format is {meta.get('format')!r}, "
            f"expected {MODEL_FORMAT!r}"
        )
    device = torch.device(device or "cpu")
    network = dict(meta["network"])
    # Saved before the STN zoom was bounded: keep the unbounded zoom the weights were fit with.
    zoom = network.get("stn_zoom_range")
    network["stn_zoom_range"] = None if zoom is None else tuple(zoom)
    model = GaMPEN(NetworkConfig(**network), meta["dropout_rate"], meta["image_px"])
    try:
        state = torch.load(model_dir / STATE_DICT_FILE, map_location=device, weights_only=True)
    except Exception as exc:
        # weights_only refuses pickled code (UnpicklingError) and torn files fail to load:
        # either way name the file instead of a traceback.
        raise StorageError(
            f"{model_dir / STATE_DICT_FILE} is not a loadable tensor state_dict "
            f"(pickled objects are refused): {str(exc).splitlines()[0]}"
        ) from exc
    model.load_state_dict(state)
    model = model.to(device).eval()
    return model, LabelScaler.load(model_dir / SCALER_FILE), meta


def _progress_bar(enabled: bool, total: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False)


def _save_torch(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _write_json(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
