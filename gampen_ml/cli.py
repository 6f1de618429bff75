"""The ``gampen`` command: every stage of the platform without Dagster.

(Over 600 lines: one thin handler per subcommand plus the one argument parser they share.)

Outputs go to the same storage layout the Dagster assets use (``--root``, default
``$GAMPEN_STORAGE`` or ``$DAGSTER_HOME/data``), so a stage run here can feed an asset
and vice versa. Paths and URIs not given as flags come from
:meth:`gampen_ml.settings.Settings.resolve`, as for the assets. ``gampen <command>
--help`` documents each command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gampen_ml.config import (
    ConfigError,
    derive_seed,
    get_profile,
    shard_keys,
)
from gampen_ml.settings import Settings
from gampen_ml.store import SIM_TEST, Store

#: ``gampen export --format`` choices: the values of ``gampen_ml.export.ExportFormat``
#: (spelled out so that ``--help`` does not import astropy).
EXPORT_FORMATS = ("fits", "votable", "ecsv")


def _settings(args: argparse.Namespace) -> Settings:
    """The flags of ``args`` over the environment (``--root``, ``--db``, ``--tracking-uri``)."""
    return Settings.resolve(
        storage_root=getattr(args, "root", None),
        database=getattr(args, "db", None),
        mlflow_tracking_uri=getattr(args, "tracking_uri", None),
    )


def _store(args: argparse.Namespace) -> Store:
    """The storage layout at ``--root`` (else the resolved root), as the assets build it."""
    return _settings(args).store()


def _tracking_uri(args: argparse.Namespace) -> str:
    return _settings(args).mlflow_tracking_uri


def _artifact_location(args: argparse.Namespace) -> str | None:
    """Artifact root under the Dagster home for the embedded store (else the server decides)."""
    return _settings(args).mlflow_artifact_location


class _Progress:
    """``progress(done, total)`` callback drawing a tqdm bar over galaxies."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total, desc=self.desc, unit="gal", dynamic_ncols=True, disable=None
            )
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _print_rows(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    import polars as pl

    with pl.Config(tbl_rows=200, tbl_cols=50, fmt_str_lengths=60, tbl_width_chars=200):
        print(pl.DataFrame(rows))


# --- stages ---------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from gampen_ml import stages

    profile = get_profile(args.profile)
    store = _store(args)
    keys = args.shards.split(",") if args.shards else shard_keys(profile)
    shards = stages.simulate_inputs(profile, store, keys, n_workers=args.workers, log=print)
    for key, summary in tqdm(shards, total=len(keys), desc="shards", unit="shard", disable=None):
        tqdm.write(f"{key}: {summary}")
    print(f"simulations of profile {profile.name} under {store.root}")


def cmd_train(args: argparse.Namespace) -> None:
    from gampen_ml import stages

    profile = get_profile(args.profile)
    result = stages.train_and_publish(
        profile,
        args.dropout,
        _store(args),
        device=args.device,
        progress=True,
        log=print,
        mlflow_tracking_uri=None if args.no_mlflow else _tracking_uri(args),
        mlflow_artifact_location=_artifact_location(args),
    )
    print(
        f"trained dropout {args.dropout:g}: val loss {result.final_val_loss:.4f}, "
        f"MLflow run {result.mlflow_run_id}, model version {result.model_version}"
    )


def cmd_calibrate(args: argparse.Namespace) -> None:
    from gampen_ml import stages

    profile = get_profile(args.profile)
    result = stages.calibrate_and_publish(
        profile,
        _store(args),
        device=args.device,
        log=print,
        mlflow_tracking_uri=None if args.no_mlflow else _tracking_uri(args),
    )
    print(f"chosen dropout rate {result.chosen_rate:g}")
    _print_rows(result.coverage.to_dicts())


def cmd_catalog(args: argparse.Namespace) -> None:
    from gampen_ml import stages
    from gampen_ml.inbox import stored_batch_domain

    profile = get_profile(args.profile)
    store = _store(args)
    domain = None
    if args.dataset != SIM_TEST:
        domain = stored_batch_domain(store, args.dataset, _settings(args).domains)
    model = stages.resolve_prediction_model(
        profile, store, domain=domain and domain.name, log=print
    )
    catalog = stages.catalog_and_publish(
        profile,
        store,
        args.dataset,
        device=args.device,
        progress=_Progress("MC dropout"),
        log=print,
        model=model,
        domain=domain,
    )
    print(f"{catalog.height} galaxies in posterior_catalog[{args.dataset}]")


def cmd_predict(args: argparse.Namespace) -> None:
    from gampen_ml import stages
    from gampen_ml.domains import find_domain
    from gampen_ml.inbox import batch_domain

    profile = get_profile(args.profile)
    domains = _settings(args).domains
    if args.domain:
        domain = find_domain(domains, args.domain)
    else:  # a batch folder's own batch.toml, as the inbox reads it
        domain = batch_domain(Path(args.path), domains) if Path(args.path).is_dir() else None
    model = stages.resolve_prediction_model(
        profile,
        _store(args),
        args.model,
        tracking_uri=_tracking_uri(args),
        log=lambda line: print(f"warning: {line}", file=sys.stderr),
        domain=domain and domain.name,
    )
    result = stages.predict_cutouts(
        profile,
        Path(args.path),
        model,
        Path(args.out),
        n_passes=args.passes,
        device=args.device,
        progress=_Progress("MC dropout"),
        domain=domain,
    )
    for rejection in result.rejections:
        print(f"skipped {rejection.file}: {rejection.reason}", file=sys.stderr)
    state = "recalibrated" if model.calibrated else "NOT recalibrated"
    read_as = f", read as domain {domain.name}" if domain else ""
    print(
        f"{result.catalog.height} galaxies written to {args.out} with {model.model_name} "
        f"v{model.model_version} ({state}{read_as}); {len(result.rejections)} file(s) skipped"
    )
    if args.flags:
        from gampen_ml.io import atomic_file

        flags = stages.catalog_flags(result.catalog, profile, _store(args), model)
        with atomic_file(args.flags) as tmp:
            flags.write_parquet(tmp)
        print(f"flags written to {args.flags} ({int(flags['unreliable'].sum())} unreliable)")


def cmd_model_export(args: argparse.Namespace) -> None:
    from gampen_ml import stages
    from gampen_ml.model_archive import export_model

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr)

    profile = get_profile(args.profile)
    store = _store(args)
    model = stages.resolve_prediction_model(
        profile, store, args.model, tracking_uri=_tracking_uri(args), log=warn
    )
    out = export_model(profile, store, model, Path(args.out), log=warn)
    state = "recalibrated" if model.calibrated else "NOT recalibrated"
    print(
        f"{model.model_name} v{model.model_version} ({state}) exported to {out} "
        f"({out.stat().st_size / 1e6:.1f} MB)"
    )


