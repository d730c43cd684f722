"""The command line as a user meets it: help, dry runs, errors, the explosion guard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_TORCH = (
    "import sys\n"
    "from render.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
    "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    "sys.exit(code)\n"
)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process that fails if torch gets imported."""
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True,
                          text=True, cwd=cwd, env=_env())


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def demo_job(tmp_path: Path, kit: Path, body: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"version: 1\nmodel_dirs: [{kit}]\noutput: {{dir: \"out/{{job}}\"}}\n"
                    "defaults: {model: tiny-sd15, size: 64x64, steps: 2}\n" + body)
    return path


def test_help_imports_no_torch():
    result = subprocess.run([sys.executable, "-c", NO_TORCH.replace(
        "code = main(sys.argv[1:])", "code = 0\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass")], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout and "--max-tasks" in result.stdout


def test_dry_run_table_and_json_import_no_torch(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: g\n    prompt: a {cat|dog}\n"
                   "    wildcards: combinatorial\n    seeds: [1, 2]\n"
                   "    grid: {cfg: [5, 9]}\n")
    table = run_cli(str(job), "--dry-run")
    assert table.returncode == 0, table.stderr
    assert "g " in table.stdout and " 8 " in table.stdout and "cfg(2)" in table.stdout
    assert "checkpoint:tiny-sd15" in table.stdout
    lines = run_cli(str(job), "--dry-run", "--json")
    assert lines.returncode == 0, lines.stderr
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(r["prompt"], r["cfg"], r["seed"]) for r in records] == [
        (p, c, s) for p in ("a cat", "a dog") for c in (5, 9) for s in (1, 2)]
    for key in ("id", "job", "index", "prompt", "negative", "seed", "steps", "cfg", "sampler",
                "width", "height", "model"):
        assert key in records[0]
    assert len({r["id"] for r in records}) == 8
    assert not (tmp_path / "out").exists(), "a dry run must write nothing"


def test_bad_input_one_line_per_error_no_traceback_nothing_written(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: x\n    prompt: hi\n    stepz: 3\n"
                   "    model: no-such-model\n")
    result = run_cli(str(job))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {job}:8:5: jobs[0].stepz: unknown key (did you mean 'steps'?)"]
    assert not (tmp_path / "out").exists()


def dry_run_error(job: Path) -> str:
    """The one error line a dry run of ``job`` prints (exit code 2, no traceback)."""
    result = run_cli(str(job), "--dry-run")
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    return line


def test_missing_model_is_a_preflight_error_listing_folders(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: x\n    prompt: hi\n"
                   "    model: no-such-model\n")
    line = dry_run_error(job)
    assert line.startswith(f"error: {job}:8:12: jobs[0].model: ")
    assert "no-such-model" in line and str(kit) in line


def test_explosion_guard_refuses_with_count_and_flag(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: big\n    prompt: x\n    seeds: 20001\n")
    result = run_cli(str(job), "--dry-run")
    assert result.returncode == 2
    assert "20,001 tasks" in result.stderr and "--max-tasks 20001" in result.stderr
    ok = run_cli(str(job), "--dry-run", "--max-tasks", "20001", "--limit", "3", "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 3


def test_only_selects_jobs_by_glob(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - {name: cats-1, prompt: a}\n"
                   "  - {name: dogs-1, prompt: b}\n")
    result = run_cli(str(job), "--dry-run", "--json", "--only", "dog*")
    assert [json.loads(x)["job"] for x in result.stdout.splitlines()] == ["dogs-1"]
    none = run_cli(str(job), "--dry-run", "--only", "fish*")
    assert none.returncode == 2 and "matches no job" in none.stderr


def test_hundred_thousand_task_dry_run_streams(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: big\n    prompt: x\n    seeds: 100000\n")
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, str(job), "--dry-run", "--json",
                             "--max-tasks", "100000"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=_env())
    assert proc.stdout is not None
    first = proc.stdout.readline()          # arrives before the run is over: it streams
    assert json.loads(first)["index"] == 0
    rest = sum(1 for _ in proc.stdout)
    assert proc.wait() == 0
    assert rest == 99999


def test_a_dry_run_tells_the_whole_truth_at_once(tmp_path, kit):
    """Every missing file of every job in one pass, each at the line where its name was
    written; the task table first, then the errors; exit 2; no torch."""
    from render.testing import write_reference_images

    write_reference_images(tmp_path / "refs")
    job = tmp_path / "job.yaml"
    job.write_text(
        "version: 1\nmodel_dirs: [nowhere, ~/also-nowhere-render]\n"
        "output: {dir: \"out/{job}\"}\n"
        "defaults: {model: no-model, size: 64x64, steps: 2}\n"
        "jobs:\n"
        "  - name: a\n"
        "    prompt: \"a house <lora:no-tag:0.5>\"\n"
        "    lora: {no-one: 0.5, no-two: 1}\n"
        "    vae: no-vae\n"
        "    controlnet: [{model: no-cn, image: refs/house.png}]\n"
        "  - name: b\n"
        "    prompt: a boat\n")
    result = run_cli(str(job), "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    table = result.stdout.splitlines()
    assert table[0].split() == ["job", "tasks", "done", "axes", "needs"]
    assert "MISSING for 1 task (errors below)" in table[1] and table[1].startswith("a ")
    errors = result.stderr.splitlines()
    located = [line.split(": ", 3)[1:3] for line in errors]
    assert located == [
        [f"{job}:4:19", "defaults.model"],
        [f"{job}:7:13", "jobs[0].prompt"],          # the inline tag, where it is written
        [f"{job}:8:20", "jobs[0].lora.no-one"],     # at the weight, as the key errors are
        [f"{job}:8:33", "jobs[0].lora.no-two"],     # every LoRA of the stack, not the first
        [f"{job}:9:10", "jobs[0].vae"],
        [f"{job}:10:26", "jobs[0].controlnet[0].model"],
    ]
    assert f"{tmp_path / 'nowhere'}, " in errors[0]       # the expanded folders it tried
    assert "also-nowhere-render: none of them exists" in errors[0]


def test_output_name_and_schedule_mistakes_are_located_at_their_own_keys(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: x\n    prompt: hi\n    schedule: Foo\n"
                   "    output: {name: \"{nope}\"}\n")
    result = run_cli(str(job), "--dry-run")
    assert result.returncode == 2
    assert [line.split(": ", 3)[2] for line in result.stderr.splitlines()] == [
        "jobs[0].schedule", "jobs[0].output.name"]
    assert "unknown schedule type 'Foo'; known schedule types:" in result.stderr


def test_prompt_syntax_is_a_located_validation_error(tmp_path, kit):
    job = demo_job(tmp_path, kit, "jobs:\n  - name: x\n    prompt: cats AND dogs\n")
    assert dry_run_error(job).startswith(f"error: {job}:7:13: jobs[0].prompt: 'AND' is "
                                         "A1111's prompt-composition keyword")
    edited = demo_job(tmp_path, kit, "jobs:\n  - name: x\n    prompt: 'a [cat:dog:0.5] [a|b]"
                      " [artist: foo]'\n    negative: '[(ugly:1.2.3)::2]'\n")
    assert dry_run_error(edited).startswith(f"error: {edited}:8:15: jobs[0].negative: "
                                            "attention weight '1.2.3'")
    fine = demo_job(tmp_path, kit, "jobs:\n  - name: x\n    prompt: a [cat:dog:0.5] [a|b]\n")
    assert run_cli(str(fine), "--dry-run").returncode == 0
