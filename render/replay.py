"""``--replay IMAGE``: re-render an image from the provenance embedded in it, alone.

The provenance holds the resolved task (every setting, every plugin section, the path and
full sha256 of every file used). Replay checks each file is still there with the same
hash, so a re-render can only differ from the original for reasons of hardware or versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render.errors import EXIT_FAILED, EXIT_OK, UserError
from render.tasks import Batch, Task, task_from_json


def read_image_metadata(image: str) -> tuple[str | None, dict[str, Any] | None]:
    """(infotext, provenance) of ``image``; an unreadable file is a one-line user error."""
    from render import metadata

    try:
        return metadata.read_metadata(image)
    except FileNotFoundError:
        raise UserError(f"{image}: no such file") from None
    except OSError as exc:
        raise UserError(f"{image}: cannot read image: {exc}") from None


def load_task(image: str) -> tuple[Task, dict[str, Any]]:
    """The task and provenance embedded in ``image``; a clear error when there is none."""
    _, prov = read_image_metadata(image)
    if not prov or "task" not in prov:
        raise UserError(f"{image}: no render provenance in this image (only images written "
                        "by render can be replayed)")
    return task_from_json(prov["task"], list(prov.get("sections", []))), prov


def verify_files(task: Task, image: str) -> None:
    """Every file the task used must still exist with the recorded sha256."""
    from render.hashing import file_sha256

    for label, ref in sorted(task.files.items()):
        if ref.hub:
            continue
        if not Path(ref.path).exists():
            raise UserError(f"{image}: {label} file {ref.path} is gone")
        if ref.sha256 and file_sha256(Path(ref.path)) != ref.sha256:
            raise UserError(f"{image}: {label} file {ref.path} changed since the image was "
                            "rendered (sha256 differs)")


def replay_image(args: Any) -> int:
    from render import __version__, metadata
    from render.engine import Engine
    from render.output import atomic_write
    from render.plugins import load_plugins

    image = args.replay
    task, prov = load_task(image)
    verify_files(task, image)
    plugins = load_plugins(args.plugins_dir)
    engine = Engine(plugins.pm, device=args.device, dtype=args.dtype)
    (result,) = engine.render(Batch(("replay",), (task,)))
    result = plugins.chain("postprocess", "result", result, task=task)
    out_dir = Path(args.out) if args.out else Path(image).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{Path(image).stem}-replay.png"
    described = engine.describe()
    new_prov = metadata.provenance(
        task, versions={"render": __version__, **described.get("versions", {})},
        device=described.get("device", ""), timings=result.timings,
        infotext=prov.get("infotext", ""))
    new_prov["replay_of"] = str(image)
    atomic_write(target, lambda p: metadata.save_image(result.images[0], p, "png", new_prov))
    verdict, within = compare(image, result.images[0])
    print(f"replayed {image} -> {target}: {verdict}")
    return EXIT_OK if within else EXIT_FAILED


#: What "the same image" means: the same task in another batch, or alone, may differ by float
#: noise of the batch size (at most 1/255 in a few pixels on the CPU).
TOLERANCE = 1


def compare(original: str, replayed: Any) -> tuple[str, bool]:
    """How the replay's pixels compare with the original's, and whether they are within
    :data:`TOLERANCE`; a lossy original (jpg, webp) cannot be compared pixel for pixel."""
    import numpy as np
    from PIL import Image

    with Image.open(original) as im:
        if im.format != "PNG":
            return f"not compared: the original is {im.format}, a lossy format", True
        before = np.asarray(im.convert("RGB"), dtype=np.int16)
    after = np.asarray(replayed.convert("RGB"), dtype=np.int16)
    if before.shape != after.shape:
        return f"a different size ({after.shape[1]}x{after.shape[0]})", False
    worst = int(np.abs(before - after).max())
    if worst == 0:
        return "identical pixels", True
    if worst <= TOLERANCE:
        return (f"max difference {worst}/255, within the {TOLERANCE}/255 tolerance (float "
                "noise of the batch size)"), True
    return (f"max difference {worst}/255, beyond the {TOLERANCE}/255 tolerance: other "
            "hardware or library versions than the provenance records?"), False
