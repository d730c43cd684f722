"""Diffusers config folders for loading A1111/civitai single-file checkpoints offline.

``from_single_file`` needs a diffusers folder of component configs; without one it asks the
hub, which the render machines cannot reach. These are the configs of the public base models:

- ``sd15``: SD 1.x (CLIP ViT-L text encoder, 768 context);
- ``sd2``: SD 2.x 768-v (OpenCLIP ViT-H, 23 layers as diffusers keeps them, v-prediction);
- ``sd2-base``: SD 2.x 512-base (the same shapes, epsilon);
- ``sdxl``: SDXL base 1.0 (CLIP ViT-L + OpenCLIP bigG, 2048 context).

Parameter counts were checked against the released models (UNet 859,520,964 / 865,910,724 /
2,567,463,684). The tokenizer's ``vocab.json``/``merges.txt`` (1.5 MB each folder) are not
shipped: :func:`shipped_config_dir` writes them at first use into a copy under the cache
folder, from the CLIP BPE table that open_clip_torch ships; the ids equal SD's tokenizer's.
No torch import here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("sd15", "sd2", "sd2-base", "sdxl")


def source_dir(name: str) -> Path:
    """The shipped (tokenizer-less) folder of config ``name``."""
    if name not in NAMES:
        raise ValueError(f"unknown shipped config {name!r}; one of {', '.join(NAMES)}")
    return HERE / name


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.rglob("*.json")):
        h.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes())
    return h.hexdigest()[:12]


def shipped_config_dir(name: str, cache: Path | None = None) -> Path:
    """A complete, loadable copy of config ``name`` (tokenizer files included).

    Built once per content version under ``<cache>/configs/``; safe when two processes race
    (each builds in a temp folder, the first rename wins).
    """
    from render.hashing import cache_dir

    src = source_dir(name)
    dest = (cache or cache_dir()) / "configs" / f"{name}-{_digest(src)}"
    if (dest / "model_index.json").is_file():
        return dest
    from render.clip_vocab import write_vocab_files

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.py*"))
        for tok in sorted(tmp.glob("tokenizer*")):
            write_vocab_files(tok)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
