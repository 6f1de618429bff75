"""Run every benchmark in one go and assemble ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.run_all            # all benchmarks
    .venv/bin/python -m benchmarks.run_all posterior  # only those whose name matches

Each ``benchmarks/bench_<name>.py`` measures our code against a reference in the same
process (these machines are noisy, so only ratios are compared) and writes its section
to ``benchmarks/results/<name>.md``; this script runs them one after the other and
concatenates the sections under a header naming the machine.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["simulation", "training", "inference", "posterior", "pipeline"]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:  # pragma: no cover
        gpu = "torch missing"
    return f"{platform.node()} · {cpu} · {os.cpu_count()} cores · {gpu}"


def assemble() -> Path:
    """Concatenate ``results/*.md`` (known order first) into ``RESULTS.md``."""
    sections = sorted(
        HERE.glob("results/*.md"),
        key=lambda p: (p.stem not in ORDER, ORDER.index(p.stem) if p.stem in ORDER else 0, p.stem),
    )
    lines = [
        "# Benchmark results",
        "",
        "Every figure below was produced by the command quoted in its section; ratios compare",
        "our code with a reference implementation run in the same process on the same machine.",
        f"Assembled {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python -m benchmarks.run_all`.",
        "",
    ]
    for path in sections:
        lines += [path.read_text().rstrip(), ""]
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    wanted = (argv if argv is not None else sys.argv[1:]) or None
    print(f"machine: {_machine()}", flush=True)
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        if wanted and not any(w in name for w in wanted):
            continue
        print(f"==> {script.name}", flush=True)
        if subprocess.run(
            [sys.executable, "-m", f"benchmarks.{script.stem}"], cwd=HERE.parent
        ).returncode:
            failed.append(name)
    print(f"wrote {assemble()}")
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
