"""A labelled set: a domain's real cutouts with fitter labels, validated like the inbox.

(Over 600 lines: the labelled-set format -- labels table, cutouts, splits, content hash,
publication -- and its label-error table, read together by fine-tuning.)

A *labelled set* is what a survey's galaxies look like to fine-tuning
(:mod:`gampen_ml.finetune`): one folder per domain, ``<Settings.labelled>/<domain>/``
(= ``$DAGSTER_HOME/labelled/<domain>/``), holding FITS cutouts (sub-folders allowed) and
one labels table, ``labels.parquet`` or ``labels.csv``:

==============  ========  ===========================================================
column          required  meaning
==============  ========  ===========================================================
``file``        yes       cutout path relative to the folder (``sub/g001.fits``)
``hdu``         no        which cutout of a multi-cutout file: the plane of a cube, or
                          the HDU index of a 2-D image (``docs/catalog.md``'s ``hdu``);
                          empty = the file's only cutout
``bt``          yes       bulge-to-total light ratio, in [0, 1]
``re_arcsec``   yes       half-light radius, arcsec, > 0
``flux_nJy``    yes       total flux, nJy, > 0 (whatever the images' unit)
``bt_sigma``    no        the labeller's 1-sigma uncertainty of ``bt`` (> 0)
``re_sigma``    no        ... of ``re_arcsec`` (arcsec)
``flux_sigma``  no        ... of ``flux_nJy`` (nJy)
``split``       no        ``train`` / ``val`` / ``test``; empty = by a hash of ``file``
==============  ========  ===========================================================

Reading follows the inbox's rules (:mod:`gampen_ml.fits_input`): every file of the folder
except the labels table (and names starting with ``_`` or ``.``, e.g. a labeller's state)
is a cutout file validated with the domain's imaging; a bad file is quarantined, whole,
under ``<Settings.quarantine>/labelled/<domain>/`` with a ``.reason.txt``
(:func:`gampen_ml.fits_input.quarantine`). A bad *row* (missing, non-finite or
out-of-range label, unknown file, duplicate) is left out with its reason, naming the table
row (1 = the first data row); a table without a required column, or that cannot be read,
is an error. Accepted cutouts without a row are reported as unlabelled, not moved.

A missing split is drawn from the SHA-256 of the file name (70 / 15 / 15 %), so every
cutout of a file lands in the same split and adding galaxies never moves old ones.

The stored partition ``<root>/labelled_set/<domain>/`` has the layout of a simulation
shard, so :class:`gampen_ml.data.datasets.ShardImages` reads it: ``images.npy``
``(N, S, S)`` float32 nJy per pixel (``S`` = the domain's stamp size), ``labels.parquet``
(:data:`STORED_COLUMNS`) and ``manifest.json`` (what was accepted, rejected and why, and
the set's SHA-256, :func:`label_set_sha256`).

**The labeller's errors.** A folder may also hold :data:`LABEL_ERRORS_FILE`
(``_label_errors.parquet``; the ``_`` keeps it out of the cutout scan): the labeller's
errors measured by injection-recovery, one row per injected galaxy (rendered like the
survey, labelled by the same labeller, compared to its truth; :func:`label_errors_table`
builds it). Columns :data:`LABEL_ERROR_COLUMNS`: ``bt_error`` = label - truth,
``re_rel_error`` and ``flux_rel_error`` = label / truth - 1, and the injected galaxies'
truths :data:`LABEL_ERROR_TRUTH_COLUMNS` (``bt_true``, ``re_arcsec_true``,
``flux_nJy_true``: the errors depend on the galaxy, and each posterior draw gets the errors
of an injected galaxy like it); ``file`` may be kept for reference. It is validated (:func:`check_label_errors`) and stored with the set, which its SHA-256 then
covers; fine-tuning recalibrates against the labels *deconvolved* from these errors
(:class:`gampen_ml.calibrate.LabelNoise`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.calibrate import LABEL_ERROR_COLUMNS
from gampen_ml.config import PARAMETERS, Profile
from gampen_ml.data.datasets import SPLITS
from gampen_ml.domains import Domain
from gampen_ml.fits_input import CutoutBatch, Rejection, load_cutouts, quarantine
from gampen_ml.io import file_sha256, save_npy
from gampen_ml.sim.errors import InputFileError
from gampen_ml.store import IMAGES_FILE, LABELS_FILE, Store

#: Names of the labels table in a labelled folder (exactly one of them).
LABEL_TABLE_NAMES = (LABELS_FILE, "labels.csv")
#: The labeller's uncertainty column of each parameter.
SIGMA_COLUMNS: dict[str, str] = {
    "bt": "bt_sigma",
    "re_arcsec": "re_sigma",
    "flux_nJy": "flux_sigma",
}
REQUIRED_COLUMNS = ("file", *PARAMETERS)
OPTIONAL_COLUMNS = ("hdu", *SIGMA_COLUMNS.values(), "split")
#: Fractions of train / val / test of the hash split.
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MANIFEST_FILE = "manifest.json"
#: The labeller's measured errors, in a labelled folder and in the stored set (optional).
LABEL_ERRORS_FILE = "_label_errors.parquet"
#: The injected galaxies' truths in a label-error table, per parameter.
LABEL_ERROR_TRUTH_COLUMNS: dict[str, str] = {p: f"{p}_true" for p in PARAMETERS}
#: Fewest injected galaxies a label-error table may hold: its rows are the whole error
#: distribution (tails included) that the recalibration deconvolves.
MIN_LABEL_ERROR_ROWS = 50
#: Sub-folder of ``Settings.quarantine`` for labelled sets (then one folder per domain).
QUARANTINE_FOLDER = "labelled"

#: Columns of the stored ``labels.parquet`` (one row per image of ``images.npy``).
STORED_COLUMNS: dict[str, pl.DataType] = {
    "galaxy_id": pl.Int64(),
    "file": pl.String(),
    "hdu": pl.Int32(),
    "split": pl.String(),
    "split_source": pl.String(),
    # The labels, then the labeller's uncertainties.
    **dict.fromkeys((*PARAMETERS, *SIGMA_COLUMNS.values()), pl.Float64()),
    "source_row": pl.Int64(),
    "ra_deg": pl.Float64(),
    "dec_deg": pl.Float64(),
    "psf_fwhm_arcsec": pl.Float64(),
    "repairs": pl.String(),
}


class LabelledSetError(InputFileError):
    """A labelled folder or its labels table cannot be used at all (names the file)."""


@dataclass(frozen=True)
class RowRejection:
    """A labels-table row left out: ``row`` counts data rows from 1."""

    row: int
    file: str
    reason: str


@dataclass
class LabelledSet:
    """The usable labelled cutouts of a folder, and what was left out.

    Attributes
    ----------
    images : np.ndarray
        ``(N, S, S)`` float32, nJy per pixel, ``S`` = the domain's stamp size.
    labels : pl.DataFrame
        ``N`` rows, :data:`STORED_COLUMNS`.
    batch : CutoutBatch
        The folder's scan (accepted files, rejected files with reasons).
    row_rejections : list[RowRejection]
        Rows of the labels table that were left out.
    unlabelled_files : list[str]
        Accepted cutout files no row names.
    table_path : Path
        The labels table read.
    """

    images: np.ndarray
    labels: pl.DataFrame
    batch: CutoutBatch
    row_rejections: list[RowRejection] = field(default_factory=list)
    unlabelled_files: list[str] = field(default_factory=list)
    table_path: Path = Path(".")

    @property
    def rejections(self) -> list[Rejection]:
        """Rejected cutout files (relative to the folder), each with its reason."""
        return self.batch.rejections


def find_labels_table(folder: Path | str) -> Path:
    """The one labels table of ``folder`` (:data:`LABEL_TABLE_NAMES`).

    Raises
    ------
    LabelledSetError
        When the folder is missing, or holds none or both.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LabelledSetError(folder, "labelled folder does not exist")
    found = [folder / name for name in LABEL_TABLE_NAMES if (folder / name).is_file()]
    if not found:
        raise LabelledSetError(folder, f"no labels table (one of {', '.join(LABEL_TABLE_NAMES)})")
    if len(found) > 1:
        raise LabelledSetError(
            folder, f"both {found[0].name} and {found[1].name}: keep one labels table"
        )
    return found[0]


