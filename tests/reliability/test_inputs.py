"""Issue 12, inputs: every input is bounded before the task-count guard, and malformed input or
a mistake that used to fail at render time is one located line at validation.

The resource cases run the real CLI in a child process limited to 1 GiB of address space and
30 s of CPU: code that expands an alias bomb, builds a seed list or sums 20,000 binomials of
20,000 runs out of one or the other (a traceback, or a kill) instead of answering, so "fast"
holds by construction, not by a stopwatch. The other cases run the CLI in-process. No case
needs a model: each is refused before preflight looks for one.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from render.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAD = ("version: 1\nmodel_dirs: [models]\noutput: {dir: \"out/{job}\"}\n"
        "defaults: {model: tiny, size: 64x64, steps: 20}\n")
LINE = re.compile(r"^error: (?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<rest>.+)$")


def job(body: str) -> str:
    return HEAD + "jobs:\n" + body


def bomb(levels: int = 9, width: int = 9, *, key: str = "x") -> str:
    """The billion laughs: ``width ** levels`` strings from a few hundred bytes of YAML."""
    lines = [f"{key}0: &{key}0 [{', '.join(['lol'] * width)}]"]
    for k in range(1, levels):
        lines.append(f"{key}{k}: &{key}{k} [{', '.join([f'*{key}{k - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
    resource.setrlimit(resource.RLIMIT_CPU, (30, 30))


def refused_bounded(path: Path, *args: str) -> str:
    """The one error line of ``render.py path --dry-run`` run in 1 GiB and 30 s of CPU."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "render.py"), str(path), "--dry-run", "-q", *args],
        capture_output=True, text=True, cwd=path.parent, preexec_fn=_limits, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert not (path.parent / "out").exists()
    return lines[0]


