"""Benchmark: ``render.py --dry-run`` of 100,000 tasks against one task (issue 16's CPU
target: under 5 s, and no torch import).

Three job files over the tiny kit, each timed as a fresh process (best of ``--repeat``):

- one task: start-up, plugin loading, model resolution (the baseline);
- seeds: 100 grid cells (cfg x sampler) x 1,000 seeds, with wildcards: a cell's tasks share
  everything but the seed, the usual overnight shape;
- cells: 100,000 distinct cells (cfg x steps), one seed each: every task built on its own.

Each run is also checked for importing torch (``-X importtime``).

    python bench/bench_dry_run.py
    python bench/bench_dry_run.py --repeat 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout, installed or not

SAMPLERS = ["Euler a", "DPM++ 2M Karras", "Euler", "DDIM", "Heun", "LMS", "DPM++ SDE",
            "UniPC", "DPM2", "DPM++ 2M"]


def job_files(folder: Path, kit: Path) -> dict[str, Path]:
    (folder / "wildcards").mkdir()
    (folder / "wildcards" / "season.txt").write_text("spring\nsummer\nautumn\nwinter\n")
    head = (f"version: 1\nmodel_dirs: [{kit}]\nwildcard_dirs: [wildcards]\n"
            'output: {dir: "out/{job}"}\n'
            "defaults: {model: tiny-sd15, size: 64x64, steps: 4}\njobs:\n"
            '  - name: j\n    prompt: "a __season__ cabin, {oil|watercolor} painting"\n')
    cfgs = ", ".join(str(3 + i) for i in range(10))
    jobs = {
        "one task": "    seeds: 1\n",
        "seeds (100 cells x 1000)": (f"    seeds: 1000\n    grid:\n      cfg: [{cfgs}]\n"
                                     f"      sampler: [{', '.join(SAMPLERS)}]\n"),
        "cells (100000 x 1 seed)": (
            "    grid:\n      cfg: [" + ", ".join(f"{3 + i * 0.05:g}" for i in range(100))
            + "]\n      steps: [" + ", ".join(str(1 + i) for i in range(1000)) + "]\n"),
    }
    paths = {}
    for n, (name, body) in enumerate(jobs.items()):
        paths[name] = folder / f"job{n}.yaml"
        paths[name].write_text(head + body)
    return paths


def timed(path: Path) -> tuple[float, bool, int]:
    """Seconds, whether torch was imported, and the task count the table printed."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "render.py"), str(path), "--dry-run",
         "--max-tasks", "200000"], capture_output=True, text=True, cwd=path.parent)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{path}: exit {result.returncode}\n{result.stderr[-2000:]}")
    torch = any(line.startswith("import time:") and line.split("|")[-1].strip() == "torch"
                for line in result.stderr.splitlines())
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    return seconds, torch, int(total.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from render.testing import ensure_models

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kit = ensure_models(folder / "kit")
        rows = []
        for name, path in job_files(folder, kit).items():
            runs = [timed(path) for _ in range(args.repeat)]
            best = min(r[0] for r in runs)
            rows.append((name, runs[0][2], best, any(r[1] for r in runs)))
    base = rows[0][2]
    print(f"{'job':<26} {'tasks':>7} {'best s':>7} {'x one task':>10}  torch imported")
    for name, tasks, best, torch in rows:
        imported = "YES" if torch else "no"
        print(f"{name:<26} {tasks:>7} {best:>7.2f} {best / base:>10.1f}  {imported}")


if __name__ == "__main__":
    main()