def read_labels_table(path: Path | str) -> pl.DataFrame:
    """Read a labels table as text columns plus ``row`` (1-based data row).

    Every value is kept as text so that :func:`check_label_rows` can name a bad value
    row by row instead of the reader failing on the first one.

    Raises
    ------
    LabelledSetError
        When the file cannot be read or lacks a required column.
    """
    path = Path(path)
    try:
        if path.suffix == ".csv":
            table = pl.read_csv(path, infer_schema=False)
        else:
            table = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for a bad file
        raise LabelledSetError(path, f"cannot read the labels table ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise LabelledSetError(
            path,
            f"missing column(s) {missing}; required: {', '.join(REQUIRED_COLUMNS)}; "
            f"optional: {', '.join(OPTIONAL_COLUMNS)}",
        )
    kept = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in table.columns]
    return table.select(pl.col(c).cast(pl.String) for c in kept).with_row_index("row", offset=1)


def _numbers(table: pl.DataFrame, column: str, dtype: pl.DataType) -> tuple[pl.Series, np.ndarray]:
    """``column`` parsed as ``dtype`` and the mask of values that are not numbers."""
    text = table[column].str.strip_chars()
    parsed = text.cast(dtype, strict=False)
    return parsed, (text.is_not_null() & (text != "") & parsed.is_null()).to_numpy()