def refused(paths: Path | list[Path], capsys: pytest.CaptureFixture[str],
            *args: str) -> list[str]:
    """The error lines of a run of ``paths`` (in-process): exit 2, nothing written."""
    paths = [paths] if isinstance(paths, Path) else paths
    folder = paths[0].parent
    before = sorted(p.name for p in folder.iterdir())
    code = main([*map(str, paths), "-q", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 2, err
    assert sorted(p.name for p in folder.iterdir()) == before, "something was written"
    return err.splitlines()


def located(line: str, path: Path, line_no: int, key: str = "") -> str:
    """Assert ``line`` is ``error: path:line:col: key: ...``; return the message after it."""
    match = LINE.match(line)
    assert match, line
    assert match["file"] == str(path), line
    assert int(match["line"]) == line_no, line
    rest = match["rest"]
    if key:
        assert rest.startswith(key + ": "), line
        rest = rest[len(key) + 2:]
    return rest


# -- 1, 2: alias bombs ---------------------------------------------------------------------------

def test_alias_bomb_in_a_job_file_is_refused_at_its_line(tmp_path: Path) -> None:
    """Issue 12: a 559-byte YAML alias bomb in a job file is refused at the alias that grows
    too large, before anything is built (it used to be expanded by json.dumps)."""
    path = tmp_path / "job.yaml"
    path.write_text(bomb() + job("  - name: a\n    prompt: x\n    grid: {cfg: *x8}\n"))
    assert path.stat().st_size < 1024
    line = refused_bounded(path)
    # 9**6 > 100,000: the sixth level is the first too large
    message = located(line, path, 6, "x5")
    assert "more than 100,000 values" in message and "aliases" in message


def test_alias_bomb_in_a_wildcard_file_is_refused(tmp_path: Path) -> None:
    """Issue 12: a 700-byte alias bomb of mappings in a YAML wildcard file (each level a
    mapping of the one below: 9**8 wildcard names) is refused, naming the file and line."""
    (tmp_path / "wildcards").mkdir()
    levels = ["m0: &m0 {" + ", ".join(f"k{i}: [lol]" for i in range(9)) + "}"]
    for k in range(1, 8):
        levels.append(f"m{k}: &m{k} {{" + ", ".join(f"k{i}: *m{k - 1}" for i in range(9)) + "}")
    (tmp_path / "wildcards" / "bomb.yaml").write_text("\n".join(levels) + "\n")
    assert (tmp_path / "wildcards" / "bomb.yaml").stat().st_size < 800
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: a __m7/k0/k0/k0/k0/k0/k0/k0/k0__ cat\n"))
    message = located(refused_bounded(path), path, 7, "jobs[0].prompt")
    assert f"{tmp_path / 'wildcards' / 'bomb.yaml'}:6:" in message
    assert "more than 1,000,000 values" in message


def test_wildcard_of_wildcards_cannot_grow_a_prompt_to_gigabytes(tmp_path: Path) -> None:
    """Issue 12: wildcards whose every value doubles the next (2**30 copies of one word) are
    refused by the prompt length limit at validation, before one expansion is built."""
    folder = tmp_path / "wildcards"
    folder.mkdir()
    for k in range(30):
        (folder / f"w{k}.txt").write_text(f"__w{k + 1}__ __w{k + 1}__\n")
    (folder / "w30.txt").write_text("word\n")
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: __w0__\n"))
    message = located(refused_bounded(path), path, 7, "jobs[0].prompt")
    assert "5,368,709,119 characters" in message and "65,536" in message


# -- 3: seeds --------------------------------------------------------------------------------

def test_a_seed_range_is_counted_not_built(tmp_path: Path) -> None:
    """Issue 12: ``seeds: "0-99999999"`` is refused by --max-tasks at once (it built a
    100-million-item list first: 20 s and 3.9 GB); 2**64 seeds too, without a traceback."""
    path = tmp_path / "job.yaml"
    path.write_text(job('  - name: a\n    prompt: x\n    seeds: "0-99999999"\n'))
    line = refused_bounded(path)
    assert "100,000,000 tasks" in line and "--max-tasks 100000000" in line
    path.write_text(job('  - name: a\n    prompt: x\n    seeds: "0-18446744073709551615"\n'))
    line = refused_bounded(path)
    assert "more than 18,446,744,073,709,551,615 tasks" in line


@pytest.mark.parametrize(("seeds", "fragment"), [
    ('seeds: "0-18446744073709551616"', "exceeds the largest seed (18446744073709551615)"),
    ('seeds: "5-' + "9" * 5000 + '"', "exceeds the largest seed"),
    ("seeds: 18446744073709551615\n    seed: 2", "overflow the largest seed"),
])
def test_seeds_past_the_largest_are_one_line(tmp_path: Path, seeds: str, fragment: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: a seed range or count past 2**64 - 1 is one located line at ``seeds``."""
    path = tmp_path / "job.yaml"
    path.write_text(job(f"  - name: a\n    prompt: x\n    {seeds}\n"))
    (line,) = refused(path, capsys, "--dry-run")
    assert fragment in located(line, path, 8, "jobs[0].seeds")


def test_an_integer_too_long_to_print_is_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: a 5,000-digit seed (Python cannot even print it) is one located line."""
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: x\n    seed: " + "7" * 5000 + "\n"))
    (line,) = refused(path, capsys, "--dry-run")
    assert "number too long" in located(line, path, 8, "jobs[0].seed")


# -- 4: subsets of a large wildcard ----------------------------------------------------------

def test_subsets_of_a_large_wildcard_are_counted_at_once(tmp_path: Path) -> None:
    """Issue 12: ``{1-8000$$__big__}`` over a 20,000-line wildcard is refused by the guard at
    once; it summed 8,000 binomials of 20,000 and could not print the result. (Picking more
    would make prompts over the length limit, refused before the guard.)"""
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "big.txt").write_text("".join(f"v{i}\n" for i in range(20_000)))
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: '{1-8000$$ $$__big__}'\n"
                        "    wildcards: combinatorial\n"))
    line = refused_bounded(path)
    assert "more than 18,446,744,073,709,551,615 tasks" in line, line


# -- 5: sizes ----------------------------------------------------------------------------------

