"""The project as a fresh clone meets it: README commands, CI, the example job files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from render.expand import load_job_file
from render.plugins import load_plugins
from render.run import resolve_tasks

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_begins_with_the_two_setup_commands():
    demo, tests = readme_commands()
    assert "render.py jobs/demo.yaml" in demo and "render.testing models" in demo
    assert "pytest" in tests
    # both install the pinned, hashed lock, then the project without re-resolving anything
    assert "pip install -q -r requirements.txt " in demo
    assert "pip install -q -r requirements-dev.txt " in tests
    for command in (demo, tests):
        assert "install -q --no-deps --no-build-isolation -e ." in command


def locked(name: str) -> dict[str, tuple[str, str]]:
    """``{package: (version, marker)}`` of a lock file (uv's requirements format)."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)(?: ; ([^\\]+))?", line)
        if match:
            pins.setdefault(match[1].lower(), []).append((match[2], (match[3] or "").strip()))
    return pins


def test_the_lock_pins_every_dependency_within_pyproject_ranges():
    """Fails when pyproject.toml changes without `bash .ci/lock`."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime, dev = locked("requirements.txt"), locked("requirements-dev.txt")
    ray = locked("requirements-ray.txt")
    extras = project["project"]["optional-dependencies"]
    wanted = [(project["project"]["dependencies"], (runtime, dev, ray)),
              (extras["dev"], (dev,)),
              (extras["ray"], (dev, ray)),   # the test command installs the Ray executor
              (project["build-system"]["requires"], (runtime, dev, ray))]
    for requirements, locks in wanted:
        for text in requirements:
            req = Requirement(text)
            for lock in locks:
                pins = lock.get(canonicalize_name(req.name))
                assert pins, f"{req.name} is not in the lock"
                for version, _marker in pins:
                    assert req.specifier.contains(version, prereleases=True), (req, version)
    # the dev lock is the runtime lock plus the test tools, never other versions
    # (a test tool may need a package on more platforms: its dev pin then has no marker)
    for name, pins in runtime.items():
        for lock in (dev, ray):
            assert [v for v, _ in lock[name]] == [v for v, _ in pins], name
            assert all(d in (m, "") for (_, d), (_, m) in zip(lock[name], pins, strict=True)), name
    for name, pins in ray.items():   # Ray's own dependencies: the same versions in both
        assert [v for v, _ in dev[name]] == [v for v, _ in pins], name
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-ray.txt"):
        entries = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / name).read_text())
        pinned = [e for e in entries if "==" in e.split("\n", 1)[0]]
        assert len(pinned) == sum(len(v) for v in locked(name).values())
        assert all("--hash=sha256:" in e for e in pinned), name


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_demo_job_expands_and_preflights_on_the_kit(kit, tmp_path):
    text = (ROOT / "jobs" / "demo.yaml").read_text().replace("../demo-models", str(kit))
    shutil.copytree(ROOT / "jobs" / "wildcards", tmp_path / "wildcards")
    refs = tmp_path / "refs"
    from render.testing import write_reference_images

    write_reference_images(refs)
    text = text.replace(f"{kit}/refs", str(refs))
    job = tmp_path / "demo.yaml"
    job.write_text(text)
    plugins = load_plugins()
    tasks = resolve_tasks(load_job_file(job, plugins).jobs, plugins)
    assert {t.job for t in tasks} == {"cabins", "lora-weights", "controlnet-house",
                                      "hires-lighthouse", "upscaled-boat", "depth-room",
                                      "xl-fox", "lantern-animation"}
    assert len(tasks) == 33


def test_catalog_is_a_valid_job_file():
    """Validation passes; only rendering would need the real models."""
    jf = load_job_file(ROOT / "jobs" / "catalog.yaml", load_plugins())
    assert [plan.job.name for plan in jf.jobs] == [
        "cabins", "portraits", "detail-sweep", "house-canny", "repaint", "xl-foxes", "animals",
        "lantern-clip", "pendulum-restyle"]
    assert jf.task_count == 48 + 8 + 4 + 3 + 3 + 8 + 4 + 1 + 1
