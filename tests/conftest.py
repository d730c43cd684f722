"""Shared fixtures: the tiny model kit is built once per test session."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the hash cache of every test session out of the user's ~/.cache."""
    os.environ["RENDER_CACHE_DIR"] = str(tmp_path_factory.mktemp("render-cache"))


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model kit (ComfyUI layout), built once per session."""
    from render.testing import ensure_models

    return ensure_models(tmp_path_factory.mktemp("kit"))


@pytest.fixture
def write_job(tmp_path: Path):
    """Write a job file (dedented YAML) into tmp_path and return its path."""

    def write(text: str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def one_thread() -> None:
    import torch

    torch.set_num_threads(1)
