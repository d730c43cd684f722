"""What a user of the built wheel gets: the built-in plugins ship inside it and load from any
working directory, with no checkout around."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def builtin_plugin_files() -> set[str]:
    """Every Python file of the repository's ``plugins/`` folder, relative to it."""
    folder = ROOT / "plugins"
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts}


def builtin_plugin_names() -> set[str]:
    folder = ROOT / "plugins"
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return {n for n in names if not n.startswith("_")}


def source_copy(target: Path) -> Path:
    """The checkout's files (tracked, or new and not ignored) copied to ``target``, so a
    stale ``build/`` folder of the checkout cannot leak old files into the wheel."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target / rel)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from the checkout's files with the locked setuptools."""
    out = tmp_path_factory.mktemp("dist")
    source = source_copy(tmp_path_factory.mktemp("source"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = out.glob("render-*.whl")
    return built


def test_the_wheel_carries_every_builtin_plugin_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("render/builtin_plugins/") for n in names
               if n.startswith("render/builtin_plugins/") and n.endswith(".py")}
    assert shipped == builtin_plugin_files()
    assert "render/configs/sd15/unet/config.json" in names
    assert not any(n.startswith(("plugins/", "tests/", "jobs/")) for n in names)


def test_an_installed_wheel_lists_the_builtin_plugins_from_any_folder(wheel, tmp_path):
    """A venv holding only the wheel (dependencies borrowed from this one), run from /tmp."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = Path(subprocess.run(
        [str(env_dir / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip())
    # A .pth path line adds this venv's packages without running its .pth files, so the
    # editable checkout of render is not visible there: only the wheel's copy is.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
         "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    where = tmp_path / "elsewhere"
    where.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import render; print(render.__file__)"],
        cwd=where, env=env, check=True, capture_output=True, text=True)
    assert Path(probe.stdout.strip()).is_relative_to(site), probe.stdout
    listed = subprocess.run(
        [str(env_dir / "bin" / "render"), "--list-plugins"],
        cwd=where, env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()
            if line and not line.startswith(" ")}
    assert builtin_plugin_names() <= set(rows), listed.stdout
    for name in builtin_plugin_names():
        assert str(site / "render" / "builtin_plugins") in rows[name], rows[name]
    assert "FAILED" not in listed.stdout

