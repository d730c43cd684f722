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
                                      "depth-room", "xl-fox"}
    assert len(tasks) == 24


def test_catalog_is_a_valid_job_file():
    """Validation passes; only rendering would need the real models."""
    jf = load_job_file(ROOT / "jobs" / "catalog.yaml", load_plugins())
    assert [plan.job.name for plan in jf.jobs] == [
        "cabins", "portraits", "detail-sweep", "house-canny", "repaint", "xl-foxes", "animals"]
    assert jf.task_count == 48 + 8 + 4 + 3 + 3 + 8 + 4
