"""Fixtures shared by the built-in plugins' tests: the plugins, a job writer, an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from render.plugins import load_plugins

#: A job file on the tiny kit; tests append entries under ``jobs:``.
JOB = """\
version: 1
model_dirs: [{dirs}]
output: {{dir: "out/{{job}}"}}
defaults: {{model: tiny-sd15, size: 64x64, steps: 3, cfg: 5, sampler: Euler, seed: 1,
           prompt: "a house"}}
jobs:
"""


@pytest.fixture(scope="module")
def plugins() -> Any:
    """Every built-in plugin, loaded by file path exactly like a user's plugin."""
    loaded = load_plugins()
    assert not loaded.failures, loaded.failures
    return loaded


@pytest.fixture
def job(kit: Path, write_job: Any) -> Any:
    """Write a job file on the kit from the entries under ``jobs:``; extra model dirs first."""

    def make(entries: str, *, dirs: tuple[Path, ...] = ()) -> Path:
        all_dirs = ", ".join(str(d) for d in (*dirs, kit))
        return write_job(JOB.format(dirs=all_dirs) + entries)

    return make


@pytest.fixture(scope="module")
def engine(plugins: Any) -> Any:
    """One CPU fp32 engine per test module (two resident models: SD1.5 and SDXL)."""
    import torch

    from render.engine import Engine

    torch.set_num_threads(1)
    eng = Engine(plugins.pm, device="cpu", dtype="float32", max_resident=2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def house(tmp_path_factory: Any) -> Any:
    """The kit's house picture cropped to 64x48 RGB: not square, so a swapped width and
    height would show."""
    from PIL import Image

    from render.testing import write_reference_images

    refs = write_reference_images(tmp_path_factory.mktemp("refs"))
    with Image.open(refs["house.png"]) as im:
        return im.convert("RGB").crop((0, 8, 64, 56))
