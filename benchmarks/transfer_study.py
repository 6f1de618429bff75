"""Transfer study (issue 19, part 5): the champion vs fine-tuned on 250 / 1,000 labels.

On the simulated target domain (:mod:`gampen_ml.sim.target_domain`: Table-1 galaxies with
star-forming knots, a Kolmogorov PSF, correlated noise), with known truth:

1. **Render** a labelled pool (``--pool`` galaxies, seed ``--pool-seed``) and a separate
   frozen test split (``--n-test`` galaxies, :data:`FROZEN_TEST_SEED`), never used for any
   choice: early stopping and recalibration use the labelled sets' ``val`` split only.
2. **Label.** A random order of the pool is fixed once (seed ``--pool-seed``); the set of
   ``L`` labels is its first ``L`` galaxies, every fifth of them ``val`` (so the 250-label set
   lies inside the 1,000-label one). The first ``--n-fit`` galaxies are labelled by the
   profile fitter exactly as ``gampen label --workers N`` does
   (:func:`gampen_ml.label.label_folder`, bulge+disk, resumable); every other pool galaxy
   gets *truth + an error drawn from the fitter's measured residuals* on those fits (one fit
   galaxy drawn at random per galaxy, its residual vector applied jointly: relative for
   ``re_arcsec`` and ``flux_nJy``, absolute for ``bt``, then clipped to the valid range). A
   fit that failed gets a drawn error too. Each row's ``label_source`` says which.
3. **Fine-tune** the champion on each set through the ``finetuned_model`` asset's function
   (:func:`gampen_ml.finetune.finetune_and_publish`: default freezing, early stopping on
   ``val``, the champion's recalibration refit on ``val``), one domain partition per set.
   Each set is fine-tuned twice, in two storage roots, with the same domain name (so the
   same seeds): ``<work>/root`` recalibrates against the labels as given, ``<work>/root-eiv``
   against the labels *deconvolved* from the labeller's measured errors (the set carries
   :data:`gampen_ml.labelled.LABEL_ERRORS_FILE`, built by
   :func:`gampen_ml.labelled.label_errors_table` from the fitter's ``ok`` labels and their
   truths: the same residuals the drawn labels were made from, so for those labels the
   error model is exact by construction).
4. **Score** the champion and each fine-tuned model on the test split against the truth
   (:func:`gampen_ml.finetune.domain_catalog`, one MC seed for all models): sigma and the
   68th percentile of |residual| per parameter (absolute, and relative for Re and flux) and
   the coverage of the 68.27 / 95.45 / 99.73 % HPD intervals; plus the labeller's own
   numbers on its fits (seconds per galaxy, coverage of its posterior widths;
   :func:`benchmarks.label_study.score`).

Writes ``transfer_study.json`` and ``transfer_study.md`` to ``--out``. Every step is kept
in ``--work`` (the cutouts, the fitter's labels, a storage root with the champion copied
from ``--base-root``, the labelled sets and the fine-tuned models) and skipped when done.

Run::

    .venv/bin/python -m benchmarks.transfer_study --base-root /tmp/pipe_base/dagster_home/data \\
        --work /tmp/study/work --n-fit 250 --fit-budget-s 990 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from benchmarks.label_study import score as score_labeller
from benchmarks.study_files import mark_rendered, rendered, write_results
from gampen_ml.config import PARAMETERS, get_profile
from gampen_ml.domains import load_domain
from gampen_ml.finetune import (
    LABELLED_ASSET,
    FinetuneConfig,
    domain_catalog,
    finetune_and_publish,
    residual_summary,
)
from gampen_ml.io import file_sha256, partition_dir
from gampen_ml.label import STATUS_OK, label_folder, read_labels
from gampen_ml.labelled import (
    LABEL_ERRORS_FILE,
    label_errors_table,
    publish_labelled_set,
)
from gampen_ml.metrics import covered, residuals
from gampen_ml.sim.target_domain import (
    FROZEN_TEST_SEED,
    TRUTH_FILE,
    TargetDomainConfig,
    write_target_domain,
)
from gampen_ml.stages import champion_model, finetuned_model

HERE = Path(__file__).resolve().parent
#: What the fine-tuning needs of the base storage root (copied, never written there).
CHAMPION_ASSETS = ("calibrated_dropout_rate", "trained_model")
TEST_DOMAIN = "sim-knots-test"
#: Galaxies per call of the labeller (the fit budget is checked between calls).
FIT_CHUNK = 20
LEVEL_KEYS = ("coverage_68", "coverage_95", "coverage_99")
NOMINAL = {"coverage_68": 0.6827, "coverage_95": 0.9545, "coverage_99": 0.9973}
#: The from-scratch row is its own script (hours of rendering and training on 2 cores).
FROM_SCRATCH_NOTE = (
    "separate run: `python -m benchmarks.transfer_scratch` (results/transfer_scratch.md)"
)


def render(folder: Path, n: int, seed: int, n_workers: int) -> pl.DataFrame:
    """Target-domain cutouts + truth in ``folder`` (rendered once per ``(n, seed)``)."""
    marker = folder / "_render.json"
    if rendered(marker, n, seed, "use --work"):
        return pl.read_parquet(folder / TRUTH_FILE)
    truth = write_target_domain(folder, n, TargetDomainConfig(), seed, n_workers=n_workers)
    mark_rendered(marker, n, seed)
    return truth


def link(src: Path, dst: Path) -> None:
    """Hard-link (else copy) ``src`` to ``dst`` once; publishing may move ``dst`` away."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fitter_labels(
    work: Path, pool: Path, files: list[str], n_workers: int, budget_s: float | None
) -> tuple[pl.DataFrame, float]:
    """Fitter labels of the first files of ``files`` that ``budget_s`` allows (resumable).

    The files are fitted in chunks of :data:`FIT_CHUNK`, in order; no new chunk starts
    once ``budget_s`` seconds have passed (None: fit them all). Returns the labels of the
    fitted files and the wall seconds this call spent fitting.
    """
    folder = work / "fit"
    out = work / "fitter_labels.parquet"
    cfg = TargetDomainConfig()
    imaging = cfg.domain().imaging(get_profile("quick").imaging)
    start = time.perf_counter()
    for first in range(0, len(files), FIT_CHUNK):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            print(f"fit budget of {budget_s:.0f} s spent: {first} of {len(files)} fitted")
            break
        for name in files[first : first + FIT_CHUNK]:
            link(pool / name, folder / name)
        label_folder(folder, out, imaging, domain=cfg.domain(), resume=True, n_workers=n_workers)
        print(f"fitted {min(first + FIT_CHUNK, len(files))} ({time.perf_counter() - start:.0f} s)")
    return read_labels(out), time.perf_counter() - start


