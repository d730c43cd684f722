"""Benchmark: render's tiled 4x upscale (``resize.upscale_to``) against spandrel called by hand.

Both sides upscale the same 512x512 image 4x on the CPU with the same ESRGAN x4 file, in the
same tiles, each in its own process (so peak RSS is each side's own), in one invocation; the
report is their ratio:

- ours: preflight's deep check (which loads the file), then ``upscale_to(image, (2048, 2048),
  ...)``: feathered tiles, out-of-memory handling, the model from the component cache;
- spandrel: ``ModelLoader().load_from_file`` and a plain loop over the same tiles, each
  output pasted in (no blending), as a spandrel user writes it.

    python bench/bench_upscale.py                   # the kit's tiny ESRGAN and a full-size
                                                    # RealESRGAN_x4plus (64 filters, 23 blocks)
    python bench/bench_upscale.py --blocks 6        # a shallower full-size trunk (faster)
    python bench/bench_upscale.py --tile 0          # untiled

The full-size model is RealESRGAN_x4plus's architecture with random weights (they time like
the real ones), in its release layout (``{"params_ema": ...}`` .pth), built into --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # run from a checkout, installed or not


def image(size: int):
    """A deterministic picture with edges and gradients."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, ((x * 8).astype(int) + (y * 8).astype(int)) % 2 * 0.6 + 0.2], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def side(spec: dict) -> dict:
    """One side, in this process: seconds to load, seconds to upscale, peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    path = Path(spec["model"])
    img = image(spec["size"])
    target = spec["size"] * 4
    start = time.perf_counter()
    if spec["side"] == "ours":
        from render.builtin_plugins.upscale import resize, spandrel_models

        from render.api import FileRef
        from render.engine import Renderer

        renderer = Renderer("cpu", torch.float32)
        ref = FileRef("upscaler", path.stem, str(path), sha256=f"bench:{path}")
        spandrel_models.check_file(path, purpose="upscaler", deep=True)    # preflight
        spandrel_models.load(ref, renderer, purpose="upscaler")
        loaded = time.perf_counter()
        out = resize.upscale_to(img, (target, target), path.stem, ref, renderer,
                                tile=spec["tile"], overlap=spec["overlap"])
    else:
        import numpy as np
        from PIL import Image
        from render.builtin_plugins.upscale.resize import tile_spans
        from spandrel import ModelLoader

        model = ModelLoader().load_from_file(str(path)).eval()
        loaded = time.perf_counter()
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        starts, t = tile_spans(spec["size"], spec["tile"] or spec["size"], spec["overlap"])
        s = model.scale
        result = torch.zeros(1, 3, target, target)
        with torch.inference_mode():
            for top in starts:
                for left in starts:
                    tile = model(x[:, :, top:top + t, left:left + t])
                    result[:, :, top * s:(top + t) * s, left * s:(left + t) * s] = tile
        array = (result[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out = Image.fromarray(np.ascontiguousarray(array))
    done = time.perf_counter()
    assert out.size == (target, target)
    return {"load_s": loaded - start, "upscale_s": done - loaded,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def build_models(work: Path, blocks: int) -> dict[str, Path]:
    import torch

    from render.testing.upscalers import _esrgan_model, build_esrgan_x4, to_new_layout

    work.mkdir(parents=True, exist_ok=True)
    tiny = work / "tiny-esrgan-x4.pth"
    if not tiny.is_file():
        build_esrgan_x4(tiny, 401)
    full = work / f"RealESRGAN_x4plus-random-{blocks}b.pth"
    if not full.is_file():
        model = _esrgan_model(1, num_filters=64, num_blocks=blocks, scale=4)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"params_ema": to_new_layout(state)}, str(full))
    return {"tiny ESRGAN (16 filters, 1 block)": tiny,
            f"RealESRGAN_x4plus arch (64 filters, {blocks} blocks)": full}


def run_side(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, __file__, "--side", json.dumps(spec)],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{spec['side']} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=512, help="input side (default 512)")
    parser.add_argument("--tile", type=int, default=256, help="tile side, 0 = whole image")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=23,
                        help="RRDB blocks of the full-size model (RealESRGAN_x4plus: 23)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--tiny-only", action="store_true", help="skip the full-size model")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "render-bench-upscale")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(json.loads(args.side))))
        return 0
    models = build_models(args.workdir, args.blocks)
    if args.tiny_only:
        models = dict(list(models.items())[:1])
    print(f"4x upscale of {args.size}x{args.size} on the CPU ({args.threads} thread(s)), "
          f"tile {args.tile or 'none'}, overlap {args.overlap}")
    for label, path in models.items():
        spec = {"model": str(path), "size": args.size, "tile": args.tile,
                "overlap": args.overlap, "threads": args.threads}
        ours = run_side({**spec, "side": "ours"})
        theirs = run_side({**spec, "side": "spandrel"})
        print(f"\n{label}")
        for name, row in (("render", ours), ("spandrel loop", theirs)):
            print(f"  {name:14} upscale {row['upscale_s']:7.2f} s   load {row['load_s']:5.2f} s"
                  f"   peak RSS {row['maxrss_mb']:7.0f} MB")
        print(f"  ratio render/spandrel: time {ours['upscale_s'] / theirs['upscale_s']:.2f}x, "
              f"peak RSS {ours['maxrss_mb'] / theirs['maxrss_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
