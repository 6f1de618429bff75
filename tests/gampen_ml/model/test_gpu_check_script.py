"""benchmarks/gpu_check.sh runs on CPU at tiny sizes and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = os.environ | {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        check=True, env=env, timeout=120, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["train"]["finite"] and result["train"]["steps"] == 3
    assert result["mc_dropout"]["passes_per_s"] > 0
    assert result["mc_dropout"]["head_tail_max_abs_diff"] == 0.0