def build_labels(
    truth: pl.DataFrame, order: np.ndarray, fits: pl.DataFrame, seed: int
) -> pl.DataFrame:
    """One label row per pool galaxy in ``order``: fitter label or truth + a drawn error."""
    truth = truth.select("file", "galaxy_id", *PARAMETERS)
    ok = fits.filter(pl.col("fit_status") == STATUS_OK).join(
        truth, on="file", how="inner", suffix="_true"
    )
    if ok.height == 0:
        raise SystemExit("no fitter label is ok: nothing to draw label errors from")
    errors = np.column_stack(
        [
            (ok["bt"] - ok["bt_true"]).to_numpy(),
            (ok["re_arcsec"] / ok["re_arcsec_true"] - 1).to_numpy(),
            (ok["flux_nJy"] / ok["flux_nJy_true"] - 1).to_numpy(),
        ]
    )
    fitted = {r["file"]: r for r in ok.iter_rows(named=True)}
    rng = np.random.default_rng(seed)
    rows = truth[order.tolist()].iter_rows(named=True)
    out = []
    for position, row in enumerate(rows):
        fit = fitted.get(row["file"])
        if fit is not None:
            bt, re, flux, source = fit["bt"], fit["re_arcsec"], fit["flux_nJy"], "fitter"
        else:
            e = errors[rng.integers(len(errors))]
            bt = float(np.clip(row["bt"] + e[0], 0.0, 1.0))
            re = float(max(row["re_arcsec"] * (1 + e[1]), 1e-3))
            flux = float(max(row["flux_nJy"] * (1 + e[2]), 1e-3))
            source = "truth+drawn_error"
        out.append(
            {
                "file": f"pool/{row['file']}",
                "bt": bt,
                "re_arcsec": re,
                "flux_nJy": flux,
                "split": "val" if position % 5 == 4 else "train",
                "label_source": source,
                "position": position,
            }
        )
    return pl.DataFrame(out)


