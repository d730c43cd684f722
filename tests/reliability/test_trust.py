"""Issue 12, trusting files: no file's contents are believed blindly, and checks that used to
fail at render time (after a model loaded and the ledger was written) run at preflight.

A user mistake is one line ``error: file:line:col: key: message``, exit 2, before any model
loads, nothing written. Every case runs the real CLI on the tiny kit; none mocks a pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from render import metadata
from render.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAD = ('version: 1\nmodel_dirs: [{dirs}]\noutput: {{dir: "out/{{job}}", grid: false}}\n'
        "defaults: {{model: tiny-sd15, size: 64x64, steps: 2, prompt: a house}}\njobs:\n")
LINE = re.compile(r"^error: (?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<key>[^:]+): "
                  r"(?P<message>.+)$")
#: Runs the CLI and fails if torch or diffusers got imported (validation must not need them).
NO_TORCH = ("import sys\nfrom render.cli import main\ncode = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
            "sys.exit(code)\n")


def write_job(folder: Path, dirs: list[Path], body: str) -> Path:
    path = folder / "job.yaml"
    path.write_text(HEAD.format(dirs=", ".join(map(str, dirs))) + body, encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of ``path`` holding ``needle`` (where the error must point)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, text in enumerate(lines, 1) if needle in text)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(capsys: pytest.CaptureFixture[str], job: Path, *args: str) -> list[str]:
    """The error lines of ``render.py job args``: exit 2, no traceback, nothing written."""
    before = tree(job.parent)
    code = main([str(job), "-q", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, err
    assert tree(job.parent) == before, "something was written"
    return [line for line in err.splitlines() if line.startswith("error:")]


def located(line: str, job: Path, line_no: int, key: str) -> str:
    """Assert ``line`` is ``error: job:line_no:col: ...key: ...``; return its message."""
    match = LINE.match(line)
    assert match, line
    assert (match["file"], int(match["line"])) == (str(job), line_no), line
    assert match["key"].endswith(key), line
    return match["message"]


def accepted(capsys: pytest.CaptureFixture[str], job: Path, *args: str) -> str:
    code = main([str(job), "-q", "--dry-run", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# -- 1. a decoy .safetensors beside a pickle ---------------------------------------------------

def _pipeline_copy(kit: Path, models: Path, name: str) -> Path:
    dest = models / "checkpoints" / name
    shutil.copytree(kit / "checkpoints" / "tiny-sd15", dest)
    return dest


def _pickle_with_decoy(part: Path, weights: str, pickle: str, decoy: str) -> None:
    """``part``'s weights as the pickle ``pickle``, and a copy of it named ``decoy`` beside."""
    (part / weights).rename(part / pickle)
    shutil.copy(part / pickle, part / decoy)


def _decoy_unet(folder: Path) -> None:
    _pickle_with_decoy(folder / "unet", "diffusion_pytorch_model.safetensors",
                       "diffusion_pytorch_model.bin", "decoy.safetensors")


def _variant_decoy(folder: Path) -> None:
    _pickle_with_decoy(folder / "unet", "diffusion_pytorch_model.safetensors",
                       "diffusion_pytorch_model.bin",
                       "diffusion_pytorch_model.fp16.safetensors")   # no variant is loaded


def _text_encoder_decoy(folder: Path) -> None:
    _pickle_with_decoy(folder / "text_encoder", "model.safetensors", "pytorch_model.bin",
                       "diffusion_pytorch_model.safetensors")


def _sharded_pickle(folder: Path) -> None:
    unet = folder / "unet"
    _pickle_with_decoy(unet, "diffusion_pytorch_model.safetensors", "shard-00001.bin",
                       "decoy.safetensors")
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "shard-00001.bin"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(("layout", "pickle"), [
    (_decoy_unet, "unet/diffusion_pytorch_model.bin"),
    (_variant_decoy, "unet/diffusion_pytorch_model.bin"),
    (_text_encoder_decoy, "text_encoder/pytorch_model.bin"),
    (_sharded_pickle, "unet/shard-00001.bin"),
], ids=["decoy-beside-bin", "variant-decoy", "text-encoder-decoy", "sharded-index-pickle"])
def test_a_decoy_safetensors_does_not_let_a_pickle_load(layout: Any, pickle: str, kit: Path,
                                                        tmp_path: Path, capsys: Any) -> None:
    """Issue 12: a decoy .safetensors beside the .bin diffusers/transformers would read let
    the pickle load without allow_pickle; preflight now refuses it at the model's line."""
    folder = _pipeline_copy(kit, tmp_path / "models", "decoy")
    layout(folder)
    job = write_job(tmp_path, [tmp_path / "models"], "  - name: a\n    model: decoy\n")
    for args in ((), ("--dry-run",)):
        (line,) = refused(capsys, job, *args)
        message = located(line, job, line_of(job, "model: decoy"), "model")
        assert f"{folder / pickle} is a pickle" in message and "allow_pickle" in message