def cmd_model_import(args: argparse.Namespace) -> None:
    from gampen_ml.model_archive import import_model

    result = import_model(
        Path(args.file),
        _tracking_uri(args),
        name=args.name,
        alias=args.alias,
        artifact_location=_artifact_location(args),
    )
    alias = f", alias {args.alias!r}" if args.alias else ""
    print(
        f"{args.file} registered as {result.model_name} version {result.model_version}{alias} "
        f"(MLflow run {result.run_id})"
    )


def cmd_plots(args: argparse.Namespace) -> None:
    import polars as pl

    from gampen_ml.plots import make_catalog_figures

    catalog = pl.read_parquet(args.catalog)
    coverage = pl.read_parquet(args.coverage) if args.coverage else None
    paths = make_catalog_figures(catalog, Path(args.out), coverage_table=coverage)
    print(f"{len(paths)} files in {args.out} (index: {paths.get('index')})")


def cmd_export(args: argparse.Namespace) -> None:
    from gampen_ml.export import export_partition

    result = export_partition(
        _store(args),
        args.dataset,
        args.format,
        args.out,
        with_flags=args.flags,
        database=_settings(args).database,
    )
    print(
        f"{result.n_rows} rows of posterior_catalog[{args.dataset}] written to {result.path} "
        f"({args.format}, data version {result.provenance.get('DATAVER')})"
    )


def cmd_validate(args: argparse.Namespace) -> None:

    from gampen_ml.catalog import read_catalog
    from gampen_ml.flags import catalog_flags
    from gampen_ml.validate import validation_report

    if args.robustness:
        _robustness(args)
        return
    profile = get_profile(args.profile)
    store = _store(args)
    catalog = read_catalog(store.catalog(args.dataset))
    md, js = validation_report(
        catalog,
        catalog_flags(catalog, profile, store),
        Path(args.out),
        profile_name=profile.name,
        coverage_table=store.read_coverage(),
        flag_config=profile.flags,
    )
    print(md.read_text())
    print(f"written: {md} {js}")


