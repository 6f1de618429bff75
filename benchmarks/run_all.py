"""Run every benchmark in one go and assemble ``benchmarks/RESULTS.md``.

    .venv/bin/python -m benchmarks.run_all                 # the suite, sized for ~8 min on 2 cores, 1 thread
    .venv/bin/python -m benchmarks.run_all posterior scale # only those whose name matches
    .venv/bin/python -m benchmarks.run_all --full          # each script's own (larger) defaults
    .venv/bin/python -m benchmarks.run_all --assemble-only # just rebuild RESULTS.md

Each ``benchmarks/bench_<name>.py`` measures our code against a reference in the same
process (these machines are noisy, so only ratios are compared). ``simulation``,
``adaptive``, ``scale`` and ``sky_catalog`` write their section ``benchmarks/results/<name>.md``
themselves;
the sections of ``training``, ``inference``, ``posterior`` (and ``gpu``, measured on a GPU
machine with ``benchmarks/gpu_check.sh``; ``pipeline``, written by whoever times the quick
pipeline) are curated by hand from a run. ``RESULTS.md`` holds every section followed by the
verbatim output of this run's script, so each figure can be checked against a fresh run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "summary",
    "simulation",
    "training",
    "inference",
    "posterior",
    "adaptive",
    "scale",
    "sky_catalog",
    "gpu",
    "pipeline",
    "validation",
]

#: Arguments of the default (budgeted) run; ``--full`` drops them. One torch thread: on a
#: shared 2-core machine two OpenMP threads per process spin against the other jobs and
#: slow batch-1 code (the references) by 10x or more, which would inflate every ratio.
BUDGET_ARGS: dict[str, list[str]] = {
    "simulation": ["--n-naive", "40", "--n-fast", "400"],
    "training": ["--threads", "1", "--steps", "5", "--paper-steps", "0"],
    "inference": ["--threads", "1", "--galaxies", "64", "--passes", "40"],
    "posterior": ["--galaxies", "2000", "--reference", "20"],
    "adaptive": ["--galaxies", "192", "--threads", "1"],
    "scale": ["--sizes", "20000", "100000", "--threads", "1", "--batch", "512"],
    "sky_catalog": ["--sizes", "100000"],
}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = f"torch {torch.__version__}"
    except ImportError:  # pragma: no cover
        gpu, threads = "torch missing", ""
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{platform.node()} · {cpu} · {os.cpu_count()} cores · {gpu} · {threads} · load {load}"


def _sort_key(path: Path) -> tuple:
    return (path.stem not in ORDER, ORDER.index(path.stem) if path.stem in ORDER else 0, path.stem)


def assemble(machine: str | None = None) -> Path:
    """Concatenate ``results/*.md`` (known order first), each followed by its last output."""
    lines = [
        "# Benchmark results",
        "",
        "Every figure below was produced by the command quoted in its section; ratios compare",
        "our code with a reference implementation run in the same process on the same machine,",
        "with the same torch thread count.",
        f"Assembled {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python -m benchmarks.run_all`"
        + (f" on {machine}." if machine else "."),
        "",
    ]
    for path in sorted(HERE.glob("results/*.md"), key=_sort_key):
        lines += [path.read_text().rstrip(), ""]
        log = HERE / "results" / "logs" / f"{path.stem}.txt"
        if log.is_file():
            lines += [
                f"<details><summary>Output of the last `run_all` run of bench_{path.stem}.py"
                "</summary>",
                "",
                "```",
                log.read_text().rstrip(),
                "```",
                "</details>",
                "",
            ]
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only benchmarks whose name contains one")
    parser.add_argument("--full", action="store_true", help="the scripts' own default sizes")
    parser.add_argument("--assemble-only", action="store_true")
    args = parser.parse_args(argv)
    machine = _machine()
    print(f"machine: {machine}", flush=True)
    failed = []
    if not args.assemble_only:
        (HERE / "results" / "logs").mkdir(parents=True, exist_ok=True)
        scripts = sorted(HERE.glob("bench_*.py"), key=lambda p: _sort_key(Path(p.stem[6:])))
        for script in scripts:
            name = script.stem.removeprefix("bench_")
            if args.names and not any(w in name for w in args.names):
                continue
            extra = [] if args.full else BUDGET_ARGS.get(name, [])
            cmd = [sys.executable, "-m", f"benchmarks.{script.stem}", *extra]
            print(f"==> {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            text = (
                f"$ python -m benchmarks.{script.stem} {' '.join(extra)}\n{done.stdout}"
                f"{done.stderr if done.returncode else ''}[{seconds:.0f} s, exit {done.returncode}]"
            )
            (HERE / "results" / "logs" / f"{name}.txt").write_text(text)
            print(text, flush=True)
            if done.returncode:
                failed.append(name)
    print(f"wrote {assemble(machine)}")
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
