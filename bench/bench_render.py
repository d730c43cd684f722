"""Benchmark: an N-task grid through ``render.py`` against a plain diffusers loop.

Both sides run as whole processes (start-up, model load, imports and writes included), over
the same tasks, on the same machine, in the same invocation; the report is their ratio.

    python bench/bench_render.py                 # CPU, the tiny kit, 16 tasks
    python bench/bench_render.py --tasks 64 --batch-size 4
    python bench/bench_render.py --gpu           # full-size SD1.5 (512 px) and SDXL (1024 px)
                                                 # random-weight architectures, 30 steps, CFG

The GPU mode builds SD1.5 and SDXL from their published configs with random weights (they
time exactly like real weights) into --workdir, so it needs no download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout, installed or not

PLAIN_LOOP = textwrap.dedent('''
    """The baseline: what a user writes by hand with diffusers."""
    import json, sys, time, torch
    from diffusers import AutoPipelineForText2Image, EulerAncestralDiscreteScheduler
    spec = json.loads(sys.argv[1])
    device = spec["device"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(spec["threads"])
    pipe = AutoPipelineForText2Image.from_pretrained(spec["model"], torch_dtype=dtype,
                                                     local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    for i, task in enumerate(spec["tasks"]):
        g = torch.Generator(device).manual_seed(task["seed"])
        image = pipe(task["prompt"], negative_prompt=task["negative"], width=task["size"],
                     height=task["size"], num_inference_steps=task["steps"],
                     guidance_scale=task["cfg"], generator=g).images[0]
        image.save(f"{spec['out']}/{i:05}.png")
''')


def job_yaml(model_dir: Path, model: str, n: int, size: int, steps: int, out: Path) -> str:
    cfgs = [5, 7]
    seeds = max(1, n // len(cfgs))
    return textwrap.dedent(f"""
        version: 1
        model_dirs: [{model_dir}]
        output: {{dir: "{out}/{{job}}", grid: false}}
        defaults: {{model: {model}, size: {size}x{size}, steps: {steps}, sampler: Euler a,
                   negative: "lowres"}}
        jobs:
          - name: bench
            prompt: a cabin in the woods, oil painting
            seeds: {seeds}
            grid: {{cfg: {cfgs}}}
    """)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    return elapsed


def bench_one(label: str, model_dir: Path, model: str, model_path: Path, n: int, size: int,
              steps: int, batch_size: int, device: str, work: Path) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out_r, out_p = work / f"{label}-render", work / f"{label}-plain"
    out_p.mkdir(parents=True, exist_ok=True)
    job = work / f"{label}.yaml"
    job.write_text(job_yaml(model_dir, model, n, size, steps, out_r))
    tasks = [{"prompt": "a cabin in the woods, oil painting", "negative": "lowres",
              "seed": seed, "cfg": cfg, "steps": steps, "size": size}
             for cfg in (5, 7) for seed in range(max(1, n // 2))]
    spec = {"model": str(model_path), "tasks": tasks, "out": str(out_p), "device": device,
            "threads": os.cpu_count() or 1}
    plain = timed([sys.executable, "-c", PLAIN_LOOP, json.dumps(spec)], env)
    cmd = [sys.executable, "render.py", str(job), "-q", "--batch-size", str(batch_size),
           "--device", device]
    ours = timed(cmd, env)
    rerun = timed(cmd, env)   # everything done: the ledger skips it all
    count = len(tasks)
    return {"tasks": count, "plain_s": plain, "render_s": ours, "rerun_s": rerun,
            "plain_img_s": count / plain, "render_img_s": count / ours,
            "speed_ratio": plain / ours}


def build_full_size(work: Path) -> dict[str, Path]:
    """Random-weight SD1.5 and SDXL diffusers folders built from the shipped configs.

    Random weights time exactly like real ones; nothing is downloaded.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from render.configs import shipped_config_dir

    built = {}
    for family in ("sd15", "sdxl"):
        source = shipped_config_dir(family)
        target = work / "checkpoints" / f"random-{family}"
        if not (target / "model_index.json").exists():
            index = json.loads((source / "model_index.json").read_text())
            parts = {
                "unet": UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(source / "unet")),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(source / "vae")),
            }
            for name in ("text_encoder", "text_encoder_2"):
                if name in index:
                    cls = (CLIPTextModelWithProjection if name == "text_encoder_2"
                           else CLIPTextModel)
                    parts[name] = cls(CLIPTextConfig.from_pretrained(source / name))
            for name in ("tokenizer", "tokenizer_2"):
                if name in index:
                    parts[name] = CLIPTokenizer.from_pretrained(source / name)
            from diffusers import DiffusionPipeline

            pipe_cls = getattr(__import__("diffusers"), index["_class_name"])
            scheduler_cls = getattr(__import__("diffusers"), index["scheduler"][1])
            parts["scheduler"] = scheduler_cls.from_pretrained(source / "scheduler")
            extra = {"safety_checker": None, "feature_extractor": None,
                     "requires_safety_checker": False} if family == "sd15" else {}
            pipe = pipe_cls(**parts, **extra).to(torch.float16)
            assert isinstance(pipe, DiffusionPipeline)
            pipe.save_pretrained(target)
        built[family] = target
    return built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="render-bench-"))
    results = {}
    if args.gpu:
        models = build_full_size(work)
        results["sd15-512"] = bench_one("sd15", work, "random-sd15", models["sd15"], args.tasks,
                                        512, 30, args.batch_size, "cuda", work)
        results["sdxl-1024"] = bench_one("sdxl", work, "random-sdxl", models["sdxl"],
                                         args.tasks, 1024, 30, args.batch_size, "cuda", work)
    else:
        from render.testing import ensure_models

        kit = ensure_models(work / "kit")
        results["tiny-64"] = bench_one("tiny", kit, "tiny-sd15", kit / "checkpoints" /
                                       "tiny-sd15", args.tasks, 64, 8, args.batch_size, "cpu",
                                       work)
    for label, r in results.items():
        print(f"{label}: {r['tasks']} tasks  plain diffusers {r['plain_s']:.1f} s "
              f"({r['plain_img_s']:.2f} img/s)  render.py {r['render_s']:.1f} s "
              f"({r['render_img_s']:.2f} img/s)  ratio {r['speed_ratio']:.2f}x  "
              f"re-run (all done) {r['rerun_s']:.1f} s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
