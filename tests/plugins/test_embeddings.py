"""The textual-inversion plugin (plugins/embeddings.py) on the tiny model kit.

Job files go through ``render.expand`` and ``render.plan.Preflight`` with the real
``ModelResolver``; renders go through ``render.engine`` (which encodes prompts with
``render.prompts``, expanding multi-vector tokens); one test runs the CLI end to end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from render import expand
from render.errors import FieldError, JobErrors
from render.run import resolve_tasks
from render.tasks import Batch, Result, Task


@pytest.fixture(scope="module")
def emb(plugins: Any) -> Any:
    """The plugin module as loaded (by file path, like a user's plugin)."""
    return plugins.pm.get_plugin("embeddings")


def resolve(path: Path, plugins: Any) -> list[Task]:
    """Load, expand (plugins included) and preflight a job file, as ``render`` does."""
    return resolve_tasks(expand.load_job_file(path, plugins).jobs, plugins)


def by_job(tasks: list[Task]) -> dict[str, Task]:
    return {t.job: t for t in tasks}


def embeddings_of(task: Task) -> list[str]:
    return sorted(label for label in task.files if label.startswith("embedding:"))


def fake_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    header = {n: {"dtype": "F32", "shape": list(s), "data_offsets": [0, 0]}
              for n, s in shapes.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


# -- the section, detection, preflight ---------------------------------------------------------

def test_section_forms(emb: Any) -> None:
    assert emb.validate_section(None) == []
    assert emb.validate_section("easynegative") == ["easynegative"]
    assert emb.validate_section(["b", "a", "b"]) == ["b", "a"]
    with pytest.raises(FieldError) as info:
        emb.validate_section(["a", {"b": 1}])
    assert (info.value.message, info.value.subkey) == ("expected an embedding name, got a "
                                                       "mapping", "1")
    with pytest.raises(FieldError, match="expected a list of embedding names, got 3"):
        emb.validate_section(3)


def test_names_in_prompts_are_found_as_whole_words(job: Any, plugins: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: word
            prompt: "a tiny-emb house"
          - name: case
            prompt: "a (Tiny-Emb:1.2) house"
          - name: inside
            prompt: "a tiny-embroidery house, xtiny-emb"
          - name: tag
            prompt: "a house <othernet:tiny-emb:1>"   # a tag no plugin owns
          - name: negative
            negative: "tiny-emb, lowres"
          - name: listed
            embeddings: [tiny-emb]
    """), plugins))
    found = {name: embeddings_of(task) for name, task in tasks.items()}
    assert found == {"word": ["embedding:tiny-emb"], "case": ["embedding:tiny-emb"],
                     "inside": [], "tag": [], "negative": ["embedding:tiny-emb"],
                     "listed": ["embedding:tiny-emb"]}
    ref = tasks["word"].files["embedding:tiny-emb"]
    assert (ref.extra["token"], ref.extra["vectors"], ref.family) == ("tiny-emb", 2, None)
    assert "embeddings" not in tasks["word"].sections  # found names do not change the section


def test_listed_embedding_must_exist(job: Any, plugins: Any) -> None:
    path = job("""\
          - name: typo
            embeddings: [tiny-emb, tiny-emv]
    """)
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    message = str(info.value)
    assert message.startswith(f"{path}:8:36: jobs[0].embeddings[1]: embedding 'tiny-emv' not "
                              "found")
    assert "did you mean 'tiny-emb'" in message


def test_family_mismatch_is_an_error(job: Any, plugins: Any) -> None:
    path = job("""\
          - name: sd15_on_xl
            model: tiny-sdxl
            embeddings: [tiny-emb]
          - name: xl_on_sd15
            negative: "tiny-emb-xl"
    """)
    with pytest.raises(JobErrors) as info:
        resolve(path, plugins)
    assert str(info.value).splitlines() == [
        f"{path}:9:26: jobs[0].embeddings[0]: embedding 'tiny-emb' (tiny-emb.safetensors) is "
        "for SD 1.x/2.x (it has vectors for one text encoder; SDXL needs two), but model "
        "'tiny-sdxl' is SDXL",
        f"{path}:11:23: jobs[1].negative: embedding 'tiny-emb-xl' (tiny-emb-xl.safetensors, named "
        "in the negative prompt) is for SDXL (it holds clip_l and clip_g vectors), but model "
        "'tiny-sd15' is SD 1.x",
    ]


def test_inspect(emb: Any, kit: Path, tmp_path: Path) -> None:
    sd = emb.inspect_embedding(kit / "embeddings" / "tiny-emb.safetensors")
    assert (set(sd.families), sd.vectors) == ({"sd1", "sd2"}, 2)
    xl = emb.inspect_embedding(kit / "embeddings" / "tiny-emb-xl.safetensors")
    assert (set(xl.families), xl.vectors) == ({"sdxl"}, 2)
    real = emb.inspect_embedding(fake_safetensors(tmp_path / "a.safetensors",
                                                  {"emb_params": (8, 768)}))
    assert (set(real.families), real.reason, real.vectors) == (
        {"sd1"}, "its vectors are 768 wide", 8)
    sd2 = emb.inspect_embedding(fake_safetensors(tmp_path / "b.safetensors", {"<x>": (1024,)}))
    assert (set(sd2.families), sd2.vectors) == ({"sd2"}, 1)
    with pytest.raises(FieldError, match="is not a textual-inversion embedding"):
        emb.inspect_embedding(fake_safetensors(tmp_path / "c.safetensors",
                                               {"a": (1, 2), "b": (1, 2)}))


def test_ti_hashes_in_a1111_format(job: Any, plugins: Any, emb: Any, kit: Path) -> None:
    tasks = by_job(resolve(job("""\
          - name: used
            prompt: "a tiny-emb house"
          - name: listed_only
            embeddings: [tiny-emb]
    """), plugins))
    short = hashlib.sha256((kit / "embeddings" / "tiny-emb.safetensors").read_bytes()
                           ).hexdigest()[:12]
    fields = emb.result_metadata(task=tasks["used"], result=Result(tasks["used"], []))
    assert fields == {"TI hashes": f'"tiny-emb: {short}"'}
    # loaded but not named in the text: not used, so not in the infotext (as in A1111)
    assert emb.result_metadata(task=tasks["listed_only"], result=None) is None


# -- rendering -----------------------------------------------------------------------------------

@pytest.fixture
def engine(plugins: Any) -> Any:
    """A fresh engine per test: what an earlier test loaded must not leak into this one."""
    import torch

    from render.engine import Engine

    torch.set_num_threads(1)
    eng = Engine(plugins.pm, device="cpu", dtype="float32")
    yield eng
    eng.close()


def render_one(engine: Any, task: Task) -> np.ndarray:
    (result,) = engine.render(Batch(("test",), (task,)))
    return np.asarray(result.images[0], dtype=np.int16)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def without_embeddings(task: Task) -> Task:
    """The task as a job whose folders hold no embeddings would have it."""
    return dataclasses.replace(task, files={k: v for k, v in task.files.items()
                                            if not k.startswith("embedding:")})


def test_embedding_changes_pixels_and_only_whole_words(
    job: Any, plugins: Any, engine: Any, kit: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    single = tmp_path / "extra" / "embeddings"
    single.mkdir(parents=True)
    vectors = load_file(str(kit / "embeddings" / "tiny-emb.safetensors"))["emb_params"]
    save_file({"emb_params": vectors[:1].clone()}, str(single / "tiny-one.safetensors"))
    assert isinstance(vectors, torch.Tensor) and vectors.shape[0] == 2
    tasks = by_job(resolve(job("""\
          - name: emb
            prompt: "a tiny-emb house"
          - name: case
            prompt: "a TINY-EMB house"
          - name: word
            prompt: "a tiny-embroidery house"
          - name: one
            prompt: "a tiny-one house"
    """, dirs=(tmp_path / "extra",)), plugins))
    word_before = render_one(engine, tasks["word"])
    plain = render_one(engine, without_embeddings(tasks["emb"]))  # the name as literal text
    with_emb = render_one(engine, tasks["emb"])
    assert diff(with_emb, plain) > 5
    # once loaded, the token must not match inside other words
    assert np.array_equal(render_one(engine, tasks["word"]), word_before)
    assert np.array_equal(render_one(engine, tasks["case"]), with_emb)
    assert np.array_equal(render_one(engine, tasks["emb"]), with_emb)
    # both vectors are used: the first one alone renders something else
    assert diff(render_one(engine, tasks["one"]), with_emb) > 2
    # a job whose folders lack the embedding cannot silently use the one loaded for another
    with pytest.raises(RuntimeError, match="an embedding loaded for another job file"):
        render_one(engine, without_embeddings(tasks["emb"]))
    # loaded once: the tokenizer holds one token per vector, whole-word only
    pipe = engine.pipeline_for(engine.resident(tasks["emb"].files["model"]), tasks["emb"])
    added = {t.content: t for t in pipe.tokenizer.added_tokens_decoder.values()
             if not t.special}
    assert sorted(added) == ["tiny-emb", "tiny-emb_1", "tiny-one"]
    assert all(t.single_word for t in added.values())


def test_embedding_inside_a_prompt_edit(job: Any, plugins: Any, engine: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: edit
            prompt: "a [tiny-emb:cat:2] house"
            steps: 4
    """), plugins))
    task = tasks["edit"]
    assert embeddings_of(task) == ["embedding:tiny-emb"]
    literal = render_one(engine, without_embeddings(task))  # the name as text, steps 0-2
    cat = render_one(engine, dataclasses.replace(task, prompt="a cat house"))
    with_emb = render_one(engine, task)
    assert diff(with_emb, literal) > 5 and diff(with_emb, cat) > 5


