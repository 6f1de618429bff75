"""DistributedDataParallel training under torchrun: two CPU processes (gloo) on tiny shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gampen_ml import stages
from gampen_ml.config import get_profile

SCRIPT = """
import sys
from pathlib import Path
import torch
from gampen_ml.config import get_profile
from gampen_ml.train import train_model
torch.set_num_threads(1)
shards = sorted(Path(sys.argv[1]).glob("shard-*"))
r = train_model(get_profile("tiny"), 0.05, shards, Path(sys.argv[2]), device="cpu",
                resume=False, progress=False)
print("RESULT", r.final_train_loss, r.final_val_loss, flush=True)
"""


@pytest.mark.slow
def test_two_process_ddp_run_agrees_across_ranks(tmp_path):
    profile = get_profile("tiny")
    root = tmp_path / "data"
    list(stages.simulate_inputs(profile, root))
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "model"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script),
         str(root / "simulated_galaxies"), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 2, result.stdout
    # Losses are all-reduced over the ranks: both processes report the same numbers.
    assert lines[0][1:] == lines[1][1:]
    assert all(float(v) == float(v) for v in lines[0][1:])  # finite, not NaN
    for name in ("state_dict.pt", "model.json", "label_scaler.json", "history.json"):
        assert (out / name).is_file(), name
