"""One-shot shortened run of the paper setup: the ``gampen`` CLI end to end, each stage timed.

simulate -> train every dropout rate of the profile -> calibrate -> MC-dropout catalog of
``sim-test`` -> ``gampen validate`` (the same Markdown + JSON report as the pipeline's
``diagnostic_plots``), without Dagster or MLflow (``--no-mlflow``), in one process so the
CUDA context and imports are paid once. Meant for a GPU machine (``paper-short`` profile,
minutes on one H100/H200, see ``benchmarks/paper_short_gpu.sh``); on a CPU it runs the
``tiny`` profile in a few minutes, which is what the test does.

Writes into ``out_dir``: ``validation.md`` / ``validation.json`` (the report),
``timings.json`` (seconds per stage, the device, stages skipped past the budget, training
curves, chosen dropout rate) and ``results.tar.gz`` (everything the report folder holds,
figures included, plus each model's ``history.json`` and the calibration table).

Usage::

    python -m benchmarks.paper_short OUT_DIR [--profile paper-short] [--budget-s 540]
        [--dropout-rates 0.01] [--epochs 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from gampen_ml import cli
from gampen_ml.config import PROFILES, dropout_key, get_profile
from gampen_ml.store import CALIBRATION_FILE, Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--profile", default=None, help="default: paper-short on CUDA, else tiny")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no stage past this")
    parser.add_argument("--root", type=Path, default=None, help="storage root (default: temp)")
    parser.add_argument("--dropout-rates", default=None, help="e.g. 0.01 (default: profile's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="peak learning rate (profile's)"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    profile = get_profile(args.profile or ("paper-short" if cuda else "tiny"))
    if args.dropout_rates or args.epochs or args.learning_rate:
        # A shorter variant under the same name: the CLI stages below look the profile up
        # by name in this process.
        rates = args.dropout_rates
        profile = profile.replace(
            calibration=dataclasses.replace(
                profile.calibration,
                dropout_rates=tuple(float(r) for r in rates.split(","))
                if rates
                else profile.calibration.dropout_rates,
            ),
            training=dataclasses.replace(
                profile.training,
                epochs=args.epochs or profile.training.epochs,
                learning_rate=args.learning_rate or profile.training.learning_rate,
            ),
        )
        PROFILES[profile.name] = profile
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = (args.root or Path(tempfile.mkdtemp(prefix="paper_short_"))).resolve()
    report = root / "validation"
    if cuda:
        torch.backends.cudnn.benchmark = True
    timings: dict = {
        "profile": profile.name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "n_galaxies": profile.simulation.n_galaxies,
        "epochs": profile.training.epochs,
        "learning_rate": profile.training.learning_rate,
        "mean_warmup_fraction": profile.training.mean_warmup_fraction,
        "dropout_rates": list(profile.calibration.dropout_rates),
        "stages_s": {},
        "skipped": [],
    }
    common = ["--profile", profile.name, "--root", str(root)]
    stages = [("simulate", ["simulate", *common])]
    for rate in profile.calibration.dropout_rates:
        stages.append((f"train {dropout_key(rate)}", ["train", *common, "--dropout", f"{rate:g}",
                                                      "--no-mlflow"]))  # fmt: skip
    stages += [
        ("calibrate", ["calibrate", *common, "--no-mlflow"]),
        ("catalog", ["catalog", *common]),
        ("validate", ["validate", *common, "--out", str(report)]),
    ]
    started = time.perf_counter()

    def save() -> None:
        timings["total_s"] = round(time.perf_counter() - started, 1)
        (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")

    status = 0
    for name, argv_stage in stages:
        if time.perf_counter() - started > args.budget_s:
            timings["skipped"].append(name)
            print(f"[paper_short] skipped {name}: past the {args.budget_s:.0f} s budget")
            continue
        print(f"[paper_short] {name}: gampen {' '.join(argv_stage)}", flush=True)
        t0 = time.perf_counter()
        status = cli.main(argv_stage)
        timings["stages_s"][name] = round(time.perf_counter() - t0, 1)
        save()
        if status != 0:
            timings["failed"] = name
            break
    _collect(profile, root, report, out, timings)
    save()
    print(json.dumps(timings, indent=2))
    return status


def _collect(profile, root: Path, report: Path, out: Path, timings: dict) -> None:
    """Copy the report beside ``timings.json`` and pack every result file into one archive."""
    for name in ("validation.md", "validation.json"):
        if (report / name).is_file():
            shutil.copy2(report / name, out / name)
    files = [p for p in report.rglob("*") if p.is_file()] if report.is_dir() else []
    store = Store(root)
    calibration = store.calibration()
    files += [p for p in calibration.glob("*") if p.is_file() and p.suffix != ".npy"]
    curves = {}
    for rate in profile.calibration.dropout_rates:
        history = store.history(rate)
        if history.is_file():
            files.append(history)
            curves[dropout_key(rate)] = json.loads(history.read_text())
    timings["training"] = curves
    if (calibration / CALIBRATION_FILE).is_file():
        timings["calibration"] = json.loads((calibration / CALIBRATION_FILE).read_text())
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)))


if __name__ == "__main__":
    sys.exit(main())