def _robustness(args: argparse.Namespace) -> None:
    """``gampen validate --robustness``: the shift suite, beside the sim-test split."""
    from gampen_ml import robustness, stages

    profile = get_profile(args.profile)
    store = _store(args)
    out = Path(args.out)
    model = stages.resolve_prediction_model(
        profile, store, args.model, tracking_uri=_tracking_uri(args), log=print
    )
    stages.shift_suite(
        profile, store, model, out, n_per_variation=args.n, seed=args.seed,
        variations=args.variations.split(",") if args.variations else None,
        device=args.device, n_workers=args.workers or os.cpu_count() or 1,
        with_sim_test=True, log=print,
    )  # fmt: skip
    md, js = out / robustness.MD_FILE, out / robustness.JSON_FILE
    print(md.read_text())
    print(f"written: {md} {js}")


def cmd_misspecification(args: argparse.Namespace) -> None:
    from gampen_ml import stages
    from gampen_ml.misspecification import (
        evaluate_misspecification,
        misspecification_report,
        real_galaxy_report,
    )

    profile = get_profile(args.profile)
    store = _store(args)
    if args.model and args.recalibration:
        model_dir, recalibration = Path(args.model), Path(args.recalibration)
    else:
        model = stages.resolve_prediction_model(
            profile, store, args.model, tracking_uri=_tracking_uri(args), log=print
        )
        model_dir, recalibration = model.model_dir, model.recalibration
    psf_dir = Path(args.psf_dir) if args.psf_dir else store.psf_library()
    noise_dir = Path(args.noise_dir) if args.noise_dir else store.noise_pool()
    out = Path(args.out)
    seed = derive_seed(profile.seed, "misspecification")
    table = evaluate_misspecification(
        profile, model_dir, psf_dir, noise_dir, out, n_per_variant=args.n, seed=seed,
        device=args.device, recalibration=recalibration, log=print,
    )  # fmt: skip
    md, js = misspecification_report(table, out)
    print(md.read_text())
    if args.real_catalog:
        catalog, png = real_galaxy_report(
            profile, model_dir, psf_dir, noise_dir, Path(args.real_catalog), out,
            seed=seed, device=args.device, recalibration=recalibration,
        )  # fmt: skip
        print(f"{catalog.height} real galaxies: {png}")
    print(f"written: {md} {js}")


def cmd_label(args: argparse.Namespace) -> None:
    from gampen_ml.domains import find_domain
    from gampen_ml.label import label_folder

    profile = get_profile(args.profile)
    domain = find_domain(_settings(args).domains, args.domain) if args.domain else None
    imaging = domain.imaging(profile.imaging) if domain else profile.imaging
    run = label_folder(
        Path(args.folder),
        Path(args.out),
        imaging,
        domain=domain,
        model=args.model,
        resume=args.resume,
        n_workers=args.workers,
        limits=profile.limits,
        progress=_Progress("label"),
    )
    skipped = f", {run.n_skipped} file(s) already labelled" if run.n_skipped else ""
    note = " (bt is null: a single Sérsic fit has no B/T)" if args.model == "sersic" else ""
    print(
        f"{run.n_rows} row(s) written to {run.out}{note}: {run.n_ok} fit(s) ok, "
        f"{run.n_rows - run.n_ok} with another fit_status{skipped}; {run.seconds:.0f} s"
    )


def cmd_label_errors(args: argparse.Namespace) -> None:
    from gampen_ml.labelled import LABEL_ERROR_COLUMNS, write_label_errors

    table = write_label_errors(Path(args.labels), Path(args.truth), Path(args.out))
    p68 = ", ".join(
        f"{c} {table[c].abs().quantile(0.68):.3g}" for c in LABEL_ERROR_COLUMNS.values()
    )
    print(f"{table.height} injected galaxies' label errors written to {args.out} (p68: {p68})")


# --- queries --------------------------------------------------------------------------


def _existing_database(args: argparse.Namespace) -> Path:
    """The database ``sql``/``lineage`` read; it must exist (they never create it)."""
    db = _settings(args).database
    if not db.is_file():
        raise FileNotFoundError(
            f"no lineage database at {db} (looked at --db, else $GAMPEN_DUCKDB, else "
            "$DAGSTER_HOME/gampen.duckdb, else ./dagster_home/gampen.duckdb); the first "
            "materialization of the pipeline creates it"
        )
    return db


