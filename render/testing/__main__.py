"""``python -m render.testing``: write the tiny model kit or the reference images."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build, print one line per written entry."""
    parser = argparse.ArgumentParser(
        prog="python -m render.testing",
        description="Tiny random-weight Stable Diffusion models for tests (offline, seconds).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="write the kit in ComfyUI models/ layout under DIR")
    models.add_argument("dir", type=Path, metavar="DIR")
    models.add_argument("--force", action="store_true", help="rebuild even if already built")
    models.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible timing)"
    )
    images = sub.add_parser("images", help="write the deterministic 64x64 reference PNGs to DIR")
    images.add_argument("dir", type=Path, metavar="DIR")
    images.add_argument("--size", type=int, default=64, help="edge length in pixels")
    args = parser.parse_args(argv)

    from . import build_models, write_reference_images

    if args.command == "images":
        for name, path in write_reference_images(args.dir, args.size).items():
            print(f"{name}\t{path}")
        return 0

    from . import _is_complete, kit_paths

    if _is_complete(args.dir) and not args.force:
        refs = write_reference_images(args.dir / "refs")
        for name, path in {**kit_paths(args.dir), **refs}.items():
            print(f"{name}\t{path}")
        print("already built (use --force to rebuild)", file=sys.stderr)
        return 0

    created = not args.dir.exists()
    start = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(max(1, args.threads))
        paths = build_models(args.dir, force=args.force)
        # The demo jobs read reference images from DIR/refs (house, gradient, mask, checker).
        refs = write_reference_images(args.dir / "refs")
    except Exception as exc:  # one line for the user; the folder is gone if we made it
        if created:
            shutil.rmtree(args.dir, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: building the tiny model kit in {args.dir} failed: "
              f"{type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    for name, path in {**paths, **refs}.items():
        print(f"{name}\t{path}")
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
