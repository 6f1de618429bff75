"""Transfer study (issue 19, part 5), last row: trained from scratch on 10x the domain sims.

The row of ``benchmarks/results/transfer_study.md`` that the study itself leaves out for
time: a network of the champion's architecture trained from scratch on ``--n-train``
(default 10,000 = 10x the largest label set) rendered target-domain galaxies
(:mod:`gampen_ml.sim.target_domain`) labelled with their *truth*, then recalibrated and
scored exactly like the study's other rows.

1. **Render** ``--n-train`` galaxies (pool seed ``--pool-seed``, default 19,200: disjoint
   from the study's labelled pool, 19,100, and from the frozen test split,
   :data:`~gampen_ml.sim.target_domain.FROZEN_TEST_SEED`) in resumable chunks
   (:func:`render_chunked`).
2. **Label** with the truth: a random order of the galaxies fixed by the pool seed, every
   fifth ``val`` (80 / 20, as the study's label sets), published as
   ``labelled_set/<--name>`` through :func:`benchmarks.transfer_study.publish` (the
   platform's validation, crop/pad to the model's stamp).
3. **Train from scratch** (``--trainer``):

   * ``train`` (default): :func:`gampen_ml.train.train_model`, the profile's own training --
     the ``quick`` recipe in full (AdamW, one-cycle schedule over its 14 epochs, the
     mean-squared-error warm-up of ``mean_warmup_fraction``, gradient clipping,
     augmentation), no early stopping (the last epoch's weights, as the champion's), the
     champion's dropout rate, a label scaler fit on this train split, a checkpoint after
     every epoch (a rerun resumes it);
   * ``finetune``: the fine-tuning loop with ``FinetuneConfig(init="random", freeze="none")``
     (:func:`gampen_ml.finetune.finetune_model`: the champion's label scaler, the profile's
     peak learning rate held constant, eq. 8 alone, early stopping on ``val`` with
     ``--patience``, at most ``--max-epochs``; not resumable).

4. **Recalibrate** on the ``val`` split with the champion's method
   (:func:`gampen_ml.finetune.calibrate_on_split`; truth labels, so no label noise).
5. **Score** the study's frozen test split (``--test-set``, the study's
   ``labelled_set/sim-knots-test``; never used for a choice) with
   :func:`gampen_ml.finetune.domain_catalog` and the study's MC seed and statistics
   (:func:`benchmarks.transfer_study.summarise`).

Writes ``transfer_scratch.json`` and ``transfer_scratch.md`` (one row in the format of the
study's table; ``transfer_scratch.finetune.*`` with ``--trainer finetune``) to ``--out``;
everything else lives in ``--scratch`` and is skipped when done.

Run::

    .venv/bin/python -m benchmarks.transfer_scratch --base-root /tmp/study/work/root \\
        --scratch /tmp/study/scratch --workers 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from benchmarks.study_files import mark_rendered, rendered, write_results
from benchmarks.transfer_study import (
    CHAMPION_ASSETS,
    LEVEL_KEYS,
    TEST_DOMAIN,
    publish,
    summarise,
)
from gampen_ml.calibrate import Recalibration
from gampen_ml.config import PARAMETERS, derive_seed, get_profile
from gampen_ml.finetune import (
    FinetuneConfig,
    calibrate_on_split,
    domain_catalog,
    finetune_model,
    labelled_training_domain,
)
from gampen_ml.labelled import read_manifest
from gampen_ml.sim.target_domain import (
    FROZEN_TEST_SEED,
    TRUTH_FILE,
    TargetDomainConfig,
    render_target_domain,
    target_domain_parameters,
    write_target_cutouts,
)
from gampen_ml.stages import PredictionModel, champion_model

HERE = Path(__file__).resolve().parent
SCRATCH_POOL_SEED = 19_200
#: Galaxies per render chunk (a chunk is the unit a crash can lose).
CHUNK = 250
RENDER_SPEC = "_render_spec.json"
RENDER_DONE = "_render.json"
CALIBRATION_FILE = "scratch_calibration.json"


def render_chunked(
    folder: Path, n: int, seed: int, n_workers: int, chunk: int = CHUNK
) -> pl.DataFrame:
    """Render ``n`` target-domain galaxies into ``folder`` in resumable chunks.

    The parameters of all ``n`` are drawn together from ``seed`` (as
    :func:`gampen_ml.sim.target_domain.write_target_domain` does) and each galaxy's PSF, knot
    and noise streams are seeded ``(seed, galaxy_id)``, so the chunked folder holds exactly the
    images a one-shot render would. A chunk counts as done once its truth table
    ``_chunk_<k>.parquet`` exists (written after its cutouts); a rerun skips done chunks.
    Returns the full truth table (also written to ``folder / TRUTH_FILE``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RENDER_DONE
    if rendered(marker, n, seed, "use another folder"):
        return pl.read_parquet(folder / TRUTH_FILE)
    spec = folder / RENDER_SPEC
    if spec.exists():
        known = json.loads(spec.read_text())
        if (known["n"], known["seed"], known["chunk"]) != (n, seed, chunk):
            raise SystemExit(f"{folder} is a partial render of {known}: use another folder")
    else:
        spec.write_text(json.dumps({"n": n, "seed": seed, "chunk": chunk}))
    cfg = TargetDomainConfig()
    params = target_domain_parameters(n, seed)
    parts = []
    for k, a in enumerate(range(0, n, chunk)):
        part_file = folder / f"_chunk_{k:04d}.parquet"
        if part_file.exists():
            parts.append(pl.read_parquet(part_file))
            continue
        t0 = time.perf_counter()
        images, psfs, truth = render_target_domain(
            params.slice(a, chunk), cfg, seed, n_workers=n_workers
        )
        write_target_cutouts(folder, images, psfs, truth, cfg)
        tmp = part_file.with_suffix(".tmp")
        truth.write_parquet(tmp)
        tmp.rename(part_file)
        parts.append(truth)
        print(
            f"render chunk {k} ({a + truth.height}/{n}) {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    truth = pl.concat(parts)
    tmp = folder / "_truth.tmp"
    truth.write_parquet(tmp)
    tmp.rename(folder / TRUTH_FILE)
    mark_rendered(marker, n, seed)
    return truth


def render_wall_seconds(folder: Path) -> float | None:
    """Wall time of a finished chunked render: its spec file to its done marker (mtimes).

    Includes any pause between a crash and the resume; None while the render is unfinished.
    """
    spec, done = folder / RENDER_SPEC, folder / RENDER_DONE
    if not (spec.exists() and done.exists()):
        return None
    return done.stat().st_mtime - spec.stat().st_mtime


def truth_labels(truth: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Truth labels (``file`` = ``pool/<cutout>``) in a random order, every fifth ``val``."""
    order = np.random.default_rng(seed).permutation(truth.height)
    return (
        truth[order.tolist()]
        .select(pl.concat_str(pl.lit("pool/"), "file").alias("file"), *PARAMETERS)
        .with_row_index("position")
        .with_columns(
            pl.when(pl.col("position") % 5 == 4)
            .then(pl.lit("val"))
            .otherwise(pl.lit("train"))
            .alias("split")
        )
    )


def markdown_row(result: dict) -> str:
    """The study table's header and this model's row (``transfer_study.md`` format)."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    by = {r["parameter"]: r for r in result["test"]}
    cov = ["/".join(pct(by[p][k]) for p in PARAMETERS) for k in LEVEL_KEYS]
    if result["trainer"] == "train":
        epochs = f"{result['epochs_run']} (last)"
    else:
        epochs = f"{result['epochs_run']} ({result['best_epoch']})"
    row = (
        f"| {result['name']} | {result['n_labels']} truth | {result['n_train']} / "
        f"{result['n_val']} | {epochs} | "
        f"{by['bt']['sigma']:.3f} | {by['bt']['p68_abs_residual']:.3f} | "
        f"{by['re_arcsec']['frac_sigma']:.3f} | {by['re_arcsec']['frac_p68_abs_residual']:.3f} | "
        f"{by['flux_nJy']['frac_sigma']:.3f} | {by['flux_nJy']['frac_p68_abs_residual']:.3f} | "
        f"{cov[0]} | {cov[1]} | {cov[2]} |"
    )
    render = result["render_wall_seconds"]
    lines = [
        "# Transfer study: trained from scratch on 10x domain sims",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['n_labels']} target-domain galaxies (`{result['domain']}`, pool seed "
        f"{result['pool_seed']}), labelled with their truth, {result['n_train']} train / "
        f"{result['n_val']} val; trainer `{result['trainer']}` ({result['trainer_note']}); "
        f"recalibrated on its val split with the champion's method; scored on the study's "
        f"frozen test split ({result['n_test']} galaxies, seed {result['test_seed']}, MC seed "
        f"{result['mc_seed']}). Render {'–' if render is None else f'{render:.0f} s'} wall "
        f"({result['workers']} render workers); training {result['train_epoch_seconds']:.0f} s in "
        f"epochs; calibration {result['calibration_seconds']:.0f} s; test catalog "
        f"{result['test_seconds']:.0f} s. Machine: {result['machine']}, profile "
        f"`{result['profile']}`, {result['threads']} torch threads.",
        "",
        "| model | labels (fitter / drawn) | train / val | epochs (best) | "
        "B/T σ | B/T p68 | Re σ (rel.) | Re p68 (rel.) | flux σ (rel.) | flux p68 (rel.) | "
        "cov. 68.27 % (bt/re/flux) | cov. 95.45 % | cov. 99.73 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        row,
        "",
    ]
    return "\n".join(lines)


def train_scratch(args, profile, base, labelled_dir: Path, model_dir: Path) -> dict:
    """Train from scratch into ``model_dir`` (resumable for ``train``); the run's figures."""
    started = time.perf_counter()
    if args.trainer == "train":
        from gampen_ml.train import train_model

        result = train_model(
            profile, base.dropout_rate, [labelled_dir], model_dir, device="cpu",
            resume=True, progress=False, log=lambda line: print(line, flush=True),
        )  # fmt: skip
        history = result.history
        figures = {"epochs_run": len(history), "best_epoch": len(history)}
        note = (
            f"gampen_ml.train.train_model: the {profile.name} recipe, "
            f"{profile.training.epochs} epochs, {profile.training.lr_schedule} schedule, "
            "last epoch kept"
        )
    else:
        config = FinetuneConfig(
            init="random", freeze="none", max_epochs=args.max_epochs, patience=args.patience
        )
        seed = derive_seed(profile.seed, "transfer_scratch", args.name)
        training = finetune_model(
            profile, base.model_dir, labelled_dir, model_dir, config, seed=seed,
            device="cpu", log=lambda line: print(line, flush=True),
        )  # fmt: skip
        history = training.history
        figures = {"epochs_run": len(history), "best_epoch": training.best_epoch}
        note = (
            f"fine-tune loop, init random, constant lr {config.learning_rate(profile):.3g}, "
            f"early stopping patience {config.patience}, at most {config.max_epochs} epochs"
        )
    return {
        **figures,
        "trainer_note": note,
        "history": history,
        "train_epoch_seconds": float(sum(h["seconds"] for h in history)),
        "train_wall_seconds_this_run": time.perf_counter() - started,
        "final_val_loss": history[-1]["val_loss"] if history else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-root",
        type=Path,
        default=Path("/tmp/study/work/root"),
        help="storage root with the champion (the study's --work/root)",
    )
    parser.add_argument(
        "--test-set",
        type=Path,
        default=Path("/tmp/study/work/root/labelled_set") / TEST_DOMAIN,
        help="the study's published frozen test split",
    )
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/study/scratch"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="sim-knots-scratch10k", help="labelled-set name")
    parser.add_argument("--n-train", type=int, default=10_000, help="rendered galaxies")
    parser.add_argument("--pool-seed", type=int, default=SCRATCH_POOL_SEED)
    parser.add_argument("--workers", type=int, default=2, help="render processes")
    parser.add_argument("--trainer", choices=("train", "finetune"), default="train")
    parser.add_argument("--max-epochs", type=int, default=14, help="finetune trainer only")
    parser.add_argument("--patience", type=int, default=5, help="finetune trainer only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.pool_seed == FROZEN_TEST_SEED:
        raise SystemExit(f"--pool-seed {FROZEN_TEST_SEED} renders the frozen test split")
    torch.set_num_threads(args.threads)
    profile = get_profile("quick")
    scratch = args.scratch

    truth = render_chunked(scratch / "pool", args.n_train, args.pool_seed, args.workers)
    print(f"rendered {truth.height} galaxies", flush=True)
    if args.render_only:
        return
    if not (args.test_set / "manifest.json").is_file():
        raise SystemExit(f"{args.test_set}: no published test split (run transfer_study first)")

    root = scratch / "root"
    for asset in CHAMPION_ASSETS:
        if not (root / asset).exists():
            shutil.copytree(args.base_root / asset, root / asset)
    base = champion_model(profile, root)
    labels = truth_labels(truth, args.pool_seed + 1)
    started = time.perf_counter()
    labelled_dir = publish(profile, root, scratch, args.name, labels, {"pool": scratch / "pool"})
    print(f"labelled set ready ({time.perf_counter() - started:.0f} s)", flush=True)

    model_dir = scratch / f"model-{args.trainer}"
    trained = train_scratch(args, profile, base, labelled_dir, model_dir)

    calib_file = model_dir / CALIBRATION_FILE
    if calib_file.is_file():
        calib = json.loads(calib_file.read_text())
    else:
        started = time.perf_counter()
        recalibration, coverage = calibrate_on_split(
            profile, model_dir, labelled_dir, split="val", dataset=f"{args.name}-val",
            seed=derive_seed(profile.seed, "transfer_scratch", "val"),
            recalibrate=base.recalibration is not None, log=print,
        )  # fmt: skip
        calib = {
            "recalibration": None if recalibration is None else recalibration.to_dict(),
            "val_coverage": coverage.to_dicts(),
            "seconds": time.perf_counter() - started,
        }
        calib_file.write_text(json.dumps(calib, indent=2) + "\n")
    recal = calib["recalibration"]
    image_px = int(json.loads((model_dir / "model.json").read_text())["image_px"])
    model = PredictionModel(
        model_dir,
        f"gampen-{profile.name}-{args.name}",
        "unregistered",
        base.dropout_rate,
        None if recal is None else Recalibration.from_dict(recal),
        domain=labelled_training_domain(profile, labelled_dir, image_px),
    )
    started = time.perf_counter()
    catalog = domain_catalog(
        profile, model, args.test_set, "test", seed=FROZEN_TEST_SEED, domain=TEST_DOMAIN
    )
    test_seconds = time.perf_counter() - started

    splits = read_manifest(labelled_dir)["splits"]
    result = {
        "benchmark": "transfer_scratch",
        "command": "python -m benchmarks.transfer_scratch " + " ".join(sys.argv[1:]),
        "name": f"from scratch on 10x domain sims ({args.n_train:,} truth-labelled)",
        "domain": TargetDomainConfig().name,
        "profile": profile.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "workers": args.workers,
        "pool_seed": args.pool_seed,
        "n_labels": truth.height,
        "n_train": int(splits["train"]),
        "n_val": int(splits["val"]),
        "n_test": catalog.height,
        "test_seed": FROZEN_TEST_SEED,
        "mc_seed": FROZEN_TEST_SEED,
        "trainer": args.trainer,
        "dropout_rate": base.dropout_rate,
        "render_wall_seconds": render_wall_seconds(scratch / "pool"),
        **trained,
        "calibration_seconds": calib["seconds"],
        "recalibration": recal,
        "val_coverage": [
            r for r in calib["val_coverage"] if r["recalibrated"] == (recal is not None)
        ],
        "test_seconds": test_seconds,
        "test": summarise(catalog, "scratch"),
    }
    stem = "transfer_scratch" if args.trainer == "train" else f"transfer_scratch.{args.trainer}"
    write_results(args.out, stem, result, markdown_row(result))


if __name__ == "__main__":
    main()