def cmd_sql(args: argparse.Namespace) -> None:
    """Read-only: an existing database, its views defined afresh over ``--root``."""
    from gampen_ml.database import query

    def warn(line: str) -> None:
        print(f"gampen sql: warning: {line}", file=sys.stderr)

    db = _existing_database(args)
    _print_rows(query(db, args.query, storage_root=Path(args.root), log=warn))


def cmd_lineage(args: argparse.Namespace) -> None:
    from gampen_ml.database import lineage_chain

    rows = lineage_chain(_existing_database(args), args.asset, args.partition)
    if not rows:
        raise SystemExit(f"no successful lineage row for {args.asset}[{args.partition or '-'}]")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_rows(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gampen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument(
            "--profile", help="paper, paper-short, quick or tiny (default $GAMPEN_PROFILE or quick)"
        )
        p.add_argument(
            "--root",
            default=None,
            help="storage root (default $GAMPEN_STORAGE or $DAGSTER_HOME/data)",
        )
        return p

    def model_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="cuda, cpu, … (default: CUDA when present)")
        p.add_argument(
            "--tracking-uri", default=None, help="MLflow URI (default sqlite under $DAGSTER_HOME)"
        )

    def domain_opt(p: argparse.ArgumentParser, details: str) -> None:
        p.add_argument(
            "--domain",
            default=None,
            help="survey domain declared in <dagster_home>/domains/NAME.toml: read the files "
            "as that survey delivers them" + details,
        )

    p = add("simulate", cmd_simulate, "PSF library, noise pool and simulated shards")
    p.add_argument("--shards", help="comma-separated shard keys (default: all)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: cores)")

    p = add("train", cmd_train, "train one GaMPEN model (resumes from its checkpoint)")
    p.add_argument("--dropout", type=float, required=True, help="dropout rate of the model")
    p.add_argument("--no-mlflow", action="store_true", help="do not log/register in MLflow")
    model_opts(p)

    p = add("calibrate", cmd_calibrate, "coverage of every dropout model on val; pick the rate")
    p.add_argument("--no-mlflow", action="store_true", help="do not set the MLflow champion alias")
    model_opts(p)

    p = add("catalog", cmd_catalog, "posterior catalog of the simulated test split (sim-test)")
    p.add_argument("--dataset", default="sim-test", help="dataset key (default sim-test)")
    model_opts(p)

    p = add("predict", cmd_predict, "posterior catalog of real FITS cutouts (file, cube or folder)")
    p.add_argument("path", help="FITS file, cube or folder of cutouts")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument(
        "--model",
        default=None,
        help="NAME.gampen archive, trained_model folder, MLflow version or alias (default "
        "champion)",
    )
    p.add_argument(
        "--passes", type=int, default=None, help="MC passes per galaxy (default: profile)"
    )
    domain_opt(
        p,
        " and predict with its fine-tuned model when there is one (default: the folder's "
        "batch.toml, else none)",
    )
    p.add_argument(
        "--flags",
        default=None,
        help="also write the qualitative flags to this Parquet file, against the model's "
        "training domain (an archive's own, else the storage root's)",
    )
    model_opts(p)

    p = sub.add_parser(
        "model",
        help="move a model: export it as one .gampen file, import one into MLflow",
        description="move a model: export it as one .gampen file, import one into MLflow",
    )
    actions = p.add_subparsers(dest="action", required=True)
    p = add(
        "export",
        cmd_model_export,
        "write a model, its calibration, training domain and model card to NAME.gampen",
        parent=actions,
    )
    p.add_argument(
        "--model",
        default="champion",
        help="champion (default), trained_model folder, MLflow version or alias",
    )
    p.add_argument("--out", required=True, help="the archive to write, NAME.gampen")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (for a version or alias)")
    p = add(
        "import",
        cmd_model_import,
        "register a .gampen archive as a new version of its MLflow model",
        parent=actions,
    )
    p.add_argument("file", help="NAME.gampen")
    p.add_argument(
        "--name",
        default=None,
        help="registered model name (default: the archive's, gampen-<profile>, which "
        "gampen predict --model VERSION looks up)",
    )
    p.add_argument("--alias", default=None, help="point this alias (e.g. champion) at it")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default sqlite under $DAGSTER_HOME)"
    )

    p = add("plots", cmd_plots, "diagnostic figures of a catalog (PNG + index.md)")
    p.add_argument("catalog", help="a posterior catalog Parquet file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--coverage", default=None, help="coverage.parquet of the calibration")

    p = add("export", cmd_export, "a posterior catalog as FITS, VOTable or ECSV, with units")
    p.add_argument("dataset", help="catalog partition: sim-test or an inbox batch name")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="output format")
    p.add_argument(
        "--out",
        default=None,
        help="output file (default <root>/posterior_catalog/<dataset>/catalog.fits|vot|ecsv)",
    )
    p.add_argument(
        "--flags",
        action="store_true",
        help="append the qualitative_flags columns (needs --out)",
    )

    p = add("validate", cmd_validate, "side-by-side table with the paper on a simulated catalog")
    p.add_argument("--dataset", default="sim-test", help="catalog partition with truths")
    p.add_argument("--out", default="validation", help="output folder (default ./validation)")
    p.add_argument(
        "--robustness",
        action="store_true",
        help="instead: calibration on independently rendered galaxies under survey shifts",
    )
    p.add_argument("--n", type=int, default=1000, help="--robustness: galaxies per variation")
    p.add_argument(
        "--seed", type=int, default=None, help="--robustness: seed (default: the frozen test seed)"
    )
    p.add_argument("--variations", default=None, help="--robustness: comma-separated subset")
    p.add_argument("--workers", type=int, default=None, help="--robustness: render processes")
    p.add_argument(
        "--model",
        default=None,
        help="--robustness: .gampen archive, model folder, version or alias (champion)",
    )
    model_opts(p)

    p = add(
        "misspecification",
        cmd_misspecification,
        "coverage and flags on galaxies outside the training distribution",
    )
    p.add_argument(
        "--model",
        default=None,
        help=".gampen archive, trained_model folder, MLflow version or alias (default: the "
        "calibrated champion)",
    )
    p.add_argument(
        "--recalibration",
        default=None,
        help="recalibration.json to apply to --model (default: the champion's, for the champion)",
    )
    p.add_argument("--n", type=int, default=200, help="galaxies per variant (default 200)")
    p.add_argument("--out", default="misspecification", help="output folder")
    p.add_argument("--psf-dir", default=None, help="PSF library (default <root>/psf_library/all)")
    p.add_argument("--noise-dir", default=None, help="noise pool (default <root>/noise_pool/all)")
    p.add_argument(
        "--real-catalog",
        default=None,
        help="GalSim real-galaxy catalog FITS (e.g. shared/data/aegis_f814w/AEGIS_F814w_catalog.fits)",
    )
    model_opts(p)

    p = add("label", cmd_label, "label a folder of cutouts with a profile fitter (pysersic)")
    p.add_argument("folder", help="folder of FITS cutouts (searched recursively)")
    p.add_argument("--out", required=True, help="labels table to write, .parquet or .csv")
    domain_opt(p, " (image, weight, flux unit, PSF)")
    p.add_argument(
        "--model",
        default="bulge-disk",
        choices=("bulge-disk", "sersic"),
        help="bulge-disk (default: bt, composite Re, flux) or sersic (Re and flux; bt null)",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep the rows of --out and skip their files"
    )
    p.add_argument("--workers", type=int, default=1, help="fit processes (default 1)")

    p = add(
        "label-errors",
        cmd_label_errors,
        "measure the labeller's errors on injected galaxies (their labels vs their truth) "
        "into a labelled folder's _label_errors.parquet",
    )
    p.add_argument("labels", help="the labeller's table on the injected galaxies (gampen label)")
    p.add_argument("--truth", required=True, help="their truths: file, bt, re_arcsec, flux_nJy")
    p.add_argument(
        "--out", required=True, help="table to write: <labelled folder>/_label_errors.parquet"
    )

    for name, func, help in (
        ("sql", cmd_sql, "run a SQL query on a read-only connection to the catalog database"),
        ("lineage", cmd_lineage, "print what produced an asset partition, recursively"),
    ):
        p = add(name, func, help)
        p.add_argument(
            "--db",
            default=None,
            help="DuckDB file (default $GAMPEN_DUCKDB or $DAGSTER_HOME/gampen.duckdb)",
        )
    sub.choices["sql"].add_argument("query", help='e.g. "select count(*) from posterior_catalog"')
    sub.choices["lineage"].add_argument("asset", help="asset name, e.g. posterior_catalog")
    sub.choices["lineage"].add_argument("--partition", default=None, help="partition key")
    sub.choices["lineage"].add_argument("--json", action="store_true", help="JSON output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "root", None) is None:
        args.root = str(_settings(args).storage_root)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"gampen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
