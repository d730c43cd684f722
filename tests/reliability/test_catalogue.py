"""Issue 12's catalogue of user mistakes: each is one line naming file, line and key, exit 2,
before any model loads, with nothing written.

One row per hostile input a new user (or a fuzzer) produced; the rows are the regression
guard that later work cannot break. Cases that need a model file run against the tiny kit's
folder layout but never load a model: preflight reads headers and configs only. Each runs the
real CLI in-process, once for a real run and once with ``--dry-run``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from render.cli import main

HEAD = ('version: 1\nmodel_dirs: [{kit}]\noutput: {dir: "out/{job}", grid: false}\n'
        "defaults: {model: tiny-sd15, size: 64x64, steps: 2}\n")


def job(body: str) -> str:
    return HEAD + "jobs:\n" + body


def bomb(levels: int = 9, width: int = 9) -> str:
    """The billion laughs: ``width ** levels`` strings from a few hundred bytes."""
    lines = ['x0: &x0 ["lol"]']
    for k in range(1, levels):
        lines.append(f"x{k}: &x{k} [{', '.join([f'*x{k - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


#: (case id, job file text, the key the error must name, a text the message must contain).
#: ``{kit}`` is the tiny kit's folder; ``{here}`` the job file's folder.
CASES: list[tuple[str, str, str, str]] = [
    # -- malformed files --------------------------------------------------------------------
    ("yaml-syntax", "version: 1\njobs: [\n", "", ""),
    ("control-characters", "version: 1\njobs:\n  - name: a\x07b\n    prompt: x\n", "", ""),
    ("deep-nesting", "version: 1\njobs: " + "[" * 400 + "]" * 400 + "\n", "", ""),
    ("top-level-list", "- 1\n- 2\n", "", ""),
    ("python-tag", job("  - name: a\n    prompt: !!python/object/apply:os.system [echo hi]\n"),
     "", ""),
    ("alias-bomb", bomb() + job("  - name: a\n    prompt: x\n    grid: {cfg: *x8}\n"), "", ""),
    # -- numbers and ranges -----------------------------------------------------------------
    ("seed-range-explodes", job('  - name: a\n    prompt: x\n    seeds: "0-99999999"\n'),
     "", "max-tasks"),
    ("seed-past-2**64", job("  - name: a\n    prompt: x\n    seed: 36893488147419103232\n"),
     "seed", ""),
    ("seed-range-past-2**64",
     job('  - name: a\n    prompt: x\n    seeds: "18446744073709551610-18446744073709551620"\n'),
     "seeds", ""),
    ("strength-runs-no-step",
     job("  - name: a\n    prompt: x\n    image: {here}/in.png\n    strength: 0.1\n"),
     "strength", ""),
    ("mask-without-image", job("  - name: a\n    prompt: x\n    mask: {here}/in.png\n"),
     "mask", ""),
    ("prompt-too-long", job("  - name: a\n    prompt: " + "word " * 40_000 + "\n"),
     "prompt", ""),
    ("prompt_sr-empty-first",
     job('  - name: a\n    prompt: a cat\n    grid: {prompt_sr: ["", dog]}\n'), "prompt_sr", ""),
    # -- output names -----------------------------------------------------------------------
    ("name-spec-misfit",
     HEAD.replace('grid: false}', 'name: "{prompt:05d}", grid: false}')
     + "jobs:\n  - name: a\n    prompt: x\n", "output.name", ""),
    ("name-escapes-root",
     HEAD.replace('grid: false}', 'name: "../../x", grid: false}')
     + "jobs:\n  - name: a\n    prompt: x\n", "output.name", ""),
    ("job-named-render.db", job("  - name: render.db\n    prompt: x\n"), "name", ""),
    ("job-named-index.html", job("  - name: INDEX.html\n    prompt: x\n"), "name", ""),
    # -- files ------------------------------------------------------------------------------
    ("image-not-an-image", job("  - name: a\n    prompt: x\n    image: {here}/notes.png\n"),
     "image", ""),
    ("image-truncated", job("  - name: a\n    prompt: x\n    image: {here}/cut.png\n"),
     "image", ""),
    ("model-missing", job("  - name: a\n    prompt: x\n    model: no-such-model\n"),
     "model", ""),
    ("clip-skip-too-deep", job("  - name: a\n    prompt: x\n    clip_skip: 5\n"),
     "clip_skip", ""),
    ("depth-without-image", job("  - name: a\n    prompt: x\n    model: tiny-sd2-depth\n"),
     "", ""),
    ("lora-weight-absurd", job("  - name: a\n    prompt: x\n    lora: {tiny-lora-a: 1e308}\n"),
     "lora", ""),
    ("lora-tag-not-finite", job("  - name: a\n    prompt: x <lora:tiny-lora-a:nan>\n"),
     "prompt", ""),
]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """The files the cases point at: a good image, a truncated one, text named .png."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    data = (tmp_path / "in.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    return tmp_path


LINE = re.compile(r"^error: (?P<file>[^:]+\.yaml)(?::(?P<line>\d+):\d+)?: (?P<rest>.+)$")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("case", "text", "key", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_located_line(case: str, text: str, key: str, fragment: str,
                                          dry_run: bool, kit: Path, inputs: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: every user mistake is one line naming file, line and key; exit 2; nothing
    written."""
    path = inputs / "job.yaml"
    path.write_text(text.replace("{kit}", str(kit)).replace("{here}", str(inputs)),
                    encoding="utf-8")
    before = sorted(p.name for p in inputs.iterdir())
    code = main([str(path), "-q"] + (["--dry-run"] if dry_run else []))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    first = LINE.match(lines[0])
    assert first, f"not a located one-line error: {lines[0]!r}"
    assert Path(first["file"]).name == "job.yaml"
    if key:
        assert re.search(rf"(^|[\s.]){re.escape(key)}[:.\[]", first["rest"]), lines[0]
        assert first["line"], f"no line number: {lines[0]!r}"
    if fragment:
        assert fragment in lines[0]
    assert len(lines[0]) < 600, "one line, not a dump"
    assert sorted(p.name for p in inputs.iterdir()) == before   # nothing written