def test_a_prompt_longer_than_64_kib_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: a prompt over 65,536 characters (written, or drawn from a wildcard) is one
    line at ``prompt``; it was accepted whole."""
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: " + "word " * 20_000 + "\n"))
    (line,) = refused(path, capsys, "--dry-run")
    assert "99,999 characters, more than the 65,536" in located(line, path, 7, "jobs[0].prompt")
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "long.txt").write_text("short\n" + "x" * 70_000 + "\n")
    path.write_text(job("  - name: a\n    negative: __long__\n    prompt: x\n"))
    (line,) = refused(path, capsys, "--dry-run")
    assert "70,000 characters" in located(line, path, 7, "jobs[0].negative")


def test_a_job_file_over_4_mib_is_refused_unread(tmp_path: Path) -> None:
    """Issue 12: a 50 MB job file is refused by its size before it is parsed."""
    path = tmp_path / "job.yaml"
    with path.open("w") as handle:
        handle.write(job("  - name: a\n    prompt: '"))
        for _ in range(50):
            handle.write("x" * 2**20)
        handle.write("'\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "render.py"), str(path), "--dry-run"], capture_output=True,
        text=True, preexec_fn=_limits, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {path}: job file larger than 4 MiB; split it"]


# -- 6: malformed YAML -----------------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("control-character", b"version: 1\njobs:\n  - name: a\x07b\n", 3,
     "characters are not allowed (character #x07)"),
    ("nul-byte", b"version: 1\n\x00\n", 2, "characters are not allowed (character #x00)"),
    ("lists-500-deep", b"version: 1\njobs: " + b"[" * 500 + b"]" * 500 + b"\n", 2,
     "lists and mappings nested more than 64 deep"),
    ("mappings-300-deep", b"version: 1\njobs:\n" + b"".join(
        b" " * (i + 1) + b"a:\n" for i in range(300)), 65,
     "lists and mappings nested more than 64 deep"),
    ("tab-indent", b"version: 1\njobs:\n\t- name: a\n", 3,
     "invalid YAML: a tab character; YAML indents with spaces"),
    ("not-utf8", b"version: 1\njobs:\n  - name: caf\xe9\n", 3, "not UTF-8 text (byte 0xe9)"),
    ("empty", b"", 1, "expected a mapping at the top level"),
    ("top-level-list", b"- version: 1\n", 1, "expected a mapping at the top level"),
    ("top-level-scalar", b"hello\n", 1, "expected a mapping at the top level"),
    ("alias-cycle", b"version: 1\njobs: &j [*j]\n", 2,
     "invalid YAML: an alias refers to a value that contains it"),
    ("two-documents", b"version: 1\n---\njobs: []\n", 2, "invalid YAML: but found another"),
    ("unclosed-list", b"version: 1\njobs: [\n", 3, "invalid YAML: "),
]


@pytest.mark.parametrize(("text", "line_no", "fragment"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_yaml_is_one_located_line(tmp_path: Path, text: bytes, line_no: int,
                                            fragment: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: control characters, nesting hundreds deep, tabs, a non-UTF-8 file, an
    empty file, a list or scalar at the top: one line with file:line each (some were
    tracebacks: ReaderError, RecursionError; some had no line)."""
    path = tmp_path / "job.yaml"
    path.write_bytes(text)
    for args in ((), ("--dry-run",)):
        (line,) = refused(path, capsys, *args)
        assert fragment in located(line, path, line_no), line


# -- 7: output-name format specs -------------------------------------------------------------