def declare(dagster_home: Path, name: str):
    """Write ``domains/<name>.toml`` (the target domain under ``name``) and load it."""
    toml = TargetDomainConfig().domain_toml().replace(TargetDomainConfig().name, name, 1)
    path = dagster_home / "domains" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml)
    return load_domain(path)


def publish(
    profile,
    root: Path,
    work: Path,
    name: str,
    labels: pl.DataFrame,
    sources: dict[str, Path],
    label_errors: pl.DataFrame | None = None,
) -> Path:
    """Publish ``labels`` (``file`` = ``<pool|test>/<cutout>``) as ``labelled_set/<name>``.

    With ``label_errors`` the source folder (``<work>/labelled-eiv/<name>``) also holds the
    labeller's error table, which the set then carries.
    """
    out = partition_dir(root, LABELLED_ASSET, name)
    if (out / "manifest.json").is_file():
        return out
    domain = declare(work / "dagster_home", name)
    source = work / ("labelled" if label_errors is None else "labelled-eiv") / name
    if label_errors is not None:
        source.mkdir(parents=True, exist_ok=True)
        label_errors.write_parquet(source / LABEL_ERRORS_FILE)
    for file in labels["file"]:
        sub, cutout = file.split("/", 1)
        link(sources[sub] / cutout, source / file)
    labels.select("file", "bt", "re_arcsec", "flux_nJy", "split").write_parquet(
        source / "labels.parquet"
    )
    result = publish_labelled_set(
        profile, domain, source, out, work / "quarantine" / "labelled", log=print
    )
    print(f"labelled_set/{name}: {result.split_counts}")
    return out


def summarise(catalog: pl.DataFrame, model: str) -> list[dict]:
    """:func:`residual_summary` plus relative sigma / p68 for Re and flux."""
    rows = residual_summary(catalog, model)
    for row in rows:
        if row["parameter"] != "bt":
            r = residuals(catalog, row["parameter"], fractional=True)
            row["frac_sigma"] = float(np.nanstd(r))
            row["frac_p68_abs_residual"] = float(np.nanpercentile(np.abs(r), 68))
    return rows


def bt_coverage_by_component(catalog: pl.DataFrame, truth: pl.DataFrame) -> dict:
    """B/T coverage (68.27 / 95.45 %) of single-component (B/T exactly 0 or 1) and two-component
    galaxies: the first can only be covered by an interval that reaches 0 or 1."""
    files = catalog["source_file"].str.split("/").list.last()
    component = (
        pl.DataFrame({"file": files}).join(truth.select("file", "component"), on="file", how="left")
    )["component"].to_numpy()
    groups = {"single": component != "bulge+disk", "two": component == "bulge+disk"}
    return {
        name: {
            "n": int(mask.sum()),
            **{
                key: float(covered(catalog, "bt", level)[mask].mean())
                for key, level in zip(LEVEL_KEYS[:2], (0.6827, 0.9545), strict=True)
            },
        }
        for name, mask in groups.items()
    }


