"""Benchmark: peak memory of a long AnimateDiff animation through FreeNoise context windows
against a short one without, on the CPU with the tiny kit (issue 14's memory target).

Each side renders one task through render's own engine and AnimateDiff plugin, in its own
process (so each peak RSS is its own), after a 2-frame warm-up render; what is compared is
the growth of peak RSS during the timed render (activations and decode), in one invocation:

- short: 16 frames, no context (one window: the whole animation);
- long: 64 frames, ``context: {length: 16, stride: 4}`` with the split on (the default);
- long, no split: the same with ``split: false`` (FreeNoise windows the motion modules only).

    python bench/bench_animatediff.py                 # 256x256, 4 steps, 1 thread
    python bench/bench_animatediff.py --size 384 --steps 2

The tiny kit is random-weight and small; its activations are what grows with frame count,
as a full-size model's do, so the ratio is what the target is about (not the absolute MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout, installed or not

SIDES = {
    "short (16 frames, no context)": {"frames": 16},
    "long (64 frames, context 16/4, split)": {"frames": 64,
                                              "context": {"length": 16, "stride": 4}},
    "long (64 frames, context 16/4, no split)": {"frames": 64, "split": False,
                                                 "context": {"length": 16, "stride": 4}},
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side(spec: dict) -> dict:
    """One side, in this process: the render's seconds and its peak RSS growth."""
    import torch

    from render import testing as tk
    from render.engine import Engine
    from render.plugins import load_plugins
    from render.run import load_all, resolve_tasks, selected_plans
    from render.tasks import Batch

    torch.set_num_threads(spec["threads"])
    kit = tk.ensure_models()
    section = {"motion_module": "tiny-motion-sd15", **spec["animatediff"]}
    warm = {"motion_module": "tiny-motion-sd15", "frames": 2}
    job = Path(spec["workdir"]) / f"bench-{abs(hash(json.dumps(spec)))}.yaml"
    job.write_text(
        f"version: 1\nmodel_dirs: [{kit}]\noutput: {{dir: out}}\n"
        f"defaults: {{model: tiny-sd15, size: {spec['size']}x{spec['size']}, "
        f"steps: {spec['steps']}, sampler: Euler, seed: 1, prompt: a house}}\n"
        f"jobs:\n  - name: warm\n    steps: 1\n    animatediff: {json.dumps(warm)}\n"
        f"  - name: timed\n    animatediff: {json.dumps(section)}\n")
    plugins = load_plugins()
    warm_task, task = resolve_tasks(selected_plans(load_all([str(job)], plugins), []), plugins)
    engine = Engine(plugins.pm, device="cpu", dtype="float32")
    engine.render(Batch(("warm",), (warm_task,)))
    before = max(_rss_mib(), _peak_mib())
    start = time.perf_counter()
    (result,) = engine.render(Batch(("timed",), (task,)))
    seconds = time.perf_counter() - start
    return {"frames": len(result.images), "seconds": seconds,
            "growth_mib": max(0.0, _peak_mib() - before), "peak_mib": _peak_mib()}


def run_side(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--side", json.dumps(spec)],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(json.loads(args.side))))
        return 0
    print(f"AnimateDiff on the CPU, tiny kit, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.threads} thread(s); peak RSS growth during the render, each in its own "
          "process:")
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        for label, section in SIDES.items():
            spec = {"animatediff": section, "size": args.size, "steps": args.steps,
                    "threads": args.threads, "workdir": workdir}
            rows[label] = row = run_side(spec)
            print(f"  {label:42} {row['frames']:3} frames  {row['seconds']:7.1f} s  "
                  f"growth {row['growth_mib']:7.1f} MiB  (peak {row['peak_mib']:.0f} MiB)")
    short, long_split, long_whole = rows.values()
    print(f"  ratio 64 frames (windows, split) / 16 frames: memory "
          f"{long_split['growth_mib'] / max(short['growth_mib'], 1e-9):.2f}x, time "
          f"{long_split['seconds'] / short['seconds']:.2f}x")
    print(f"  ratio 64 frames (windows, no split) / 16 frames: memory "
          f"{long_whole['growth_mib'] / max(short['growth_mib'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
