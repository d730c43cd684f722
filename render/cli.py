"""Command line: parse arguments, run the stages, turn user mistakes into one-line errors.

``--help``, validation and ``--dry-run`` never import torch; only rendering does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from render import __version__
from render.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, JobErrors, UserError
from render.executors import EXECUTORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="render.py",
        description="Render Stable Diffusion job files (YAML) into images with metadata.",
        epilog="Example: python render.py jobs/demo.yaml --dry-run",
    )
    parser.add_argument("jobs", nargs="*", metavar="JOB.yaml", help="job files to render")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, expand and list the tasks; render nothing")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: one JSON object per task per line")
    parser.add_argument("--only", action="append", default=[], metavar="JOB",
                        help="only jobs whose name matches this glob (repeatable)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="at most N tasks in total (after --only)")
    parser.add_argument("--max-tasks", type=int, default=10000, metavar="N",
                        help="refuse job files that expand to more tasks (default 10000)")
    parser.add_argument("--plugins-dir", action="append", default=[], metavar="DIR",
                        help="also load every *.py file and package folder in DIR as a plugin "
                             "(repeatable)")
    parser.add_argument("--list-plugins", action="store_true",
                        help="show plugins, their job keys, model kinds and hooks, then exit")
    parser.add_argument("--force", action="store_true",
                        help="re-render tasks the ledger already holds")
    parser.add_argument("--batch-size", type=int, default=0, metavar="N",
                        help="images per pipeline call; 0 = chosen from free memory")
    parser.add_argument("--device", default=None,
                        help="torch device (cuda, cuda:1, mps, cpu); default: best available")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights dtype; default bf16/fp16 on GPUs, fp32 on CPU")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where batches render: in this process (default), or on Ray "
                             "workers, one per GPU of this box or of a Ray cluster "
                             "(pip install 'render[ray]')")
    parser.add_argument("--address", metavar="ADDR",
                        help="with --executor ray: the Ray cluster to join (auto, "
                             "ray://head:10001); default: start one on this machine")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="with --executor ray: render workers (default: one per GPU of "
                             "the cluster; 1 on a CPU-only one)")
    parser.add_argument("--replay", metavar="IMAGE",
                        help="re-render IMAGE from its embedded provenance")
    parser.add_argument("--show", metavar="IMAGE", help="print IMAGE's generation settings")
    parser.add_argument("--out", metavar="DIR", help="with --replay: folder for the new image")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="with --replay: load the pickle files (.ckpt, .pt, .bin) the "
                             "image's task used; an image itself never grants this")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"render {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
    )
    from render import run
    from render.plan import check_device_name

    try:
        check_device_name(args.device)
        if args.allow_pickle and not args.replay:
            raise UserError("--allow-pickle only applies to --replay; a job file allows a "
                            "pickle per model, in models: with allow_pickle: true")
        if args.list_plugins:
            return run.list_plugins(args)
        if args.show:
            return run.show(args.show)
        if args.replay:
            return run.replay(args)
        if not args.jobs:
            parser.error("give at least one job file (or --list-plugins, --show, --replay)")
        if args.json and not args.dry_run:
            parser.error("--json needs --dry-run")
        if args.limit is not None and args.limit < 0:
            parser.error("--limit must be >= 0")
        if args.executor != "ray" and (args.address or args.workers is not None):
            parser.error("--address and --workers need --executor ray")
        if args.workers is not None and args.workers < 1:
            parser.error("--workers must be >= 1")
        return run.run(args)
    except JobErrors as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:   # a second Ctrl-C: the first one asked for a clean stop
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
