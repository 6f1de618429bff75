"""benchmarks/paper_short_gpu.sh: the one-shot shortened paper run, as on a GPU machine.

Without CUDA the script runs the ``tiny`` profile through the same CLI stages; the test runs
it the way a person would and checks it produced the report and the timings of every stage.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_paper_short_script_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "GAMPEN_STORAGE")}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "paper_short_gpu.sh"), str(out)],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["profile"] == "tiny" and timings["device"] == "cpu"
    assert list(timings["stages_s"]) == [
        "simulate",
        "train dropout-0",
        "train dropout-0.05",
        "calibrate",
        "catalog",
        "validate",
    ]
    assert timings["skipped"] == [] and "failed" not in timings
    assert timings["calibration"]["chosen_dropout_rate"] in (0.0, 0.05)
    assert set(timings["training"]) == {"dropout-0", "dropout-0.05"}
    report = (out / "validation.md").read_text()
    assert "68.27" in report and "paper" in report.lower()
    metrics = json.loads((out / "validation.json").read_text())
    assert metrics  # the side-by-side numbers, machine-readable
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert "trained_model/dropout-0/history.json" in names
    assert "calibrated_dropout_rate/all/coverage.parquet" in names
    assert "validation/validation.md" in names


def test_paper_short_budget_and_overrides(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "GAMPEN_STORAGE")}
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "benchmarks" / "paper_short_gpu.sh"),
            str(out),
            "--dropout-rates",
            "0.05",
            "--epochs",
            "3",
            "--learning-rate",
            "3e-4",
        ],
        env={**env, "PYTHON": sys.executable, "BUDGET_S": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    timings = json.loads((out / "timings.json").read_text())
    # No budget: no stage starts, each is listed as skipped, and the timings still come back.
    assert timings["stages_s"] == {}
    assert timings["skipped"][0] == "simulate" and timings["skipped"][-1] == "validate"
    assert not (out / "validation.md").exists()
    # The overrides replace the profile's grid and epochs.
    assert timings["dropout_rates"] == [0.05] and timings["epochs"] == 3
    assert timings["learning_rate"] == 3e-4
    assert "train dropout-0.05" in timings["skipped"] and len(timings["skipped"]) == 5
