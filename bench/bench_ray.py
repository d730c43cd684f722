"""Benchmark: scale-out of ``--executor ray``, N workers against 1, in one invocation.

Each configuration is a whole ``render.py`` process over the same job (Ray's start-up, the
workers' imports and model loads, and the writes included), against the local executor as
the baseline. Start-up is measured too (a one-task run per configuration) so the efficiency
over the steady state can be told from the one over the whole night.

    python bench/bench_ray.py                          # CPU, tiny kit: 1 vs 2 workers, 64 tasks
    python bench/bench_ray.py --tasks 256 --size 128
    python bench/bench_ray.py --gpu --workers 1 2 4 8  # a multi-GPU box: per added GPU

Efficiency of N workers = (time with 1 worker / time with N) / N; 1.0 is perfect scale-out.
Writes ``bench/results/ray-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout, installed or not


def job_file(folder: Path, models: Path, name: str, n: int, size: int, steps: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        version: 1
        model_dirs: [{models}]
        output: {{dir: "{folder}/out-{name}/{{job}}", grid: false}}
        defaults: {{model: tiny-sd15, size: {size}x{size}, steps: {steps}, sampler: Euler a}}
        jobs:
          - {{name: bench, prompt: "a barn at dusk", seeds: {n}}}
    """).lstrip())
    return path


def timed(job: Path, *extra: str) -> tuple[float, str]:
    """Seconds for one whole run, and its summary."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "render.py"), str(job), "-q", *extra],
                          env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"render.py {' '.join(extra)} failed:\n{done.stderr}")
    return seconds, done.stderr + done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu", action="store_true", help="workers on GPUs (--device cuda)")
    args = parser.parse_args()
    from render.testing import ensure_models

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = ensure_models(folder / "kit")
        device = ["--device", "cuda"] if args.gpu else ["--device", "cpu"]
        common = ["--batch-size", str(args.batch_size), *device]
        results: dict[str, dict[str, float]] = {}
        local_job = job_file(folder, models, "local", args.tasks, args.size, args.steps)
        results["local"] = {"seconds": timed(local_job, *common)[0]}
        for n in args.workers:
            ray = [*common, "--executor", "ray", "--workers", str(n)]
            startup = timed(job_file(folder, models, f"start{n}", 1, args.size, args.steps),
                            *ray)[0]
            seconds, summary = timed(
                job_file(folder, models, f"ray{n}", args.tasks, args.size, args.steps), *ray)
            rates = [float(r) for r in re.findall(r"ray worker \d+ .* ([\d.]+) img/s", summary)]
            results[f"ray-{n}"] = {"workers": n, "seconds": seconds, "startup": startup,
                                   "per_worker_img_s": rates}
        one = results[f"ray-{args.workers[0]}"]
        base_n = args.workers[0]
        print(f"{args.tasks} tasks, {args.size}px, {args.steps} steps, batch "
              f"{args.batch_size}, {'GPU' if args.gpu else 'CPU'} ({os.cpu_count()} cores)")
        print(f"  local executor: {results['local']['seconds']:.1f} s")
        for n in args.workers:
            r = results[f"ray-{n}"]
            whole = (one["seconds"] * base_n / r["seconds"]) / n
            steady = ((one["seconds"] - one["startup"]) * base_n
                      / max(1e-9, r["seconds"] - r["startup"])) / n
            r["efficiency"], r["steady_efficiency"] = whole, steady
            r["vs_local"] = results["local"]["seconds"] / r["seconds"]
            print(f"  ray, {n} worker{'s' if n != 1 else ''}: {r['seconds']:.1f} s "
                  f"(start-up {r['startup']:.1f} s); {r['vs_local']:.2f}x the local run; "
                  f"efficiency {whole:.2f} whole, {steady:.2f} past start-up; per worker "
                  + ", ".join(f"{x:.2f}" for x in r["per_worker_img_s"]) + " img/s")
        out = ROOT / "bench" / "results" / f"ray-{'gpu' if args.gpu else 'cpu'}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"tasks": args.tasks, "size": args.size, "steps": args.steps,
                                   "batch_size": args.batch_size, "cores": os.cpu_count(),
                                   "results": results}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