def test_sdxl_embedding_loads_into_both_encoders(job: Any, plugins: Any, engine: Any) -> None:
    tasks = by_job(resolve(job("""\
          - name: xl
            model: tiny-sdxl
            prompt: "a tiny-emb-xl house"
    """), plugins))
    plain = render_one(engine, without_embeddings(tasks["xl"]))
    with_emb = render_one(engine, tasks["xl"])
    assert diff(with_emb, plain) > 5
    pipe = engine.pipeline_for(engine.resident(tasks["xl"].files["model"]), tasks["xl"])
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert "tiny-emb-xl_1" in tokenizer.get_vocab()


def test_cli_end_to_end_writes_ti_hashes(job: Any, kit: Path, tmp_path: Path) -> None:
    from PIL import Image

    from render.cli import main

    path = job("""\
          - name: e2e
            negative: "Tiny-Emb, lowres"
    """)
    assert main([str(path), "--quiet", "--device", "cpu"]) == 0
    (png,) = (tmp_path / "out" / "e2e").glob("*.png")
    text = Image.open(png).info["parameters"]
    short = hashlib.sha256((kit / "embeddings" / "tiny-emb.safetensors").read_bytes()
                           ).hexdigest()[:12]
    assert "\nNegative prompt: Tiny-Emb, lowres\n" in text
    assert f'TI hashes: "tiny-emb: {short}"' in text


def test_embedding_folders_are_walked_bounded(job: Any, plugins: Any, kit: Path,
                                             tmp_path: Path) -> None:
    """Issue 12: an embeddings folder holding a link loop and a link to /proc is listed in
    bounded time (the core's walker), and the embedding in it is still found."""
    import shutil
    import threading

    folder = tmp_path / "models" / "embeddings"
    folder.mkdir(parents=True)
    shutil.copy(kit / "embeddings" / "tiny-emb.safetensors", folder / "loop-emb.safetensors")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "proc").symlink_to("/proc", target_is_directory=True)
    path = job('  - name: a\n    prompt: "a loop-emb house"\n', dirs=(tmp_path / "models",))
    found: list[Task] = []
    worker = threading.Thread(target=lambda: found.extend(resolve(path, plugins)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "walking the embeddings folder did not end"
    assert embeddings_of(found[0]) == ["embedding:loop-emb"]