def check_label_rows(table: pl.DataFrame, where: str) -> tuple[pl.DataFrame, list[RowRejection]]:
    """Parse and check every row of :func:`read_labels_table`'s output.

    Returns
    -------
    (rows, rejections)
        ``rows``: the good rows with typed columns ``row``, ``file``, ``hdu`` (Int32,
        null when not given), the parameters, the sigma columns and ``split`` (nulls
        where not given); ``rejections``: one per bad row, every problem of the row in
        its reason, prefixed by ``where``.
    """
    n = table.height
    problems: list[list[str]] = [[] for _ in range(n)]
    text = {c: table[c].to_list() for c in table.columns}

    def add(mask: np.ndarray, template: str, values: Sequence | None = None) -> None:
        """Add ``template`` (``{value}`` = the row's value) to every row of ``mask``."""
        for i in np.flatnonzero(mask):
            problems[i].append(template.format(value=None if values is None else values[i]))

    files = table["file"].str.strip_chars()
    add((files.is_null() | (files == "")).fill_null(True).to_numpy(), "no file")
    typed: dict[str, pl.Series] = {"row": table["row"], "file": files}
    for p in (*PARAMETERS, *SIGMA_COLUMNS.values()):
        if p not in table.columns:
            typed[p] = pl.Series(p, [None] * n, dtype=pl.Float64)
            continue
        values, bad = _numbers(table, p, pl.Float64)
        typed[p] = values
        v = values.fill_null(np.nan).to_numpy().astype(np.float64)
        given = values.is_not_null().to_numpy()
        add(bad, f"{p} = {{value!r}} is not a number", text[p])
        with np.errstate(invalid="ignore"):
            add(given & ~np.isfinite(v), f"{p} = {{value}} is not finite", v)
            if p in PARAMETERS:
                add(~given & ~bad, f"{p} is missing")
            if p == "bt":
                add(np.isfinite(v) & ((v < 0) | (v > 1)), "bt = {value:g} is outside [0, 1]", v)
            else:
                add(np.isfinite(v) & (v <= 0), f"{p} = {{value:g}} is not positive", v)
    if "hdu" in table.columns:
        # As a float first: a table written by pandas holds a column with gaps as floats.
        hdu, bad = _numbers(table, "hdu", pl.Float64)
        h = hdu.fill_null(0.0).to_numpy()
        with np.errstate(invalid="ignore"):
            wrong = bad | ~np.isfinite(h) | (h != np.round(h)) | (h < 0) | (h > 2**31 - 1)
        add(wrong, "hdu = {value!r} is not a non-negative integer", text["hdu"])
        typed["hdu"] = pl.Series("hdu", np.where(wrong, 0, h)).cast(pl.Int32)
        typed["hdu"] = typed["hdu"].set(hdu.is_null() | pl.Series(wrong), None)
    else:
        typed["hdu"] = pl.Series("hdu", [None] * n, dtype=pl.Int32)
    if "split" in table.columns:
        split = table["split"].str.strip_chars().str.to_lowercase().replace("", None)
        unknown = (split.is_not_null() & ~split.is_in(SPLITS)).to_numpy()
        add(unknown, f"split {{value!r}} is not one of {', '.join(SPLITS)}", text["split"])
        typed["split"] = split
    else:
        typed["split"] = pl.Series("split", [None] * n, dtype=pl.String)
    rows = pl.DataFrame(typed).with_columns(pl.col("row").cast(pl.Int64))

    # Two rows for the same cutout: which label is right is unknowable, so both go.
    key = rows.select(pl.col("file"), pl.col("hdu").cast(pl.String).fill_null("-"))
    groups: dict[tuple, list[int]] = {}
    for i, (f, h) in enumerate(key.iter_rows()):
        groups.setdefault((f, h), []).append(i)
    for indices in groups.values():
        if len(indices) > 1 and rows["file"][indices[0]] is not None:
            for i in indices:
                others = ", ".join(str(rows["row"][j]) for j in indices if j != i)
                problems[i].append(f"duplicate of row(s) {others} (same file and hdu)")

    bad_rows = [i for i in range(n) if problems[i]]
    rejections = [
        RowRejection(int(rows["row"][i]), str(rows["file"][i] or ""), f"{where} row "
                     f"{rows['row'][i]}: " + "; ".join(problems[i]))
        for i in bad_rows
    ]  # fmt: skip
    good = np.ones(n, dtype=bool)
    good[bad_rows] = False
    return rows.filter(pl.Series(good)), rejections