def test_pickles_diffusers_does_not_read_are_no_reason_to_refuse(kit: Path, tmp_path: Path,
                                                                 capsys: Any) -> None:
    """Issue 12: deciding per component works both ways: a .bin beside the safetensors
    file diffusers loads (as in runwayml's repo) and a .ckpt in a pipeline folder's root
    (which diffusers never reads) are not pickles the load reads, so nothing is refused."""
    folder = _pipeline_copy(kit, tmp_path / "models", "both")
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors",
                folder / "unet" / "diffusion_pytorch_model.bin")
    shutil.copy(folder / "text_encoder" / "model.safetensors",
                folder / "text_encoder" / "pytorch_model.bin")
    (folder / "v1-5-pruned.ckpt").write_bytes(b"not read")
    job = write_job(tmp_path, [tmp_path / "models"], "  - name: a\n    model: both\n")
    assert "checkpoint:both" in accepted(capsys, job)


def test_the_file_rule_matches_what_diffusers_and_transformers_load(kit: Path,
                                                                   tmp_path: Path) -> None:
    """Issue 12: the rule preflight uses is the libraries' own: in each layout only the file
    the rule names holds valid weights (the others are garbage), and the real
    ``from_pretrained`` loads, so it read exactly that file."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from render.models import component_reads, pickle_files

    src = kit / "checkpoints" / "tiny-sd15"
    layouts = [  # (class, component, {file: "valid" | "pickle" | "garbage"}, the file read)
        (UNet2DConditionModel, "unet", {"diffusion_pytorch_model.safetensors": "valid",
                                        "diffusion_pytorch_model.bin": "garbage"},
         "diffusion_pytorch_model.safetensors"),
        (UNet2DConditionModel, "unet", {"diffusion_pytorch_model.bin": "pickle",
                                        "decoy.safetensors": "garbage",
                                        "diffusion_pytorch_model.fp16.safetensors": "garbage"},
         "diffusion_pytorch_model.bin"),
        (CLIPTextModel, "text_encoder", {"model.safetensors": "valid",
                                         "pytorch_model.bin": "garbage"}, "model.safetensors"),
        (CLIPTextModel, "text_encoder", {"pytorch_model.bin": "pickle",
                                         "decoy.safetensors": "garbage"}, "pytorch_model.bin"),
    ]
    for n, (cls, component, files, read) in enumerate(layouts):
        folder = tmp_path / f"layout{n}"
        folder.mkdir()
        shutil.copy(src / component / "config.json", folder / "config.json")
        weights = next(p for p in (src / component).glob("*.safetensors"))
        for name, content in files.items():
            if content == "valid":
                shutil.copy(weights, folder / name)
            elif content == "pickle":
                torch.save(load_file(weights), folder / name)
            else:
                (folder / name).write_bytes(b"\0" * 64)
        assert [p.name for p in component_reads(folder) or []] == [read]
        assert bool(pickle_files(folder)) == read.endswith(".bin")
        cls.from_pretrained(str(folder), local_files_only=True)   # garbage would fail it


# -- 2. --replay and --show trust nothing in an image ------------------------------------------

def _record(kit: Path, tmp_path: Path, body: str, capsys: Any,
            dirs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The resolved task of a one-task job, as its image's provenance holds it."""
    job = write_job(tmp_path, [*dirs, kit], body)
    assert main([str(job), "--dry-run", "--json", "-q"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    record.pop("done")
    return record


def _image(path: Path, task: Any, sections: Any = None, **prov: Any) -> Path:
    """A PNG whose ``render`` chunk holds ``task`` (anyone can write one)."""
    from render.plugins import load_plugins

    if sections is None:
        fields = load_plugins().fields()
        sections = sorted(k for k in task if ("task", k) in fields) if isinstance(
            task, dict) else []
    data = {"format": "render-provenance", "schema": 1, "task": task, "sections": sections,
            "infotext": "a house\nSteps: 2", **prov}
    Image.new("RGB", (64, 64)).save(path, pnginfo=metadata.png_info("a house", data))
    return path


def _cli_no_torch(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def _crafted(record: dict[str, Any], tmp_path: Path) -> list[tuple[str, Any, str]]:
    """(case, provenance task, the key its error names) for hostile provenances."""
    def changed(**kw: Any) -> dict[str, Any]:
        return {**record, **kw}

    files = record["files"]
    model = files["model"]
    return [
        ("task-is-a-list", [1, 2], "task"),
        ("missing-seed", {k: v for k, v in record.items() if k != "seed"}, "task.seed"),
        ("width-not-multiple-of-8", changed(width=13), "task.width"),
        ("negative-steps", changed(steps=-3), "task.steps"),
        ("seed-past-2**64", changed(seed=2**70), "task.seed"),
        ("sampler-unknown", changed(sampler="Turbo Warp"), "task.sampler"),
        ("files-a-list", changed(files=["x"]), "task.files"),
        ("file-ref-a-string", changed(files={**files, "model": "x"}), "task.files.model"),
        ("file-ref-unknown-key", changed(files={**files, "model": {**model, "evil": 1}}),
         "task.files.model.evil"),
        ("file-hub-skips-hash", changed(files={**files, "model": {**model, "hub": True}}),
         "task.files.model.hub"),
        ("file-relative-path", changed(files={**files, "model": {**model, "path": "x"}}),
         "task.files.model.path"),
        ("model-extra-format", changed(files={**files, "model": {
            **model, "extra": {**model["extra"], "format": "exe"}}}),
         "task.files.model.extra.format"),
        ("lora-weight-absurd", changed(lora={"tiny-lora-a": {"te": 1e308, "unet": 1e308}}),
         "task.lora.tiny-lora-a"),
    ]


def test_replay_validates_the_provenance_like_a_job_file(kit: Path, tmp_path: Path,
                                                         capsys: Any) -> None:
    """Issue 12: crafted provenance gave KeyError/AttributeError tracebacks and an invalid
    width reached diffusers; now each is ``IMAGE: task.<key>: message``, exit 2, before torch
    is imported (the job file's validators check it)."""
    record = _record(kit, tmp_path, "  - name: a\n    lora: {tiny-lora-a: 0.5}\n", capsys)
    out = tmp_path / "replays"
    for case, task, key in _crafted(record, tmp_path):
        image = _image(tmp_path / f"{case}.png", task)
        code = main(["--replay", str(image), "--out", str(out)])
        err = capsys.readouterr().err
        assert "Traceback" not in err, (case, err)
        assert code == 2, (case, err)
        lines = err.splitlines()
        assert lines and all(line.startswith(f"error: {image}: ") for line in lines), lines
        assert any(line.startswith(f"error: {image}: {key}: ") for line in lines), (case, lines)
    image = tmp_path / "width-not-multiple-of-8.png"
    result = _cli_no_torch("--replay", str(image), "--out", str(out))
    assert result.returncode == 2, result.stderr   # and torch was not imported
    assert result.stderr.splitlines() == [
        f"error: {image}: task.width: a width must be a multiple of 8, got 13"]
    assert not out.exists()


def test_replay_accepts_what_render_wrote(kit: Path, tmp_path: Path, capsys: Any) -> None:
    """Issue 12: the validation passes every provenance render itself writes, plugin sections
    included (their validators take their own normalised form), and rebuilds the same task."""
    from render.plugins import load_plugins
    from render.replay import load_task
    from render.testing import write_hypernetwork, write_reference_images

    refs = write_reference_images(tmp_path / "refs")
    write_hypernetwork(tmp_path / "extra" / "hypernetworks" / "tiny-hn.safetensors")
    bodies = [
        "  - name: a\n    prompt: a house tiny-emb <lora:tiny-lora-b:0.3>\n"
        "    lora: {tiny-lora-a: 0.5}\n    hypernetwork: {tiny-hn: 0.5}\n    clip_skip: 2\n"
        f"    controlnet: [{{model: tiny-controlnet-sd15, image: {refs['checker.png']},"
        " preprocessor: none, scale: 0.7}]\n",
        f"  - name: d\n    model: tiny-sd2-depth\n    depth: {{image: {refs['house.png']}}}\n",
        f"  - name: i\n    image: {refs['house.png']}\n    mask: {refs['mask.png']}\n"
        "    strength: 0.6\n    sampler: DPM++ 2M Karras\n",
    ]
    plugins = load_plugins()
    for n, body in enumerate(bodies):
        record = _record(kit, tmp_path, body, capsys, dirs=(tmp_path / "extra",))
        task, _ = load_task(str(_image(tmp_path / f"ok{n}.png", record)), plugins)
        assert task.compute_id() == record["id"]
        assert task.to_json() == {**record, "files": task.to_json()["files"]}


def test_replay_never_takes_allow_pickle_from_an_image(kit: Path, tmp_path: Path,
                                                        capsys: Any) -> None:
    """Issue 12: allow_pickle was taken from the image. Now an image that needs a pickle is
    refused (one line naming --allow-pickle) whatever it says, and only --allow-pickle on the
    command line grants it."""
    from render.hashing import sha256_file
    from render.plugins import load_plugins
    from render.replay import grant_pickles, load_task

    record = _record(kit, tmp_path, "  - name: a\n", capsys)
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(b"a pickle that runs code when loaded")
    model = record["files"]["model"]
    model.update(path=str(ckpt), sha256=sha256_file(ckpt))
    model["extra"].update(format="single_file", allow_pickle=True,
                          config=str(kit / "checkpoints" / "tiny-sd15"))
    image = _image(tmp_path / "evil.png", record)
    result = _cli_no_torch("--replay", str(image), "--out", str(tmp_path / "replays"))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {image}: model file {ckpt} is a pickle")
    assert "--allow-pickle" in line
    task, _ = load_task(str(image), load_plugins())
    assert "allow_pickle" not in task.files["model"].extra
    granted = grant_pickles(task, str(image), allowed=True)
    assert granted.files["model"].extra["allow_pickle"] is True
    job = write_job(tmp_path, [kit], "  - name: a\n")
    assert refused(capsys, job, "--allow-pickle") == [
        "error: --allow-pickle only applies to --replay; a job file allows a pickle per model,"
        " in models: with allow_pickle: true"]
    assert not (tmp_path / "replays").exists()


def _nested_json_png(path: Path) -> Path:
    info = metadata.png_info(None, None)
    info.add_itxt("render", "[" * 100_000 + "]" * 100_000)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_show_and_replay_survive_crafted_metadata(tmp_path: Path, capsys: Any) -> None:
    """Issue 12: ``--show`` raised AttributeError on a provenance whose task or files are
    not mappings, and JSON nested 100,000 deep raised RecursionError; now --show prints
    what it can (exit 0) and replay says in one line what is wrong (exit 2)."""
    cases = {
        "task-list": _image(tmp_path / "a.png", [1, 2]),
        "files-list": _image(tmp_path / "b.png", {"id": "x", "files": ["a", "b"]}),
        "ref-list": _image(tmp_path / "c.png", {"id": "x", "files": {"model": [1]}}),
        "sections-int": _image(tmp_path / "d.png", {"id": "x"}, sections=5),
    }
    for case, image in cases.items():
        assert main(["--show", str(image)]) == 0, case
        out, err = capsys.readouterr()
        assert out.startswith("a house") and "Traceback" not in err, case
        assert main(["--replay", str(image)]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith(f"error: {image}: ") and "Traceback" not in err, (case, err)
    deep = _nested_json_png(tmp_path / "deep.png")
    for args in (["--show", str(deep)], ["--replay", str(deep)]):
        assert main(args) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {deep}: cannot read image metadata")


# -- 3. input images that cannot be decoded ------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def decompression_bomb(path: Path, side: int = 10_000) -> Path:
    """A 200-byte PNG that claims ``side`` x ``side`` pixels (100 MP: past Pillow's limit)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)   # 1-bit greyscale
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture
def bad_images(tmp_path: Path) -> dict[str, Path]:
    """A good image, and three that cannot be used: truncated, not an image, a bomb."""
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "notes.png").write_text("these are my notes, not a picture")
    return {"good": good, "truncated": tmp_path / "cut.png", "text": tmp_path / "notes.png",
            "bomb": decompression_bomb(tmp_path / "bomb.png")}


@pytest.mark.parametrize("bad", ["truncated", "text", "bomb"])
@pytest.mark.parametrize(("body", "key"), [
    ("    image: {bad}\n", "image"),
    ("    image: {good}\n    mask: {bad}\n", "mask"),
    ("    model: tiny-sd2-depth\n    depth: {{image: {bad}}}\n", "depth.image"),
    ("    controlnet: [{{model: tiny-controlnet-sd15, image: {bad}, preprocessor: none}}]\n",
     "controlnet[0].image"),
], ids=["image", "mask", "depth-image", "controlnet-image"])
def test_an_input_image_that_cannot_be_decoded_fails_at_preflight(
        bad: str, body: str, key: str, kit: Path, tmp_path: Path, bad_images: dict[str, Path],
        capsys: Any) -> None:
    """Issue 12: an image: (mask:, depth image, ControlNet image) that cannot be decoded
    failed per task at render time after the model loaded; now it is one line at its key."""
    text = body.format(bad=bad_images[bad], good=bad_images["good"])
    job = write_job(tmp_path, [kit], "  - name: a\n" + text)
    (line,) = refused(capsys, job, "--dry-run")
    message = located(line, job, line_of(job, str(bad_images[bad])), key)
    assert str(bad_images[bad]) in message
    if bad == "bomb":
        assert "decompression-bomb limit" in message


def test_a_broken_image_stops_a_real_run_before_anything_is_written(
        kit: Path, tmp_path: Path, bad_images: dict[str, Path], capsys: Any) -> None:
    """Issue 12: without --dry-run too: no ledger, no gallery, no model loaded."""
    job = write_job(tmp_path, [kit], f"  - name: a\n    image: {bad_images['truncated']}\n")
    (line,) = refused(capsys, job)
    located(line, job, line_of(job, "image:"), "image")


# -- 4. a depth model without an image -----------------------------------------------------------

def test_a_depth_model_without_an_image_fails_at_its_model_key(kit: Path, tmp_path: Path,
                                                               capsys: Any) -> None:
    """Issue 12: txt2img on a depth model (5-channel UNet) passed preflight and failed per
    task at render time; now it is one line at the model key. With an image it still runs."""
    from render.testing import write_reference_images

    refs = write_reference_images(tmp_path / "refs")
    job = write_job(tmp_path, [kit], "  - name: a\n    model: tiny-sd2-depth\n"
                                     f"  - name: b\n    model: tiny-sd2-depth\n"
                                     f"    image: {refs['house.png']}\n")
    (line,) = refused(capsys, job, "--dry-run")
    message = located(line, job, line_of(job, "model: tiny-sd2-depth"), "jobs[0].model")
    assert "depth-to-image model" in message and "depth: {image: ...}" in message
    assert "b " in accepted(capsys, job, "--only", "b")


# -- 5. clip_skip past the text encoder's layers -------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "single"])
def test_clip_skip_past_the_text_encoder_fails_at_preflight(model: str, kit: Path,
                                                            tmp_path: Path, capsys: Any) -> None:
    """Issue 12: clip_skip beyond the text encoder's layers raised in the prompt encoder at
    render time; preflight now counts the layers (configs, or a single file's tensor names,
    no torch) and refuses it at clip_skip's line. The kit's encoders have 2 layers."""
    alias = (f"models: {{single: {{source: {kit}/checkpoints/tiny-sd15-single.safetensors,"
             f" config: {kit}/checkpoints/tiny-sd15}}}}\n")
    job = write_job(tmp_path, [kit], f"  - name: a\n    model: {model}\n    clip_skip: 3\n"
                                     f"  - name: b\n    model: {model}\n    clip_skip: 2\n")
    job.write_text(alias + job.read_text())
    result = _cli_no_torch(str(job), "--dry-run", "-q")
    (line,) = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    message = located(line, job, line_of(job, "clip_skip: 3"), "clip_skip")
    assert message.startswith(f"clip_skip 3 exceeds the text encoder of model '{model}',"
                              " which has 2 layers")
    assert "b " in accepted(capsys, job, "--only", "b")


# -- 6. --device naming no device ----------------------------------------------------------------

@pytest.mark.parametrize("device", ["cudax", "banana", "cuda:-1", "cuda:0:1", "CPU"])
def test_a_device_name_that_is_no_device_is_refused_at_parsing(device: str, kit: Path,
                                                               tmp_path: Path) -> None:
    """Issue 12: ``--device cudax`` went through preflight, wrote a ledger and failed late;
    the name is now checked with the arguments (no torch), for --dry-run too."""
    job = write_job(tmp_path, [kit], "  - name: a\n")
    for args in ((), ("--dry-run",)):
        result = _cli_no_torch(str(job), "--device", device, *args)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"error: --device {device!r} names no device; use cpu, cuda, cuda:N (N from 0),"
            " mps or xpu, or leave it out to use the best one available"]
    assert tree(tmp_path) == ["job.yaml"]


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(
        kit: Path, tmp_path: Path, capsys: Any) -> None:
    """Issue 12: ``--device cuda:7`` on a box without it loaded nothing useful but wrote the
    ledger and gallery first; now it is one line once preflight passed, nothing written."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    job = write_job(tmp_path, [kit], "  - name: a\n")
    (line,) = refused(capsys, job, "--device", f"cuda:{count}")
    assert line.startswith(f"error: --device cuda:{count}: this machine has ")
    assert accepted(capsys, job, "--device", f"cuda:{count}")   # a dry run loads nothing


# -- 7. LoRA weights that are not finite or absurd -----------------------------------------------

@pytest.mark.parametrize(("body", "key", "needle"), [
    ("    lora: {tiny-lora-a: 1.0e+308}\n", "lora.tiny-lora-a", "1.0e+308"),
    ("    lora: {tiny-lora-a: -25}\n", "lora.tiny-lora-a", "tiny-lora-a: -25"),
    ("    lora: {tiny-lora-a: {te: 0.5, unet: 21.0}}\n", "lora.tiny-lora-a", "21.0"),
    ('    prompt: "a house <lora:tiny-lora-a:1e308>"\n', "prompt", "1e308"),
    ('    prompt: "a house <lora:tiny-lora-a:0.5:-21>"\n', "prompt", "a:0.5:-21>"),
], ids=["section-1e308", "section-minus-25", "section-unet-21", "tag-1e308", "tag-unet-minus-21"])
def test_a_lora_weight_that_is_absurd_is_refused(body: str, key: str, needle: str, kit: Path,
                                                 tmp_path: Path, capsys: Any) -> None:
    """Issue 12: ``1e308`` rendered an all-black image recorded as done; weights must be
    finite and within +-20 (plugins/lora.py MAX_WEIGHT), in the section and in tags."""
    job = write_job(tmp_path, [kit], "  - name: a\n" + body)
    (line,) = refused(capsys, job, "--dry-run")
    message = located(line, job, line_of(job, needle), key)
    assert "20" in message
    ok = write_job(tmp_path, [kit], "  - name: a\n    lora: {tiny-lora-a: -20}\n"
                                    '    prompt: "a house <lora:tiny-lora-b:20:-1.5>"\n')
    assert "lora:tiny-lora-a" in accepted(capsys, ok)


# -- 8. the hash cache -----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "sqlite-header-only"])
def test_a_corrupt_hash_cache_is_set_aside_and_rebuilt(damage: str, kit: Path, tmp_path: Path,
                                                       monkeypatch: Any, capsys: Any) -> None:
    """Issue 12: garbage in the hash cache broke even --dry-run with a sqlite traceback; it
    is only a cache: it is moved aside (kept) with one warning line and rebuilt."""
    import sqlite3

    from render import hashing

    cache = tmp_path / "cache"
    cache.mkdir()
    db = cache / "hashes.sqlite"
    if damage == "garbage":
        db.write_bytes(os.urandom(4096))
    elif damage == "sqlite-header-only":
        db.write_bytes(b"SQLite format 3\0" + b"\xff" * 200)
    else:
        good = sqlite3.connect(cache / "full.sqlite")
        good.execute("CREATE TABLE hashes (path TEXT, algo TEXT, size INTEGER, mtime_ns"
                     " INTEGER, value TEXT, PRIMARY KEY (path, algo))")
        good.executemany("INSERT INTO hashes VALUES (?, 'sha256', 1, 1, ?)",
                         [(f"/m/{i:06}" * 8, "0" * 64) for i in range(3000)])
        good.commit()
        good.close()
        db.write_bytes((cache / "full.sqlite").read_bytes()[:20_000])
        (cache / "full.sqlite").unlink()
    damaged = db.read_bytes()
    monkeypatch.setenv("RENDER_CACHE_DIR", str(cache))
    job = write_job(tmp_path, [kit], "  - name: a\n")
    assert main([str(job), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    (warning,) = err.splitlines()
    assert warning.startswith(f"warning: hash cache {db} was damaged")
    (aside,) = cache.glob("hashes.sqlite.corrupt-*")
    assert aside.read_bytes() == damaged     # kept, not deleted
    assert "checkpoint:tiny-sd15" in out
    monkeypatch.setattr(hashing, "_default_cache", None)   # as the next run would open it
    assert main([str(job), "--dry-run"]) == 0   # the rebuilt cache works: no second warning
    assert capsys.readouterr().err == ""


def test_a_cache_dir_that_is_a_file_is_one_line(kit: Path, tmp_path: Path, monkeypatch: Any,
                                                capsys: Any) -> None:
    """Issue 12: RENDER_CACHE_DIR naming a file gave a traceback (--dry-run too); it is an
    error naming RENDER_CACHE_DIR (not a silent fallback: the shipped configs live there)."""
    (tmp_path / "cachefile").write_text("mine")
    monkeypatch.setenv("RENDER_CACHE_DIR", str(tmp_path / "cachefile"))
    job = write_job(tmp_path, [kit], "  - name: a\n")
    for args in ((), ("--dry-run",)):
        (line,) = refused(capsys, job, *args)
        assert line == (f"error: cache folder {tmp_path / 'cachefile'} is a file, not a"
                        " folder; point RENDER_CACHE_DIR at a folder render may write (unset,"
                        " it is ~/.cache/render)")
    assert (tmp_path / "cachefile").read_text() == "mine"


# -- 9. model_dirs that cannot be searched -------------------------------------------------------

def test_model_dirs_walk_skips_proc_and_symlink_loops(kit: Path, tmp_path: Path,
                                                      capsys: Any) -> None:
    """Issue 12: ``model_dirs`` reaching /proc gave a PermissionError traceback (and walked
    an endless virtual tree); virtual filesystems are skipped, symlink loops end, unreadable
    subfolders are passed over quietly."""
    models = tmp_path / "models"
    (models / "loras" / "deep").mkdir(parents=True)
    (models / "loras" / "proc").symlink_to("/proc")
    (models / "loras" / "deep" / "loop").symlink_to(models / "loras")
    shutil.copy(kit / "loras" / "tiny-lora-a.safetensors",
                models / "loras" / "deep" / "x.safetensors")
    job = write_job(tmp_path, [models, kit], "  - name: a\n    lora: {x: 0.5}\n")
    assert "lora:x" in accepted(capsys, job)


@pytest.mark.parametrize("entry", ["file", "proc", "too-big", "unreadable"])
def test_a_model_dirs_entry_that_cannot_be_searched_is_one_line_at_its_line(
        entry: str, kit: Path, tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """Issue 12: an unusable model_dirs entry (a file, /proc, a tree like / or ~ that is no
    models folder, a folder render may not read) was skipped silently or walked for minutes;
    now it is one line at its own line in the job file."""
    from render import folders

    target = {"file": tmp_path / "notes.txt", "proc": Path("/proc"),
              "too-big": tmp_path / "home", "unreadable": tmp_path / "locked"}[entry]
    if entry == "file":
        target.write_text("not a folder")
    elif entry == "too-big":
        monkeypatch.setattr(folders, "MAX_SCAN_FOLDERS", 30)
        for i in range(40):
            (target / f"d{i}").mkdir(parents=True)
    elif entry == "unreadable":
        target.mkdir()
        target.chmod(0)
        if os.access(target, os.R_OK):
            pytest.skip("running as root: a folder cannot be made unreadable")
    job = tmp_path / "job.yaml"
    job.write_text(HEAD.replace("model_dirs: [{dirs}]", f"model_dirs:\n  - {kit}\n  - {target}")
                   .format() + "  - name: a\n")
    try:
        (line,) = refused(capsys, job, "--dry-run")
    finally:
        if entry == "unreadable":
            target.chmod(0o755)
    message = located(line, job, 4, "model_dirs[1]")
    assert str(target) in message