def markdown(result: dict) -> str:
    """The result as ``benchmarks/results/transfer_study.md``."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [
        "# Transfer study: champion vs fine-tuned on the simulated target domain",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Target domain `{result['domain']}` (knots, Kolmogorov PSF, correlated noise). Test: "
        f"{result['n_test']} galaxies (seed {result['test_seed']}), scored against the truth. "
        f"Pool seed {result['pool_seed']}. Labels: {result['n_fit']} galaxies fitted by "
        f"`gampen label` ({result['labeller']['n_ok']} ok), the rest truth + errors drawn from "
        "those fits' residuals. Machine: "
        f"{result['machine']}, profile `{result['profile']}`.",
        "",
        "| model | labels (fitter / drawn) | train / val | epochs (best) | "
        "B/T σ | B/T p68 | Re σ (rel.) | Re p68 (rel.) | flux σ (rel.) | flux p68 (rel.) | "
        "cov. 68.27 % (bt/re/flux) | cov. 95.45 % | cov. 99.73 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        by = {r["parameter"]: r for r in m["test"]}
        cov = ["/".join(pct(by[p][k]) for p in PARAMETERS) for k in LEVEL_KEYS]
        labels = f"{m['labels']['fitter']} / {m['labels']['drawn']}" if m.get("labels") else "–"
        split = f"{m['n_train']} / {m['n_val']}" if m.get("n_train") else "–"
        epochs = f"{m['epochs_run']} ({m['best_epoch']})" if "epochs_run" in m else "–"
        lines.append(
            f"| {m['name']} | {labels} | {split} | {epochs} | "
            f"{by['bt']['sigma']:.3f} | {by['bt']['p68_abs_residual']:.3f} | "
            f"{by['re_arcsec']['frac_sigma']:.3f} | {by['re_arcsec']['frac_p68_abs_residual']:.3f} | "
            f"{by['flux_nJy']['frac_sigma']:.3f} | {by['flux_nJy']['frac_p68_abs_residual']:.3f} | "
            f"{cov[0]} | {cov[1]} | {cov[2]} |"
        )
    lines.append(f"| from scratch on 10x domain sims | – | – | – | {FROM_SCRATCH_NOTE} |||||||||")
    lab = result["labeller"]
    errors = result["label_errors"]
    p68 = errors["p68_abs"]
    lines += [
        "",
        "σ: standard deviation of mode − truth; p68: 68th percentile of |mode − truth|; Re and "
        "flux relative to the truth (absolute values in the JSON). Coverage in %: the truth "
        "inside the model's HPD interval.",
        "",
        "**Recalibration against the labels vs deconvolved from the label errors.** Each "
        "label set is fine-tuned twice with the same seeds (same weights: "
        + (
            "yes"
            if len({m.get("weights_sha256") for m in result["models"] if "weights_sha256" in m})
            == len({m["n_train"] for m in result["models"] if "n_train" in m})
            else "NO, see weights_sha256 in the JSON"
        )
        + "); only the recalibration on `val` differs. *Against the labels*: the intervals are "
        "fit to cover the fitter's labels, label noise included. *Deconvolved*: the set "
        f"carries a label-error table of the {errors['n_rows']} `ok` fits (label − truth "
        f"for B/T, label / truth − 1 for Re and flux; p68 |error| B/T {p68['bt_error']:.3f}, "
        f"Re {100 * p68['re_rel_error']:.1f} %, flux {100 * p68['flux_rel_error']:.1f} %), "
        "and every val label is compared with the posterior convolved with those errors "
        "(`gampen_ml.calibrate.LabelNoise`). The error model is **exact by construction** for "
        "the drawn labels (they were made from the same residuals, drawn the same way) and is "
        "the fitter's own residuals for the fitter-labelled ones: a best case. On a real "
        "survey the table comes from injected galaxies, and is only as good as the injections' "
        "resemblance to the survey's galaxies, PSF and noise.",
        "",
        "B/T coverage by kind of test galaxy (single component: true B/T exactly 0 or 1, "
        "covered only by an interval that reaches 0 or 1; two components: 0 < B/T < 1):",
        "",
        "| model | single-component: n, cov. 68.27 %, 95.45 % | two-component: n, cov. 68.27 %, "
        "95.45 % |",
        "|---|---|---|",
    ]
    for m in result["models"]:
        if "bt_coverage_by_component" in m:
            c = m["bt_coverage_by_component"]
            lines.append(
                f"| {m['name']} | "
                + " | ".join(
                    f"{c[k]['n']}, {pct(c[k]['coverage_68'])}, {pct(c[k]['coverage_95'])}"
                    for k in ("single", "two")
                )
                + " |"
            )
    lines += [
        "",
        f"Labeller on its {lab['n_galaxies']} galaxies (bulge+disk, {result['workers']} "
        f"workers): seconds per galaxy median {lab['seconds_median']:.1f}, mean "
        f"{lab['seconds_mean']:.1f}; wall {lab['wall_seconds']:.0f} s this run.",
        "",
        "| parameter | σ (rel. for Re, flux) | p68 | cov. 68.27 % | cov. 95.45 % | cov. 99.73 % |",
        "|---|---|---|---|---|---|",
    ]
    for p, e in lab["parameters"].items():
        pre = "frac_" if "frac_sigma" in e else ""
        lines.append(
            f"| `{p}` | {e[pre + 'sigma']:.3f} | {e[pre + 'p68_abs']:.3f} | "
            f"{pct(e['coverage_68'])} | {pct(e['coverage_95'])} | {pct(e['coverage_99'])} |"
        )
    lines.append("")
    return "\n".join(lines)


CONDITIONAL = "recalibrated against the labels deconvolved from label errors drawn conditionally"


def recalibrate_existing(args: argparse.Namespace) -> None:
    """Refit the val recalibration of the existing deconvolved models; score them on test.

    Each ``<work>/root-eiv`` model keeps its weights; :func:`gampen_ml.finetune.calibrate_on_split`
    refits its recalibration on its set's ``val`` split with the seed the fine-tuning used
    (the label-error table's errors drawn conditionally on each posterior draw, the
    current :class:`gampen_ml.calibrate.LabelNoise`), and the model with that recalibration
    catalogs the frozen test split. Rows are appended to ``--out/transfer_study.json``
    (earlier rows of the same name replaced) and the Markdown is rewritten.
    """
    from gampen_ml.config import derive_seed
    from gampen_ml.finetune import calibrate_on_split
    from gampen_ml.store import FINETUNED_MODEL

    profile = get_profile("quick")
    work, path = args.work, args.out / "transfer_study.json"
    result = json.loads(path.read_text())
    test_truth = pl.read_parquet(work / "test" / TRUTH_FILE)
    test_dir = partition_dir(work / "root", LABELLED_ASSET, TEST_DOMAIN)
    store = work / "root-eiv"
    for size in [int(s) for s in args.sizes.split(",")]:
        name = f"sim-knots-l{size}"
        earlier = next(
            m for m in result["models"] if m.get("calibration") == "deconvolved" and
            m["name"].startswith(f"fine-tuned, {size} labels")
        )  # fmt: skip
        started = time.perf_counter()
        model = finetuned_model(profile, store, name)
        seed = derive_seed(profile.seed, FINETUNED_MODEL, name)
        recalibration, coverage = calibrate_on_split(
            profile, model.model_dir, partition_dir(store, LABELLED_ASSET, name), split="val",
            dataset=f"{name}-val", seed=derive_seed(seed, "val"), recalibrate=True, log=print,
        )  # fmt: skip
        model = dataclasses.replace(model, recalibration=recalibration)
        catalog = domain_catalog(
            profile, model, test_dir, "test", seed=result["mc_seed"], domain=TEST_DOMAIN
        )
        row = {
            **{k: earlier[k] for k in earlier if k not in ("name", "test", "seconds")},
            "name": f"fine-tuned, {size} labels (freeze convolutions), {CONDITIONAL}",
            "calibration": "deconvolved-conditional",
            "seconds": time.perf_counter() - started,
            "recalibration": {
                k: list(getattr(recalibration, k)) for k in ("scale", "exponent", "floor")
            },
            "val_coverage": coverage.filter(pl.col("recalibrated")).to_dicts(),
            "test": summarise(catalog, "finetuned"),
            "bt_coverage_by_component": bt_coverage_by_component(catalog, test_truth),
        }
        result["models"] = [m for m in result["models"] if m["name"] != row["name"]]
        at = result["models"].index(earlier) + 1
        result["models"].insert(at, row)
        print(f"{name} (conditional): {row['seconds']:.0f} s", flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "transfer_study.md").write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-root", type=Path, required=True, help="storage root of the champion"
    )
    parser.add_argument("--work", type=Path, default=HERE / "out" / "transfer_study")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--pool", type=int, default=1000, help="pool galaxies (labelled)")
    parser.add_argument("--pool-seed", type=int, default=19_100)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--n-fit", type=int, default=200, help="fitter-labelled galaxies")
    parser.add_argument("--sizes", default="250,1000", help="label-set sizes")
    parser.add_argument(
        "--fit-budget-s", type=float, default=None, help="stop fitting after this (s)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--recalibrate-existing",
        action="store_true",
        help="only refit the deconvolved models' val recalibration with the current code "
        "(conditional label-error draws) and score them on test; appends rows to --out's "
        "transfer_study.json (no training, no fitting)",
    )
    args = parser.parse_args()
    if args.recalibrate_existing:
        torch.set_num_threads(args.threads)
        recalibrate_existing(args)
        return
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > args.pool or args.n_fit > min(args.pool, max(sizes)):
        raise SystemExit("--sizes and --n-fit must not exceed --pool")
    profile = get_profile("quick")
    work = args.work
    root = work / "root"
    for asset in CHAMPION_ASSETS:
        if not (root / asset).exists():
            shutil.copytree(args.base_root / asset, root / asset)

    t0 = time.perf_counter()
    test_truth = render(work / "test", args.n_test, FROZEN_TEST_SEED, args.workers)
    pool_truth = render(work / "pool", args.pool, args.pool_seed, args.workers)
    print(f"rendered {args.n_test} test + {args.pool} pool ({time.perf_counter() - t0:.0f} s)")
    order = np.random.default_rng(args.pool_seed).permutation(args.pool)
    fit_files = [pool_truth["file"][int(i)] for i in order[: args.n_fit]]
    fits, wall = fitter_labels(work, work / "pool", fit_files, args.workers, args.fit_budget_s)
    fits = fits.filter(pl.col("file").is_in(fit_files))
    n_fit = fits.height
    print(f"fitter labels: {fits.height} ({wall:.0f} s this run)")
    labels = build_labels(pool_truth, order, fits, args.pool_seed + 1)
    labels.write_parquet(work / "pool_labels.parquet")

    sources = {"pool": work / "pool", "test": work / "test"}
    test_labels = test_truth.select(
        pl.concat_str(pl.lit("test/"), "file").alias("file"),
        *PARAMETERS,
        pl.lit("test").alias("split"),
    )
    test_dir = publish(profile, root, work, TEST_DOMAIN, test_labels, sources)
    base = champion_model(profile, root)
    mc_seed = FROZEN_TEST_SEED
    champion_catalog = domain_catalog(
        profile, base, test_dir, "test", seed=mc_seed, domain=TEST_DOMAIN
    )
    models = [
        {
            "name": f"champion ({base.model_name} v{base.model_version})",
            "test": summarise(champion_catalog, "champion"),
            "bt_coverage_by_component": bt_coverage_by_component(champion_catalog, test_truth),
        }
    ]
    # The labeller's errors on its ok fits: the table the deconvolved rows calibrate with.
    errors = label_errors_table(fits, pool_truth)
    errors.write_parquet(work / "label_errors.parquet")
    root_eiv = work / "root-eiv"
    for asset in CHAMPION_ASSETS:
        if not (root_eiv / asset).exists():
            shutil.copytree(root / asset, root_eiv / asset)  # the same champion
    config = FinetuneConfig(max_epochs=args.max_epochs, patience=args.patience)
    for size in sizes:
        name = f"sim-knots-l{size}"
        subset = labels.filter(pl.col("position") < size)
        counts = subset.group_by("label_source").len()
        for calibration, store, table in (
            ("labels", root, None),
            ("deconvolved", root_eiv, errors),
        ):
            publish(profile, store, work, name, subset, sources, label_errors=table)
            started = time.perf_counter()
            if finetuned_model(profile, store, name) is None:
                finetune_and_publish(profile, store, name, config=config, log=print)
            folder = partition_dir(store, "finetuned_model", name)
            metrics = json.loads((folder / "metrics.json").read_text())
            recalibration = json.loads((folder / "calibration.json").read_text())["recalibration"]
            model = finetuned_model(profile, store, name)
            catalog = domain_catalog(
                profile, model, test_dir, "test", seed=mc_seed, domain=TEST_DOMAIN
            )
            what = (
                "recalibrated against the labels"
                if table is None
                else "recalibrated against the labels deconvolved from the label errors"
            )
            models.append(
                {
                    "name": f"fine-tuned, {size} labels (freeze {config.freeze}), {what}",
                    "calibration": calibration,
                    "labels": {
                        "fitter": int(
                            counts.filter(pl.col("label_source") == "fitter")["len"].sum()
                        ),
                        "drawn": int(
                            counts.filter(pl.col("label_source") != "fitter")["len"].sum()
                        ),
                    },
                    "seconds": time.perf_counter() - started,
                    **{
                        k: metrics[k]
                        for k in (
                            "n_train",
                            "n_val",
                            "best_epoch",
                            "epochs_run",
                            "val_loss_before",
                            "val_loss_after",
                            "learning_rate",
                        )
                    },
                    "label_errors": metrics.get("label_errors"),
                    "weights_sha256": file_sha256(folder / "state_dict.pt"),
                    "recalibration": {k: recalibration[k] for k in ("scale", "exponent", "floor")},
                    "val_coverage": metrics["val_coverage"],
                    "test": summarise(catalog, "finetuned"),
                    "bt_coverage_by_component": bt_coverage_by_component(catalog, test_truth),
                }
            )
            print(f"{name} ({calibration}): done ({models[-1]['seconds']:.0f} s)")

    fitted = fits.join(
        pool_truth.select("file", *(pl.col(p).alias(f"{p}_true") for p in PARAMETERS)),
        on="file",
        how="left",
    )
    seconds = fits["fit_seconds"].drop_nulls().to_numpy()
    result = {
        "benchmark": "transfer_study",
        "command": "python -m benchmarks.transfer_study "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out",)
        ),
        "domain": TargetDomainConfig().name,
        "profile": profile.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers,
        "n_test": args.n_test,
        "test_seed": FROZEN_TEST_SEED,
        "pool_seed": args.pool_seed,
        "n_fit": n_fit,
        "n_fit_asked": args.n_fit,
        "mc_seed": mc_seed,
        "labeller": {
            "n_galaxies": fits.height,
            "n_ok": int((fits["fit_status"] == STATUS_OK).sum()),
            "seconds_median": float(np.median(seconds)),
            "seconds_mean": float(np.mean(seconds)),
            "wall_seconds": wall,
            "parameters": score_labeller(fitted),
        },
        "models": models,
        "from_scratch": FROM_SCRATCH_NOTE,
        "label_errors": {
            "n_rows": errors.height,
            "sha256": file_sha256(work / "label_errors.parquet"),
            "p68_abs": {
                c: float(np.percentile(np.abs(errors[c].to_numpy()), 68))
                for c in ("bt_error", "re_rel_error", "flux_rel_error")
            },
        },
        "finetune_config": {
            "freeze": config.freeze,
            "max_epochs": config.max_epochs,
            "patience": config.patience,
        },
        "wall_seconds": time.perf_counter() - t0,
    }
    write_results(args.out, "transfer_study", result, markdown(result))


if __name__ == "__main__":
    main()