@pytest.mark.parametrize(("name", "body", "fragment"), [
    ("{prompt:05d}", "", "{prompt:05d} does not fit prompt, which is text"),
    ("{seed:.40}", "", "{seed:.40} does not fit seed, which is an integer"),
    ("{seed:c}", "", "{seed:c} does not fit seed"),
    ("{cfg:d}", "    grid: {cfg: [7, 7.5]}\n", "{cfg:d} does not fit cfg, which is a number"),
    ("{size:05d}", "    grid: {size: [64x64, 64x128]}\n", "{size:05d} does not fit size"),
])
def test_output_name_spec_must_fit_its_field(tmp_path: Path, name: str, body: str,
                                             fragment: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: an output-name format spec that does not fit its field's values is one line
    at ``output.name`` at validation (it failed every task at write time)."""
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + f'jobs:\n  - name: a\n    prompt: x\n    output: {{name: "{name}"}}\n'
                    + body)
    (line,) = refused(path, capsys, "--dry-run")
    assert fragment in located(line, path, 8, "jobs[0].output.name")


def test_fitting_specs_still_pass_validation(tmp_path: Path) -> None:
    """Issue 12: the spec check refuses only misfits: ``{cfg:.1f}``, ``{prompt:.40}``,
    ``{index:05}``, ``{cfg:d}`` over integer cfgs and an axis's own values load fine."""
    from render.expand import load_job_file
    from render.plugins import load_plugins

    path = tmp_path / "job.yaml"
    path.write_text(HEAD + 'jobs:\n  - name: a\n    prompt: x\n    output: {name: '
                    '"{index:05}-{prompt:.40}-{cfg:03d}-{steps:>4}-{seed:x}-{size:>9}"}\n'
                    "    grid: {cfg: [5, 7], size: [64x64, 64x128]}\n")
    assert load_job_file(path, load_plugins(builtins=False)).task_count == 4


# -- 8: image keys -----------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "line_no", "key", "fragment"), [
    ("    mask: in.png\n", 8, "jobs[0].mask", "a mask needs an image to inpaint"),
    ("    image: in.png\n    strength: 0.04\n", 9, "jobs[0].strength",
     "strength 0.04 with steps 20 runs no denoising step"),
    ("    image: in.png\n    steps: 1\n", 9, "jobs[0].steps",
     "strength 0.75 (the default) with steps 1 runs no denoising step"),
    ("    image: in.png\n    grid: {strength: [0.5, 0.01]}\n", 9, "jobs[0].grid.strength",
     "strength 0.01 with steps 20"),
    ("    image: in.png\n    strength: 0.2\n    grid: {steps: [20, 4]}\n", 10,
     "jobs[0].grid.steps", "strength 0.2 with steps 4"),
    ("    image: in.png\n    zip: {strength: [0.5, 0.3], steps: [4, 2]}\n", 9,
     "jobs[0].zip.strength", "strength 0.3 with steps 2"),
])
def test_image_settings_that_cannot_render_are_refused(tmp_path: Path, body: str,
                                                       line_no: int, key: str, fragment: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Issue 12: ``mask:`` without ``image:``, and a strength so low that img2img runs
    int(steps x strength) = 0 denoising steps (also from a grid or zip axis), are one line at
    validation; they loaded a model and failed each task."""
    (tmp_path / "in.png").write_bytes(b"\x89PNG")   # validation checks the file exists
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: x\n" + body))
    (line,) = refused(path, capsys, "--dry-run")
    assert fragment in located(line, path, line_no, key), line


def test_a_zip_row_that_never_occurs_is_not_refused(tmp_path: Path) -> None:
    """Issue 12: zip axes pair row by row: strength 0.3 only meets steps 4 (1 step runs)."""
    from render.expand import load_job_file
    from render.plugins import load_plugins

    (tmp_path / "in.png").write_bytes(b"\x89PNG")
    path = tmp_path / "job.yaml"
    path.write_text(job("  - name: a\n    prompt: x\n    image: in.png\n"
                        "    zip: {strength: [0.6, 0.3], steps: [2, 4]}\n"))
    assert load_job_file(path, load_plugins(builtins=False)).task_count == 2


# -- 9, 10: names and prompt_sr --------------------------------------------------------------

@pytest.mark.parametrize("name", ["render.db", "RENDER.DB", "render.db-wal", "render.lock",
                                  "Index.HTML", ".thumbs", "..", ".hidden"])
def test_job_names_the_output_root_keeps_are_refused(tmp_path: Path, name: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: a job named like a file the output root holds (render.db, render.lock,
    index.html, .thumbs), in any case, is one line at its name."""
    path = tmp_path / "job.yaml"
    path.write_text(job(f'  - name: "{name}"\n    prompt: x\n'))
    (line,) = refused(path, capsys, "--dry-run")
    assert f"job name {name!r}" in located(line, path, 6, "jobs[0].name")


def test_prompt_sr_with_an_empty_first_value_is_refused(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """Issue 12: ``prompt_sr: ["", dog]`` searched for "" and put "dog" between every two
    characters of the prompt; it is one line at the axis."""
    path = tmp_path / "job.yaml"
    path.write_text(job('  - name: a\n    prompt: a cat\n    grid: {prompt_sr: ["", dog]}\n'))
    (line,) = refused(path, capsys, "--dry-run")
    assert "may not be empty" in located(line, path, 8, "jobs[0].grid.prompt_sr")


# -- 11: the same job name in two files ------------------------------------------------------

def test_one_job_name_in_two_files_is_one_line_naming_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: two job files each holding a job ``a`` crashed the run (``unique_paths``)
    and merged in the dry-run table; now one line names both places. ``--only`` picking
    jobs that do not clash, or one file given twice, is no clash."""
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    first.write_text(job("  - name: a\n    prompt: x\n"))
    second.write_text(job("  - name: b\n    prompt: y\n  - name: a\n    prompt: z\n"))
    for args in ((), ("--dry-run",)):
        (line,) = refused([first, second], capsys, *args)
        message = located(line, second, 8, "jobs[1].name")
        assert f"job 'a' is also defined at {first}:6:11" in message
    lines = refused([first, second], capsys, "--dry-run", "--only", "b")
    assert not any("also defined" in line for line in lines)     # (the model is missing)
    lines = refused([first, tmp_path / "." / "one.yaml"], capsys, "--dry-run")
    assert not any("also defined" in line for line in lines)


# -- 15: output.grid chooses the axes --------------------------------------------------------

@pytest.mark.parametrize(("output", "body", "line_no", "key", "message"), [
    ("{dir: out, grid: {x: cgf}}", "    grid: {cfg: [5, 7]}\n", 9, "jobs[0].output.grid.x",
     "'cgf' is not an axis of this job (axes: cfg, seed, prompt) (did you mean 'cfg'?)"),
    ("{dir: out, grid: {x: cfg, y: cfg}}", "    grid: {cfg: [5, 7]}\n", 9,
     "jobs[0].output.grid.y", "'cfg' is already x"),
    ("{dir: out, grid: {x: cfg, max_pixels: 100}}", "    grid: {cfg: [5, 7]}\n", 9,
     "jobs[0].output.grid.max_pixels", "expected a number of pixels >= 4096, got 100"),
    ("{dir: out, grid: {x: cfg, w: seed}}", "    grid: {cfg: [5, 7]}\n", 9,
     "jobs[0].output.grid.w", "unknown key"),
    ("{dir: out, grid: {x: [cfg]}}", "    grid: {cfg: [5, 7]}\n", 9,
     "jobs[0].output.grid.x", "expected an axis name"),
])
def test_a_bad_output_grid_is_one_line_at_its_key(tmp_path: Path, capsys, output: str,
                                                  body: str, line_no: int, key: str,
                                                  message: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(job(f"  - name: a\n    prompt: a cat\n{body}    output: {output}\n"))
    (line,) = refused(path, capsys, "--dry-run")
    assert message in located(line, path, line_no, key)


def test_the_files_output_grid_serves_jobs_without_that_axis(tmp_path: Path, capsys) -> None:
    """A top-level ``output.grid: {x: cfg}`` is for every job: one without a cfg axis is no
    error, but a name that is no task key at all is one line, once (not once per job)."""
    path = tmp_path / "job.yaml"
    head = HEAD.replace('output: {dir: "out/{job}"}', 'output: {dir: "out/{job}", grid: {x: cfg}}')
    jobs = ("jobs:\n  - name: a\n    prompt: a cat\n    grid: {cfg: [5, 7]}\n"
            "  - name: b\n    prompt: a dog\n    grid: {steps: [20, 30]}\n")
    path.write_text(head + jobs)
    (line,) = refused(path, capsys, "--dry-run")     # only the (absent) model of the test
    assert "defaults.model" in line and "output.grid" not in line
    path.write_text(head.replace("x: cfg", "x: cgf") + jobs)
    (line,) = refused(path, capsys, "--dry-run")        # once, though two jobs share it
    assert "'cgf' is not a task key (did you mean 'cfg'?)" in located(line, path, 3,
                                                                      "output.grid.x")