def hash_split(file: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> str:
    """Split of a file from the SHA-256 of its (relative, POSIX) name: 70 / 15 / 15 %."""
    u = int.from_bytes(hashlib.sha256(file.encode("utf-8")).digest()[:8], "big") / 2.0**64
    train, val, _ = fractions
    return "train" if u < train else "val" if u < train + val else "test"


def load_domain_cutouts(folder: Path | str, domain: Domain, profile: Profile) -> CutoutBatch:
    """Every cutout of ``folder`` read the domain's way, at its ``stamp_size_px``, in nJy.

    :func:`gampen_ml.fits_input.load_cutouts` with ``domain``: its image HDU, flux unit
    (converted to nJy), pixel scale and PSF source.
    """
    return load_cutouts(folder, domain.imaging(profile.imaging), profile.limits, domain=domain)


def load_labelled_set(folder: Path | str, domain: Domain, profile: Profile) -> LabelledSet:
    """Read ``folder``'s labels table and cutouts; match rows to cutouts; assign splits.

    Parameters
    ----------
    folder : path
        ``<Settings.labelled>/<domain>/``.
    domain : Domain
        How to read the cutouts (pixel scale, stamp size, flux unit).
    profile : Profile
        Supplies the base imaging and the input size limits.

    Returns
    -------
    LabelledSet
        Never raises for a bad cutout file or a bad row (they are reported).

    Raises
    ------
    LabelledSetError
        When the folder or its labels table is unusable as a whole.
    """
    folder = Path(folder)
    table_path = find_labels_table(folder)
    rows, row_rejections = check_label_rows(read_labels_table(table_path), table_path.name)
    batch = load_domain_cutouts(folder, domain, profile)
    # The labels table is the only non-cutout file a labelled folder is meant to hold.
    batch.rejections = [r for r in batch.rejections if r.file not in LABEL_TABLE_NAMES]
    rejected = {r.file: r.reason for r in batch.rejections}
    cutouts = batch.table.rename({"galaxy_id": "_image", "source_file": "file"})
    n_per_file = dict(cutouts.group_by("file").len().iter_rows())
    hdus: dict[str, list[int]] = {}
    for f, h in cutouts.select("file", "hdu").iter_rows():
        hdus.setdefault(f, []).append(h)
    where = table_path.name

    kept, images_index = [], []
    by_key = {(f, h): i for f, h, i in cutouts.select("file", "hdu", "_image").iter_rows()}
    for row in rows.iter_rows(named=True):
        file, hdu, problem = row["file"], row["hdu"], None
        if file in rejected:
            problem = f"file {file} was rejected (quarantined): {rejected[file]}"
        elif file not in n_per_file:
            problem = f"unknown file {file!r}: no such cutout file in {folder}"
        elif hdu is None and n_per_file[file] > 1:
            problem = (
                f"file {file} holds {n_per_file[file]} cutouts (hdu {hdus[file]}); "
                "say which in the hdu column"
            )
        elif hdu is not None and (file, hdu) not in by_key:
            problem = f"file {file} has no cutout at hdu {hdu} (has hdu {hdus[file]})"
        if problem is not None:
            row_rejections.append(
                RowRejection(row["row"], file, f"{where} row {row['row']}: {problem}")
            )
            continue
        image = by_key[(file, hdu if hdu is not None else hdus[file][0])]
        kept.append({**row, "_image": image})
        images_index.append(image)
    row_rejections.sort(key=lambda r: r.row)
    labelled_files = {r["file"] for r in kept}
    unlabelled = sorted(
        set(batch.accepted_files) - labelled_files - {r.file for r in row_rejections}
    )

    row_schema = {**rows.schema, "_image": pl.Int64}
    matched = pl.DataFrame(kept, schema=row_schema).drop("hdu")
    matched = matched.join(cutouts.drop("file", "pixel_scale_arcsec"), on="_image", how="left")
    hashed = pl.Series([hash_split(f) for f in matched["file"]], dtype=pl.String)
    given = pl.col("split").is_not_null()
    labels = matched.with_columns(
        galaxy_id=pl.int_range(pl.len(), dtype=pl.Int64),
        split=pl.when(given).then(pl.col("split")).otherwise(hashed),
        split_source=pl.when(given).then(pl.lit("table")).otherwise(pl.lit("hash")),
        source_row=pl.col("row"),
    ).select(pl.col(c).cast(d) for c, d in STORED_COLUMNS.items())
    images = batch.images[np.asarray(images_index, dtype=np.int64)]
    return LabelledSet(images, labels, batch, row_rejections, unlabelled, table_path)


def label_set_sha256(folder: Path | str) -> str:
    """SHA-256 identifying a stored labelled set: over its ``labels.parquet`` and ``images.npy``.

    Hex SHA-256 of the text ``labels.parquet:<sha256 of the file>\\nimages.npy:<sha256>``
    (plus ``\\n_label_errors.parquet:<sha256>`` when the set has a label-error table); the
    fine-tuned model records it (MLflow tag ``gampen.label_set_sha256``).
    """
    folder = Path(folder)
    text = f"{LABELS_FILE}:{file_sha256(folder / LABELS_FILE)}\n"
    text += f"{IMAGES_FILE}:{file_sha256(folder / IMAGES_FILE)}"
    if (folder / LABEL_ERRORS_FILE).is_file():
        # Only when present, so the hash of a set without one is what it always was.
        text += f"\n{LABEL_ERRORS_FILE}:{file_sha256(folder / LABEL_ERRORS_FILE)}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class LabelledSetResult:
    """What :func:`publish_labelled_set` stored and left out."""

    out_dir: Path
    n_galaxies: int
    split_counts: dict[str, int]
    label_set_sha256: str
    manifest: dict
    quarantined: list[Path]


def publish_labelled_set(
    profile: Profile,
    domain: Domain,
    source: Path | str,
    out_dir: Path | str,
    quarantine_root: Path | str,
    *,
    log: Callable[[str], None] = lambda line: None,
) -> LabelledSetResult:
    """Validate ``source``, store the labelled set at ``out_dir``, quarantine bad files.

    Steps, each safe to rerun (as the inbox): read and validate
    (:func:`load_labelled_set`) -> store ``images.npy``, ``labels.parquet`` and
    ``manifest.json`` in one atomic step -> move each rejected cutout file to
    ``<quarantine_root>/<domain>/`` with its reason. A rerun after the quarantine finds
    the moved files gone and reports their rows as naming unknown files.

    Parameters
    ----------
    profile : Profile
        Base imaging and input size limits.
    domain : Domain
        The domain (partition key = ``domain.name``).
    source : path
        ``<Settings.labelled>/<domain>/``.
    out_dir : path
        ``<root>/labelled_set/<domain>/``.
    quarantine_root : path
        ``<Settings.quarantine>/labelled``.
    log : callable(str)
        Receives a summary line and one line per problem.

    Raises
    ------
    LabelledSetError
        When the folder or table is unusable, or no labelled cutout is usable (the bad
        files are quarantined first).
    """
    source, out_dir = Path(source), Path(out_dir)
    errors_path = source / LABEL_ERRORS_FILE
    errors = read_label_errors(source)  # a bad table fails the run before anything moves
    data = load_labelled_set(source, domain, profile)
    for rejection in data.rejections:
        log(f"quarantine {rejection.file}: {rejection.reason}")
    for rejection in data.row_rejections:
        log(f"left out {rejection.reason}")
    if data.labels.height == 0:
        quarantine(data.rejections, source, quarantine_root, batch_name=domain.name)
        reasons = [r.reason for r in data.row_rejections[:3]] + [
            f"{r.file}: {r.reason}" for r in data.rejections[:3]
        ]
        raise LabelledSetError(
            data.table_path,
            "no usable labelled cutout" + (f" ({'; '.join(reasons)})" if reasons else ""),
        )
    counts = {s: int((data.labels["split"] == s).sum()) for s in SPLITS}
    with Store.publish(out_dir) as tmp:
        save_npy(tmp / IMAGES_FILE, data.images.astype(np.float32, copy=False))
        data.labels.write_parquet(tmp / LABELS_FILE)
        if errors is not None:
            shutil.copyfile(errors_path, tmp / LABEL_ERRORS_FILE)
        sha = label_set_sha256(tmp)
        manifest = {
            "domain": domain.name,
            "source": str(source),
            "labels_table": data.table_path.name,
            "label_set_sha256": sha,
            "n_galaxies": data.labels.height,
            "splits": counts,
            "split_from_hash": int((data.labels["split_source"] == "hash").sum()),
            "stamp_size_px": domain.stamp_size_px,
            "pixel_scale_arcsec": domain.pixel_scale_arcsec,
            "flux_unit_in": domain.flux_unit,
            "files_in": data.batch.n_files_in,
            "files_accepted": data.batch.accepted_files,
            "files_quarantined": {r.file: r.reason for r in data.rejections},
            "rows_rejected": [
                {"row": r.row, "file": r.file, "reason": r.reason} for r in data.row_rejections
            ],
            "unlabelled_files": data.unlabelled_files,
            "label_errors": None if errors is None else label_errors_record(tmp),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    moved = quarantine(data.rejections, source, quarantine_root, batch_name=domain.name)
    log(
        f"labelled set {domain.name}: {data.labels.height} galaxies "
        f"({', '.join(f'{k} {v}' for k, v in counts.items())}), {len(moved)} file(s) "
        f"quarantined, {len(data.row_rejections)} row(s) left out, "
        + (f"label errors of {len(errors)} injected galaxies, " if errors is not None else "")
        + f"sha256 {sha[:16]}"
    )
    return LabelledSetResult(out_dir, data.labels.height, counts, sha, manifest, moved)


def read_manifest(folder: Path | str) -> dict:
    """``manifest.json`` of a stored labelled set (:class:`LabelledSetError` when missing)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise LabelledSetError(path, "missing: materialize labelled_set for this domain first")
    return json.loads(path.read_text())


def label_errors_table(labels: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """The labeller's errors on injected galaxies: its labels against their truth.

    Parameters
    ----------
    labels : pl.DataFrame
        The labeller's table on the injected galaxies (``gampen label``'s output): ``file``
        and the three labels; with a ``fit_status`` column only ``ok`` rows count, and rows
        with a missing or non-finite label are left out (a failed fit is no label).
    truth : pl.DataFrame
        ``file`` and the true ``bt``, ``re_arcsec``, ``flux_nJy`` of the same galaxies
        (e.g. ``gampen_ml.sim.target_domain``'s ``_truth.parquet``); ``file`` is unique.

    Returns
    -------
    pl.DataFrame
        One row per galaxy with a usable label, sorted by ``file``: ``file``,
        :data:`LABEL_ERROR_COLUMNS` (``bt_error`` = label - truth, ``re_rel_error`` and
        ``flux_rel_error`` = label / truth - 1) and the truths ``<parameter>_true``.
        Write it as ``<labelled folder>/``:data:`LABEL_ERRORS_FILE`.

    Raises
    ------
    ValueError
        When a column is missing or ``truth`` names a file twice.
    """
    for name, table in (("labels", labels), ("truth", truth)):
        missing = [c for c in ("file", *PARAMETERS) if c not in table.columns]
        if missing:
            raise ValueError(f"label_errors_table: {name} lacks column(s) {missing}")
    duplicated = truth.filter(pl.col("file").is_duplicated())["file"].unique().to_list()
    if duplicated:
        raise ValueError(f"label_errors_table: truth names file(s) {duplicated[:5]} twice")
    if "fit_status" in labels.columns:
        labels = labels.filter(pl.col("fit_status") == "ok")
    usable = pl.all_horizontal(pl.col(p).is_not_null() & pl.col(p).is_finite() for p in PARAMETERS)
    joined = (
        labels.select("file", *PARAMETERS)
        .filter(usable)
        .join(
            truth.select("file", *(pl.col(p).alias(f"{p}_true") for p in PARAMETERS)),
            on="file",
            how="inner",
        )
    )
    return joined.select(
        "file",
        (pl.col("bt") - pl.col("bt_true")).alias(LABEL_ERROR_COLUMNS["bt"]),
        (pl.col("re_arcsec") / pl.col("re_arcsec_true") - 1).alias(
            LABEL_ERROR_COLUMNS["re_arcsec"]
        ),
        (pl.col("flux_nJy") / pl.col("flux_nJy_true") - 1).alias(LABEL_ERROR_COLUMNS["flux_nJy"]),
        *LABEL_ERROR_TRUTH_COLUMNS.values(),
    ).sort("file")


def check_label_errors(table: pl.DataFrame, path: Path | str) -> pl.DataFrame:
    """Validate a label-error table; return its errors and truths as float64.

    Returns
    -------
    pl.DataFrame
        The columns :data:`LABEL_ERROR_COLUMNS` and :data:`LABEL_ERROR_TRUTH_COLUMNS`, float64,
        one row per injected galaxy (:meth:`gampen_ml.calibrate.LabelNoise.from_table`).

    Raises
    ------
    LabelledSetError
        Naming ``path``: a missing column, fewer than :data:`MIN_LABEL_ERROR_ROWS` rows, or
        a value that is missing, not finite, a B/T error outside [-1, 1], a relative error
        <= -1 (a label <= 0), a true B/T outside [0, 1] or a true Re or flux <= 0, with the
        first offending rows (1 = first data row).
    """
    errors = list(LABEL_ERROR_COLUMNS.values())
    truths = list(LABEL_ERROR_TRUTH_COLUMNS.values())
    columns = errors + truths
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LabelledSetError(
            path,
            f"missing column(s) {missing} of a label-error table; required: "
            f"{', '.join(columns)} (B/T: label - truth; Re, flux: label / truth - 1; the "
            "injected galaxies' truths, whose errors each posterior draw is matched to; "
            "`gampen label-errors` writes them all)",
        )
    if table.height < MIN_LABEL_ERROR_ROWS:
        raise LabelledSetError(
            path,
            f"only {table.height} row(s): a label-error table needs at least "
            f"{MIN_LABEL_ERROR_ROWS} injected galaxies (its rows are the whole error "
            "distribution the recalibration deconvolves)",
        )
    try:
        values = table.select(pl.col(c).cast(pl.Float64) for c in columns)
    except Exception as exc:  # polars raises several error types for a bad cast
        raise LabelledSetError(path, f"label errors are not numbers ({exc})") from exc
    limits = {
        errors[0]: (lambda e: np.abs(e) > 1, "is outside [-1, 1]"),
        errors[1]: (lambda e: e <= -1, "is <= -1 (a label <= 0)"),
        errors[2]: (lambda e: e <= -1, "is <= -1 (a label <= 0)"),
        truths[0]: (lambda t: (t < 0) | (t > 1), "is outside [0, 1]"),
        truths[1]: (lambda t: t <= 0, "is <= 0"),
        truths[2]: (lambda t: t <= 0, "is <= 0"),
    }
    for column in columns:
        e = values[column].to_numpy()
        impossible, what = limits[column]
        with np.errstate(invalid="ignore"):
            for bad, text in ((~np.isfinite(e), "is missing or not finite"), (impossible(e), what)):
                rows = np.flatnonzero(bad) + 1
                if len(rows):
                    raise LabelledSetError(
                        path,
                        f"{column} {text} in {len(rows)} row(s), first rows {rows[:5].tolist()}",
                    )
    return values


def read_label_errors(folder: Path | str) -> pl.DataFrame | None:
    """The label-error table of a labelled folder or stored set; None when it has none.

    Reads ``folder/``:data:`LABEL_ERRORS_FILE` and validates it
    (:func:`check_label_errors`, whose float64 errors and truths it returns).

    Raises
    ------
    LabelledSetError
        When the table cannot be read or is invalid (names the file).
    """
    path = Path(folder) / LABEL_ERRORS_FILE
    if not path.is_file():
        return None
    try:
        table = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for a bad file
        raise LabelledSetError(path, f"cannot read the label-error table ({exc})") from exc
    return check_label_errors(table, path)


def label_errors_record(folder: Path | str) -> dict | None:
    """What a set's label-error table is, for manifests and model records; None when absent.

    ``{"file", "n_rows", "sha256"}`` (the file's SHA-256).
    """
    errors = read_label_errors(folder)
    if errors is None:
        return None
    path = Path(folder) / LABEL_ERRORS_FILE
    return {"file": LABEL_ERRORS_FILE, "n_rows": int(len(errors)), "sha256": file_sha256(path)}


def write_label_errors(
    labels_path: Path | str, truth_path: Path | str, out: Path | str
) -> pl.DataFrame:
    """Measure a labeller's errors on injected galaxies and write the label-error table.

    Parameters
    ----------
    labels_path : path
        The labeller's table on the injected galaxies (``gampen label``'s ``--out``),
        Parquet or CSV.
    truth_path : path
        Their truths: ``file`` (as in the labels table) and ``bt``, ``re_arcsec``,
        ``flux_nJy``; Parquet or CSV.
    out : path
        Where to write the table, normally ``<labelled folder>/``:data:`LABEL_ERRORS_FILE`.

    Returns
    -------
    pl.DataFrame
        The table written (:func:`label_errors_table`), validated by
        :func:`check_label_errors` first.

    Raises
    ------
    LabelledSetError
        When an input cannot be read or lacks a column, or the table is invalid (names the
        file).
    """
    from gampen_ml.io import atomic_file

    tables = []
    for path in (Path(labels_path), Path(truth_path)):
        try:
            tables.append(pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path))
        except Exception as exc:  # polars raises several error types for a bad file
            raise LabelledSetError(path, f"cannot read the table ({exc})") from exc
    try:
        table = label_errors_table(*tables)
    except ValueError as exc:
        raise LabelledSetError(Path(labels_path), str(exc)) from exc
    check_label_errors(table, out)
    with atomic_file(out) as tmp:
        table.write_parquet(tmp)
    return table
